"""Model families: how a pipeline turns prompts and images into the UNet's inputs.

What differs between Stable Diffusion 1.x/2.x and later pipelines lives here, not in the
training loop, the sampler or the tuners:

- the prompt: tokenizers, text encoders, which hidden state conditions the UNet, a pooled output;
- added conditions the UNet takes besides the text: `added_conditions` names the keys of the
  UNet's `added_cond_kwargs` (none for SD1.x/2.x; SDXL's `text_embeds` and `time_ids`);
- the latent space: the VAE's scaling factor, and `latents_mean` / `latents_std` when its
  config has them (z = (x - mean) * scaling_factor / std).

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
    pooled output."""

    def __init__(self, text_encoder, text_encoder_2):
        super().__init__(auto_prefix=False)
        self.text_encoder = text_encoder
        self.text_encoder_2 = text_encoder_2

    def construct(self, input_ids):
        first = self.text_encoder(input_ids[:, 0], output_hidden_states=True)[-1][-2]
        second = self.text_encoder_2(input_ids[:, 1], output_hidden_states=True)
        hidden_states = ops.concat((first, second[-1][-2]), axis=-1)
        return hidden_states, second[0]


class StableDiffusion:
    """SD1.x and SD2.x: one CLIP tokenizer and text encoder, no added conditions."""

    name = "sd"
    subfolders = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
    text_encoders = ("text_encoder",)
    tokenizers = ("tokenizer",)
    added_conditions = ()  # the prompt encoder returns encoder_hidden_states only

    @staticmethod
    def prompt_tokenizer(components) -> PromptTokenizer:
        return PromptTokenizer(components.tokenizer)

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
    encoder a tuple (encoder_hidden_states, text_embeds); `add_time_ids` gives `time_ids`."""

    name = "sdxl"
    subfolders = StableDiffusion.subfolders + ("text_encoder_2", "tokenizer_2")
    text_encoders = ("text_encoder", "text_encoder_2")
    tokenizers = ("tokenizer", "tokenizer_2")
    added_conditions = ("text_embeds", "time_ids")

    @staticmethod
    def prompt_tokenizer(components) -> PromptTokenizers:
        return PromptTokenizers([components.tokenizer, components.tokenizer_2])

    @staticmethod
    def prompt_encoder(components) -> nn.Cell:
        """A Cell: the step's token ids [B, 2, L] -> (encoder_hidden_states, text_embeds)."""
        return SDXLPromptEncoder(components.text_encoder, components.text_encoder_2)

    @staticmethod
    def latent_scaling(vae) -> LatentScaling:
        return LatentScaling(vae.config)

    @staticmethod
    def add_time_ids(original_size, crop_top_left, target_size) -> ms.Tensor:
        """The UNet's `time_ids` [B, 6] float32: original (h, w), crop top-left (y, x), target
        (h, w); each a pair for the batch or [B, 2] per sample (models/time_ids.py)."""
        return ms.Tensor(time_ids(original_size, crop_top_left, target_size))


FAMILIES = {family.name: family for family in (StableDiffusion, SDXL)}


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
    return family


def refuse_added_conditions(path: str, purpose: str) -> None:
    """One line for a folder whose family takes added conditions (SDXL): it loads and encodes
    prompts, but `purpose` (training, sampling) does not pass them to the UNet yet."""
    family = detect_family(path)
    if family.added_conditions:
        raise ModelFolderError(f"{path} is an {family.__name__} pipeline; {purpose} supports SD1.x/2.x folders so far")
