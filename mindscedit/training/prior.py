"""DreamBooth's prior preservation: class images from the base model, and batches pairing them
with the instance images.

Class images: `class_data_dir` must hold `num_class_images` images; the missing ones are sampled
from the base pipeline (loaded on its own, and dropped with its compiled graphs before the
training pipeline loads) with the class prompt. Image i is `class-<i>.png`, drawn from seed + i,
and written whole (a temporary file renamed), so a run interrupted mid-generation keeps what it
wrote and the next one generates only the rest, the same images it would have. Images already
there under any name count and are kept. Under msrun each rank generates its share of the
missing indices, and all look again until none is missing.

Batches: each step's batch is the instance batch followed by a class batch of the same size;
the loss (losses.py, `prior_split`) is the instance half's mean plus prior_loss_weight times the
class half's, with Min-SNR or EDM weights applied per sample before the split.
"""
import gc
import logging
import os
import time
from typing import Iterator, List

import numpy as np

from ..data.sources import IMAGE_SUFFIXES

logger = logging.getLogger("mindscedit")

CLASS_IMAGE_NAME = "class-{:05d}.png"
NUM_INFERENCE_STEPS = 25
GUIDANCE_SCALE = 7.5
WAIT_SECONDS = 2.0


def count_images(folder: str) -> int:
    if not os.path.isdir(folder):
        return 0
    return sum(1 for name in os.listdir(folder) if os.path.splitext(name)[1].lower() in IMAGE_SUFFIXES)


def missing_indices(folder: str, num_class_images: int) -> List[int]:
    """The indices i whose class-<i>.png is still to generate: the first free ones, as many as
    the folder's images (any name) fall short of num_class_images."""
    shortfall = num_class_images - count_images(folder)
    missing, i = [], 0
    while len(missing) < shortfall:
        if not os.path.exists(os.path.join(folder, CLASS_IMAGE_NAME.format(i))):
            missing.append(i)
        i += 1
    return missing


def consecutive_runs(indices: List[int], longest: int) -> List[List[int]]:
    """`indices` cut into runs of consecutive numbers, each at most `longest` long (one sampler
    call each: the sampler draws image k of a call from seed + k)."""
    runs = []
    for i in indices:
        if runs and runs[-1][-1] == i - 1 and len(runs[-1]) < longest:
            runs[-1].append(i)
        else:
            runs.append([i])
    return runs


def generate_class_images(model_path: str, folder: str, prompt: str, num_class_images: int, batch_size: int,
                          resolution: int, seed: int, dtype, rank: int = 0, world_size: int = 1) -> int:
    """Fill `folder` up to num_class_images images; returns how many this rank generated.

    Ranks list the folder on their own, so a slow rank may see some images of a fast one: each
    takes its share of what is missing, then looks again until nothing is. An index two ranks
    both make is the same image (same seed), renamed into place whole either way.
    """
    os.makedirs(folder, exist_ok=True)
    sampler, made = None, 0
    while True:
        missing = missing_indices(folder, num_class_images)
        if not missing:
            break
        mine = missing[rank::world_size]
        if not mine:  # the rest is the other ranks' to make
            time.sleep(WAIT_SECONDS)
            continue
        if sampler is None:
            sampler = _base_sampler(model_path, dtype)
            logger.info("prior preservation: generating %d class images of '%s' in %s", len(missing), prompt, folder)
        _sample_into(sampler, folder, prompt, mine, batch_size, resolution, seed)
        made += len(mine)
    if sampler is not None:
        del sampler
        gc.collect()  # the base pipeline and its compiled graphs go before the training pipeline loads
    return made


def _base_sampler(model_path: str, dtype):
    from ..models.loading import load_components
    from ..sampling.sampler import Sampler

    return Sampler(load_components(model_path, dtype))


def _sample_into(sampler, folder, prompt, indices, batch_size, resolution, seed) -> None:
    for run in consecutive_runs(indices, batch_size):
        images = sampler(prompt, num_inference_steps=NUM_INFERENCE_STEPS, guidance_scale=GUIDANCE_SCALE,
                         seed=seed + run[0], height=resolution, width=resolution, num_images_per_prompt=len(run),
                         progress=False)
        for i, image in zip(run, images):
            path = os.path.join(folder, CLASS_IMAGE_NAME.format(i))
            image.save(path + ".tmp", format="PNG")
            os.replace(path + ".tmp", path)


def paired_batches(instance_batches: Iterator[dict], class_batches: Iterator[dict]) -> Iterator[dict]:
    """Each instance batch followed by a class batch, concatenated along the batch axis."""
    for instance, prior in zip(instance_batches, class_batches):
        yield {key: np.concatenate([instance[key], prior[key]]) for key in instance}
