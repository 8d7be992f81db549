"""The forward pass of one training step: frozen VAE and text encoders, the UNet, the loss
(losses.py: DDPM's or EDM-style; the loss also noises and preconditions the UNet's input).

Both networks take their optional inputs last, in one order: the values of the model family's
added conditions first (SDXL: the pooled prompt and the time ids; none for SD1.x/2.x), then,
for a method with a condition image, that image. The family decides how many there are, so a
family with other conditions changes neither network.
"""
import mindspore as ms
from mindspore import nn, ops

from ..models.family import AddedConditions, StableDiffusion


class LatentTrainNet(nn.Cell):
    """latents, text embeddings, host-drawn noise/timesteps, the added conditions' values (, a
    condition image) -> loss: the UNet half of a step.

    With a ControlledUNet (CSC-Tuner training, or the ControlNet baseline of the benchmark) the
    step takes a condition image [B, 3, H, W] in [0, 1] last. The benchmark times this Cell
    alone, as PyTorch reference measurements time the UNet step alone.
    """

    def __init__(self, unet, loss, controlled_unet=None, family=StableDiffusion):
        super().__init__()
        self.use_control = controlled_unet is not None
        self.unet = controlled_unet if self.use_control else unet
        self.loss = loss
        self.unet_dtype = unet.dtype
        self.added_cond_kwargs = AddedConditions(family, unet.dtype)
        self.num_added = len(family.added_conditions)
        if self.use_control:
            self.control_scales = ms.Tensor([1.0], ms.float32)
            self.control_scale = ms.Tensor(1.0, ms.float32)

    def construct(self, latents, encoder_hidden_states, noise, timesteps, *extras):
        """extras: the family's added condition values, then the condition image if controlled."""
        added_cond_kwargs = self.added_cond_kwargs(extras[:self.num_added])
        noisy = self.loss.add_noise(latents, noise, timesteps)
        sample, unet_timesteps = self.loss.unet_inputs(noisy, timesteps)  # preconditioned for EDM-style training
        sample = sample.astype(self.unet_dtype)
        encoder_hidden_states = encoder_hidden_states.astype(self.unet_dtype)
        if self.use_control:
            model_pred = self.unet(sample, unet_timesteps, encoder_hidden_states, (extras[self.num_added],),
                                   self.control_scales, self.control_scale, added_cond_kwargs)
        else:
            model_pred = self.unet(sample, unet_timesteps, encoder_hidden_states,
                                   added_cond_kwargs=added_cond_kwargs, return_dict=False)[0]
        return self.loss(model_pred, latents, noise, timesteps, noisy)


class LatentDiffusionTrainNet(nn.Cell):
    """pixels, token ids, host-drawn randomness, the family's size conditions (, condition) -> loss.

    The prompt encoder and the latent scaling come from the model family (models/family.py); a
    family with prompt conditions (SDXL's pooled `text_embeds`) gets them from its prompt encoder
    after the hidden states, and its size conditions (`time_ids`) from the data.
    All randomness (VAE posterior noise, diffusion noise, timesteps) comes in as inputs, drawn on
    the host from a generator seeded by (seed, micro-step). Steps are then reproducible
    across resumes and independent of graph-side RNG state.
    """

    def __init__(self, unet, vae, prompt_encoder, latent_scaling, loss, controlled_unet=None,
                 family=StableDiffusion, trains_text=False):
        super().__init__()
        self.trains_text = trains_text  # gradients flow into the prompt encoder (pivotal tuning's token rows)
        self.vae = vae
        self.text_encoder = prompt_encoder
        self.latent_scaling = latent_scaling
        self.denoise = LatentTrainNet(unet, loss, controlled_unet, family)
        self.vae_dtype = vae.dtype
        self.encodes_conditions = bool(family.prompt_conditions)  # the prompt encoder returns a tuple

    def encode_latents(self, pixel_values, latent_eps):
        moments = self.vae.encode(pixel_values.astype(self.vae_dtype))[0]
        mean, logvar = ops.chunk(moments.astype(ms.float32), 2, axis=1)
        std = ops.exp(0.5 * ops.clamp(logvar, -30.0, 20.0))
        return ops.stop_gradient(self.latent_scaling.to_model(mean + std * latent_eps))

    def construct(self, pixel_values, input_ids, latent_eps, noise, timesteps, *extras):
        """extras: the family's size condition values, then the condition image if controlled."""
        latents = self.encode_latents(pixel_values, latent_eps)
        encoded = self.text_encoder(input_ids)
        if not self.trains_text:
            encoded = ops.stop_gradient(encoded)
        if self.encodes_conditions:
            return self.denoise(latents, encoded[0], noise, timesteps, *encoded[1:], *extras)
        return self.denoise(latents, encoded, noise, timesteps, *extras)
