"""Tests for mindscedit.data: record loading, image transforms, the dataset, sampler and dataloader."""
import csv
import io
import itertools
import json
import logging
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from mindscedit.data import (
    DataError,
    ImageTransform,
    Record,
    ResumableShardedSampler,
    TextImageDataset,
    apply_params,
    create_dataloader,
    decode_image,
    decode_sample_key,
    load_records,
    write_tiny_clip_tokenizer,
)

PHOTOS16 = Path(__file__).resolve().parent.parent / "mindscedit" / "assets" / "photos16"
PHOTOS16_PARQUET = PHOTOS16 / "data" / "train-00000-of-00001.parquet"


# ------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def photos_table():
    return pq.read_table(PHOTOS16_PARQUET)


@pytest.fixture(scope="module")
def captions(photos_table):
    return photos_table.column("text").to_pylist()


@pytest.fixture(scope="module")
def image_bytes(photos_table):
    return [cell["bytes"] for cell in photos_table.column("image").to_pylist()]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return write_tiny_clip_tokenizer(tmp_path_factory.mktemp("tokenizer"))


def write_images(folder: Path, image_bytes) -> list:
    names = []
    for i, data in enumerate(image_bytes):
        names.append(f"{i:02d}.jpg")
        (folder / names[-1]).write_bytes(data)
    return names


def pil_to_bytes(image: Image.Image, format="PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=format)
    return buffer.getvalue()


def take(iterable, count):
    return list(itertools.islice(iterable, count))


# ------------------------------------------------------------------------------------- sources


@pytest.mark.parametrize(
    "path", [PHOTOS16, PHOTOS16 / "data", PHOTOS16_PARQUET], ids=["root", "data", "file"]
)
def test_parquet_layouts(path, captions, image_bytes):
    records = load_records(path)
    assert len(records) == 16
    assert [r.caption for r in records] == captions
    assert [r.image for r in records] == image_bytes
    assert records[3].origin == "train-00000-of-00001.parquet row 3"


def test_parquet_image_path_is_relative_to_parquet_folder(tmp_path, image_bytes):
    names = write_images(tmp_path, image_bytes[:2])
    images = pa.array([{"bytes": None, "path": n} for n in names],
                      pa.struct([("bytes", pa.binary()), ("path", pa.string())]))
    pq.write_table(pa.table({"image": images, "text": ["a", "b"]}), tmp_path / "train.parquet")
    records = load_records(tmp_path)
    assert [r.image for r in records] == [str(tmp_path / n) for n in names]


def test_imagefolder_metadata_jsonl(tmp_path, captions, image_bytes):
    names = write_images(tmp_path, image_bytes)
    with open(tmp_path / "metadata.jsonl", "w") as handle:
        for name, caption in zip(names, captions):
            handle.write(json.dumps({"file_name": name, "text": caption}) + "\n")
    records = load_records(tmp_path)  # default image column "image" falls back to file_name
    assert len(records) == 16
    assert [r.caption for r in records] == captions
    assert [Path(r.image).read_bytes() for r in records] == image_bytes
    assert records[4].origin == "metadata.jsonl line 5"


@pytest.mark.parametrize("pass_file", [True, False], ids=["csv-file", "csv-folder"])
def test_csv(tmp_path, captions, image_bytes, pass_file):
    names = write_images(tmp_path, image_bytes)
    with open(tmp_path / "captions.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "caption"])
        writer.writerows(zip(names, captions))
    records = load_records(tmp_path / "captions.csv" if pass_file else tmp_path, caption_column="caption")
    assert len(records) == 16
    assert [r.caption for r in records] == captions
    assert records[0].image == str(tmp_path / "00.jpg")
    assert records[0].origin == "captions.csv line 2"


def test_list_captions_are_sampled_per_seed_and_epoch(tmp_path, image_bytes, tokenizer):
    options = [f"caption number {k}" for k in range(6)]
    images = pa.array([{"bytes": b, "path": None} for b in image_bytes[:2]],
                      pa.struct([("bytes", pa.binary()), ("path", pa.string())]))
    table = pa.table({"image": images, "text": ["x", "y"], "captions": [options, options[:1]]})
    pq.write_table(table, tmp_path / "train.parquet")
    records = load_records(tmp_path, caption_column="captions")
    assert records[0].caption == options

    def chosen_ids(seed, epoch):
        dataset = TextImageDataset(records, ImageTransform(16), tokenizer, seed=seed)
        return tuple(dataset[epoch * len(records)][1])

    across_epochs = {chosen_ids(0, epoch) for epoch in range(12)}
    across_seeds = {chosen_ids(seed, 0) for seed in range(12)}
    assert len(across_epochs) > 1 and len(across_seeds) > 1
    assert chosen_ids(3, 2) == chosen_ids(3, 2)  # deterministic for a given (seed, epoch, index)


def test_unknown_column_suggests_nearest():
    with pytest.raises(DataError) as info:
        load_records(PHOTOS16, caption_column="txt")
    message = str(info.value)
    assert "train-00000-of-00001.parquet" in message and "'txt'" in message
    assert "did you mean 'text'" in message and "\n" not in message


def test_missing_path_is_named(tmp_path):
    with pytest.raises(DataError, match="no_such_dataset"):
        load_records(tmp_path / "no_such_dataset")


def test_empty_parquet(tmp_path, photos_table):
    pq.write_table(photos_table.slice(0, 0), tmp_path / "empty.parquet")
    with pytest.raises(DataError, match="empty"):
        load_records(tmp_path)


def test_unknown_layout(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(DataError, match="unknown dataset layout"):
        load_records(tmp_path)


# ---------------------------------------------------------------------------------- transforms


def test_transform_shape_and_range(image_bytes):
    image = decode_image(image_bytes[0], "photos row 0")
    pixels, params = ImageTransform(64, random_flip=True)(image, np.random.default_rng(0))
    assert pixels.shape == (3, 64, 64) and pixels.dtype == np.float32
    assert -1.0 <= pixels.min() < pixels.max() <= 1.0
    assert set(params) >= {"top", "left", "flipped"}


def test_center_crop_is_centred():
    # 300x100: white middle square between black side squares; the centre crop is all white.
    array = np.zeros((100, 300, 3), np.uint8)
    array[:, 100:200] = 255
    pixels, params = ImageTransform(50, center_crop=True)(Image.fromarray(array), np.random.default_rng(0))
    assert params["resized_size"] == (150, 50) and (params["top"], params["left"]) == (0, 50)
    assert np.all(pixels[:, :, 1:-1] == 1.0)  # the outermost columns blend with black when resizing
    assert pixels.mean() > 0.95


def test_flip_params_replay_on_condition_image():
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (90, 120, 3), dtype=np.uint8))
    condition = Image.fromarray(rng.integers(0, 256, (90, 120), dtype=np.uint8))  # e.g. an edge map
    transform = ImageTransform(48, random_flip=True)
    by_flip = {}
    for seed in range(20):
        pixels, params = transform(image, np.random.default_rng(seed))
        by_flip.setdefault(params["flipped"], (pixels, params))
    assert set(by_flip) == {True, False}

    for pixels, params in by_flip.values():
        # the training image itself replays to the transform's output
        replayed = apply_params(image, params).astype(np.float32) / 127.5 - 1.0
        np.testing.assert_allclose(replayed.transpose(2, 0, 1), pixels, atol=1e-6)
        assert apply_params(condition, params).shape == (48, 48, 3)

    flipped_params = by_flip[True][1]
    same_crop_unflipped = dict(flipped_params, flipped=False)
    np.testing.assert_array_equal(
        apply_params(condition, flipped_params), apply_params(condition, same_crop_unflipped)[:, ::-1]
    )


def _mode_images():
    rgb = np.random.default_rng(1).integers(0, 256, (40, 60, 3), dtype=np.uint8)
    yield "CMYK", Image.fromarray(rgb).convert("CMYK")
    yield "RGBA", Image.fromarray(np.dstack([rgb, np.full(rgb.shape[:2], 128, np.uint8)]))
    yield "P", Image.fromarray(rgb).convert("P")
    yield "L", Image.fromarray(rgb).convert("L")
    yield "I;16", Image.fromarray(np.full((40, 60), 40000, np.uint16))
    yield "I", Image.fromarray(np.full((40, 60), 40000, np.int32))
    yield "tiny", Image.fromarray(rgb[:10, :10])


@pytest.mark.parametrize("mode,image", list(_mode_images()), ids=[m for m, _ in _mode_images()])
def test_image_modes_become_rgb(mode, image):
    # round-trip through encoded bytes where the format supports the mode, like real data
    if mode in ("RGBA", "P", "L", "I;16", "tiny"):
        image = decode_image(pil_to_bytes(image), mode)
    pixels, _ = ImageTransform(32)(image, np.random.default_rng(0))
    assert pixels.shape == (3, 32, 32) and pixels.dtype == np.float32
    assert -1.0 <= pixels.min() and pixels.max() <= 1.0
    if mode in ("I;16", "I"):
        # 40000/65535 of full scale, not clipped to white as PIL's own convert("RGB") would
        np.testing.assert_allclose(pixels, (round(40000 / 257) / 127.5) - 1.0, atol=1e-6)


def test_transparent_pixels_become_white():
    image = Image.new("RGBA", (20, 20), (255, 0, 0, 0))
    pixels, _ = ImageTransform(20)(image, np.random.default_rng(0))
    assert np.all(pixels == 1.0)


def test_truncated_or_missing_image_names_origin(image_bytes, tmp_path):
    with pytest.raises(DataError, match="photos row 7"):
        decode_image(image_bytes[0][: len(image_bytes[0]) // 2], "photos row 7")
    with pytest.raises(DataError, match="metadata.jsonl line 2"):
        decode_image(str(tmp_path / "missing.jpg"), "metadata.jsonl line 2")


# ------------------------------------------------------------------------------------- dataset


def test_dataset_item_shapes(tokenizer):
    dataset = TextImageDataset(load_records(PHOTOS16), ImageTransform(32, random_flip=True), tokenizer)
    pixel_values, input_ids = dataset[5]
    assert pixel_values.shape == (3, 32, 32) and pixel_values.dtype == np.float32
    assert input_ids.shape == (77,) and input_ids.dtype == np.int32
    assert input_ids[0] == tokenizer.bos_token_id


def test_bad_sample_skip_and_error(image_bytes, tokenizer, caplog):
    records = load_records(PHOTOS16)
    records[1] = Record(image_bytes[1][:500], records[1].caption, "photos row 1")
    transform = ImageTransform(32)

    skipping = TextImageDataset(records, transform, tokenizer, on_bad_sample="skip")
    with caplog.at_level(logging.WARNING, logger="mindscedit.data"):
        pixel_values, input_ids = skipping[1]
    assert skipping.num_skipped == 1
    assert "photos row 1" in caplog.text
    # the replacement is the next valid sample, exactly as it is served on its own
    np.testing.assert_array_equal(pixel_values, skipping[2][0])
    np.testing.assert_array_equal(input_ids, skipping[2][1])

    failing = TextImageDataset(records, transform, tokenizer, on_bad_sample="error")
    with pytest.raises(DataError, match="photos row 1"):
        failing[1]


# ------------------------------------------------------------------------------------- sampler


def test_sampler_is_deterministic_per_seed():
    first = take(ResumableShardedSampler(37, 4, seed=5), 100)
    assert first == take(ResumableShardedSampler(37, 4, seed=5), 100)
    assert first != take(ResumableShardedSampler(37, 4, seed=6), 100)
    assert take(ResumableShardedSampler(37, 4, shuffle=False), 8) == list(range(8))


def test_shards_are_disjoint_and_union_to_global_batches():
    num_samples, batch_size, steps = 37, 3, 20  # 6 steps per epoch: crosses several epochs
    shards = [
        iter(ResumableShardedSampler(num_samples, batch_size, 2, shard_id, seed=1)) for shard_id in (0, 1)
    ]
    single = iter(ResumableShardedSampler(num_samples, 2 * batch_size, seed=1))
    seen_per_epoch = {}
    for _ in range(steps):
        batches = [take(shard, batch_size) for shard in shards]
        assert batches[0] + batches[1] == take(single, 2 * batch_size)
        for key in batches[0] + batches[1]:
            epoch, index = decode_sample_key(key, num_samples)
            assert index not in seen_per_epoch.setdefault(epoch, set())  # disjoint within an epoch
            seen_per_epoch[epoch].add(index)
    assert len(seen_per_epoch) >= 3


def test_start_step_resumes_exact_tail():
    num_samples, batch_size, start_step = 37, 3, 14  # steps_per_epoch = 6 for 2 shards
    for shard_id in (0, 1):
        full = take(ResumableShardedSampler(num_samples, batch_size, 2, shard_id, seed=2), 40 * batch_size)
        resumed = take(
            ResumableShardedSampler(num_samples, batch_size, 2, shard_id, seed=2, start_step=start_step),
            (40 - start_step) * batch_size,
        )
        assert resumed == full[start_step * batch_size:]


def test_dataset_smaller_than_global_batch():
    with pytest.raises(DataError, match="global batch"):
        ResumableShardedSampler(num_samples=7, batch_size=4, num_shards=2)


# ---------------------------------------------------------------------------------- dataloader


def _first_batches(records, tokenizer, num_workers, steps=3):
    loader = create_dataloader(records, tokenizer, resolution=32, batch_size=4, random_flip=True,
                               seed=3, num_workers=num_workers)
    iterator = loader.create_dict_iterator(num_epochs=1, output_numpy=True)
    return take(iterator, steps)


def test_dataloader_matches_across_worker_counts(tokenizer):
    records = load_records(PHOTOS16)
    one_worker = _first_batches(records, tokenizer, num_workers=1)
    two_workers = _first_batches(records, tokenizer, num_workers=2)
    assert len(one_worker) == len(two_workers) == 3
    for a, b in zip(one_worker, two_workers):
        assert a["pixel_values"].shape == (4, 3, 32, 32) and a["pixel_values"].dtype == np.float32
        assert a["input_ids"].shape == (4, 77) and a["input_ids"].dtype == np.int32
        np.testing.assert_array_equal(a["pixel_values"], b["pixel_values"])
        np.testing.assert_array_equal(a["input_ids"], b["input_ids"])
    # the batches follow the sampler's order
    dataset = TextImageDataset(records, ImageTransform(32, random_flip=True), tokenizer, seed=3)
    keys = take(ResumableShardedSampler(16, 4, seed=3), 4)
    expected = [dataset[key] for key in keys]
    np.testing.assert_array_equal(one_worker[0]["pixel_values"], np.stack([pixels for pixels, _ in expected]))
    np.testing.assert_array_equal(one_worker[0]["input_ids"], np.stack([ids for _, ids in expected]))


@pytest.mark.smoke
def test_two_loaders_at_once_tell_their_clean_up_processes_to_quit(tokenizer):
    """Each map with worker processes has a clean-up process beside them, which waits on an event;
    tearing the pipeline down must set it. MindSpore 2.7 did not (see compat.let_map_workers_shut_down):
    it sent SIGTERM after 5 s, and with two pipelines at once (DreamBooth) that could hang for good."""
    import gc
    import multiprocessing

    from mindspore.dataset.engine.datasets import _PythonMultiprocessing

    gc.collect()  # the pipelines of earlier tests gone
    records = load_records(PHOTOS16)
    loaders = [create_dataloader(records, tokenizer, 32, batch_size=2, num_workers=2, seed=seed) for seed in (0, 1)]
    iterators = [loader.create_dict_iterator(num_epochs=1, output_numpy=True) for loader in loaders]
    assert [next(iterator)["pixel_values"].shape for iterator in iterators] == [(2, 3, 32, 32)] * 2
    # The events only: a reference to a pool itself would keep it from being torn down.
    quit_events = [pool.eof_clean_process for pool in gc.get_objects() if type(pool) is _PythonMultiprocessing]
    clean_ups = [p for p in multiprocessing.active_children() if p.name == "MapCleanProcess"]
    assert len(quit_events) == len(clean_ups) == 2 and not any(event.is_set() for event in quit_events)
    del loaders, iterators
    gc.collect()
    assert all(event.is_set() for event in quit_events)
    for process in clean_ups:
        process.join(timeout=60)
    assert [process.exitcode for process in clean_ups] == [0, 0]


def test_tiny_tokenizer_files(tmp_path):
    write_tiny_clip_tokenizer(tmp_path)
    assert {p.name for p in tmp_path.iterdir()} >= {
        "vocab.json", "merges.txt", "special_tokens_map.json", "tokenizer_config.json"}
    assert json.loads((tmp_path / "tokenizer_config.json").read_text())["model_max_length"] == 77
