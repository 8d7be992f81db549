"""Model families: how a pipeline turns prompts and images into the UNet's inputs.

What differs between Stable Diffusion 1.x/2.x and later pipelines lives here, not in the
training loop, the sampler or the tuners:

- the prompt: tokenizers, text encoders, which hidden state conditions the UNet, a pooled output;
- added conditions the UNet takes besides the text (none for SD1.x/2.x, so none here yet);
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
from mindspore import nn

from ..errors import ModelFolderError
from .text import PromptTokenizer


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


class StableDiffusion:
    """SD1.x and SD2.x: one CLIP tokenizer and text encoder, no added conditions."""

    name = "sd"
    subfolders = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
    text_encoders = ("text_encoder",)

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


FAMILIES = {family.name: family for family in (StableDiffusion,)}


def detect_family(path: str):
    """The family of a diffusers folder, from model_index.json and the UNet's config."""
    with open(os.path.join(path, "model_index.json")) as f:
        index = json.load(f)
    unet_config = os.path.join(path, "unet", "config.json")
    added = None
    if os.path.isfile(unet_config):
        with open(unet_config) as f:
            added = json.load(f).get("addition_embed_type")
    pipeline = index.get("_class_name", "")
    if "text_encoder_2" in index or added is not None or "XL" in pipeline:
        raise ModelFolderError(f"{path} is an SDXL-style pipeline ({pipeline or 'addition_embed_type ' + str(added)}); "
                               "this version trains and samples SD1.x/2.x folders")
    return StableDiffusion
