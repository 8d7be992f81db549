"""Writing sampled images: one PNG per image (prompt and seed in tEXt chunks and in the name), a grid per prompt."""
import math
import os
import re
from typing import Dict, List

from PIL import Image
from PIL.PngImagePlugin import PngInfo


def slug(text: str, max_length: int = 40) -> str:
    """A file-name-safe short form of a prompt."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:max_length].rstrip("-") or "prompt"


def png_info(image: Image.Image) -> PngInfo:
    info = PngInfo()
    for key, value in image.info.items():
        if isinstance(value, str):
            info.add_text(key, value)
    return info


def image_grid(images: List[Image.Image]) -> Image.Image:
    """Images tiled in rows of ceil(sqrt(n))."""
    cols = math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / cols)
    w, h = images[0].size
    grid = Image.new("RGB", (cols * w, rows * h))
    for i, image in enumerate(images):
        grid.paste(image, ((i % cols) * w, (i // cols) * h))
    return grid


def save_images(images: List[Image.Image], output_dir: str) -> Dict[str, List[str]]:
    """Save Sampler output: `{p:03d}-{slug}-seed{seed}.png` per image and `{p:03d}-{slug}-grid.png` per prompt.

    Returns {"images": paths, "grids": paths}. Prompts are numbered in order of appearance.
    """
    os.makedirs(output_dir, exist_ok=True)
    by_prompt: Dict[str, List[Image.Image]] = {}
    for image in images:
        by_prompt.setdefault(image.info.get("prompt", ""), []).append(image)
    written = {"images": [], "grids": []}
    for p, (prompt, group) in enumerate(by_prompt.items()):
        stem = f"{p:03d}-{slug(prompt)}"
        for image in group:
            path = os.path.join(output_dir, f"{stem}-seed{image.info.get('seed', 'x')}.png")
            image.save(path, pnginfo=png_info(image))
            written["images"].append(path)
        grid = image_grid(group)
        grid.info.update(prompt=prompt, seeds=",".join(i.info.get("seed", "") for i in group))
        path = os.path.join(output_dir, f"{stem}-grid.png")
        grid.save(path, pnginfo=png_info(grid))
        written["grids"].append(path)
    return written
