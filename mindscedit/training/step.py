"""One jitted training step: forward, backward over the trainable weights only, optimizer update.

mindone's TrainStep supplies the data-parallel gradient reducer, global norm clipping, loss
scaling and gradient accumulation. Without accumulation the step here runs branch-free: a step
whose gradients are not finite is skipped by gating the optimizer's writes rather than by an
`if`, so the compiled graph has no control flow and MindSpore's compile cache can store it
(see compile_cache.py). With accumulation mindone's own step (with its branches) runs.
"""
from typing import List, Optional

import mindspore as ms
from mindspore import ops
from mindspore.amp import DynamicLossScaler, all_finite
from mindspore.ops import composite as C
from mindspore.ops import functional as F
from mindone.diffusers.optimization import get_scheduler
from mindone.diffusers.training_utils import TrainStep
from mindone.trainers.adamw_mf import AdamW


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


_gated_adamw = C.MultitypeFuncGraph("gated_adamw")


def _where_applied(apply, new, old):
    """`new` where the step applies, else `old` (explicit broadcast: see models/fast_layers.py)."""
    return ops.select(ops.broadcast_to(apply, old.shape), new, old)


@_gated_adamw.register("Tensor", "Tensor", "Tensor", "Tensor", "Tensor", "Tensor", "Tensor",
                       "Tensor", "Tensor", "Tensor", "Tensor")
def _gated_adamw_update(apply, beta1, beta2, eps, step, lr, weight_decay, param, grad, exp_avg, exp_avg_sq):
    """torch.optim.AdamW's update of one parameter, written only where `apply` is True."""
    grad = grad.astype(ms.float32)
    weight = param.astype(ms.float32)
    new_avg = exp_avg * beta1 + grad * (1.0 - beta1)
    new_avg_sq = exp_avg_sq * beta2 + grad * grad * (1.0 - beta2)
    step_size = lr / (1.0 - ops.pow(beta1, step))
    denom = ops.sqrt(new_avg_sq / (1.0 - ops.pow(beta2, step))) + eps
    new_weight = weight * (1.0 - lr * weight_decay) - new_avg / denom * step_size
    ops.assign(exp_avg, _where_applied(apply, new_avg, exp_avg))
    ops.assign(exp_avg_sq, _where_applied(apply, new_avg_sq, exp_avg_sq))
    return ops.assign(param, _where_applied(apply, new_weight.astype(param.dtype), param))


class GatedAdamW(AdamW):
    """mindone's AdamW (bias-corrected, decoupled decay) with an `apply` flag: when it is False
    the weights, moments, step count and learning-rate position all stay as they were."""

    def construct(self, gradients, apply=True):
        apply = ops.logical_and(ms.Tensor(True), apply)  # a bool Tensor whether given a constant or not
        lr = self.get_lr()
        step = (self.global_step + 1).astype(ms.float32)
        updates = self.hyper_map(
            F.partial(_gated_adamw, apply, self.beta1, self.beta2, self.eps, step, lr, self.weight_decay),
            self._parameters, self.flatten_gradients(gradients), self.exp_avg, self.exp_avg_sq,
        )
        ops.assign_add(self.global_step, apply.astype(self.global_step.dtype))
        return updates


def make_optimizer(
    params: List[ms.Parameter],
    lrs: List[float],
    adam_beta1: float = 0.9,
    adam_beta2: float = 0.999,
    adam_epsilon: float = 1e-8,
    adam_weight_decay: float = 1e-2,
):
    """AdamW (decoupled weight decay, bias-corrected, as torch.optim.AdamW) on a per-step LR list."""
    return GatedAdamW(params, learning_rate=lrs, betas=(adam_beta1, adam_beta2), eps=adam_epsilon, weight_decay=adam_weight_decay)


class DiffusionTrainStep(TrainStep):
    """mindone's step (with gradient accumulation) on the loss network; returns (loss for logging,
    loss as seen by backward)."""

    branch_free = False

    def forward(self, *inputs):
        loss = self.model(*inputs)
        return self.scale_loss(loss), loss


class BranchFreeTrainStep(DiffusionTrainStep):
    """The same step without accumulation and without control flow: a step whose gradients are
    not finite runs the optimizer with its writes gated off."""

    branch_free = True

    def construct(self, *inputs):
        outputs, grads = self.forward_and_backward(*inputs)
        grads = self.grad_accumulator.grad_reducer(grads)  # data-parallel mean; identity on one card
        grads = self.grad_scaler.unscale(grads)
        grads = self.grad_clipper.clip_grad_norm(grads)
        finite = all_finite(grads)
        ops.assign(self.grad_scaler.all_finite, finite)
        outputs = ops.depend(outputs, self.optimizer(grads, finite))
        outputs = ops.depend(outputs, self.grad_scaler.loss_scaler.adjust(finite))
        return (self.unscale_loss(outputs[0]),) + outputs[1:]


def build_train_step(
    network,
    optimizer,
    mixed_precision: str = "no",
    max_grad_norm: Optional[float] = None,
    gradient_accumulation_steps: int = 1,
    jit_level: Optional[str] = None,
) -> DiffusionTrainStep:
    step_class = BranchFreeTrainStep if gradient_accumulation_steps == 1 else DiffusionTrainStep
    step = step_class(
        network,
        optimizer,
        loss_scaler=make_loss_scaler(mixed_precision),
        max_grad_norm=max_grad_norm,
        gradient_accumulation_steps=gradient_accumulation_steps,
        # The sampler is endless: accumulate by count, never by end of epoch.
        gradient_accumulation_kwargs={"sync_with_dataloader": False},
    )
    if jit_level:
        step.set_jit_config(ms.JitConfig(jit_level=jit_level))
    return step.set_train()
