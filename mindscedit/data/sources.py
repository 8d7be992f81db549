"""Reading (image, caption) records from the dataset layouts we accept.

Supported layouts for ``load_records(path)``, checked in this order:

* parquet: a ``.parquet`` file, or a folder with ``*.parquet`` files directly inside it or under
  ``data/`` (the Hugging Face export, e.g. the OnePiece BLIP-captions dataset). The image column
  is either the HF ``Image`` struct ``{bytes, path}``, raw bytes, or a path string.
* imagefolder: a folder with ``metadata.jsonl`` (diffusers' layout), or that ``.jsonl`` file itself.
  Each line is a JSON object naming an image file relative to the folder and its caption.
* csv: a ``.csv`` file, or a folder holding exactly one, with a header row; image paths are
  relative to the CSV's folder.

``load_instance_records(path, prompt)`` reads DreamBooth's instance images: a plain folder of
images, every one captioned with the instance prompt (or a folder in a layout above).

Images are not decoded here: a record holds encoded bytes or a file path, so loading stays fast
and a corrupt image is only reported (or skipped) when the dataset reads it.
"""
import csv
import difflib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

from ..errors import UserError

__all__ = ["DataError", "Record", "load_records", "load_instance_records", "IMAGE_PATH_FALLBACKS"]


class DataError(UserError):
    """A problem with the training data; the message is one line naming the file and row/column."""


@dataclass(frozen=True)
class Record:
    """One training sample before decoding.

    ``origin`` says where it came from for error messages: ``"<file> row N"`` (0-based parquet row),
    ``"metadata.jsonl line N"`` or ``"<file>.csv line N"`` (1-based file line, the header is line 1).
    """

    image: Union[bytes, str]  # encoded image bytes, or a path to an image file
    caption: Union[str, List[str]]  # a list means "pick one at random per sample"
    origin: str
    condition: Union[bytes, str, None] = None  # a dataset-supplied condition image (controllable training)


# When the default image column "image" is absent from a jsonl/CSV file, these columns, tried in
# order, are taken to hold the image path (diffusers' imagefolder uses "file_name").
IMAGE_PATH_FALLBACKS = ("file_name", "path", "image_path")
DEFAULT_IMAGE_COLUMN = "image"


def load_records(
    path: Union[str, Path],
    image_column: str = "image",
    caption_column: str = "text",
    on_bad_record: Optional[Callable[[DataError], None]] = None,
    condition_column: Optional[str] = None,
) -> List[Record]:
    """Read every record of the dataset at ``path`` (see the module docstring for layouts).

    A row whose cells are unusable (no image, an empty or missing caption, a missing column)
    raises its DataError; with ``on_bad_record`` the row is dropped and the error handed to it
    instead. Problems with the dataset as a whole (path, layout, columns, no rows) always raise.
    ``condition_column`` names a column of condition images (same cell format as the image).
    """
    path = Path(path)
    report = on_bad_record or _raise
    if not path.exists():
        raise DataError(f"dataset path does not exist: {path}")

    if path.is_file():
        suffix = path.suffix.lower()
        if suffix == ".parquet":
            records = _read_parquet_files([path], image_column, caption_column, report, condition_column)
        elif suffix == ".jsonl":
            records = _read_jsonl(path, image_column, caption_column, report, condition_column)
        elif suffix == ".csv":
            records = _read_csv(path, image_column, caption_column, report, condition_column)
        else:
            raise DataError(f"{path}: unknown dataset file type (expected .parquet, .jsonl or .csv)")
    else:
        layout = _folder_layout(path)
        if layout is None:
            raise DataError(
                f"{path}: unknown dataset layout (expected *.parquet, data/*.parquet, "
                "metadata.jsonl or one .csv file)"
            )
        kind, files = layout
        if kind == "parquet":
            records = _read_parquet_files(files, image_column, caption_column, report, condition_column)
        elif kind == "jsonl":
            records = _read_jsonl(files[0], image_column, caption_column, report, condition_column)
        elif len(files) == 1:
            records = _read_csv(files[0], image_column, caption_column, report, condition_column)
        else:
            names = ", ".join(f.name for f in files)
            raise DataError(f"{path}: several CSV files ({names}); pass the one to use")

    if not records:
        if records.num_rows:
            raise DataError(f"{path}: none of its {records.num_rows} rows is usable")
        raise DataError(f"{path}: dataset is empty (no rows)")
    return list(records)


def _folder_layout(path: Path) -> Optional[Tuple[str, List[Path]]]:
    """("parquet" | "jsonl" | "csv", its files) of a dataset folder, in load_records' order; None
    for a folder in none of those layouts (e.g. a plain folder of images)."""
    parquet_files = sorted(path.glob("*.parquet")) or sorted((path / "data").glob("*.parquet"))
    if parquet_files:
        return "parquet", parquet_files
    if (path / "metadata.jsonl").is_file():
        return "jsonl", [path / "metadata.jsonl"]
    csv_files = sorted(path.glob("*.csv"))
    return ("csv", csv_files) if csv_files else None


IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


def load_instance_records(
    path: Union[str, Path],
    instance_prompt: str,
    image_column: str = "image",
    caption_column: str = "text",
    on_bad_record: Optional[Callable[[DataError], None]] = None,
    condition_column: Optional[str] = None,
) -> List[Record]:
    """DreamBooth's instance images: a plain folder of images, each captioned `instance_prompt`
    (diffusers' --instance_data_dir); a folder in one of load_records' layouts keeps the captions
    of its `caption_column` instead (custom captions)."""
    path = Path(path)
    if not path.is_dir():
        raise DataError(f"instance_data_dir is not a folder: {path}")
    if _folder_layout(path) is not None:
        return load_records(path, image_column, caption_column, on_bad_record, condition_column)
    files = sorted(f for f in path.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise DataError(f"{path}: no images ({', '.join(IMAGE_SUFFIXES)}) and no dataset layout "
                        "(metadata.jsonl, parquet, CSV)")
    return [Record(image=str(f), caption=instance_prompt, origin=str(f)) for f in files]


class _Records(list):
    """The usable records, remembering how many rows were read in all."""

    num_rows = 0

    def add(self, make: Callable[[], Record], report: Callable[[DataError], None]) -> None:
        self.num_rows += 1
        try:
            self.append(make())
        except DataError as exc:
            report(exc)


def _raise(exc: DataError) -> None:
    raise exc


# --------------------------------------------------------------------------------------- parquet


def _read_parquet_files(files: Sequence[Path], image_column: str, caption_column: str, report,
                        condition_column: Optional[str] = None) -> _Records:
    import pyarrow as pa  # imported on use: ~25 MiB that jsonl/csv/folder datasets never need
    import pyarrow.parquet as pq

    records = _Records()
    wanted = list(dict.fromkeys([image_column, caption_column] + ([condition_column] if condition_column else [])))
    for file in files:
        try:
            columns = pq.read_schema(file).names
            for column in wanted:
                _require_column(column, columns, file)
            table = pq.read_table(file, columns=wanted)
        except (pa.ArrowException, OSError) as exc:
            raise DataError(f"{file}: cannot read parquet: {_one_line(exc)}") from exc

        images = table.column(image_column).to_pylist()
        captions = table.column(caption_column).to_pylist()
        conditions = table.column(condition_column).to_pylist() if condition_column else [None] * len(images)
        for row, (image, caption, condition) in enumerate(zip(images, captions, conditions)):
            origin = f"{file.name} row {row}"
            records.add(
                lambda: Record(
                    _image_cell(image, file.parent, origin),
                    _caption_cell(caption, origin),
                    origin,
                    _condition_cell(condition, condition_column, file.parent, origin),
                ),
                report,
            )
    return records


# ----------------------------------------------------------------------------------- jsonl / csv


def read_utf8_lines(path, encoding: str = "utf-8") -> Iterator[Tuple[int, str]]:
    """(line number, text) of each line of a UTF-8 text file; a line that is not UTF-8 is one
    DataError naming the file and the line."""
    with open(path, "rb") as handle:
        for line_number, raw in enumerate(handle, start=1):
            try:
                yield line_number, raw.decode(encoding)
            except UnicodeDecodeError as exc:
                raise DataError(f"{path} line {line_number}: not UTF-8 text ({exc.reason} at byte {exc.start}); "
                                "save the file as UTF-8") from None


def _read_jsonl(file: Path, image_column: str, caption_column: str, report,
                condition_column: Optional[str] = None) -> _Records:
    rows = []  # (line number, JSON object)
    for line_number, line in read_utf8_lines(file):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{file.name} line {line_number}: invalid JSON: {exc}") from exc
        if not isinstance(row, dict):
            raise DataError(f"{file.name} line {line_number}: expected a JSON object")
        rows.append((line_number, row))
    return _records_from_rows(rows, file, image_column, caption_column, report, None, condition_column)


def _read_csv(file: Path, image_column: str, caption_column: str, report,
              condition_column: Optional[str] = None) -> _Records:
    # utf-8-sig drops the byte-order mark spreadsheet programs like to add.
    reader = csv.DictReader(line for _, line in read_utf8_lines(file, "utf-8-sig"))
    if not reader.fieldnames:
        raise DataError(f"{file}: CSV file has no header row")
    # reader.line_num is the file line where the row ended (the header is line 1).
    rows = [(reader.line_num, row) for row in reader]
    return _records_from_rows(rows, file, image_column, caption_column, report, reader.fieldnames, condition_column)


def _records_from_rows(
    rows: Iterable[tuple],
    file: Path,
    image_column: str,
    caption_column: str,
    report: Callable[[DataError], None],
    columns: Optional[List[str]] = None,
    condition_column: Optional[str] = None,
) -> _Records:
    """Records from ``(line number, dict)`` jsonl/CSV rows; image paths are relative to the file."""
    rows = list(rows)
    records = _Records()
    if not rows:
        return records
    if columns is None:  # jsonl has no header: the first object's keys stand in for it
        columns = list(rows[0][1])

    fallbacks = IMAGE_PATH_FALLBACKS if image_column == DEFAULT_IMAGE_COLUMN else ()
    image_column = _require_column(image_column, columns, file, fallbacks)
    caption_column = _require_column(caption_column, columns, file)
    if condition_column:
        condition_column = _require_column(condition_column, columns, file)

    for number, row in rows:
        origin = f"{file.name} line {number}"
        records.add(lambda: _row_record(row, file, image_column, caption_column, origin, condition_column), report)
    return records


def _row_record(row: dict, file: Path, image_column: str, caption_column: str, origin: str,
                condition_column: Optional[str] = None) -> Record:
    for column in (image_column, caption_column, condition_column):
        if column and column not in row:
            raise DataError(f"{origin}: missing column '{column}'")
    image = _image_cell(row[image_column], file.parent, origin)
    condition = _condition_cell(row.get(condition_column), condition_column, file.parent, origin)
    return Record(image, _caption_cell(row[caption_column], origin), origin, condition)


# ------------------------------------------------------------------------------------- helpers


def _require_column(name: str, columns: Sequence[str], file: Path, fallbacks: Sequence[str] = ()) -> str:
    """Return the column to use for ``name``, or raise naming the file and the nearest column."""
    if name in columns:
        return name
    for alternative in fallbacks:
        if alternative in columns:
            return alternative
    nearest = difflib.get_close_matches(name, list(columns), n=1, cutoff=0.0)
    hint = f"; did you mean '{nearest[0]}'?" if nearest else ""
    available = ", ".join(columns) or "none"
    raise DataError(f"{file}: no column '{name}' (columns: {available}){hint}")


def _image_cell(value, folder: Path, origin: str) -> Union[bytes, str]:
    if isinstance(value, dict):
        # Hugging Face Image feature: embedded bytes, or else a path relative to the file.
        value = value.get("bytes") or value.get("path")
    if isinstance(value, (bytes, bytearray, memoryview)) and len(value) > 0:
        return bytes(value)
    if isinstance(value, str) and value:
        return str(folder / value)
    raise DataError(f"{origin}: image cell has neither image bytes nor a path")


def _condition_cell(value, column: Optional[str], folder: Path, origin: str) -> Union[bytes, str, None]:
    if not column:
        return None
    return _image_cell(value, folder, f"{origin} (column '{column}')")


def _caption_cell(value, origin: str) -> Union[str, List[str]]:
    if value is None:
        raise DataError(f"{origin}: caption is missing")
    if isinstance(value, str) and not value.strip():
        raise DataError(f"{origin}: caption is empty")
    if isinstance(value, str):
        return value
    if isinstance(value, (list, tuple)) and value and all(isinstance(c, str) and c.strip() for c in value):
        return list(value)
    raise DataError(
        f"{origin}: caption must be a string or a non-empty list of strings, got {value!r:.60}"
    )


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())

