"""Save and load UNet LoRA weights in the diffusers/peft layout.

`pytorch_lora_weights.safetensors` with keys `unet.<module path>.lora_A.weight` / `.lora_B.weight`
([rank, in] and [out, rank]), which diffusers' `load_lora_weights` reads. Rank follows from the
shapes; rank and alpha are also kept in the file's metadata.
"""
import json
import os
from typing import Dict

import numpy as np
import mindspore as ms
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from ...errors import UserError
from .config import LoRAConfig

WEIGHTS_NAME = "pytorch_lora_weights.safetensors"


def _lora_params(unet, adapter_name: str) -> Dict[str, ms.Parameter]:
    """{diffusers key: parameter} of one adapter."""
    marker = f".{adapter_name}."
    params = {}
    for name, p in unet.parameters_and_names():  # structural names: Parameter.name changes when wrapped
        if (".lora_A." in name or ".lora_B." in name) and marker in name:
            params["unet." + name.replace(marker, ".")] = p
    if not params:
        raise ValueError(f"this UNet has no LoRA adapter named '{adapter_name}'")
    return params


def save_lora(unet, folder: str, config: LoRAConfig) -> None:
    os.makedirs(folder, exist_ok=True)
    state = {key: p.asnumpy().astype(np.float32) for key, p in _lora_params(unet, config.adapter_name).items()}
    metadata = {
        "format": "pt",
        "lora_adapter_metadata": json.dumps(
            {"r": config.rank, "lora_alpha": config.lora_alpha, "target_modules": list(config.target_modules)}
        ),
    }
    save_file(state, os.path.join(folder, WEIGHTS_NAME), metadata=metadata)


def read_lora_metadata(file: str) -> dict:
    with safe_open(file, framework="np") as f:
        meta = f.metadata() or {}
    return json.loads(meta.get("lora_adapter_metadata", "{}"))


def load_lora(unet, path: str, adapter_name: str = "default") -> None:
    """Load diffusers-layout LoRA weights into an adapter already injected in `unet`; all-or-nothing."""
    file = os.path.join(path, WEIGHTS_NAME) if os.path.isdir(path) else path
    if not os.path.isfile(file):
        raise UserError(f"LoRA weights not found: {file}")
    state = load_file(file)
    params = _lora_params(unet, adapter_name)
    for key, value in state.items():
        if key not in params:
            raise UserError(f"{file}: key '{key}' does not fit this UNet's LoRA layers")
        if tuple(value.shape) != tuple(params[key].shape):
            raise UserError(
                f"{file}: '{key}' has shape {tuple(value.shape)}, this UNet expects {tuple(params[key].shape)}"
            )
    missing = sorted(set(params) - set(state))
    if missing:
        raise UserError(f"{file}: missing key '{missing[0]}' ({len(missing)} missing)")
    for key, value in state.items():
        params[key].set_data(ms.Tensor(value.astype(np.float32), params[key].dtype))
