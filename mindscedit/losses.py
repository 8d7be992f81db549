"""The denoising loss: MSE against the scheduler's target, with optional Min-SNR-gamma weights."""
from typing import Optional

import numpy as np
import mindspore as ms
from mindspore import nn, ops


def snr_from_alphas_cumprod(alphas_cumprod: np.ndarray) -> np.ndarray:
    """SNR(t) = alpha_bar_t / (1 - alpha_bar_t) for every training timestep."""
    alphas_cumprod = np.asarray(alphas_cumprod, dtype=np.float64)
    return alphas_cumprod / (1.0 - alphas_cumprod)


def min_snr_weight_table(alphas_cumprod: np.ndarray, gamma: float, prediction_type: str) -> np.ndarray:
    """Min-SNR-gamma loss weight per timestep (Hang et al. 2023).

    epsilon target: min(SNR, gamma) / SNR; v target: min(SNR, gamma) / (SNR + 1).
    """
    snr = snr_from_alphas_cumprod(alphas_cumprod)
    clipped = np.minimum(snr, gamma)
    if prediction_type == "epsilon":
        weight = clipped / snr
    elif prediction_type == "v_prediction":
        weight = clipped / (snr + 1.0)
    else:
        raise ValueError(f"unsupported prediction_type '{prediction_type}' (epsilon or v_prediction)")
    return weight.astype(np.float32)


class DiffusionLoss(nn.Cell):
    """Adds noise to clean latents, and scores a model prediction against the right target.

    Schedule values are looked up per sample from tables built once from the scheduler's
    alphas_cumprod, so the graph holds no Python-side state that changes between steps.
    """

    def __init__(self, alphas_cumprod: np.ndarray, prediction_type: str, snr_gamma: Optional[float] = None):
        super().__init__()
        if prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(f"unsupported prediction_type '{prediction_type}' (epsilon or v_prediction)")
        alphas_cumprod = np.asarray(alphas_cumprod, dtype=np.float64)
        self.prediction_type = prediction_type
        self.sqrt_alpha = ms.Tensor(np.sqrt(alphas_cumprod).astype(np.float32))
        self.sqrt_one_minus_alpha = ms.Tensor(np.sqrt(1.0 - alphas_cumprod).astype(np.float32))
        self.use_snr_weights = snr_gamma is not None
        if self.use_snr_weights:
            self.snr_weights = ms.Tensor(min_snr_weight_table(alphas_cumprod, snr_gamma, prediction_type))

    def _per_sample(self, table: ms.Tensor, timesteps: ms.Tensor) -> ms.Tensor:
        return ops.gather(table, timesteps, 0).reshape(-1, 1, 1, 1)

    def add_noise(self, latents, noise, timesteps):
        return self._per_sample(self.sqrt_alpha, timesteps) * latents + self._per_sample(
            self.sqrt_one_minus_alpha, timesteps
        ) * noise

    def target(self, latents, noise, timesteps):
        if self.prediction_type == "epsilon":
            return noise
        # v = sqrt(alpha_bar) * eps - sqrt(1 - alpha_bar) * x0
        return self._per_sample(self.sqrt_alpha, timesteps) * noise - self._per_sample(
            self.sqrt_one_minus_alpha, timesteps
        ) * latents

    def construct(self, model_pred, latents, noise, timesteps):
        target = self.target(latents, noise, timesteps)
        error = ops.square(model_pred.astype(ms.float32) - target.astype(ms.float32))
        per_sample = error.mean(axis=(1, 2, 3))
        if self.use_snr_weights:
            per_sample = per_sample * ops.gather(self.snr_weights, timesteps, 0)
        return per_sample.mean()
