"""The denoising losses of a training step.

DiffusionLoss: DDPM's (noise the latents at a discrete timestep, MSE against the noise or v),
with optional Min-SNR-gamma weights. EDMLoss: EDM-style training (Karras et al. 2022, as
diffusers' `--do_edm_style_training`): noise at a sigma, precondition the UNet's input and
output, MSE of the denoised latents against the clean ones.

Both share one interface with the training network: `add_noise(latents, noise, timesteps)`,
`unet_inputs(noisy, timesteps)` -> (the UNet's sample, its timestep), and the loss
`(model_pred, latents, noise, timesteps, noisy)`, where `timesteps` are the host-drawn integer
indices in [0, num_train_timesteps).
"""
from typing import Optional, Tuple

import numpy as np
import mindspore as ms
from mindspore import nn, ops


def _check_prediction_type(prediction_type: str) -> None:
    if prediction_type not in ("epsilon", "v_prediction"):
        raise ValueError(f"unsupported prediction_type '{prediction_type}' (epsilon or v_prediction)")


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


class _PerSampleLoss(nn.Cell):
    """The reduction both losses share: the mean of the per-sample losses, or with DreamBooth's
    prior preservation (`prior_split` = (instance samples n, prior_loss_weight w)) the mean over
    the first n samples plus w times the mean over the rest (the class images)."""

    def __init__(self, prior_split: Optional[Tuple[int, float]] = None):
        super().__init__()
        self.split = prior_split is not None
        self.num_instance, self.prior_loss_weight = prior_split if self.split else (0, 0.0)

    def reduce(self, per_sample):
        if self.split:
            n = self.num_instance
            return per_sample[:n].mean() + self.prior_loss_weight * per_sample[n:].mean()
        return per_sample.mean()


class DiffusionLoss(_PerSampleLoss):
    """Adds noise to clean latents, and scores a model prediction against the right target.

    Schedule values are looked up per sample from tables built once from the scheduler's
    alphas_cumprod, so the graph holds no Python-side state that changes between steps.
    """

    def __init__(self, alphas_cumprod: np.ndarray, prediction_type: str, snr_gamma: Optional[float] = None,
                 prior_split: Optional[Tuple[int, float]] = None):
        super().__init__(prior_split)
        _check_prediction_type(prediction_type)
        alphas_cumprod = np.asarray(alphas_cumprod, dtype=np.float64)
        self.num_train_timesteps = len(alphas_cumprod)
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

    def unet_inputs(self, noisy, timesteps):
        return noisy, timesteps

    def target(self, latents, noise, timesteps):
        if self.prediction_type == "epsilon":
            return noise
        # v = sqrt(alpha_bar) * eps - sqrt(1 - alpha_bar) * x0
        return self._per_sample(self.sqrt_alpha, timesteps) * noise - self._per_sample(
            self.sqrt_one_minus_alpha, timesteps
        ) * latents

    def construct(self, model_pred, latents, noise, timesteps, noisy=None):
        target = self.target(latents, noise, timesteps)
        error = ops.square(model_pred.astype(ms.float32) - target.astype(ms.float32))
        per_sample = error.mean(axis=(1, 2, 3))
        if self.use_snr_weights:
            per_sample = per_sample * ops.gather(self.snr_weights, timesteps, 0)
        return self.reduce(per_sample)


def edm_preconditioning(sigmas: np.ndarray, prediction_type: str, sigma_data: Optional[float] = None) -> dict:
    """Per-sigma float64 tables {c_in, c_skip, c_out, weight} of EDM-style training.

    With `sigma_data` (an EDM scheduler, Karras et al. 2022 table 1): c_in = 1/sqrt(s² + sd²),
    c_skip = sd²/(s² + sd²), c_out = ±s·sd/sqrt(s² + sd²) (minus for v), unweighted. Without (a
    discrete schedule run through Euler's sigmas, as diffusers does it): c_in = 1/sqrt(s² + 1);
    epsilon: D = x - s·F; v: D = x/(s² + 1) - s·F/sqrt(s² + 1); weight s^-2. In both the denoised
    latents are D = c_skip·x_sigma + c_out·F.
    """
    _check_prediction_type(prediction_type)
    s = np.asarray(sigmas, dtype=np.float64)
    sign = -1.0 if prediction_type == "v_prediction" else 1.0
    if sigma_data is not None:
        total = s**2 + sigma_data**2
        return dict(c_in=1.0 / np.sqrt(total), c_skip=sigma_data**2 / total, c_out=sign * s * sigma_data / np.sqrt(total),
                    weight=np.ones_like(s))
    c_in = 1.0 / np.sqrt(s**2 + 1.0)
    if prediction_type == "epsilon":
        c_skip, c_out = np.ones_like(s), -s
    else:
        c_skip, c_out = 1.0 / (s**2 + 1.0), -s * c_in
    return dict(c_in=c_in, c_skip=c_skip, c_out=c_out, weight=s**-2.0)


class EDMLoss(_PerSampleLoss):
    """EDM-style training: x_sigma = x0 + sigma·noise, the UNet sees c_in·x_sigma at its timestep
    value for that sigma (c_noise of an EDM scheduler, the discrete timestep otherwise), the
    denoised D = c_skip·x_sigma + c_out·F is scored against x0 with the sigma's weight.

    `sigmas[i]` and `unet_timesteps[i]` belong to index i; the step draws indices uniformly, as
    diffusers draws from its scheduler's timesteps. Min-SNR is not defined here (a config with
    both is refused before this is built).
    """

    def __init__(self, sigmas: np.ndarray, unet_timesteps: np.ndarray, prediction_type: str,
                 sigma_data: Optional[float] = None, prior_split: Optional[Tuple[int, float]] = None):
        super().__init__(prior_split)
        tables = edm_preconditioning(sigmas, prediction_type, sigma_data)
        self.num_train_timesteps = len(sigmas)
        self.sigma = ms.Tensor(np.asarray(sigmas, np.float32))
        self.unet_timesteps = ms.Tensor(np.asarray(unet_timesteps, np.float32))
        self.c_in, self.c_skip, self.c_out, self.weight = (ms.Tensor(tables[k].astype(np.float32))
                                                           for k in ("c_in", "c_skip", "c_out", "weight"))

    @classmethod
    def from_alphas_cumprod(cls, alphas_cumprod: np.ndarray, prediction_type: str,
                            prior_split: Optional[Tuple[int, float]] = None) -> "EDMLoss":
        """A discrete (DDPM-trained) schedule: sigma_t = sqrt((1 - a_t) / a_t), the UNet's timestep t."""
        alphas_cumprod = np.asarray(alphas_cumprod, dtype=np.float64)
        sigmas = np.sqrt((1.0 - alphas_cumprod) / alphas_cumprod)
        return cls(sigmas, np.arange(len(sigmas), dtype=np.float64), prediction_type, prior_split=prior_split)

    def _per_sample(self, table, timesteps):
        return ops.gather(table, timesteps, 0).reshape(-1, 1, 1, 1)

    def add_noise(self, latents, noise, timesteps):
        return latents + self._per_sample(self.sigma, timesteps) * noise

    def unet_inputs(self, noisy, timesteps):
        return self._per_sample(self.c_in, timesteps) * noisy, ops.gather(self.unet_timesteps, timesteps, 0)

    def construct(self, model_pred, latents, noise, timesteps, noisy=None):
        denoised = (self._per_sample(self.c_skip, timesteps) * noisy
                    + self._per_sample(self.c_out, timesteps) * model_pred.astype(ms.float32))
        per_sample = ops.square(denoised - latents.astype(ms.float32)).mean(axis=(1, 2, 3))
        return self.reduce(per_sample * ops.gather(self.weight, timesteps, 0))


def training_loss(noise_scheduler, prediction_type: str, snr_gamma: Optional[float] = None,
                  edm_style: bool = False, prior_split: Optional[Tuple[int, float]] = None) -> nn.Cell:
    """The loss of a run from its noise scheduler: DDPM's, or EDM-style on the scheduler's sigmas
    (an EDM scheduler, with sigmas and sigma_data, trains EDM-style whatever `edm_style` says).
    prior_split: (instance samples per batch, prior_loss_weight) with prior preservation."""
    config = noise_scheduler.config
    if hasattr(config, "sigma_data"):  # EDMEulerScheduler, EDMDPMSolverMultistepScheduler
        sigmas = noise_scheduler.sigmas.asnumpy()[:-1]  # the trailing 0 is the sampler's end point
        return EDMLoss(sigmas, noise_scheduler.timesteps.asnumpy(), prediction_type, float(config.sigma_data),
                       prior_split)
    alphas_cumprod = noise_scheduler.alphas_cumprod.asnumpy()
    if edm_style:
        return EDMLoss.from_alphas_cumprod(alphas_cumprod, prediction_type, prior_split)
    return DiffusionLoss(alphas_cumprod, prediction_type, snr_gamma, prior_split)
