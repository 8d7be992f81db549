"""The training input pipeline: a random-access dataset, a resumable sharded sampler and the
MindSpore dataloader that ties them together.

Sample keys
-----------
The sampler yields *sample keys* ``epoch * num_samples + index`` rather than bare indices. The
dataset decodes a key back into ``(epoch, index)`` and seeds all randomness of that sample (crop,
flip, caption choice) with ``np.random.default_rng([seed, epoch, index])``. Loader workers are
separate processes that cannot see the sampler, so the key is how the epoch reaches them; and
because the randomness depends only on the key, results do not depend on the number of workers.
A plain index ``< num_samples`` is a key for epoch 0, so ``dataset[i]`` works as usual.
"""
import logging
import re
from typing import Iterator, List, Optional, Sequence, Set, Tuple

import numpy as np

from ..compat import let_map_workers_shut_down
from ..models.text import PromptTokenizer
from .conditions import ConditionSpec
from .sources import DataError, Record
from .transforms import ImageTransform, crop_coordinates, decode_image

__all__ = [
    "TextImageDataset",
    "ResumableShardedSampler",
    "create_dataloader",
    "encode_sample_key",
    "decode_sample_key",
    "iterate_batches",
]

logger = logging.getLogger("mindscedit.data")

COLUMN_NAMES = ["pixel_values", "input_ids"]
# The dataloader adds this column: how many bad samples were skipped to fill each batch entry.
# Worker processes each hold their own dataset copy, so per-sample counts are how the total
# reaches the main process.
SKIPPED_COLUMN = "num_skipped"

# Loader defaults, from scripts/bench_loader.py: one 512x512 sample (decode, resize, crop, flip,
# normalise) costs about 7 ms of an idle x86 core for 256x256 JPEGs, 12 ms with a canny condition
# and 50 ms for 2048x2048 JPEGs (about twice that on busy cores), while an Ascend 910* trains SD1.5
# at 12-15 img/s, i.e. takes a sample every 65-85 ms. One worker keeps up only with small images
# on a free core; two cover large photos, slower or busy host cores, and (unlike one, which runs
# as a thread of the training process) decode in processes of their own. Each card's training
# process starts its own workers, so a host of 8 cards runs 16.
DEFAULT_NUM_WORKERS = 2
# Rows (and, after batching, batches) each pipeline stage may hold ahead of the next: 16 is about
# a second of samples at 910 speed with batch 1, enough to ride out a slow sample since the
# workers produce several times faster than a card consumes. MindSpore's own default is also 16.
DEFAULT_PREFETCH_SIZE = 16


def encode_sample_key(epoch: int, index: int, num_samples: int) -> int:
    return epoch * num_samples + index


def decode_sample_key(key: int, num_samples: int) -> Tuple[int, int]:
    """Inverse of ``encode_sample_key``: ``(epoch, index)``."""
    return divmod(int(key), num_samples)


class TextImageDataset:
    """Random-access dataset of ``(pixel_values float32 [3,R,R], input_ids int32 [L])``, then the
    condition image when a ConditionSpec is given, then the model family's ``size_conditions``
    (SDXL: ``time_ids`` float32 [6] from the image's size, crop and flip; none for SD1.x/2.x).

    ``on_bad_sample="skip"`` replaces an undecodable sample by the next index that decodes (the
    failure is logged once per index and counted in ``num_skipped``; with several loader workers
    each worker process keeps its own count). ``"error"`` raises the DataError instead.
    """

    def __init__(
        self,
        records: Sequence[Record],
        transform: ImageTransform,
        tokenizer,
        seed: int = 0,
        on_bad_sample: str = "skip",
        condition: Optional[ConditionSpec] = None,
        family=None,
    ):
        if not records:
            raise DataError("dataset has no records")
        if on_bad_sample not in ("skip", "error"):
            raise ValueError(f"on_bad_sample must be 'skip' or 'error', got {on_bad_sample!r}")
        self.records: List[Record] = list(records)
        self.transform = transform
        # text -> token ids: a model family's prompt tokenizer (models/family.py), or a plain CLIP tokenizer.
        self.tokenize = PromptTokenizer(tokenizer) if hasattr(tokenizer, "model_max_length") else tokenizer
        self.seed = seed
        self.on_bad_sample = on_bad_sample
        self.condition = condition
        self.family = family  # models/family.py: which size conditions each sample carries
        self.num_skipped = 0
        self._bad_indices: Set[int] = set()  # known-bad samples are skipped without re-decoding
        self._small_warned: Set[int] = set()

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, key) -> tuple:
        num_samples = len(self.records)
        epoch, index = decode_sample_key(key, num_samples)
        for offset in range(num_samples):
            candidate = (index + offset) % num_samples
            if candidate not in self._bad_indices:
                try:
                    return self._load(candidate, epoch)
                except DataError as exc:
                    if self.on_bad_sample == "error":
                        raise
                    self._bad_indices.add(candidate)
                    logger.warning("skipping bad sample (using the next one instead): %s", exc)
            self.num_skipped += 1
        raise DataError(f"none of the {num_samples} samples could be decoded")

    def _load(self, index: int, epoch: int) -> tuple:
        record = self.records[index]
        rng = np.random.default_rng([self.seed, epoch, index])
        image = decode_image(record.image, record.origin)
        if min(image.size) < self.transform.resolution and index not in self._small_warned:
            self._small_warned.add(index)
            logger.warning(
                "%s: image is %dx%d, smaller than the resolution %d; it is upscaled",
                record.origin, *image.size, self.transform.resolution,
            )
        try:
            pixel_values, params = self.transform(image, rng)
        except (OSError, ValueError) as exc:  # e.g. an image mode PIL cannot convert to RGB
            raise DataError(f"{record.origin}: cannot transform image: {exc}") from exc

        caption = record.caption
        if not isinstance(caption, str):
            caption = caption[int(rng.integers(len(caption)))]
        sample = (pixel_values, self.tokenize(caption))
        if self.condition is not None:
            # Its own generator: adding a condition leaves the crop, flip and caption draws unchanged.
            condition_rng = np.random.default_rng([self.seed, epoch, index, 1])
            sample += (self.condition.make(record, pixel_values, params, condition_rng),)
        if self.family is not None:
            sample += tuple(self.family.size_condition_values(*crop_coordinates(params)))
        return sample


class ResumableShardedSampler:
    """Infinite, resumable stream of sample keys (see the module docstring) for one data shard.

    Epoch ``e`` uses the permutation ``default_rng([seed, e]).permutation(num_samples)`` (the
    identity without ``shuffle``), truncated to a whole number of global batches of
    ``batch_size * num_shards`` samples. Sharding rule: global step ``s`` of an epoch owns the
    contiguous block ``perm[s*G : (s+1)*G]`` (``G = batch_size * num_shards``) and shard ``i`` takes
    its ``i``-th sub-block of ``batch_size`` samples, i.e. ``perm[j]`` goes to shard
    ``(j // batch_size) % num_shards``. Hence shards are disjoint within an epoch, and concatenating
    the shards' batches of one step gives exactly the batch of a single-shard run with batch size G.

    Iteration starts at global step ``start_step`` (possibly in a later epoch), so a resumed run
    sees exactly the batches the uninterrupted run would have seen from that step on. It never
    ends: the trainer stops by step count. The iterator is stateless and can be restarted.
    """

    def __init__(
        self,
        num_samples: int,
        batch_size: int,
        num_shards: int = 1,
        shard_id: int = 0,
        shuffle: bool = True,
        seed: int = 0,
        start_step: int = 0,
    ):
        if batch_size < 1 or num_shards < 1:
            raise ValueError(f"batch_size and num_shards must be >= 1, got {batch_size} and {num_shards}")
        if not 0 <= shard_id < num_shards:
            raise ValueError(f"shard_id must be in [0, {num_shards}), got {shard_id}")
        if start_step < 0:
            raise ValueError(f"start_step must be >= 0, got {start_step}")
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.num_shards = num_shards
        self.shard_id = shard_id
        self.shuffle = shuffle
        self.seed = seed
        self.start_step = start_step
        self.global_batch_size = batch_size * num_shards
        self.steps_per_epoch = num_samples // self.global_batch_size
        if self.steps_per_epoch == 0:
            raise DataError(
                f"dataset has {num_samples} samples, fewer than one global batch "
                f"({batch_size} per shard x {num_shards} shards = {self.global_batch_size})"
            )

    def epoch_permutation(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.num_samples)
        return np.random.default_rng([self.seed, epoch]).permutation(self.num_samples)

    def __iter__(self) -> Iterator[int]:
        epoch, first_step = divmod(self.start_step, self.steps_per_epoch)
        while True:
            permutation = self.epoch_permutation(epoch)
            for step in range(first_step, self.steps_per_epoch):
                begin = step * self.global_batch_size + self.shard_id * self.batch_size
                for index in permutation[begin : begin + self.batch_size]:
                    yield encode_sample_key(epoch, int(index), self.num_samples)
            epoch, first_step = epoch + 1, 0


class _CountingLoader:
    """``dataset[key]`` plus the number of bad samples skipped to produce it (picklable for workers)."""

    def __init__(self, dataset: TextImageDataset):
        self.dataset = dataset

    def __call__(self, key):
        before = self.dataset.num_skipped
        sample = self.dataset[key]
        return (*sample, np.array(self.dataset.num_skipped - before, dtype=np.int32))


# How a DataError raised in a loader worker reads inside MindSpore's RuntimeError (the last match
# is the exception line of the traceback).
_WORKER_DATA_ERROR = re.compile(r"^(?:[\w.]+\.)?DataError: (.+)$", re.M)


def iterate_batches(loader) -> Iterator[dict]:
    """The loader's batches as dicts of numpy arrays.

    MindSpore re-raises an exception from a loader worker as a RuntimeError holding the whole
    traceback; a DataError (``on_bad_sample="error"``) comes out as itself, one line again.
    """
    iterator = loader.create_dict_iterator(num_epochs=1, output_numpy=True)
    while True:
        try:
            batch = next(iterator)
        except StopIteration:
            return
        except RuntimeError as exc:
            found = _WORKER_DATA_ERROR.findall(str(exc))
            if not found:
                raise
            raise DataError(found[-1]) from None
        yield batch


class _KeyStream:
    """The sampler's keys as one-column rows for ``GeneratorDataset``."""

    def __init__(self, sampler: ResumableShardedSampler):
        self.sampler = sampler

    def __iter__(self):
        for key in self.sampler:
            yield (np.array(key, dtype=np.int64),)


def create_dataloader(
    records: Sequence[Record],
    tokenizer,
    resolution: int,
    batch_size: int,
    center_crop: bool = False,
    random_flip: bool = False,
    shuffle: bool = True,
    seed: int = 0,
    num_shards: int = 1,
    shard_id: int = 0,
    start_step: int = 0,
    num_workers: int = DEFAULT_NUM_WORKERS,
    on_bad_sample: str = "skip",
    condition: Optional[ConditionSpec] = None,
    prefetch_size: Optional[int] = DEFAULT_PREFETCH_SIZE,
    family=None,
):
    """Infinite MindSpore dataset of batches with columns ``pixel_values`` and ``input_ids``
    (and ``condition``, float32 [3, R, R] in [0, 1], when a ConditionSpec is given; and the
    family's ``size_conditions``, e.g. SDXL's ``time_ids``, when a model family is given).

    Iterate it with ``create_dict_iterator(num_epochs=1, output_numpy=True)`` and stop by step count.
    A third column, ``num_skipped``, counts the bad samples skipped for each entry (sum it for a total).

    Why not ``GeneratorDataset(source=dataset, sampler=sampler)``: MindSpore materialises a Python
    sampler's whole index list up front, which never returns for an infinite sampler. Instead a
    one-column GeneratorDataset streams the sample keys lazily and an order-preserving ``map``
    decodes them in ``num_workers`` processes, so batches come out in sampler order.

    ``prefetch_size`` is the depth of the queues between pipeline stages (rows, then batches).
    MindSpore has only a process-wide setting for it, read when the iterator is created, so this
    sets ``mindspore.dataset.config.set_prefetch_size`` for the whole process; ``None`` leaves
    that setting alone.
    """
    import mindspore.dataset as ms_dataset  # imported here so loading records does not pull in MindSpore

    if num_workers < 1:
        raise ValueError(f"num_workers must be >= 1, got {num_workers}")
    if prefetch_size is not None:
        ms_dataset.config.set_prefetch_size(int(prefetch_size))
    if num_workers > 1:
        let_map_workers_shut_down()

    dataset = TextImageDataset(
        records, ImageTransform(resolution, center_crop, random_flip), tokenizer, seed, on_bad_sample, condition, family
    )
    sampler = ResumableShardedSampler(
        len(dataset), batch_size, num_shards, shard_id, shuffle, seed, start_step
    )
    keys = ms_dataset.GeneratorDataset(source=_KeyStream(sampler), column_names=["sample_key"], shuffle=False)
    samples = keys.map(
        operations=_CountingLoader(dataset),
        input_columns=["sample_key"],
        output_columns=COLUMN_NAMES + (["condition"] if condition else []) + list(getattr(family, "size_conditions", ()))
        + [SKIPPED_COLUMN],
        num_parallel_workers=num_workers,
        python_multiprocessing=num_workers > 1,
    )
    return samples.batch(batch_size, drop_remainder=True)
