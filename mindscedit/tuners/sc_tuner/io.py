"""Save and load SC-Tuner weights in ms-swift's layout.

`adapter_model.safetensors` holds `up_blocks.{i}.resnets.{j}.scetuner_<adapter>.tuner_op.ln{1,2}.{weight,bias}`
(Linear weights [out, in], as torch.nn.Linear and MindSpore's nn.Dense both store them) and
`adapter_config.json` the SCETuningConfig that ms-swift reads.
"""
import json
import os
from typing import Dict

import numpy as np
import mindspore as ms
from safetensors.numpy import load_file, save_file

from ...errors import UserError
from .config import SCTunerConfig
from .model import sc_tuner_dims, sc_tuner_named_parameters

WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_NAME = "adapter_config.json"


def sc_tuner_state_dict(unet) -> Dict[str, np.ndarray]:
    return {key: p.asnumpy().astype(np.float32) for key, p in sc_tuner_named_parameters(unet).items()}


def adapter_config(unet, config: SCTunerConfig) -> dict:
    return {
        "swift_type": "SCETUNING",
        "dims": sc_tuner_dims(unet),
        "target_modules": r"^up_blocks\.\d+\.resnets\.\d+$",
        "hint_modules": None,
        "tuner_mode": "decoder",
        "tuner_op": "SCEAdapter",
        "down_ratio": config.down_ratio,
    }


def save_sc_tuners(unet, folder: str, config: SCTunerConfig = SCTunerConfig()) -> None:
    os.makedirs(folder, exist_ok=True)
    save_file(sc_tuner_state_dict(unet), os.path.join(folder, WEIGHTS_NAME), metadata={"format": "pt"})
    with open(os.path.join(folder, CONFIG_NAME), "w") as f:
        json.dump(adapter_config(unet, config), f, indent=2)


def load_sc_tuners(unet, path: str) -> None:
    """Load tuner weights (a folder with adapter_model.safetensors, or the file) into `unet`.

    Every key and shape is checked before anything is assigned: nothing is half-loaded.
    """
    file = os.path.join(path, WEIGHTS_NAME) if os.path.isdir(path) else path
    if not os.path.isfile(file):
        raise UserError(f"SC-Tuner weights not found: {file}")
    state = load_file(file)
    params = sc_tuner_named_parameters(unet)
    for key, value in state.items():
        if key not in params:
            raise UserError(f"{file}: key '{key}' does not fit this UNet's SC-Tuners")
        if tuple(value.shape) != tuple(params[key].shape):
            raise UserError(
                f"{file}: '{key}' has shape {tuple(value.shape)}, this UNet expects {tuple(params[key].shape)}"
            )
    missing = sorted(set(params) - set(state))
    if missing:
        raise UserError(f"{file}: missing key '{missing[0]}' ({len(missing)} missing)")
    for key, value in state.items():
        params[key].set_data(ms.Tensor(value.astype(np.float32), params[key].dtype))
