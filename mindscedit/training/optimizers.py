"""Optimizers the training step can run, and what each keeps between steps.

An optimizer here is a MindSpore Optimizer with two additions the rest of the package relies on:

- `construct(gradients, apply, grad_factor)`: the branch-free step's gate. When `apply` is
  False nothing may change (weights, state, step count); `grad_factor` is a scalar every
  gradient is multiplied by first (loss-scale unscaling and clipping, folded into one factor).
- `state_slots()` / `scalar_state()`: the tensors that make up its state, by name, so that
  checkpoints save and restore them without knowing which optimizer wrote them.
- `learning_rate`: one scalar Parameter, which the training step sets from its last input before
  every update. The schedule lives in the loop, not in the graph: a table of per-step rates in
  the optimizer would make the compiled step depend on the run's length, and a resumed run with
  more steps would compile it again instead of loading it from the compile cache.

Weights come in `ParamGroup`s: the method's weights first, then any others the run trains
(pivotal tuning's new token embeddings) with their own learning rate, a fixed multiple of the
schedule's, and weight decay. `set_group_lr_scale` changes a group's multiple between steps
without recompiling (0 stops a group: its weights, and its state, stay exactly as they are); a
run of one group compiles to the same graph as before groups existed.

A new optimizer is a class with those, a builder that reads its settings from the training
config (and, if some settings do not suit it, a check of them), and one entry in OPTIMIZERS. AdamW is here; Prodigy, longer, in prodigy.py.
"""
from dataclasses import dataclass
from typing import Callable, Dict, Sequence

import mindspore as ms
from mindspore import ops
from mindspore.ops import composite as C
from mindspore.ops import functional as F
from mindone.trainers.adamw_mf import AdamW

from .param_groups import GroupScales, ParamGroup, as_groups, flatten_groups
from .prodigy import check_prodigy_settings, prodigy_from_config



_fused_adamw = C.MultitypeFuncGraph("fused_adamw")
_adam_weight_decay = ops.AdamWeightDecay()


@_fused_adamw.register("Tensor", "Tensor", "Tensor", "Tensor", "Tensor", "Tensor", "Tensor", "Tensor", "Tensor",
                       "Tensor", "Tensor")
def _fused_adamw_update(apply, grad_factor, lr, beta1, beta2, eps, decay, param, grad, exp_avg, exp_avg_sq):
    """One fused kernel per parameter on grad * grad_factor (a scalar: no broadcast index, see
    models/cpu_rewrites.py); a gated-off step feeds it a zero gradient, so a non-finite gradient
    never reaches the moments."""
    grad = grad.astype(ms.float32) * grad_factor
    grad = ops.select(ops.broadcast_to(apply, grad.shape), grad, ops.zeros_like(grad))
    return _adam_weight_decay(param, exp_avg, exp_avg_sq, lr, beta1, beta2, eps, decay, grad)


_fused_adamw_per_weight = C.MultitypeFuncGraph("fused_adamw_per_weight")


@_fused_adamw_per_weight.register("Tensor", "Tensor", "Tensor", "Tensor", "Tensor", "Tensor", "Tensor", "Tensor",
                                  "Tensor", "Tensor", "Tensor")
def _fused_adamw_update_per_weight(grad_factor, beta1, beta2, eps, apply, lr, decay, param, grad, exp_avg, exp_avg_sq):
    """As _fused_adamw_update, gated per weight: a weight of a group at lr 0 keeps its moments too."""
    one = ms.Tensor(1.0, ms.float32)
    return _fused_adamw_update(apply, grad_factor, lr, ops.select(apply, beta1, one), ops.select(apply, beta2, one),
                               eps, decay, param, grad, exp_avg, exp_avg_sq)


class GatedAdamW(AdamW, GroupScales):
    """mindone's AdamW (bias-corrected, decoupled decay, as torch.optim.AdamW) with an `apply`
    flag: when it is False the weights, moments and step count all stay as they were.

    The update runs as MindSpore's fused AdamWeightDecay kernel, one node per parameter instead of
    some twenty, which matters for compile time when every UNet weight trains. That kernel has no
    bias correction, so torch's is folded into its scalars: with c1 = 1 - beta1^t and
    c2 = 1 - beta2^t, lr' = lr * sqrt(c2) / c1, eps' = eps * sqrt(c2), decay' = decay * c1 / sqrt(c2)
    give w - lr' * (m / (sqrt(v) + eps') + decay' * w), which is torch's
    w * (1 - lr * decay) - lr / c1 * m / (sqrt(v / c2) + eps). A gated-off step runs the kernel with
    lr' = 0 and both betas 1, which leaves w, m and v exactly as they were. `grad_factor` scales
    every gradient first (the branch-free step's unscaling and clipping). With several groups, each
    weight gets its group's lr' and decay' (the same kernel); a group at lr 0 stays as it was.
    """

    def __init__(self, groups: Sequence[ParamGroup], learning_rate, betas, eps, weight_decay):
        super().__init__(flatten_groups(groups), learning_rate=learning_rate, betas=betas, eps=eps,
                         weight_decay=weight_decay)
        self.init_groups(groups, weight_decay)

    def construct(self, gradients, apply=True, grad_factor=1.0):
        apply = ops.logical_and(ms.Tensor(True), apply)  # a bool Tensor whether given a constant or not
        grad_factor = ops.cast(grad_factor, ms.float32).reshape(())
        beta1, beta2 = self.beta1.reshape(()), self.beta2.reshape(())
        step = (self.global_step + 1).astype(ms.float32).reshape(())
        correction1 = 1.0 - ops.pow(beta1, step)
        sqrt_correction2 = ops.sqrt(1.0 - ops.pow(beta2, step))
        one, zero = ms.Tensor(1.0, ms.float32), ms.Tensor(0.0, ms.float32)
        lr = ops.select(apply, self.get_lr().reshape(()) * sqrt_correction2 / correction1, zero)
        gated_beta1, gated_beta2 = ops.select(apply, beta1, one), ops.select(apply, beta2, one)
        eps = self.eps.reshape(()) * sqrt_correction2
        if self.num_groups == 1:  # a constant of the graph: one group compiles to one lr and decay
            updates = self.hyper_map(
                F.partial(_fused_adamw, apply, grad_factor, lr, gated_beta1, gated_beta2, eps,
                          self.weight_decay * correction1 / sqrt_correction2),
                self._parameters, self.flatten_gradients(gradients), self.exp_avg, self.exp_avg_sq,
            )
        else:
            decay_factor = correction1 / sqrt_correction2
            scales = self.per_weight_lr_scales()
            applies = tuple(ops.logical_and(apply, scale > 0) for scale in scales)
            lrs = tuple(lr * scale for scale in scales)
            decays = tuple(decay_factor * decay for decay in self.param_decays)
            updates = self.hyper_map(
                F.partial(_fused_adamw_per_weight, grad_factor, beta1, beta2, eps),
                applies, lrs, decays, self._parameters, self.flatten_gradients(gradients), self.exp_avg,
                self.exp_avg_sq,
            )
        ops.assign_add(self.global_step, apply.astype(self.global_step.dtype))
        return updates

    def state_slots(self) -> Dict[str, Sequence[ms.Parameter]]:
        """Per-weight state, one list per slot in the order of `self.parameters`. The slot names
        are the checkpoint keys' prefixes (`adam_m/<weight path>`)."""
        return {"adam_m": self.exp_avg, "adam_v": self.exp_avg_sq}

    def scalar_state(self) -> Dict[str, ms.Parameter]:
        return {"optimizer/global_step": self.global_step}


def adamw(params, learning_rate: float, beta1: float = 0.9, beta2: float = 0.999,
          eps: float = 1e-8, weight_decay: float = 1e-2) -> GatedAdamW:
    """AdamW (decoupled weight decay, bias-corrected, as torch.optim.AdamW) on weights or ParamGroups;
    `learning_rate` is the first step's (the step sets each step's, see the module docstring)."""
    return GatedAdamW(as_groups(params), learning_rate=float(learning_rate), betas=(beta1, beta2), eps=eps,
                      weight_decay=weight_decay)


def _adamw_from_config(params, learning_rate, config) -> GatedAdamW:
    return adamw(params, learning_rate, config.adam_beta1, config.adam_beta2, config.adam_epsilon,
                 config.adam_weight_decay)


@dataclass(frozen=True)
class OptimizerEntry:
    build: Callable  # (trainable weights or ParamGroups, first learning rate, training config) -> optimizer
    check: Callable = lambda config: None  # raises UserError (one line) for settings it cannot run with


OPTIMIZERS: Dict[str, OptimizerEntry] = {
    "adamw": OptimizerEntry(_adamw_from_config),
    "prodigy": OptimizerEntry(prodigy_from_config, check_prodigy_settings),
}


def build_optimizer(name: str, params, learning_rate: float, config):
    return OPTIMIZERS[name].build(as_groups(params), learning_rate, config)


def check_optimizer_settings(config) -> None:
    OPTIMIZERS[config.optimizer].check(config)
