"""The embeddings file: one [tokens, width] tensor per text encoder under `clip_l` (and `clip_g`),
the layout diffusers' `load_textual_inversion` reads, with the tokens and abstractions in its
metadata so that `sample --embeddings` needs no `--tokens`."""
import json
import os
from typing import Dict, Optional, Tuple

import numpy as np
from safetensors.numpy import save_file

from ...errors import UserError
from ..weights_file import read_weights
from .config import NewTokens

EMBEDDINGS_SUFFIX = "_emb.safetensors"


def embeddings_file_name(output_dir: str) -> str:
    """<name>_emb.safetensors, name the output folder's, as diffusers' advanced scripts name it."""
    return os.path.basename(os.path.normpath(os.path.abspath(output_dir))) + EMBEDDINGS_SUFFIX


def save_embeddings(path: str, rows: Dict[str, np.ndarray], new_tokens: NewTokens) -> None:
    metadata = {"tokens": json.dumps(new_tokens.tokens),
                "token_abstraction": json.dumps({word: list(tokens) for word, tokens in new_tokens.abstractions})}
    save_file({key: np.ascontiguousarray(value, np.float32) for key, value in rows.items()}, path, metadata=metadata)


def read_embeddings(path: str, keys, tokens: Optional[str] = None) -> Tuple[Dict[str, np.ndarray], NewTokens]:
    """The rows of each key in `keys` and the tokens they stand for: `tokens` ("<s0>,<s1>") if given, else
    the file's metadata. One error line for a missing file or key, a shape that does not fit, non-finite values."""
    if not os.path.isfile(path):
        raise UserError(f"--embeddings: {path} does not exist")
    state, metadata = read_weights(path)
    missing = [key for key in keys if key not in state]
    if missing:
        raise UserError(f"{path}: no '{missing[0]}' tensor (it holds {', '.join(sorted(state)) or 'nothing'}); "
                        f"this model's text encoders take {', '.join(keys)}")
    rows = {key: state[key].astype(np.float32) for key in keys}
    if tokens:
        new_tokens = NewTokens.of_tokens([t.strip() for t in tokens.split(",") if t.strip()])
    elif "token_abstraction" in metadata:
        new_tokens = NewTokens(tuple((word, tuple(ts)) for word, ts in json.loads(metadata["token_abstraction"]).items()))
    else:
        raise UserError(f"{path} does not name its tokens; pass them with --tokens \"<s0>,<s1>\"")
    for key, value in rows.items():
        if value.ndim != 2 or value.shape[0] != len(new_tokens.tokens):
            raise UserError(f"{path}: '{key}' has shape {tuple(value.shape)}, expected {len(new_tokens.tokens)} rows "
                            f"(one per token: {', '.join(new_tokens.tokens)})")
    return rows, new_tokens
