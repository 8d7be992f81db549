"""Save and load one CSC-Tuner in scepter's key layout, as safetensors.

`csc_tuner.safetensors` holds `pre_hint_blocks.{n}.weight`, `dense_hint_blocks.{i}.1.weight`,
`lsc_tuner_blocks.{m}.tuner_op.ln{1,2}.{weight,bias}` (conv weights [out, in, kh, kw] and Linear
weights [out, in], as in PyTorch) and, in its metadata, the condition name and the tuner config.
"""
import json
import os
from typing import Tuple

import numpy as np
import mindspore as ms
from safetensors.numpy import save_file

from ...errors import UserError
from ..weights_file import read_weights
from .config import CSCTunerConfig
from .layer import CSCTuner

WEIGHTS_NAME = "csc_tuner.safetensors"


def save_csc_tuner(tuner: CSCTuner, folder: str, config: CSCTunerConfig, condition: str) -> str:
    os.makedirs(folder, exist_ok=True)
    state = {name: p.asnumpy().astype(np.float32) for name, p in tuner.parameters_and_names()}
    metadata = {"format": "pt", "condition": condition, "csc_tuner_config": json.dumps(vars(config))}
    path = os.path.join(folder, WEIGHTS_NAME)
    save_file(state, path, metadata=metadata)
    return path


def read_csc_tuner_file(path: str) -> Tuple[str, CSCTunerConfig, dict]:
    """(condition name, config, {key: array}) of a CSC-Tuner file or of a folder holding one."""
    file = os.path.join(path, WEIGHTS_NAME) if os.path.isdir(path) else path
    if not os.path.isfile(file):
        raise UserError(f"CSC-Tuner weights not found: {file}")
    state, metadata = read_weights(file)
    if "csc_tuner_config" not in metadata:
        raise UserError(f"{file}: no csc_tuner_config in its metadata (not a CSC-Tuner file)")
    config = CSCTunerConfig(**json.loads(metadata["csc_tuner_config"]))
    return metadata.get("condition", "condition"), config, state


def load_csc_tuner_weights(tuner: CSCTuner, state: dict, origin: str) -> None:
    """Every key and shape is checked before anything is assigned: nothing is half-loaded."""
    params = dict(tuner.parameters_and_names())
    for key, value in state.items():
        if key not in params:
            raise UserError(f"{origin}: key '{key}' does not fit this UNet's CSC-Tuner")
        if tuple(value.shape) != tuple(params[key].shape):
            raise UserError(f"{origin}: '{key}' has shape {tuple(value.shape)}, this UNet expects {tuple(params[key].shape)}")
    missing = sorted(set(params) - set(state))
    if missing:
        raise UserError(f"{origin}: missing key '{missing[0]}' ({len(missing)} missing)")
    for key, value in state.items():
        params[key].set_data(ms.Tensor(value, params[key].dtype))
