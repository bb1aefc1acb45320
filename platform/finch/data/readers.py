"""Read dataset files into (source, record) pairs, where source is 'file:line' for error messages.

Ray Data's own readers drop line numbers, and a bad row must be reported by file and line,
so each file is parsed here (one Ray task per file, see pipeline.py).
"""

from __future__ import annotations

import csv
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

SUPPORTED_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet", ".txt")


class DatasetError(ValueError):
    """A dataset that cannot be used; the message names file, line/row and field."""


def check_readable(path: str) -> None:
    """Fail fast (before Ray starts work) on a missing file or an unknown file type."""
    p = Path(path)
    if not p.exists():
        raise DatasetError(f"dataset file not found: {path}")
    if p.is_dir():
        if not (p / "dataset_info.json").exists() and not (p / "dataset_dict.json").exists():
            raise DatasetError(f"{path} is a folder but not a saved Hugging Face dataset (no dataset_info.json)")
    elif p.suffix not in SUPPORTED_SUFFIXES:
        raise DatasetError(f"{path}: unsupported file type {p.suffix!r}; use one of {', '.join(SUPPORTED_SUFFIXES)}")


def iter_records(path: str, mark_bad_rows: bool = False) -> Iterator[tuple[str, dict[str, Any] | DatasetError]]:
    """Each row as (source, record). A row that does not parse as a JSON object raises its
    DatasetError; with mark_bad_rows that error comes in place of the record instead, so the
    caller decides whether to stop or skip (data.bad_rows) and still gets the rows after it."""
    p = Path(path)
    rows = _saved_hf_dataset(p) if p.is_dir() else _READERS[p.suffix](p)
    for source, record in rows:
        if isinstance(record, DatasetError) and not mark_bad_rows:
            raise record
        yield source, record


def _jsonl(path: Path) -> Iterator[tuple[str, dict[str, Any] | DatasetError]]:
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if line.strip():
                source = f"{path}:{number}"
                # Without its newline, a line cut short reports its own last column, not "column 1".
                yield source, _row_or_error(lambda: _object(_parse_json(line.rstrip("\r\n"), source), source))  # noqa: B023 (called at once)


def _json(path: Path) -> Iterator[tuple[str, dict[str, Any] | DatasetError]]:
    document = _parse_json(path.read_text(encoding="utf-8"), str(path))
    if isinstance(document, dict) and isinstance(document.get("data"), list):
        document = document["data"]
    if not isinstance(document, list):
        raise DatasetError(f"{path}: a .json dataset must be an array of objects (or {{'data': [...]}})")
    for index, record in enumerate(document):
        source = f"{path}:row {index}"
        yield source, _row_or_error(lambda: _object(record, source))  # noqa: B023 (called at once)


def _csv(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    with path.open(encoding="utf-8", newline="") as handle:
        reader = csv.DictReader(handle)
        for record in reader:
            yield f"{path}:{reader.line_num}", record


def _parquet(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    import pyarrow.parquet as pq

    for index, record in enumerate(pq.read_table(path).to_pylist()):
        yield f"{path}:row {index}", record


def _text(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """Plain text: one document per blank-line-separated paragraph."""
    paragraph: list[str] = []
    start = 1
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if line.strip():
                if not paragraph:
                    start = number
                paragraph.append(line)
            elif paragraph:
                yield f"{path}:{start}", {"text": "".join(paragraph).rstrip("\n")}
                paragraph = []
    if paragraph:
        yield f"{path}:{start}", {"text": "".join(paragraph).rstrip("\n")}


def _saved_hf_dataset(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    import datasets

    dataset = datasets.load_from_disk(str(path))
    if isinstance(dataset, datasets.DatasetDict):
        if "train" not in dataset:
            raise DatasetError(f"{path}: saved DatasetDict has no 'train' split (has {list(dataset)})")
        dataset = dataset["train"]
    for index, record in enumerate(dataset):
        yield f"{path}:row {index}", record


def _row_or_error(read_row: Callable[[], dict[str, Any]]) -> dict[str, Any] | DatasetError:
    try:
        return read_row()
    except DatasetError as err:
        return err  # iter_records raises it or hands it on


def _parse_json(text: str, source: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise DatasetError(f"{source}: invalid JSON ({err.msg} at column {err.colno})") from None


def _object(record: Any, source: str) -> dict[str, Any]:
    if not isinstance(record, dict):
        raise DatasetError(f"{source}: expected a JSON object, got {type(record).__name__}")
    return record


_READERS = {".jsonl": _jsonl, ".json": _json, ".csv": _csv, ".parquet": _parquet, ".txt": _text}
