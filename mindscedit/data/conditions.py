"""Condition images for controllable generation, computed without any annotator model.

Each annotator takes the training image as it enters the model (after resize, crop and flip:
uint8 HWC RGB), so the condition is aligned with its target by construction, and returns a
uint8 HWC RGB condition of the same size. Conditions that need a model (depth, HED, pose,
segmentation) come from the dataset instead, transformed with the target's crop and flip.
"""
from dataclasses import dataclass, field
from typing import Callable, Dict

import numpy as np

# OpenCV is imported where an annotator runs: its ~25 MiB stay out of every process that
# computes no condition (most training runs, sampling, the benchmark).


def canny(image: np.ndarray, rng=None, low_threshold: int = 100, high_threshold: int = 200) -> np.ndarray:
    """White edges on black (OpenCV's Canny on the grayscale image)."""
    import cv2

    gray = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
    edges = cv2.Canny(gray, low_threshold, high_threshold)
    return np.repeat(edges[:, :, None], 3, axis=2)


def color(image: np.ndarray, rng=None, cell: int = 64) -> np.ndarray:
    """A coarse colour layout: shrink by `cell` (area average), blow back up (nearest)."""
    import cv2

    h, w = image.shape[:2]
    small = cv2.resize(image, (max(1, w // cell), max(1, h // cell)), interpolation=cv2.INTER_AREA)
    return cv2.resize(small, (w, h), interpolation=cv2.INTER_NEAREST)


def grayscale(image: np.ndarray, rng=None) -> np.ndarray:
    import cv2

    gray = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
    return np.repeat(gray[:, :, None], 3, axis=2)


def inpainting(image: np.ndarray, rng: np.random.Generator, min_fraction: float = 0.25,
               max_fraction: float = 0.6) -> np.ndarray:
    """The image with a random rectangle blacked out: the model learns to fill it in."""
    h, w = image.shape[:2]
    mh = int(h * rng.uniform(min_fraction, max_fraction))
    mw = int(w * rng.uniform(min_fraction, max_fraction))
    top, left = int(rng.integers(0, h - mh + 1)), int(rng.integers(0, w - mw + 1))
    masked = image.copy()
    masked[top : top + mh, left : left + mw] = 0
    return masked


ANNOTATORS: Dict[str, Callable[..., np.ndarray]] = {
    "canny": canny,
    "color": color,
    "grayscale": grayscale,
    "inpainting": inpainting,
}


def annotate(kind: str, image: np.ndarray, rng: np.random.Generator = None, **options) -> np.ndarray:
    if kind not in ANNOTATORS:
        raise ValueError(f"unknown annotator '{kind}': choose one of {', '.join(ANNOTATORS)}")
    rng = rng if rng is not None else np.random.default_rng(0)
    return ANNOTATORS[kind](np.ascontiguousarray(image, dtype=np.uint8), rng, **options)


def to_condition_tensor(image: np.ndarray) -> np.ndarray:
    """uint8 HWC -> float32 CHW in [0, 1], the CSC-Tuner's input."""
    return (np.asarray(image, dtype=np.float32) / 255.0).transpose(2, 0, 1)


def pixels_to_uint8(pixel_values: np.ndarray) -> np.ndarray:
    """float32 CHW in [-1, 1] (the model's image input) -> uint8 HWC."""
    return np.clip((pixel_values.transpose(1, 2, 0) + 1.0) * 127.5 + 0.5, 0, 255).astype(np.uint8)


@dataclass
class ConditionSpec:
    """Which condition a training sample carries.

    kind: a built-in annotator (canny, color, grayscale, inpainting), computed from the training
        image after its crop and flip; or "column": the record's own condition image (a dataset
        column), given exactly the same resize, crop and flip as its target.
    options: keyword options of the annotator (e.g. low_threshold / high_threshold for canny).
    """

    kind: str
    options: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.kind != "column" and self.kind not in ANNOTATORS:
            raise ValueError(f"unknown condition '{self.kind}': choose column or one of {', '.join(ANNOTATORS)}")

    def make(self, record, pixel_values: np.ndarray, params: dict, rng: np.random.Generator) -> np.ndarray:
        """The condition of one sample as float32 CHW in [0, 1]."""
        if self.kind != "column":
            return to_condition_tensor(annotate(self.kind, pixels_to_uint8(pixel_values), rng, **self.options))
        from .sources import DataError
        from .transforms import apply_params, decode_image

        if record.condition is None:
            raise DataError(f"{record.origin}: no condition image")
        image = decode_image(record.condition, f"{record.origin} (condition)")
        try:
            return to_condition_tensor(apply_params(image, params))
        except DataError as exc:  # a size mismatch: say which row
            raise DataError(f"{record.origin}: {exc}") from None


def load_control_image(path: str, kind: str, height: int, width: int) -> np.ndarray:
    """A control image file -> float32 [3, height, width] in [0, 1], annotated unless kind is none."""
    from PIL import Image

    from .transforms import decode_image, to_rgb

    image = to_rgb(decode_image(path, path)).resize((width, height), Image.Resampling.BILINEAR)
    pixels = np.asarray(image, dtype=np.uint8)
    if kind != "none":
        pixels = annotate(kind, pixels)
    return to_condition_tensor(pixels)
