"""Text-to-image sampling on PipelineComponents: prompt encoding (the model family's), the guided denoising loop, VAE decode.

Each network call is a Cell compiled once and reused: the text encoder sees one prompt at a
time (1 x 77 ids), the denoiser the same latent batch at every step with the timestep and the
guidance scale passed as Tensors, the decoder the final latents. The scheduler's own update
(mindone.diffusers) runs on the host between denoiser calls.

A family with added conditions (SDXL) passes them to the denoiser as inputs after the guidance
scale, in `family.added_conditions` order: the prompt encoder's pooled output and the time ids
of the requested size (original = target = (height, width), crop (0, 0), as
StableDiffusionXLPipeline uses by default); a family without them passes none and the UNet gets
its default added_cond_kwargs, None.

The Cells are built with auto_prefix=False so that wrapping a UNet that a training graph also
holds does not rename its parameters: sampling between training steps leaves the training
graph exactly as it was compiled. Repeated blocks share their compiled graph
(models/graph_sharing.py).
"""
import sys
from typing import List, Optional, Sequence, Union

import numpy as np
import mindspore as ms
from mindspore import nn, ops
from PIL import Image
from tqdm.auto import tqdm

from ..errors import NonFiniteSamples, UserError
from ..models.family import AddedConditions
from ..models.graph_sharing import share_repeated_blocks
from .schedulers import make_scheduler


class _Denoiser(nn.Cell):
    """The UNet, or a ControlledUNet. Its extra inputs come last: the values of the family's
    added conditions, unpacked (none for SD1.x/2.x), then, with CSC-Tuners, control =
    (condition images, per-condition scales, control_scale)."""

    def __init__(self, unet, controlled, family):
        super().__init__(auto_prefix=False)
        self.use_control = controlled is not None
        self.unet = controlled if self.use_control else unet
        self.dtype = unet.dtype
        self.added_cond_kwargs = AddedConditions(family, unet.dtype)
        self.num_added = len(family.added_conditions)
        # The tuple of condition images as a variable: MindSpore otherwise takes a tuple input of
        # the top-level graph for a constant and compiles the graph again for every new tensor in
        # it, i.e. at every sampler call. (The added conditions come unpacked: a broadened empty
        # tuple fails at run time.)
        self.enable_tuple_broaden = True

    def predict(self, x, timestep, embeddings, added, control):
        x, embeddings = x.astype(self.dtype), embeddings.astype(self.dtype)
        added_cond_kwargs = self.added_cond_kwargs(added)
        if self.use_control:
            conditions, scales, control_scale = control
            return self.unet(x, timestep, embeddings, conditions, scales, control_scale,
                             added_cond_kwargs).astype(ms.float32)
        return self.unet(x, timestep, embeddings, added_cond_kwargs=added_cond_kwargs,
                         return_dict=False)[0].astype(ms.float32)


class GuidedDenoiser(_Denoiser):
    """Classifier-free guidance in one UNet call on [uncond; cond]: u + g * (c - u). `embeddings`
    and `added` hold both halves already ([uncond; cond] along the batch)."""

    def construct(self, latents, timestep, embeddings, guidance_scale, *inputs):
        added, control = inputs[:self.num_added], inputs[self.num_added:]
        if self.use_control:  # both halves of the batch see the condition
            conditions, scales, control_scale = control
            control = (tuple(ops.cat((c, c), axis=0) for c in conditions), scales, control_scale)
        pred = self.predict(ops.cat((latents, latents), axis=0), timestep, embeddings, added, control)
        uncond, cond = ops.chunk(pred, 2, axis=0)
        return uncond + guidance_scale * (cond - uncond)


class CondDenoiser(_Denoiser):
    """No guidance (guidance_scale <= 1): the UNet on the conditional batch only."""

    def construct(self, latents, timestep, embeddings, *inputs):
        return self.predict(latents, timestep, embeddings, inputs[:self.num_added], inputs[self.num_added:])


class VaeDecoder(nn.Cell):
    """latents -> images in [0, 1], NCHW float32 (the latent scaling of the model family undone first)."""

    def __init__(self, vae, latent_scaling):
        super().__init__(auto_prefix=False)
        self.vae = vae
        self.latent_scaling = latent_scaling
        self.dtype = vae.dtype

    def construct(self, latents):
        image = self.vae.decode(self.latent_scaling.from_model(latents).astype(self.dtype))[0]
        return ops.clamp(image.astype(ms.float32) / 2 + 0.5, 0.0, 1.0)


def _repeat(x: ms.Tensor, n: int) -> ms.Tensor:
    """x [1, ...] -> [n, ...]."""
    return x.tile((n,) + (1,) * (x.ndim - 1))


def to_pil(images: np.ndarray) -> List[Image.Image]:
    """[N, 3, H, W] floats in [0, 1] -> RGB uint8 images."""
    pixels = np.round(images.transpose(0, 2, 3, 1) * 255).astype(np.uint8)
    return [Image.fromarray(p) for p in pixels]


class Sampler:
    """Text-to-image with classifier-free guidance on PipelineComponents (plain, SC-Tuner or LoRA UNet).

    `scheduler` is one of mindscedit.sampling.SCHEDULERS for the model's noise schedule (default:
    its family's, e.g. SDXL's Euler) and may be changed between calls without recompiling. Image k of every prompt starts from numpy default_rng(seed + k), and the
    stochastic schedulers draw that image's noise from the same generator, so an image depends
    only on its prompt and its own seed.
    """

    def __init__(self, components, scheduler: Optional[str] = None, controlled=None):
        family = components.family
        self.components = components
        self.scheduler = scheduler or family.default_scheduler
        self.controlled = controlled  # a ControlledUNet with CSC-Tuners, for control_images
        self.make_scheduler()  # fail early on a bad name, or one for another noise schedule
        unet = components.unet if controlled is None else controlled
        for network in (unet, components.vae, *components.text_encoders):
            share_repeated_blocks(network)  # the networks are final here (adapters loaded)
        self.tokenize = family.prompt_tokenizer(components)
        self.text_encoder = family.prompt_encoder(components)
        self.guided_denoiser = GuidedDenoiser(components.unet, controlled, family)
        self.cond_denoiser = CondDenoiser(components.unet, controlled, family)
        self.decoder = VaeDecoder(components.vae, family.latent_scaling(components.vae))

    def make_scheduler(self):
        comps = self.components
        return make_scheduler(self.scheduler, comps.noise_scheduler.config, comps.family.noise_schedule)

    def encode(self, prompt: str):
        """(encoder_hidden_states [1, L, D], the prompt's added conditions: a tuple of [1, ...])."""
        encoded = self.text_encoder(ms.Tensor(self.tokenize(prompt)[None]))
        if not self.components.family.prompt_conditions:
            return encoded, ()
        return encoded[0], tuple(encoded[1:])

    def encode_negative(self, negative_prompt: Optional[str], encoded_prompt):
        """The unconditional half of guidance: the encoded negative prompt, or zeros shaped as
        `encoded_prompt` (an encode() result) where the family's pipeline guides an absent one
        with zero embeddings (SDXL's force_zeros_for_empty_prompt)."""
        if negative_prompt or not self.components.family.zeros_for_empty_negative_prompt(self.components):
            return self.encode(negative_prompt or "")
        hidden_states, added = encoded_prompt
        return ops.zeros_like(hidden_states), tuple(ops.zeros_like(value) for value in added)

    def text_conditions(self, prompts, negative_prompt, per_prompt: int, guided: bool, height: int, width: int):
        """(encoder_hidden_states, added condition values) of the whole batch, prompt by prompt
        with `per_prompt` images each; with guidance, the unconditional half first."""
        encoded = [self.encode(p) for p in prompts]
        hidden_states = ops.cat([_repeat(h, per_prompt) for h, _ in encoded], axis=0)
        prompt_added = [ops.cat([_repeat(a[i], per_prompt) for _, a in encoded], axis=0)
                        for i in range(len(encoded[0][1]))]
        batch = len(prompts) * per_prompt
        size_added = [_repeat(ms.Tensor(value[None]), batch) for value in
                      self.components.family.size_condition_values((height, width), (0, 0), (height, width))]
        if guided:
            uncond_hidden, uncond_added = self.encode_negative(negative_prompt, encoded[0])
            hidden_states = ops.cat((_repeat(uncond_hidden, batch), hidden_states), axis=0)
            prompt_added = [ops.cat((_repeat(u, batch), c), axis=0) for u, c in zip(uncond_added, prompt_added)]
            size_added = [ops.cat((v, v), axis=0) for v in size_added]  # the same size ids for both halves
        return hidden_states, tuple(prompt_added) + tuple(size_added)

    def __call__(
        self,
        prompts: Union[str, Sequence[str]],
        negative_prompt: Optional[str] = None,
        num_inference_steps: int = 25,
        guidance_scale: float = 7.5,
        seed: int = 0,
        height: Optional[int] = None,
        width: Optional[int] = None,
        num_images_per_prompt: int = 1,
        progress: bool = True,
        control_images: Optional[Sequence[np.ndarray]] = None,
        control_scales: Optional[Sequence[float]] = None,
        control_scale: float = 1.0,
    ) -> List[Image.Image]:
        """Images in prompt order, num_images_per_prompt each; image.info holds prompt, seed and settings.

        With CSC-Tuners (`controlled`), control_images holds one condition per tuner (float32
        [3, height, width] in [0, 1]), control_scales its strength (default 1 each) and
        control_scale the overall strength (0: the uncontrolled model exactly).
        """
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        latents, seeds = self.sample_latents(
            prompts, negative_prompt, num_inference_steps, guidance_scale, seed, height, width,
            num_images_per_prompt, progress, control_images, control_scales, control_scale,
        )
        self._check_finite(latents.asnumpy(), prompts, seeds, num_images_per_prompt)
        images = to_pil(self.decoder(latents).asnumpy())
        settings = {
            "negative_prompt": negative_prompt or "",
            "steps": str(num_inference_steps),
            "guidance_scale": str(guidance_scale),
            "scheduler": self.scheduler,
            "size": f"{images[0].width}x{images[0].height}",
        }
        for n, image in enumerate(images):
            image.info.update(prompt=prompts[n // num_images_per_prompt], seed=str(seeds[n]), **settings)
        return images

    @staticmethod
    def _check_finite(latents: np.ndarray, prompts, seeds, per_prompt: int) -> None:
        """Non-finite latents decode to black images: report them instead of returning those."""
        bad = [n for n in range(len(latents)) if not np.isfinite(latents[n]).all()]
        if bad:
            n = bad[0]
            raise NonFiniteSamples(f"sampling gave non-finite latents for {len(bad)} of {len(latents)} images (first: prompt "
                            f"{prompts[n // per_prompt]!r}, seed {seeds[n]}); no image was written. In fp16 try "
                            "--mixed_precision no; otherwise check the weights loaded")

    def control_inputs(self, control_images, control_scales, control_scale, batch: int, height: int, width: int):
        """The ControlledUNet's extra inputs for a batch, or () without CSC-Tuners."""
        if self.controlled is None:
            if control_images:
                raise UserError("control images need CSC-Tuners (--csc_tuner)")
            return ()
        names = self.controlled.names
        if not control_images or len(control_images) != len(names):
            raise UserError(f"give one control image per CSC-Tuner ({', '.join(names)})")
        conditions = []
        for name, image in zip(names, control_images):
            if tuple(image.shape) != (3, height, width):
                raise UserError(f"control image for '{name}' is {tuple(image.shape)}, expected (3, {height}, {width})")
            conditions.append(ms.Tensor(np.repeat(image[None].astype(np.float32), batch, axis=0)))
        scales = list(control_scales) if control_scales else [1.0] * len(names)
        if len(scales) != len(names):
            raise UserError(f"give one control scale per CSC-Tuner ({', '.join(names)})")
        return tuple(conditions), ms.Tensor(scales, ms.float32), ms.Tensor(control_scale, ms.float32)

    def sample_latents(
        self, prompts, negative_prompt, num_inference_steps, guidance_scale, seed, height, width,
        num_images_per_prompt, progress=True, control_images=None, control_scales=None, control_scale=1.0,
    ):
        """The denoising loop: (final latents [N, C, h, w], seed of each image)."""
        comps = self.components
        factor = comps.vae_scale_factor
        height = height or comps.unet.config.sample_size * factor
        width = width or comps.unet.config.sample_size * factor
        if not prompts:
            raise UserError("no prompt given")
        if height % factor or width % factor:
            raise UserError(f"height and width must be multiples of {factor}, got {height}x{width}")
        if num_inference_steps < 1 or num_images_per_prompt < 1:
            raise UserError("num_inference_steps and num_images_per_prompt must be >= 1")

        k = num_images_per_prompt
        seeds = [seed + i for _ in prompts for i in range(k)]
        guided = guidance_scale > 1.0
        embeddings, added = self.text_conditions(prompts, negative_prompt, k, guided, height, width)
        guidance = ms.Tensor(guidance_scale, ms.float32)

        control = self.control_inputs(control_images, control_scales, control_scale, len(seeds), height, width)
        scheduler = self.make_scheduler()
        scheduler.set_timesteps(num_inference_steps)
        generators = [np.random.default_rng(s) for s in seeds]
        shape = (comps.unet.config.in_channels, height // factor, width // factor)
        latents = np.stack([g.standard_normal(shape, dtype=np.float32) for g in generators])
        latents = ms.Tensor(latents * float(scheduler.init_noise_sigma), ms.float32)

        for t in tqdm(scheduler.timesteps, desc="sample", disable=not (progress and sys.stderr.isatty()), leave=False):
            model_input = scheduler.scale_model_input(latents, t).astype(ms.float32)
            timestep = ms.Tensor([float(t)], ms.float32)  # same dtype and shape at every step and scheduler
            if guided:
                pred = self.guided_denoiser(model_input, timestep, embeddings, guidance, *added, *control)
            else:
                pred = self.cond_denoiser(model_input, timestep, embeddings, *added, *control)
            latents = scheduler.step(pred, t, latents, generator=generators, return_dict=False)[0].astype(ms.float32)

        return latents, seeds
