"""Reading a tuner's safetensors file: one error line for a file that is not readable or whose
weights are not all finite (a NaN in a LoRA would otherwise sample black images)."""
from typing import Dict, Tuple

import numpy as np
from safetensors import safe_open
from safetensors.numpy import load_file

from ..errors import UserError


def read_weights(file: str) -> Tuple[Dict[str, np.ndarray], dict]:
    """({key: array}, metadata) of a safetensors file, every tensor checked finite."""
    try:
        state = load_file(file)
        with safe_open(file, framework="np") as f:
            metadata = f.metadata() or {}
    except Exception as err:  # noqa: BLE001 - safetensors raises several types for a bad file
        raise UserError(f"{file}: not a readable safetensors file ({' '.join(str(err).split())})") from None
    for key, value in state.items():
        if np.issubdtype(value.dtype, np.floating) and not np.isfinite(value).all():
            bad = int(np.size(value) - np.isfinite(value).sum())
            raise UserError(f"{file}: '{key}' holds {bad} non-finite value(s) (NaN or Inf); refusing to load it")
    return state, metadata
