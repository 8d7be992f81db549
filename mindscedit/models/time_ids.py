"""SDXL's micro-conditioning: the six "time ids" of a sample, numpy only (the data loader uses it).

time_ids = (original height, original width, crop top, crop left, target height, target width):
the image's size before resizing, the top-left corner of the crop taken from the resized image,
and the size the UNet generates (diffusers' `_get_add_time_ids` and its SDXL training scripts).
"""
import numpy as np


def time_ids(original_size, crop_top_left, target_size) -> np.ndarray:
    """[B, 6] float32 from three (h, w) / (y, x) pairs, each either one pair for the whole batch
    or an array [B, 2] with one pair per sample."""
    pairs = [np.asarray(pair, np.float32) for pair in (original_size, crop_top_left, target_size)]
    for name, pair in zip(("original_size", "crop_top_left", "target_size"), pairs):
        if pair.shape[-1:] != (2,) or pair.ndim > 2:
            raise ValueError(f"{name}: expected a pair or [batch, 2], got shape {pair.shape}")
    batch = max(pair.shape[0] if pair.ndim == 2 else 1 for pair in pairs)
    return np.concatenate([np.broadcast_to(pair.reshape(-1, 2), (batch, 2)) for pair in pairs], axis=1)
