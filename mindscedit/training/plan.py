"""How long a run is and how fast it learns: steps from epochs, the sample subset, the scaled rate.

Pure arithmetic, shared by the trainer and its tests, following diffusers' training scripts:

- ``num_update_steps_per_epoch = ceil(len(train_dataloader) / gradient_accumulation_steps)`` and,
  when ``max_train_steps`` is not given, ``max_train_steps = num_train_epochs x`` that. Here
  ``len(train_dataloader)`` is the batches one card sees per epoch: the sampler (data/dataset.py)
  cuts each epoch to whole global batches, so it is ``samples // (train_batch_size x cards)``
  under msrun as on one card (each card gets the same number of batches, from disjoint samples).
- ``max_train_samples``: diffusers' ``dataset.shuffle(seed).select(range(N))``, i.e. the first N
  records of a seeded permutation; chosen from all records before they are split between cards,
  so every card draws from the same subset.
- ``scale_lr``: ``learning_rate x train_batch_size x gradient_accumulation_steps x cards``.
"""
import math
from dataclasses import dataclass
from typing import List, Optional, Sequence, TypeVar

import numpy as np

from ..errors import UserError
from .config import DEFAULT_MAX_TRAIN_STEPS

T = TypeVar("T")

# The subset's generator: a key no epoch permutation (default_rng([seed, epoch])) ever uses.
SUBSET_STREAM = 2**32 - 1


def batches_per_epoch(num_samples: int, train_batch_size: int, world_size: int = 1) -> int:
    """Batches each card sees per epoch (whole global batches only, as the sampler cuts them)."""
    return num_samples // (train_batch_size * world_size)


def update_steps_per_epoch(num_samples: int, train_batch_size: int, gradient_accumulation_steps: int = 1,
                           world_size: int = 1) -> int:
    """diffusers' num_update_steps_per_epoch: ceil(batches per card / accumulation)."""
    return math.ceil(batches_per_epoch(num_samples, train_batch_size, world_size) / gradient_accumulation_steps)


def resolve_max_train_steps(max_train_steps: Optional[int], num_train_epochs: Optional[int],
                            steps_per_epoch: int) -> int:
    """The run's optimizer steps: max_train_steps if given, else epochs x steps per epoch, else the default."""
    if max_train_steps is not None:
        return max_train_steps
    if num_train_epochs is not None:
        return num_train_epochs * steps_per_epoch
    return DEFAULT_MAX_TRAIN_STEPS


def scaled_learning_rate(learning_rate: float, train_batch_size: int, gradient_accumulation_steps: int = 1,
                         world_size: int = 1) -> float:
    """scale_lr: the rate times the images of one optimizer step over all cards."""
    return learning_rate * train_batch_size * gradient_accumulation_steps * world_size


def select_samples(records: Sequence[T], max_train_samples: Optional[int], seed: int) -> List[T]:
    """The first max_train_samples records of a permutation seeded by `seed` (all of them if None)."""
    if max_train_samples is None or max_train_samples >= len(records):
        return list(records)
    order = np.random.default_rng([seed, SUBSET_STREAM]).permutation(len(records))
    return [records[i] for i in order[:max_train_samples]]


@dataclass
class RunPlan:
    """The resolved length and rate of a run, and the lines that tell the user how they came about."""
    max_train_steps: int
    learning_rate: float
    num_samples: int
    batches_per_epoch: int
    update_steps_per_epoch: int
    messages: List[str]


def _length_message(config, steps: int, per_epoch: int) -> str:
    """How the run's max_train_steps came about, in epochs too."""
    given, epochs = config.max_train_steps is not None, config.num_train_epochs
    if given and epochs is not None:
        message = f"max_train_steps {steps} given: it wins over num_train_epochs {epochs}"
    elif epochs is not None:
        message = f"num_train_epochs {epochs} x {per_epoch} steps per epoch: max_train_steps {steps}"
    elif not given:
        message = f"max_train_steps {steps} (the default; neither it nor num_train_epochs given)"
    else:
        message = f"max_train_steps {steps}"
    return f"{message} ({steps / per_epoch:.2f} epochs)"


def plan_run(config, num_samples: int, world_size: int = 1) -> RunPlan:
    """Resolve max_train_steps and the learning rate of `config` (a TrainConfig) for this data and world size."""
    c = config
    batches = batches_per_epoch(num_samples, c.train_batch_size, world_size)
    if batches == 0:
        raise UserError(f"dataset has {num_samples} samples, fewer than one global batch ({c.train_batch_size} per "
                        f"card x {world_size} cards = {c.train_batch_size * world_size})")
    per_epoch = update_steps_per_epoch(num_samples, c.train_batch_size, c.gradient_accumulation_steps, world_size)
    steps = resolve_max_train_steps(c.max_train_steps, c.num_train_epochs, per_epoch)
    cards = f" x {world_size} cards" if world_size > 1 else ""
    messages = [
        f"{num_samples} samples: {batches} batches of {c.train_batch_size} per card per epoch{cards}, "
        f"{per_epoch} optimizer steps per epoch (gradient_accumulation_steps {c.gradient_accumulation_steps})",
        _length_message(c, steps, per_epoch),
    ]
    learning_rate = c.learning_rate
    if c.scale_lr:
        learning_rate = scaled_learning_rate(c.learning_rate, c.train_batch_size, c.gradient_accumulation_steps,
                                             world_size)
        messages.append(f"scale_lr: learning rate {c.learning_rate:g} x batch {c.train_batch_size} x accumulation "
                        f"{c.gradient_accumulation_steps} x cards {world_size} = {learning_rate:g}")
    return RunPlan(steps, learning_rate, num_samples, batches, per_epoch, messages)
