"""Validation images during training: the current weights, fixed prompts and seed, saved per step.

The sampler's Cells wrap the UNet being trained (auto_prefix=False, no parameter renamed) and
compile once on the first validation; later validations reuse them. They draw their noise from
their own numpy generators, so the trainer's randomness and its compiled step are untouched.
"""
import logging
import os
from typing import List

from .images import save_images
from .sampler import Sampler

logger = logging.getLogger("mindscedit")

SCHEDULER = "dpm++_2m"
NUM_INFERENCE_STEPS = 25
GUIDANCE_SCALE = 7.5


class Validator:
    def __init__(self, components, prompts: List[str], output_dir: str, resolution: int, num_images: int, seed: int):
        self.sampler = Sampler(components, SCHEDULER)
        self.prompts = list(prompts)
        self.output_dir = output_dir
        self.resolution = resolution
        self.num_images = num_images
        self.seed = seed

    def __call__(self, global_step: int) -> str:
        images = self.sampler(
            self.prompts,
            num_inference_steps=NUM_INFERENCE_STEPS,
            guidance_scale=GUIDANCE_SCALE,
            seed=self.seed,
            height=self.resolution,
            width=self.resolution,
            num_images_per_prompt=self.num_images,
            progress=False,
        )
        folder = os.path.join(self.output_dir, "validation", f"step_{global_step}")
        save_images(images, folder)
        logger.info("validation images for step %d in %s", global_step, folder)
        return folder
