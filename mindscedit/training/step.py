"""One jitted training step: forward, backward over the trainable weights only, optimizer update.

mindone's TrainStep supplies gradient accumulation, the data-parallel gradient reducer, global
norm clipping and loss scaling with overflow skipping; this module picks the loss scaler and
the optimizer for a run.
"""
from typing import List, Optional

import mindspore as ms
from mindspore.amp import DynamicLossScaler
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


def make_optimizer(
    params: List[ms.Parameter],
    lrs: List[float],
    adam_beta1: float = 0.9,
    adam_beta2: float = 0.999,
    adam_epsilon: float = 1e-8,
    adam_weight_decay: float = 1e-2,
):
    """AdamW (decoupled weight decay, bias-corrected, as torch.optim.AdamW) on a per-step LR list."""
    return AdamW(params, learning_rate=lrs, betas=(adam_beta1, adam_beta2), eps=adam_epsilon, weight_decay=adam_weight_decay)


class DiffusionTrainStep(TrainStep):
    """Calls the loss network; returns (loss for logging, loss as seen by backward)."""

    def forward(self, *inputs):
        loss = self.model(*inputs)
        return self.scale_loss(loss), loss


def build_train_step(
    network,
    optimizer,
    mixed_precision: str = "no",
    max_grad_norm: Optional[float] = None,
    gradient_accumulation_steps: int = 1,
    jit_level: Optional[str] = None,
) -> DiffusionTrainStep:
    step = DiffusionTrainStep(
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
