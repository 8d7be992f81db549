"""LoRA on a mindone UNet through mindone's PEFT port (the layout diffusers and peft use).

mindone already implements LoRA layers and their injection; this module only configures it
and names the trainable parameters.
"""
from typing import List

import mindspore as ms

from .config import LoRAConfig


def inject_lora(unet, config: LoRAConfig) -> List[ms.Parameter]:
    """Add LoRA adapters to `unet` in place; returns the new trainable parameters."""
    from mindone.diffusers._peft import LoraConfig as PeftLoraConfig

    if config.rank < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {config.rank}")
    before = {id(p) for p in unet.get_parameters()}
    unet.add_adapter(
        PeftLoraConfig(
            r=config.rank,
            lora_alpha=config.lora_alpha,
            init_lora_weights="gaussian",
            target_modules=list(config.target_modules),
        ),
        adapter_name=config.adapter_name,
    )
    return [p for p in unet.get_parameters() if id(p) not in before]
