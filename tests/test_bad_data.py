"""Bad training data: every case is named in one line, skipped or refused by policy, and found
by `mindscedit check-data` without training."""
import io
import json
import re
import logging
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from mindscedit.cli import main
from mindscedit.data import DataError, ImageTransform, TextImageDataset, create_dataloader, iterate_batches, load_records
from mindscedit.data import write_tiny_clip_tokenizer

PHOTOS16_PARQUET = Path(__file__).resolve().parent.parent / "mindscedit" / "assets" / "photos16" / "data" / "train-00000-of-00001.parquet"
BAD_LINE = 3  # rows 1, 2 and 4 of each dataset below are good photos


@pytest.fixture(scope="module")
def photo_bytes():
    return [cell["bytes"] for cell in pq.read_table(PHOTOS16_PARQUET).column("image").to_pylist()[:3]]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return write_tiny_clip_tokenizer(tmp_path_factory.mktemp("tokenizer"))


def png(image: Image.Image, **save_args) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", **save_args)
    return buffer.getvalue()


def jpeg(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG")
    return buffer.getvalue()


def gradient(mode="RGB", size=48):
    array = np.linspace(0, 255, size * size * 3).reshape(size, size, 3).astype(np.uint8)
    return Image.fromarray(array, "RGB").convert(mode)


def write_dataset(folder: Path, photos, bad_row: dict, bad_image: bytes = None) -> Path:
    """An imagefolder (metadata.jsonl) whose line BAD_LINE is `bad_row` (image file bad.png)."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, data in enumerate(photos):
        (folder / f"{i}.jpg").write_bytes(data)
        rows.append({"file_name": f"{i}.jpg", "text": f"photo {i}"})
    if bad_image is not None:
        (folder / "bad.png").write_bytes(bad_image)
    rows.insert(BAD_LINE - 1, {"file_name": "bad.png", "text": "the bad one", **bad_row})
    (folder / "metadata.jsonl").write_text("".join(json.dumps({k: v for k, v in r.items() if v is not ...}) + "\n" for r in rows))
    return folder


def check_data(capsys, *args):
    capsys.readouterr()  # drop what fixtures printed (a library's import-time notice)
    code = main(["check-data", *map(str, args)])
    captured = capsys.readouterr()
    return code, captured.out.strip().splitlines(), captured.err.strip().splitlines()


# Each case: the bad line's cells, its image file, and what the message must say.
TRUNCATED = "truncated"
ROW_CASES = {
    "corrupt_image": ({}, b"\x89PNG\r\n\x1a\n this is not really an image", "(bad.png): cannot decode image"),
    "truncated_image": ({}, TRUNCATED, "(bad.png): cannot decode image"),
    "missing_image_file": ({"file_name": "nowhere.png"}, None, "(nowhere.png): cannot decode image: FileNotFoundError"),
    "empty_caption": ({"text": "  "}, "photo", "caption is empty"),
    "missing_caption": ({"text": None}, "photo", "caption is missing"),
    "missing_column": ({"text": ...}, "photo", "missing column 'text'"),
}


def bad_image_bytes(kind, photos):
    if kind == TRUNCATED:
        return photos[0][: len(photos[0]) // 2]
    if kind == "photo":
        return photos[1]
    return kind


@pytest.mark.parametrize("case", list(ROW_CASES))
def test_bad_row_is_named_skipped_or_refused(case, photo_bytes, tokenizer, tmp_path, capsys, caplog):
    row, image, expected = ROW_CASES[case]
    path = write_dataset(tmp_path / case, photo_bytes, row, bad_image_bytes(image, photo_bytes))
    culprit = f"metadata.jsonl line {BAD_LINE}{'' if expected.startswith('(') else ':'} {expected}"

    # check-data: exactly this one problem, then the summary; exit 1
    code, out, _ = check_data(capsys, path, "--resolution", 32)
    assert code == 1
    assert len(out) == 2 and out[0].startswith(culprit), out
    assert out[1] == "checked 4 rows: 1 problems (1 bad rows that training skips)"

    # on_bad_sample=error: the first use of the row raises, naming it
    with pytest.raises(DataError, match=re.escape(culprit)) as info:
        records = load_records(path)
        dataset = TextImageDataset(records, ImageTransform(32), tokenizer, on_bad_sample="error")
        for index in range(len(dataset)):
            dataset[index]
    assert "\n" not in str(info.value)

    # on_bad_sample=skip: the row is left out with a warning naming it, and counted
    dropped = []
    records = load_records(path, on_bad_record=dropped.append)
    dataset = TextImageDataset(records, ImageTransform(32), tokenizer, on_bad_sample="skip")
    with caplog.at_level(logging.WARNING, logger="mindscedit.data"):
        samples = [dataset[index] for index in range(len(dataset))]
    assert len(samples) == len(records) and all(np.isfinite(p).all() for p, _ in samples)
    assert len(dropped) + dataset.num_skipped == 1
    assert culprit in " ".join([str(e) for e in dropped] + [caplog.text])


@pytest.mark.parametrize(
    "name,image",
    [
        ("cmyk", lambda: jpeg(gradient("CMYK"))),
        ("16bit", lambda: png(Image.fromarray((np.arange(48 * 48).reshape(48, 48) * 28).astype(np.uint16)))),
        ("palette", lambda: png(gradient("P"))),
        ("alpha", lambda: png(gradient("RGBA"))),
        ("palette_transparency", lambda: png(gradient("P"), transparency=0)),
    ],
)
def test_unusual_image_modes_are_converted_not_refused(name, image, photo_bytes, tokenizer, tmp_path, capsys):
    path = write_dataset(tmp_path / name, photo_bytes, {}, image())
    code, out, _ = check_data(capsys, path, "--resolution", 32)
    assert (code, out) == (0, ["checked 4 rows: no problems"])
    dataset = TextImageDataset(load_records(path), ImageTransform(32), tokenizer, on_bad_sample="error")
    pixels, _ = dataset[BAD_LINE - 1]
    assert pixels.shape == (3, 32, 32) and -1 <= pixels.min() and pixels.max() <= 1
    assert pixels.std() > 0.05  # an image, not a blank (e.g. 16-bit clipped to white)


def test_image_smaller_than_resolution_is_reported_and_upscaled(photo_bytes, tokenizer, tmp_path, capsys, caplog):
    path = write_dataset(tmp_path / "small", photo_bytes, {}, png(gradient(size=16)))
    code, out, _ = check_data(capsys, path, "--resolution", 32)
    assert code == 1 and out[0] == (
        f"metadata.jsonl line {BAD_LINE}: image is 16x16, smaller than the resolution 32 (training upscales it)"
    )
    assert out[1] == "checked 4 rows: 1 problems (1 images smaller than the resolution)"
    assert check_data(capsys, path)[0] == 0  # without --resolution there is nothing to compare

    dataset = TextImageDataset(load_records(path), ImageTransform(32), tokenizer, on_bad_sample="error")
    with caplog.at_level(logging.WARNING, logger="mindscedit.data"):
        pixels, _ = dataset[BAD_LINE - 1]
    assert pixels.shape == (3, 32, 32)
    assert f"metadata.jsonl line {BAD_LINE}: image is 16x16, smaller than the resolution 32" in caplog.text


def test_check_data_reports_every_problem_at_once(photo_bytes, tmp_path, capsys):
    folder = write_dataset(tmp_path / "many", photo_bytes, {"text": ""}, b"")
    lines = (folder / "metadata.jsonl").read_text().splitlines()
    (folder / "tiny.png").write_bytes(png(gradient(size=8)))
    (folder / "junk.png").write_bytes(b"junk")
    lines += [json.dumps({"file_name": "tiny.png", "text": "small"}), json.dumps({"file_name": "junk.png", "text": "x"})]
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    code, out, _ = check_data(capsys, folder, "--resolution", 32)
    assert code == 1
    assert out == [
        "metadata.jsonl line 3: caption is empty",
        "metadata.jsonl line 6 (junk.png): cannot decode image: UnidentifiedImageError: not an image format PIL can read",
        "metadata.jsonl line 5: image is 8x8, smaller than the resolution 32 (training upscales it)",
        "checked 6 rows: 3 problems (2 bad rows that training skips, 1 images smaller than the resolution)",
    ]


@pytest.mark.parametrize(
    "case,expected",
    [
        ("missing_path", r"error: dataset path does not exist: .*no_such_dir"),
        ("empty", r"error: .*empty\.parquet: dataset is empty \(no rows\)"),
        ("unknown_column", r"error: .*train-00000-of-00001\.parquet: no column 'txt' .*did you mean 'text'\?"),
        ("missing_column", r"error: .*data\.csv: no column 'text' \(columns: file_name, caption\).*"),
        ("no_usable_row", r"error: .*: none of its 2 rows is usable"),
    ],
)
def test_unusable_dataset_is_one_error_line(case, expected, tmp_path, capsys):
    args = []
    if case == "missing_path":
        path = tmp_path / "no_such_dir"
    elif case == "empty":
        path = tmp_path / "empty.parquet"
        pq.write_table(pq.read_table(PHOTOS16_PARQUET).slice(0, 0), path)
    elif case == "unknown_column":
        path, args = PHOTOS16_PARQUET, ["--caption_column", "txt"]
    elif case == "missing_column":
        path = tmp_path / "data.csv"
        path.write_text("file_name,caption\na.png,a cat\n")
    else:
        path = tmp_path / "metadata.jsonl"
        path.write_text('{"file_name": "a.png", "text": ""}\n{"file_name": "b.png", "text": null}\n')
    code, out, err = check_data(capsys, path, *args)
    assert code == 2 and out == [] and len(err) == 1, err
    assert __import__("re").fullmatch(expected, err[0]), err[0]
    # training meets the same error before any model is loaded
    with pytest.raises(DataError):
        load_records(path, caption_column=args[1] if args else "text", on_bad_record=lambda e: None)


def test_loader_counts_skips_across_worker_processes(photo_bytes, tokenizer, tmp_path):
    path = write_dataset(tmp_path / "loader", photo_bytes, {}, b"junk")
    records = load_records(path)
    for workers in (1, 2):  # 2 workers are separate processes, each with its own dataset copy
        loader = create_dataloader(records, tokenizer, 32, batch_size=2, num_workers=workers)
        batches = [batch for _, batch in zip(range(6), iterate_batches(loader))]  # 3 epochs of 2 steps
        assert sum(int(b["num_skipped"].sum()) for b in batches) == 3  # the bad row once per epoch

    failing = create_dataloader(records, tokenizer, 32, batch_size=4, num_workers=2, on_bad_sample="error")
    with pytest.raises(DataError) as info:  # one line again, not MindSpore's worker traceback
        next(iterate_batches(failing))
    assert str(info.value).startswith(f"metadata.jsonl line {BAD_LINE} (bad.png): cannot decode image")
    assert "\n" not in str(info.value)


def test_train_with_on_bad_sample_error_stops_with_one_line(tiny_model_dir, photo_bytes, tmp_path, capfd):
    path = write_dataset(tmp_path / "train", photo_bytes[:1], {}, b"junk")  # 2 rows: one batch
    code = main([
        "train", "--pretrained_model_name_or_path", tiny_model_dir, "--train_data_dir", str(path),
        "--output_dir", str(tmp_path / "out"), "--resolution", "32", "--train_batch_size", "2",
        "--device_target", "CPU", "--on_bad_sample", "error",
    ])
    err = capfd.readouterr().err.strip().splitlines()
    assert code == 2
    assert err[-1] == ("error: metadata.jsonl line 2 (bad.png): cannot decode image: UnidentifiedImageError: not an "
                       "image format PIL can read")
    assert not any("Traceback" in line for line in err)
