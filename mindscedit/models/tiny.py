"""Write a tiny Stable Diffusion, SDXL or Playground v2.5-style pipeline (random weights) in the
diffusers folder format.

Tests and the embedded demo load it through the same code path as a real SD1.5/SD2.1, SDXL or
Playground v2.5 folder.
"""
import json
import os

import numpy as np
import mindspore as ms

from .presets import (PLAYGROUND_SCHEDULER, PLAYGROUND_VAE_LATENTS, SD_SCHEDULER, SDXL_SCHEDULER, TINY_CLIP_TEXT,
                      TINY_CLIP_TEXT_2, TINY_SDXL_TIME_DIM, TINY_SDXL_UNET, TINY_UNET, TINY_VAE)

TINY_FAMILIES = ("sd", "sdxl", "playground")
SDXL_VAE_SCALING = 0.13025


def make_tiny_model(output_dir: str, prediction_type: str = "epsilon", seed: int = 0, unet_config: dict = None,
                    family: str = "sd") -> str:
    """Write the pipeline to `output_dir`; `family` is "sd" (SD1.x-like), "sdxl" or "playground"
    (SDXL's layout with an EDM scheduler and a VAE with latents_mean / latents_std)."""
    if family not in TINY_FAMILIES:
        raise ValueError(f"unknown family '{family}': choose one of {', '.join(TINY_FAMILIES)}")
    ms.set_seed(seed)
    np.random.seed(seed)
    os.makedirs(output_dir, exist_ok=True)
    writer = {"sd": _write_sd, "sdxl": _write_sdxl, "playground": _write_playground}[family]
    model_index = writer(output_dir, prediction_type, unet_config)
    with open(os.path.join(output_dir, "model_index.json"), "w") as f:
        json.dump(model_index, f, indent=2)
    return output_dir


# MindSpore's names of the embedding and layer-norm weights -> transformers' (what a real pipeline folder has).
_TRANSFORMERS_SUFFIXES = {".embedding_table": ".weight", ".gamma": ".weight", ".beta": ".bias"}


def _save_text_encoder(model, output_dir: str, subfolder: str) -> None:
    """save_pretrained with the weights renamed as transformers names them, so that PyTorch tools load the
    tiny pipeline's text encoders too (mindone maps the names back when it loads them)."""
    from safetensors.numpy import load_file, save_file

    folder = os.path.join(output_dir, subfolder)
    model.save_pretrained(folder)
    file = os.path.join(folder, "model.safetensors")
    renamed = {}
    for key, value in load_file(file).items():
        for ms_suffix, hf_suffix in _TRANSFORMERS_SUFFIXES.items():
            if key.endswith(ms_suffix):
                key = key[: -len(ms_suffix)] + hf_suffix
                break
        renamed[key] = value
    save_file(renamed, file, metadata={"format": "pt"})


def _write_sd(output_dir, prediction_type, unet_config) -> dict:
    from mindone.diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from mindone.transformers import CLIPTextModel

    tokenizer = _write_tokenizer(output_dir, "tokenizer")
    UNet2DConditionModel(**(unet_config or TINY_UNET)).save_pretrained(os.path.join(output_dir, "unet"))
    AutoencoderKL(**TINY_VAE).save_pretrained(os.path.join(output_dir, "vae"))
    _save_text_encoder(CLIPTextModel(_text_config(tokenizer, TINY_CLIP_TEXT)), output_dir, "text_encoder")
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
    from mindone.diffusers import AutoencoderKL, EulerDiscreteScheduler

    _write_sdxl_text_and_unet(output_dir, unet_config)
    AutoencoderKL(**dict(TINY_VAE, scaling_factor=SDXL_VAE_SCALING)).save_pretrained(os.path.join(output_dir, "vae"))
    EulerDiscreteScheduler(**dict(SDXL_SCHEDULER, prediction_type=prediction_type)).save_pretrained(
        os.path.join(output_dir, "scheduler")
    )
    return _sdxl_model_index("EulerDiscreteScheduler")


def _write_playground(output_dir, prediction_type, unet_config) -> dict:
    from mindone.diffusers import AutoencoderKL, EDMDPMSolverMultistepScheduler

    _write_sdxl_text_and_unet(output_dir, unet_config)
    AutoencoderKL(**dict(TINY_VAE, **PLAYGROUND_VAE_LATENTS)).save_pretrained(os.path.join(output_dir, "vae"))
    EDMDPMSolverMultistepScheduler(**dict(PLAYGROUND_SCHEDULER, prediction_type=prediction_type)).save_pretrained(
        os.path.join(output_dir, "scheduler")
    )
    return _sdxl_model_index("EDMDPMSolverMultistepScheduler")


def _write_sdxl_text_and_unet(output_dir, unet_config) -> None:
    from mindone.diffusers import UNet2DConditionModel
    from mindone.transformers import CLIPTextModel, CLIPTextModelWithProjection

    tokenizer = _write_tokenizer(output_dir, "tokenizer")
    tokenizer_2 = _write_tokenizer(output_dir, "tokenizer_2")
    _save_text_encoder(CLIPTextModel(_text_config(tokenizer, TINY_CLIP_TEXT)), output_dir, "text_encoder")
    _save_text_encoder(CLIPTextModelWithProjection(_text_config(tokenizer_2, TINY_CLIP_TEXT_2)), output_dir,
                       "text_encoder_2")
    UNet2DConditionModel(**(unet_config or tiny_sdxl_unet_config())).save_pretrained(os.path.join(output_dir, "unet"))


def _sdxl_model_index(scheduler_class: str) -> dict:
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
        "scheduler": ["diffusers", scheduler_class],
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
