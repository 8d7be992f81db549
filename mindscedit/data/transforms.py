"""Image decoding and the resize / crop / flip / normalise transform used for training."""
import io
import os
from typing import Any, Dict, Tuple, Union

import numpy as np
from PIL import Image, ImageCms, ImageOps, UnidentifiedImageError

from .sources import DataError

__all__ = ["ImageTransform", "apply_params", "crop_coordinates", "decode_image", "to_rgb"]

# Errors PIL raises for missing, corrupt or truncated files (UnidentifiedImageError is an OSError).
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")


def decode_image(image: Union[bytes, str], origin: str) -> Image.Image:
    """Decode encoded bytes or an image file; raise DataError naming ``origin`` (and the file's
    name, for a file that ``origin`` does not already name) if that fails."""
    where = origin
    if isinstance(image, str) and image not in origin:
        where = f"{origin} ({os.path.basename(image)})"
    try:
        if isinstance(image, str):
            with open(image, "rb") as handle:
                image = handle.read()
        pil_image = Image.open(io.BytesIO(image))
        pil_image.load()  # Image.open is lazy: truncated data only fails when pixels are read
        # Phone photos store their rotation in EXIF; apply it so the pixels are upright.
        return ImageOps.exif_transpose(pil_image)
    except _DECODE_ERRORS as exc:
        if isinstance(exc, UnidentifiedImageError):  # its message only names an in-memory buffer
            message = "not an image format PIL can read"
        else:
            message = " ".join(str(exc).split())
        raise DataError(f"{where}: cannot decode image: {type(exc).__name__}: {message}") from exc


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB, compositing transparency onto white."""
    if image.mode == "RGB":
        return image
    if image.mode in _SIXTEEN_BIT_MODES or image.mode in ("I", "F"):
        return _high_bit_depth_to_rgb(image)
    if image.mode == "CMYK":
        return _cmyk_to_rgb(image)
    if image.mode == "P" or "transparency" in image.info or image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        # Palettes (and colour-key transparency) may hide an alpha channel; going through RGBA
        # turns it into real alpha, and a plain palette just gets alpha 255.
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")  # L, 1, YCbCr, ...


def _high_bit_depth_to_rgb(image: Image.Image) -> Image.Image:
    # PIL's own convert("RGB") clips 16-bit values at 255, which turns most of a 16-bit image white;
    # rescale to 8 bits instead.
    values = np.asarray(image).astype(np.float64)
    if image.mode in _SIXTEEN_BIT_MODES:
        values = values / 257.0
    elif image.mode == "I" and values.max(initial=0) > 255:
        values = values / 257.0  # 16-bit PNGs decode to mode "I"
    elif image.mode == "F" and values.max(initial=0) <= 1.0:
        values = values * 255.0  # float images are usually in [0, 1]
    gray = np.clip(np.rint(values), 0, 255).astype(np.uint8)
    return Image.fromarray(gray).convert("RGB")


def _cmyk_to_rgb(image: Image.Image) -> Image.Image:
    # The naive CMYK->RGB formula gives washed-out colours; use the embedded ICC profile when there is one.
    icc_profile = image.info.get("icc_profile")
    if icc_profile:
        try:
            source = ImageCms.ImageCmsProfile(io.BytesIO(icc_profile))
            return ImageCms.profileToProfile(image, source, ImageCms.createProfile("sRGB"), outputMode="RGB")
        except (ImageCms.PyCMSError, OSError, ValueError):
            pass  # a broken profile: fall back to the plain formula below
    return image.convert("RGB")


def apply_params(image: Image.Image, params: Dict[str, Any]) -> np.ndarray:
    """Resize, crop and flip ``image`` exactly as recorded in ``params``; return uint8 HWC RGB.

    ``image`` must have the same size as the image that produced ``params`` (e.g. a control image
    paired with the training image). The result is not normalised, so callers choose the scaling.
    """
    image = to_rgb(image)
    if image.size != tuple(params["original_size"]):
        raise DataError(
            f"condition image is {image.size[0]}x{image.size[1]}, expected "
            f"{params['original_size'][0]}x{params['original_size'][1]} like its training image"
        )
    resized_size = tuple(params["resized_size"])
    if image.size != resized_size:
        image = image.resize(resized_size, Image.Resampling.BILINEAR)
    top, left, size = params["top"], params["left"], params["crop_size"]
    image = image.crop((left, top, left + size, top + size))
    if params["flipped"]:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return np.asarray(image, dtype=np.uint8)


def crop_coordinates(params: Dict[str, Any]):
    """The crop of ``params`` as SDXL's size conditioning records it: (original (h, w), crop
    top-left (y, x), target (h, w)), computed as diffusers' SDXL training scripts do
    (train_text_to_image_sdxl.py, train_text_to_image_lora_sdxl.py).

    original is the image's size before the resize; (y, x) is where the crop starts in the
    resized image. After a flip those scripts set ``x = crop width - x``, the crop's own width
    rather than the resized image's (the mirror of the crop in the resized image would start at
    ``resized width - x - crop width``). Models fine-tuned with those scripts saw these values,
    so they are kept as they are.
    """
    width, height = params["original_size"]
    top, left, size = params["top"], params["left"], params["crop_size"]
    if params["flipped"]:
        left = size - left
    return (height, width), (top, left), (size, size)


class ImageTransform:
    """RGB -> resize shorter side to ``resolution`` -> square crop -> optional flip -> [-1, 1] CHW.

    All randomness comes from the ``rng`` passed to ``__call__``, so a sample is reproducible from
    its seed. The returned ``params`` replay the same geometry on a paired image (``apply_params``).
    """

    def __init__(self, resolution: int, center_crop: bool = False, random_flip: bool = False):
        if int(resolution) <= 0:
            raise ValueError(f"resolution must be positive, got {resolution}")
        self.resolution = int(resolution)
        self.center_crop = center_crop
        self.random_flip = random_flip

    def __call__(self, image: Image.Image, rng: np.random.Generator) -> Tuple[np.ndarray, Dict[str, Any]]:
        image = to_rgb(image)
        params = self.sample_params(image.size, rng)
        pixels = apply_params(image, params)  # uint8 HWC
        chw = pixels.transpose(2, 0, 1).astype(np.float32)
        return chw / 127.5 - 1.0, params

    def sample_params(self, size: Tuple[int, int], rng: np.random.Generator) -> Dict[str, Any]:
        """Choose the resize, crop offset and flip for an image of ``size`` (width, height)."""
        width, height = size
        scale = self.resolution / min(width, height)
        # max() guards against rounding the longer side below the crop size.
        resized_w = max(self.resolution, round(width * scale))
        resized_h = max(self.resolution, round(height * scale))
        spare_w, spare_h = resized_w - self.resolution, resized_h - self.resolution
        if self.center_crop:
            top, left = spare_h // 2, spare_w // 2
        else:
            top, left = int(rng.integers(0, spare_h + 1)), int(rng.integers(0, spare_w + 1))
        flipped = bool(self.random_flip and rng.random() < 0.5)
        return {
            "original_size": (width, height),
            "resized_size": (resized_w, resized_h),
            "top": top,
            "left": left,
            "crop_size": self.resolution,
            "flipped": flipped,
        }

    def apply_params(self, image: Image.Image, params: Dict[str, Any]) -> np.ndarray:
        return apply_params(image, params)
