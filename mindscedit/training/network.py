"""The forward pass of one training step: frozen VAE and text encoder, the UNet, the loss."""
import mindspore as ms
from mindspore import nn, ops

from ..losses import DiffusionLoss


class LatentTrainNet(nn.Cell):
    """latents, text embeddings and host-drawn noise/timesteps -> loss: the UNet half of a step.

    With a ControlledUNet (CSC-Tuner training, or the ControlNet baseline of the benchmark) the
    step takes a condition image [B, 3, H, W] in [0, 1] too. The benchmark times this Cell
    alone, as PyTorch reference measurements time the UNet step alone.
    """

    def __init__(self, unet, loss: DiffusionLoss, controlled_unet=None):
        super().__init__()
        self.use_control = controlled_unet is not None
        self.unet = controlled_unet if self.use_control else unet
        self.loss = loss
        self.unet_dtype = unet.dtype
        if self.use_control:
            self.control_scales = ms.Tensor([1.0], ms.float32)
            self.control_scale = ms.Tensor(1.0, ms.float32)

    def construct(self, latents, encoder_hidden_states, noise, timesteps, condition=None):
        noisy_latents = self.loss.add_noise(latents, noise, timesteps).astype(self.unet_dtype)
        encoder_hidden_states = encoder_hidden_states.astype(self.unet_dtype)
        if self.use_control:
            model_pred = self.unet(noisy_latents, timesteps, encoder_hidden_states, (condition,),
                                   self.control_scales, self.control_scale)
        else:
            model_pred = self.unet(noisy_latents, timesteps, encoder_hidden_states, return_dict=False)[0]
        return self.loss(model_pred, latents, noise, timesteps)


class LatentDiffusionTrainNet(nn.Cell):
    """pixels, token ids and host-drawn randomness (, condition) -> scalar loss.

    The prompt encoder and the latent scaling come from the model family (models/family.py).
    All randomness (VAE posterior noise, diffusion noise, timesteps) comes in as inputs, drawn on
    the host from a generator seeded by (seed, micro-step). Steps are then reproducible
    across resumes and independent of graph-side RNG state.
    """

    def __init__(self, unet, vae, prompt_encoder, latent_scaling, loss: DiffusionLoss, controlled_unet=None):
        super().__init__()
        self.vae = vae
        self.text_encoder = prompt_encoder
        self.latent_scaling = latent_scaling
        self.denoise = LatentTrainNet(unet, loss, controlled_unet)
        self.vae_dtype = vae.dtype

    def encode_latents(self, pixel_values, latent_eps):
        moments = self.vae.encode(pixel_values.astype(self.vae_dtype))[0]
        mean, logvar = ops.chunk(moments.astype(ms.float32), 2, axis=1)
        std = ops.exp(0.5 * ops.clamp(logvar, -30.0, 20.0))
        return ops.stop_gradient(self.latent_scaling.to_model(mean + std * latent_eps))

    def construct(self, pixel_values, input_ids, latent_eps, noise, timesteps, condition=None):
        latents = self.encode_latents(pixel_values, latent_eps)
        encoder_hidden_states = ops.stop_gradient(self.text_encoder(input_ids))
        return self.denoise(latents, encoder_hidden_states, noise, timesteps, condition)
