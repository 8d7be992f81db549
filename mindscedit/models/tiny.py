"""Write a tiny Stable Diffusion or SDXL pipeline (random weights) in the diffusers folder format.

Tests and the embedded demo load it through the same code path as a real SD1.5/SD2.1 or SDXL
folder.
"""
import json
import os

import numpy as np
import mindspore as ms

from .presets import (SD_SCHEDULER, SDXL_SCHEDULER, TINY_CLIP_TEXT, TINY_CLIP_TEXT_2, TINY_SDXL_TIME_DIM,
                      TINY_SDXL_UNET, TINY_UNET, TINY_VAE)

TINY_FAMILIES = ("sd", "sdxl")
SDXL_VAE_SCALING = 0.13025


def make_tiny_model(output_dir: str, prediction_type: str = "epsilon", seed: int = 0, unet_config: dict = None,
                    family: str = "sd") -> str:
    """Write the pipeline to `output_dir`; `family` is "sd" (SD1.x-like) or "sdxl"."""
    if family not in TINY_FAMILIES:
        raise ValueError(f"unknown family '{family}': choose one of {', '.join(TINY_FAMILIES)}")
    ms.set_seed(seed)
    np.random.seed(seed)
    os.makedirs(output_dir, exist_ok=True)
    writer = _write_sdxl if family == "sdxl" else _write_sd
    model_index = writer(output_dir, prediction_type, unet_config)
    with open(os.path.join(output_dir, "model_index.json"), "w") as f:
        json.dump(model_index, f, indent=2)
    return output_dir


def _write_sd(output_dir, prediction_type, unet_config) -> dict:
    from mindone.diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from mindone.transformers import CLIPTextModel

    tokenizer = _write_tokenizer(output_dir, "tokenizer")
    UNet2DConditionModel(**(unet_config or TINY_UNET)).save_pretrained(os.path.join(output_dir, "unet"))
    AutoencoderKL(**TINY_VAE).save_pretrained(os.path.join(output_dir, "vae"))
    CLIPTextModel(_text_config(tokenizer, TINY_CLIP_TEXT)).save_pretrained(os.path.join(output_dir, "text_encoder"))
    DDPMScheduler(**dict(SD_SCHEDULER, prediction_type=prediction_type)).save_pretrained(
        os.path.join(output_dir, "scheduler")
    )
    return {
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": "0.30.0",
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "scheduler": ["diffusers", "DDPMScheduler"],
        "safety_checker": [None, None],
        "feature_extractor": [None, None],
    }


def _write_sdxl(output_dir, prediction_type, unet_config) -> dict:
    from mindone.diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
    from mindone.transformers import CLIPTextModel, CLIPTextModelWithProjection

    tokenizer = _write_tokenizer(output_dir, "tokenizer")
    tokenizer_2 = _write_tokenizer(output_dir, "tokenizer_2")
    CLIPTextModel(_text_config(tokenizer, TINY_CLIP_TEXT)).save_pretrained(os.path.join(output_dir, "text_encoder"))
    CLIPTextModelWithProjection(_text_config(tokenizer_2, TINY_CLIP_TEXT_2)).save_pretrained(
        os.path.join(output_dir, "text_encoder_2")
    )
    UNet2DConditionModel(**(unet_config or tiny_sdxl_unet_config())).save_pretrained(os.path.join(output_dir, "unet"))
    AutoencoderKL(**dict(TINY_VAE, scaling_factor=SDXL_VAE_SCALING)).save_pretrained(os.path.join(output_dir, "vae"))
    EulerDiscreteScheduler(**dict(SDXL_SCHEDULER, prediction_type=prediction_type)).save_pretrained(
        os.path.join(output_dir, "scheduler")
    )
    return {
        "_class_name": "StableDiffusionXLPipeline",
        "_diffusers_version": "0.30.0",
        "force_zeros_for_empty_prompt": True,
        "add_watermarker": None,
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "tokenizer_2": ["transformers", "CLIPTokenizer"],
        "scheduler": ["diffusers", "EulerDiscreteScheduler"],
        "image_encoder": [None, None],
        "feature_extractor": [None, None],
    }


def tiny_sdxl_unet_config() -> dict:
    """TINY_SDXL_UNET with the widths the two tiny text encoders give: cross-attention over both
    encoders' hidden states, the added embedding over 6 time ids and the second one's projection."""
    return dict(
        TINY_SDXL_UNET,
        cross_attention_dim=TINY_CLIP_TEXT["hidden_size"] + TINY_CLIP_TEXT_2["hidden_size"],
        projection_class_embeddings_input_dim=6 * TINY_SDXL_TIME_DIM + TINY_CLIP_TEXT_2["projection_dim"],
    )


def _write_tokenizer(output_dir, subfolder):
    from transformers import CLIPTokenizer

    from .text import write_tiny_clip_tokenizer

    folder = os.path.join(output_dir, subfolder)
    write_tiny_clip_tokenizer(folder)
    return CLIPTokenizer.from_pretrained(folder)


def _text_config(tokenizer, sizes: dict):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **sizes,
    )
