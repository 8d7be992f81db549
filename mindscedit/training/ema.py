"""An exponential moving average (EMA) of the trained weights, kept by the jitted step.

The average follows diffusers' `EMAModel`: after optimizer step `k` (counted from 1, skipped
steps included, as diffusers counts `ema.step` calls) every averaged weight becomes
`decay_k * ema + (1 - decay_k) * weight` (diffusers' `ema - (1 - decay_k) * (ema - weight)`, up to
rounding), with `decay_k` from `ema_decay_at`. The decay is computed on the host and given to the
step as an input, as the learning rate is: the compiled step then does not depend on the run's
length or on the EMA settings. Written this way a decay of 0 copies the weights exactly, and a
step whose gradients are not finite runs it with (1, 0), which leaves the average bit-exact (the
weights are finite: a non-finite update never reaches them), without a per-weight select.

mindone's `EMA` cell does not fit: its decay is fixed in the graph (`decay * (1 - exp(-n/2000))`,
not diffusers' schedule), it always updates (no skipped steps) and keeps a second full copy of
the weights for swapping.
"""
from contextlib import contextmanager
from typing import Sequence

import numpy as np
import mindspore as ms
from mindspore import nn, ops
from mindspore.ops import composite as C
from mindspore.ops import functional as F


def ema_decay_at(optimization_step: int, decay: float = 0.9999, min_decay: float = 0.0, update_after_step: int = 0,
                 use_warmup: bool = False, inv_gamma: float = 1.0, power: float = 2 / 3) -> float:
    """diffusers' EMAModel.get_decay: the decay of optimizer step `optimization_step` (from 1)."""
    step = max(0, optimization_step - update_after_step - 1)
    if step <= 0:
        return 0.0
    if use_warmup:
        value = 1 - (1 + step / inv_gamma) ** -power
    else:
        value = (1 + step) / (10 + step)
    return max(min(value, decay), min_decay)


def ema_decay_from_config(config, optimization_step: int) -> float:
    return ema_decay_at(optimization_step, config.ema_decay, config.ema_min_decay, config.ema_update_after_step,
                        config.ema_use_warmup, config.ema_inv_gamma, config.ema_power)


_ema_move = C.MultitypeFuncGraph("ema_move")


@_ema_move.register("Tensor", "Tensor", "Tensor", "Tensor")
def _ema_move_one(keep, move, average, weight):
    return F.assign(average, average * keep + weight.astype(average.dtype) * move)


class EMAWeights(nn.Cell):
    """fp32 averages of `params` (initialised to their current values), in the same order.

    `construct(params, decay, apply)` moves them towards `params`; with `apply` False they stay
    exactly as they were. As a cell attribute of the step its averages are in the step's cell
    tree, which is all that a graph loaded from the compile cache binds.
    """

    def __init__(self, params: Sequence[ms.Parameter]):
        super().__init__()
        self.averages = ms.ParameterTuple(
            ms.Parameter(ms.Tensor(p.asnumpy().astype(np.float32)), name=f"ema.{p.name}", requires_grad=False)
            for p in params)
        self.hyper_map = C.HyperMap()

    def construct(self, params, decay, apply):
        decay = decay.astype(ms.float32).reshape(())
        one, zero = ops.ones_like(decay), ops.zeros_like(decay)
        keep, move = ops.select(apply, decay, one), ops.select(apply, one - decay, zero)  # scalars: 2 selects a step
        return self.hyper_map(F.partial(_ema_move, keep, move), self.averages, params)

    @contextmanager
    def swapped_in(self, params: Sequence[ms.Parameter]):
        """`params` hold the averages inside the block (to sample or save them), their own values after."""
        raw = [p.asnumpy().copy() for p in params]
        try:
            for p, average in zip(params, self.averages):
                p.set_data(ms.Tensor(average.asnumpy(), p.dtype))
            yield
        finally:
            for p, value in zip(params, raw):
                p.set_data(ms.Tensor(value, p.dtype))
