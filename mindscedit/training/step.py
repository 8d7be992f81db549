"""One jitted training step: forward, backward over the trainable weights only, optimizer update.

mindone's TrainStep supplies the data-parallel gradient reducer, loss scaling, global norm
clipping and gradient accumulation. Without accumulation the step here runs branch-free: a step
whose gradients are not finite is skipped by gating the optimizer's writes rather than by an
`if`, so the compiled graph has no control flow and MindSpore's compile cache can store it
(see compile_cache.py). With accumulation mindone's own step (with its branches) runs.

The branch-free step also handles the gradients in one pass: a single sum of squares gives the
global norm and the finiteness check, unscaling and clipping become one scalar factor, and the
optimizer applies that factor inside its per-weight update (clipping done here, not by
mindone's clipper). Per weight the graph then holds a handful of nodes for the whole update
(compile time), and no clipped or unscaled copy of the gradients is ever written (memory).

Both steps take the learning rate of the step as their last input and set the optimizer's from
it: the schedule is computed by the loop, so the compiled step is the same for any run length.
With an EMA of the weights (ema.py) the input before it is the step's EMA decay, likewise
computed by the loop; the average moves only when the optimizer applied an update.
"""
import os
from typing import List, Optional

import mindspore as ms
from mindspore import ops
from mindspore.amp import DynamicLossScaler, all_finite
from mindspore.ops import composite as C
from .. import runtime  # noqa: F401  (first: it imports mindone's noisy module quietly)
from mindone.diffusers.optimization import get_scheduler
from mindone.diffusers.training_utils import TrainStep

from .ema import EMAWeights


class SkipNonFiniteSteps(DynamicLossScaler):
    """Loss scale fixed at 1 (fp32, bf16) that still skips updates whose gradients are not finite.

    mindone's GradScaler skips a step only under a DynamicLossScaler; this one never rescales.
    """

    def __init__(self):
        super().__init__(scale_value=1.0, scale_factor=2, scale_window=1)

    def adjust(self, grads_finite):
        return True


def make_loss_scaler(mixed_precision: str, init_scale: float = 2.0**16, scale_window: int = 2000):
    """fp16 needs dynamic loss scaling; fp32 and bf16 only the non-finite guard."""
    if mixed_precision == "fp16":
        return DynamicLossScaler(scale_value=init_scale, scale_factor=2, scale_window=scale_window)
    return SkipNonFiniteSteps()


def lr_schedule(learning_rate: float, lr_scheduler: str, lr_warmup_steps: int, max_train_steps: int) -> List[float]:
    """The learning rate of every optimizer step (diffusers' schedule names)."""
    return get_scheduler(
        lr_scheduler, lr=learning_rate, num_warmup_steps=lr_warmup_steps, num_training_steps=max_train_steps
    )


_square_sum = C.MultitypeFuncGraph("square_sum")


@_square_sum.register("Tensor")
def _square_sum_of(grad):
    return ops.reduce_sum(ops.square(grad.astype(ms.float32)))


class DiffusionTrainStep(TrainStep):
    """mindone's step (with gradient accumulation) on the loss network; returns (loss for logging,
    loss as seen by backward)."""

    branch_free = False

    def __init__(self, *args, ema=None, **kwargs):
        super().__init__(*args, **kwargs)
        # A plain attribute, so the compile cache key tells a dynamic scaler's graph from a fixed one's.
        self.loss_scaler_kind = type(self.grad_scaler.loss_scaler).__name__
        self.ema = ema  # an EMAWeights of the optimizer's parameters, or None
        self.step_inputs = 1 if ema is None else 2  # after the network's: (EMA decay,) learning rate

    def construct(self, *inputs):
        """inputs: the network's, then (with an EMA) this step's EMA decay, then its learning rate."""
        self.set_learning_rate(inputs[-1])
        outputs = super().construct(*inputs[:-self.step_inputs])
        if self.ema is None:
            return outputs
        # The optimizer ran on this micro-step only if it ended an accumulation window with finite gradients.
        applied = ops.logical_and(self.grad_accumulator.sync_gradients, self.grad_scaler.all_finite)
        return ops.depend(outputs, self.ema(self.parameters, inputs[-2], ops.depend(applied, outputs)))

    def set_learning_rate(self, learning_rate):
        return ops.assign(self.optimizer.learning_rate, learning_rate.astype(ms.float32).reshape(()))

    def loss_scaler_state(self) -> dict:
        """The loss scaler's tensors by checkpoint key."""
        scaler = self.grad_scaler.loss_scaler
        return {"loss_scaler/scale_value": scaler.scale_value, "loss_scaler/counter": scaler.counter}

    def forward(self, *inputs):
        loss = self.model(*inputs)
        return self.scale_loss(loss), loss


OVERFLOW_CHECKS = ("norm", "status")


def default_overflow_check() -> str:
    """How a step tells that its gradients overflowed, for the device the context is set to.

    "status": MindSpore's `amp.all_finite`. On 910A, and on 910B in saturation mode, fp16
    overflow saturates instead of giving inf, so only the chip's float-status register (which
    all_finite reads there) sees it; elsewhere it runs AllFinite or a per-gradient isfinite.
    "norm": the sum of squares the step computes anyway is not finite. Enough where overflow
    gives inf/nan (CPU), and one node instead of one per gradient (compile time on CPU).
    """
    return "status" if ms.get_context("device_target") == "Ascend" else "norm"


class BranchFreeTrainStep(DiffusionTrainStep):
    """The same step without accumulation and without control flow: a step whose gradients are
    not finite runs the optimizer with its writes gated off.

    Gradients count as not finite when the overflow check says so (default_overflow_check), or
    when the sum of their squares is not: a NaN or inf anywhere, or loss-scaled gradients so
    large that the sum overflows fp32 (for fp16 training that is an overflow the loss scaler
    should back off from anyway). Clipping is MindSpore's clip_by_global_norm on the unscaled
    gradients: g * max_norm / max(norm, max_norm).

    The step counts skipped steps on the device (`skipped_steps` in all, `nonfinite_run` in a
    row), so the loop can read them every few steps instead of syncing with the device each step.
    """

    branch_free = True

    def __init__(self, *args, overflow_check: Optional[str] = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.overflow_check = overflow_check or default_overflow_check()
        if self.overflow_check not in OVERFLOW_CHECKS:
            raise ValueError(f"overflow_check must be one of {OVERFLOW_CHECKS}, got {self.overflow_check!r}")
        self.max_grad_norm = self.grad_clipper.max_grad_norm  # None: no clipping
        self.square_sums = C.HyperMap()
        # mindone keeps the loss scaler's state and the finiteness flag on plain objects, outside
        # the cell tree. A graph loaded from the compile cache binds only the cell's own
        # parameters; the others get memory that is not the Python parameter's: a garbage loss
        # scale then silently skips steps and `all_finite` never reaches Python. As attributes
        # they are bound.
        scaler = self.grad_scaler.loss_scaler
        self.loss_scale_value, self.all_finite = scaler.scale_value, self.grad_scaler.all_finite
        if isinstance(scaler, DynamicLossScaler):
            self.loss_scale_counter = scaler.counter
        self.skipped_steps = ms.Parameter(ms.Tensor(0, ms.int32), name="skipped_steps", requires_grad=False)
        self.nonfinite_run = ms.Parameter(ms.Tensor(0, ms.int32), name="nonfinite_run", requires_grad=False)

    def construct(self, *inputs):
        """inputs: the network's, then (with an EMA) this step's EMA decay, then its learning rate."""
        self.set_learning_rate(inputs[-1])
        outputs, grads = self.forward_and_backward(*inputs[:-self.step_inputs])
        grads = self.grad_accumulator.grad_reducer(grads)  # data-parallel mean; identity on one card
        squared_norm = ops.addn(self.square_sums(_square_sum, grads))  # of the loss-scaled gradients
        finite = ops.isfinite(squared_norm)
        if self.overflow_check == "status":
            finite = ops.logical_and(finite, all_finite(grads))
        scale = self.grad_scaler.loss_scaler.scale_value.astype(ms.float32).reshape(())
        grad_factor = 1.0 / scale
        if self.max_grad_norm is not None:
            norm = ops.sqrt(squared_norm) / scale
            grad_factor = grad_factor * self.max_grad_norm / ops.maximum(norm, self.max_grad_norm)
        ops.assign(self.grad_scaler.all_finite, finite)
        not_finite = ops.logical_not(finite).astype(ms.int32)
        ops.assign_add(self.skipped_steps, not_finite)
        ops.assign(self.nonfinite_run, (self.nonfinite_run + 1) * not_finite)
        updated = self.optimizer(grads, finite, grad_factor)
        outputs = ops.depend(outputs, updated)
        if self.ema is not None:  # after the optimizer's writes: the average follows the updated weights
            outputs = ops.depend(outputs, self.ema(self.parameters, inputs[-2], ops.depend(finite, updated)))
        outputs = ops.depend(outputs, self.grad_scaler.loss_scaler.adjust(finite))
        return (self.unscale_loss(outputs[0]),) + outputs[1:]


def build_train_step(
    network,
    optimizer,
    mixed_precision: str = "no",
    max_grad_norm: Optional[float] = None,
    gradient_accumulation_steps: int = 1,
    jit_level: Optional[str] = None,
    overflow_check: Optional[str] = None,
    use_ema: bool = False,
) -> DiffusionTrainStep:
    """use_ema: keep an EMA of the optimizer's parameters (the step then takes the EMA decay as an input)."""
    extra = {"ema": EMAWeights(optimizer.parameters) if use_ema else None}
    if gradient_accumulation_steps == 1:
        step_class, extra = BranchFreeTrainStep, dict(extra, overflow_check=overflow_check)
    else:
        step_class = DiffusionTrainStep  # mindone's step checks overflow with amp.all_finite itself
    step = step_class(
        network,
        optimizer,
        loss_scaler=make_loss_scaler(mixed_precision),
        max_grad_norm=max_grad_norm,
        gradient_accumulation_steps=gradient_accumulation_steps,
        # The sampler is endless: accumulate by count, never by end of epoch.
        gradient_accumulation_kwargs={"sync_with_dataloader": False},
        **extra,
    )
    if jit_level:
        step.set_jit_config(ms.JitConfig(jit_level=jit_level))
    return step.set_train()


def compile_front_end(cell, inputs) -> None:
    """Parse, type-infer and optimise `cell`'s graph for `inputs` without building kernels or
    running it (MindSpore's precompile-only mode). This is the check of a precision the device
    has no kernels for (bf16 on CPU): a dtype mismatch raises TypeError here, while a missing
    kernel would only show up later, in the backend."""
    previous = os.environ.get("MS_DEV_PRECOMPILE_ONLY")
    os.environ["MS_DEV_PRECOMPILE_ONLY"] = "1"
    try:
        cell.compile(*inputs)
    finally:
        if previous is None:
            del os.environ["MS_DEV_PRECOMPILE_ONLY"]
        else:
            os.environ["MS_DEV_PRECOMPILE_ONLY"] = previous
