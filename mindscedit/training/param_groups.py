"""Groups of trained weights with their own learning rate and weight decay (optimizers.py)."""
from dataclasses import dataclass
from typing import List, Optional, Sequence

import mindspore as ms


@dataclass
class ParamGroup:
    """Weights trained at `lr_ratio` x the schedule's learning rate, with their own weight decay (None: the
    optimizer's)."""
    params: List[ms.Parameter]
    lr_ratio: float = 1.0
    weight_decay: Optional[float] = None
    name: str = "weights"


class GroupScales:
    """Per-group learning-rate multiples of an optimizer, as one Parameter (set between steps, read in the
    graph) and each weight's group index (a constant of the graph)."""

    def init_groups(self, groups: Sequence[ParamGroup], default_decay: float) -> None:
        self.num_groups = len(groups)
        self.group_names = [g.name for g in groups]
        self.group_of = tuple(i for i, g in enumerate(groups) for _ in g.params)
        self.param_decays = tuple(float(default_decay if g.weight_decay is None else g.weight_decay)
                                  for g in groups for _ in g.params)
        self.host_lr_scales = [float(g.lr_ratio) for g in groups]  # read without waiting for the device
        self.lr_scales = ms.Parameter(ms.Tensor(self.host_lr_scales, ms.float32),
                                      name="optimizer_group_lr_scales", requires_grad=False)

    def per_weight_lr_scales(self) -> tuple:
        return tuple(self.lr_scales[i] for i in self.group_of)

    def set_group_lr_scale(self, index: int, value: float) -> None:
        """Group `index` trains at `value` x the schedule's rate from the next step on (0: not at all)."""
        if self.host_lr_scales[index] != value:
            self.host_lr_scales[index] = float(value)
            self.lr_scales.set_data(ms.Tensor(self.host_lr_scales, ms.float32))


def flatten_groups(groups) -> List[ms.Parameter]:
    return [p for g in groups for p in g.params]


def as_groups(params) -> List[ParamGroup]:
    """A list of weights is one group; a list of ParamGroups stays as it is."""
    params = list(params)
    if params and all(isinstance(p, ParamGroup) for p in params):
        return params
    return [ParamGroup(params)]
