"""Validation images during training: the current weights, fixed prompts and seed, saved per step.

The sampler's Cells wrap the UNet being trained (auto_prefix=False, no parameter renamed) and
compile once on the first validation; later validations reuse them. They draw their noise from
their own numpy generators, so the trainer's randomness and its compiled step are untouched.
"""
import logging
import os
from typing import List, Optional

import numpy as np

from ..errors import NonFiniteSamples
from .images import save_images
from .sampler import Sampler
from .schedulers import schedulers_for

logger = logging.getLogger("mindscedit")

SCHEDULER = "dpm++_2m"  # for DDPM-schedule models; an EDM model validates with its family's default
NUM_INFERENCE_STEPS = 25
GUIDANCE_SCALE = 7.5


class Validator:
    """Samples the validation prompts with the weights being trained.

    With CSC-Tuners, `controlled` is the ControlledUNet being trained and `condition_images`
    holds the condition of every prompt (float32 [3, resolution, resolution] in [0, 1]).
    """

    def __init__(self, components, prompts: List[str], output_dir: str, resolution: int, num_images: int, seed: int,
                 controlled=None, condition_images: Optional[List[np.ndarray]] = None):
        fits = SCHEDULER in schedulers_for(components.family.noise_schedule)
        self.sampler = Sampler(components, SCHEDULER if fits else None, controlled=controlled)
        self.prompts = list(prompts)
        self.condition_images = condition_images
        self.output_dir = output_dir
        self.resolution = resolution
        self.num_images = num_images
        self.seed = seed

    def __call__(self, global_step: int) -> Optional[str]:
        """The folder of this step's images; None (and a warning) when sampling went non-finite."""
        try:
            images = self.sample()
        except NonFiniteSamples as error:
            logger.warning("validation at step %d: %s", global_step, error)
            return None
        folder = os.path.join(self.output_dir, "validation", f"step_{global_step}")
        save_images(images, folder)
        logger.info("validation images for step %d in %s", global_step, folder)
        return folder

    def sample(self) -> list:
        # One sampler call per prompt when each prompt has its own condition image.
        if self.condition_images:
            calls = [([p], [c]) for p, c in zip(self.prompts, self.condition_images)]
        else:
            calls = [(self.prompts, None)]
        images = []
        for prompts, control_images in calls:
            images += self.sampler(
                prompts,
                num_inference_steps=NUM_INFERENCE_STEPS,
                guidance_scale=GUIDANCE_SCALE,
                seed=self.seed,
                height=self.resolution,
                width=self.resolution,
                num_images_per_prompt=self.num_images,
                progress=False,
                control_images=control_images,
            )
        return images
