"""Write a tiny Stable Diffusion pipeline (random weights) in the diffusers folder format.

Tests and the embedded demo load it through the same code path as a real SD1.5/SD2.1 folder.
"""
import json
import os

import numpy as np
import mindspore as ms

from .presets import SD_SCHEDULER, TINY_CLIP_TEXT, TINY_UNET, TINY_VAE


def make_tiny_model(output_dir: str, prediction_type: str = "epsilon", seed: int = 0, unet_config: dict = None) -> str:
    from mindone.diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from mindone.transformers import CLIPTextModel
    from transformers import CLIPTextConfig, CLIPTokenizer

    from .text import write_tiny_clip_tokenizer

    ms.set_seed(seed)
    np.random.seed(seed)
    os.makedirs(output_dir, exist_ok=True)

    tokenizer_dir = os.path.join(output_dir, "tokenizer")
    write_tiny_clip_tokenizer(tokenizer_dir)
    tokenizer = CLIPTokenizer.from_pretrained(tokenizer_dir)

    UNet2DConditionModel(**(unet_config or TINY_UNET)).save_pretrained(os.path.join(output_dir, "unet"))
    AutoencoderKL(**TINY_VAE).save_pretrained(os.path.join(output_dir, "vae"))
    text_config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **TINY_CLIP_TEXT,
    )
    CLIPTextModel(text_config).save_pretrained(os.path.join(output_dir, "text_encoder"))
    DDPMScheduler(**dict(SD_SCHEDULER, prediction_type=prediction_type)).save_pretrained(
        os.path.join(output_dir, "scheduler")
    )
    model_index = {
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
    with open(os.path.join(output_dir, "model_index.json"), "w") as f:
        json.dump(model_index, f, indent=2)
    return output_dir
