"""Model families: how a pipeline turns prompts and images into the UNet's inputs.

What differs between Stable Diffusion 1.x/2.x and later pipelines lives here, not in the
training loop, the sampler or the tuners:

- the prompt: tokenizers, text encoders, which hidden state conditions the UNet, a pooled output;
- added conditions the UNet takes besides the text: `added_conditions` names the keys of the
  UNet's `added_cond_kwargs` (none for SD1.x/2.x; SDXL's `text_embeds` and `time_ids`), the
  first `prompt_conditions` of them returned by the prompt encoder after the hidden states, the
  rest (`size_conditions`) computed per image from its size and crop (`size_condition_values`);
- the latent space: the VAE's scaling factor, and `latents_mean` / `latents_std` when its
  config has them (z = (x - mean) * scaling_factor / std);
- the noise schedule the UNet was trained on: `"ddpm"` (betas over 1000 steps; the samplers of
  SD1.x/2.x and SDXL) or `"edm"` (sigmas, Karras et al.; Playground v2.5), and the sampler
  `sample` uses by default.

A family is detected from the model folder (model_index.json and the UNet's config). The
training network, validation, `sample` and the CSC-Tuner's controlled forward all take their
prompt encoder and latent scaling from the family of the loaded pipeline.
"""
import json
import os

import numpy as np
import mindspore as ms
from mindspore import nn, ops

from ..errors import ModelFolderError
from .text import PromptTokenizer, PromptTokenizers
from .time_ids import time_ids


class LatentScaling(nn.Cell):
    """VAE latents <-> the UNet's latents: z = (x - mean) * scaling_factor / std, where mean and
    std (per channel) come from the VAE config when it has them (0 and 1 otherwise)."""

    def __init__(self, vae_config):
        super().__init__(auto_prefix=False)
        self.scaling_factor = float(vae_config.scaling_factor)
        mean = getattr(vae_config, "latents_mean", None)
        std = getattr(vae_config, "latents_std", None)
        self.has_statistics = mean is not None and std is not None
        if self.has_statistics:
            self.latents_mean = ms.Tensor(np.asarray(mean, np.float32).reshape(1, -1, 1, 1))
            self.latents_std = ms.Tensor(np.asarray(std, np.float32).reshape(1, -1, 1, 1))

    def to_model(self, latents):
        if self.has_statistics:
            return (latents - self.latents_mean) * self.scaling_factor / self.latents_std
        return latents * self.scaling_factor

    def from_model(self, latents):
        if self.has_statistics:
            return latents * self.latents_std / self.scaling_factor + self.latents_mean
        return latents / self.scaling_factor


class AddedConditions(nn.Cell):
    """The values of a family's added conditions, in `family.added_conditions` order -> the UNet's
    `added_cond_kwargs` in `dtype` (None for a family without them, as the UNet's default).

    One Cell for the sampler's denoiser and the training network: neither names a condition,
    so a family with other conditions needs no change there.
    """

    def __init__(self, family, dtype=ms.float32):
        super().__init__(auto_prefix=False)
        self.keys = tuple(family.added_conditions)
        self.dtype = dtype

    def construct(self, values):
        if not self.keys:
            return None
        # Item by item: dict(zip(...)) compiles through the Python fallback, whose result has no
        # static shapes for the UNet's text_time embedding to reshape with.
        kwargs = {}
        for i in range(len(self.keys)):
            kwargs[self.keys[i]] = values[i].astype(self.dtype)
        return kwargs


class CLIPPromptEncoder(nn.Cell):
    """token ids [B, L] -> the text encoder's last hidden states [B, L, D] (SD1.x/2.x).

    auto_prefix=False: wrapping an encoder that another graph also holds renames none of its
    parameters.
    """

    def __init__(self, text_encoder):
        super().__init__(auto_prefix=False)
        self.text_encoder = text_encoder

    def construct(self, input_ids):
        return self.text_encoder(input_ids)[0]


class SDXLPromptEncoder(nn.Cell):
    """token ids [B, 2, L] (one row per tokenizer) -> (encoder_hidden_states [B, L, D1 + D2],
    text_embeds [B, P]), as StableDiffusionXLPipeline.encode_prompt computes them: both encoders'
    penultimate hidden states concatenated on the last axis, and the second encoder's projected
    pooled output.

    The pooled output is taken here, at the first end-of-text token: CLIP configs with
    `eos_token_id` 2 (SD's and SDXL's) make the encoder pool at the largest token id, which is a
    new token as soon as pivotal tuning adds one (diffusers #10754). Without new tokens both
    positions are the same, the end-of-text token being the vocabulary's last."""

    def __init__(self, text_encoder, text_encoder_2, eos_token_id: int):
        super().__init__(auto_prefix=False)
        self.text_encoder = text_encoder
        self.text_encoder_2 = text_encoder_2
        self.eos_token_id = int(eos_token_id)

    def construct(self, input_ids):
        first = self.text_encoder(input_ids[:, 0], output_hidden_states=True)[-1][-2]
        second_ids = input_ids[:, 1]
        second = self.text_encoder_2(second_ids, output_hidden_states=True)
        hidden_states = ops.concat((first, second[-1][-2]), axis=-1)
        is_eos = (second_ids == self.eos_token_id).astype(ms.int32)
        at_eos = ops.one_hot(ops.argmax(is_eos, -1), second_ids.shape[1], ms.Tensor(1.0, ms.float32),
                             ms.Tensor(0.0, ms.float32))  # the first end-of-text token of each row
        last_hidden_state = second[1]
        pooled = (last_hidden_state * ops.expand_dims(at_eos.astype(last_hidden_state.dtype), -1)).sum(axis=1)
        return hidden_states, self.text_encoder_2.text_projection(pooled)


class StableDiffusion:
    """SD1.x and SD2.x: one CLIP tokenizer and text encoder, no added conditions."""

    name = "sd"
    diffusers_pipeline = "StableDiffusionPipeline"  # the pipeline class PyTorch users load it with
    subfolders = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
    text_encoders = ("text_encoder",)
    tokenizers = ("tokenizer",)
    added_conditions = ()  # the prompt encoder returns encoder_hidden_states only
    prompt_conditions = ()
    size_conditions = ()
    noise_schedule = "ddpm"
    default_scheduler = "ddim"
    prompt_length = 77  # tokens per prompt: CLIP's context, what the tokenizers pad to

    @staticmethod
    def size_condition_values(original_size, crop_top_left, target_size) -> tuple:
        """The `size_conditions` of one image, one float32 array each: none here."""
        return ()

    @staticmethod
    def zeros_for_empty_negative_prompt(components) -> bool:
        """Guidance without a negative prompt runs on the encoded "" (StableDiffusionPipeline)."""
        return False

    @staticmethod
    def vae_dtype(vae_config, dtype):
        """The VAE's dtype in a run of `dtype`: the run's."""
        return dtype

    @staticmethod
    def stand_in_added_values(unet_config, batch_size: int, resolution: int, rng) -> tuple:
        """Random values of the added conditions for a UNet step without a text encoder (the
        benchmark): none here."""
        return ()

    @staticmethod
    def prompt_tokenizer(components) -> PromptTokenizer:
        return PromptTokenizer(components.tokenizer, components.rewrite_prompt)

    @staticmethod
    def prompt_encoder(components) -> nn.Cell:
        """A Cell: the step's token ids -> the UNet's encoder_hidden_states."""
        return CLIPPromptEncoder(components.text_encoder)

    @staticmethod
    def latent_scaling(vae) -> LatentScaling:
        return LatentScaling(vae.config)


class SDXL:
    """SDXL: two CLIP tokenizers and text encoders (the second with a projection), and the added
    `text_time` conditions: the pooled prompt (`text_embeds`) and six size and crop `time_ids`.

    The prompt tokenizer gives [2, L] token ids per sample (one row per tokenizer), the prompt
    encoder a tuple (encoder_hidden_states, text_embeds); `size_condition_values` gives one
    image's `time_ids` [6], `add_time_ids` a batch's [B, 6]."""

    name = "sdxl"
    diffusers_pipeline = "StableDiffusionXLPipeline"
    subfolders = StableDiffusion.subfolders + ("text_encoder_2", "tokenizer_2")
    text_encoders = ("text_encoder", "text_encoder_2")
    tokenizers = ("tokenizer", "tokenizer_2")
    prompt_conditions = ("text_embeds",)
    size_conditions = ("time_ids",)
    added_conditions = prompt_conditions + size_conditions
    noise_schedule = "ddpm"
    default_scheduler = "euler"  # the EulerDiscreteScheduler SDXL base ships with
    prompt_length = StableDiffusion.prompt_length  # both encoders are CLIP's

    @staticmethod
    def size_condition_values(original_size, crop_top_left, target_size) -> tuple:
        """(time_ids,): float32 [6] for one image, from (h, w), (top, left) and (h, w)."""
        return (time_ids(original_size, crop_top_left, target_size)[0],)

    @staticmethod
    def zeros_for_empty_negative_prompt(components) -> bool:
        """StableDiffusionXLPipeline guides an absent negative prompt with zero embeddings (hidden
        states and pooled) when its config says force_zeros_for_empty_prompt, its default."""
        return bool((components.pipeline_config or {}).get("force_zeros_for_empty_prompt", True))

    @staticmethod
    def vae_dtype(vae_config, dtype):
        """fp32 in an fp16 run when the VAE's config says force_upcast (its default): SDXL's VAE
        overflows in fp16, and its pipeline and diffusers' SDXL training scripts keep it in fp32
        (a VAE fixed for fp16, force_upcast false, runs in fp16)."""
        if dtype == ms.float16 and getattr(vae_config, "force_upcast", True):
            return ms.float32
        return dtype

    @staticmethod
    def stand_in_added_values(unet_config, batch_size: int, resolution: int, rng) -> tuple:
        """(text_embeds, time_ids) for a UNet step without the text encoders (the benchmark): a
        random pooled prompt of the width the UNet's text_time embedding takes besides the six time
        ids, and the time ids of an uncropped square image at `resolution`."""
        pooled = unet_config.projection_class_embeddings_input_dim - 6 * unet_config.addition_time_embed_dim
        size = (resolution, resolution)
        ids = np.tile(time_ids(size, (0, 0), size), (batch_size, 1))
        return (rng.standard_normal((batch_size, pooled), dtype=np.float32), ids)

    @staticmethod
    def prompt_tokenizer(components) -> PromptTokenizers:
        return PromptTokenizers([components.tokenizer, components.tokenizer_2], components.rewrite_prompt)

    @staticmethod
    def prompt_encoder(components) -> nn.Cell:
        """A Cell: the step's token ids [B, 2, L] -> (encoder_hidden_states, text_embeds)."""
        return SDXLPromptEncoder(components.text_encoder, components.text_encoder_2,
                                 components.tokenizer_2.eos_token_id)

    @staticmethod
    def latent_scaling(vae) -> LatentScaling:
        return LatentScaling(vae.config)

    @staticmethod
    def add_time_ids(original_size, crop_top_left, target_size) -> ms.Tensor:
        """The UNet's `time_ids` [B, 6] float32: original (h, w), crop top-left (y, x), target
        (h, w); each a pair for the batch or [B, 2] per sample (models/time_ids.py)."""
        return ms.Tensor(time_ids(original_size, crop_top_left, target_size))


class Playground(SDXL):
    """Playground v2.5-style: an SDXL pipeline trained on the EDM noise schedule (its scheduler
    config is an EDM one, sigma_data 0.5, sigmas 0.002-80) whose VAE normalises latents with
    per-channel `latents_mean` / `latents_std` (LatentScaling reads them from the VAE config)."""

    name = "playground"
    noise_schedule = "edm"
    default_scheduler = "edm_dpm++_2m"  # EDMDPMSolverMultistepScheduler, as Playground v2.5 ships


FAMILIES = {family.name: family for family in (StableDiffusion, SDXL, Playground)}
EDM_SCHEDULER_PREFIX = "EDM"  # mindone.diffusers' EDMEulerScheduler, EDMDPMSolverMultistepScheduler


def family_of_unet(unet_config):
    """The family a UNet config alone implies (a preset without a pipeline folder): SDXL for the
    text_time added embedding, Stable Diffusion without one."""
    return SDXL if getattr(unet_config, "addition_embed_type", None) == "text_time" else StableDiffusion


def detect_family(path: str):
    """The family of a diffusers folder, from model_index.json and the UNet's config; fails in
    one line when the folder lacks a subfolder the family needs or has added conditions no family
    here knows."""
    from .loading import check_model_folder

    check_model_folder(path, ())
    with open(os.path.join(path, "model_index.json")) as f:
        index = json.load(f)
    unet_config = os.path.join(path, "unet", "config.json")
    added = None
    if os.path.isfile(unet_config):
        with open(unet_config) as f:
            added = json.load(f).get("addition_embed_type")
    pipeline = index.get("_class_name", "")
    if added not in (None, "text_time"):
        raise ModelFolderError(f"{path}: the UNet's addition_embed_type '{added}' ({pipeline or 'no pipeline class'}) "
                               "is not supported; supported: none (SD1.x/2.x) and text_time (SDXL)")
    family = SDXL if "text_encoder_2" in index or added == "text_time" or "XL" in pipeline else StableDiffusion
    for sub in family.subfolders:
        if not os.path.isdir(os.path.join(path, sub)):
            raise ModelFolderError(f"model folder {path} has no '{sub}/' subfolder")
    if family is SDXL and _scheduler_class(path).startswith(EDM_SCHEDULER_PREFIX):
        return Playground
    return family


def _scheduler_class(path: str) -> str:
    """The `_class_name` of the folder's scheduler config ("" when it has none or is unreadable:
    loading reports that in its own words)."""
    config = os.path.join(path, "scheduler", "scheduler_config.json")
    try:
        with open(config) as f:
            return str(json.load(f).get("_class_name", ""))
    except (OSError, ValueError):
        return ""


def trains_edm_style(path: str) -> bool:
    """Whether the folder's scheduler is an EDM one (Playground, or any family whose folder ships
    EDMEuler / EDM DPM-Solver): its runs train EDM-style whatever do_edm_style_training says."""
    detect_family(path)  # a folder that is not a model folder fails here, in its own words
    return _scheduler_class(path).startswith(EDM_SCHEDULER_PREFIX)
