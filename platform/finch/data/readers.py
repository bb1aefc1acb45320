"""Read dataset files into (source, record) pairs, where source is 'file:line' for error messages.

Ray Data's own readers drop line numbers, and a bad row must be reported by file and line,
so each file is parsed here (one Ray task per file, see pipeline.py).
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
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


def iter_records(path: str) -> Iterator[tuple[str, dict[str, Any]]]:
    p = Path(path)
    if p.is_dir():
        yield from _saved_hf_dataset(p)
    else:
        yield from _READERS[p.suffix](p)


def _jsonl(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if line.strip():
                yield f"{path}:{number}", _object(_parse_json(line, f"{path}:{number}"), f"{path}:{number}")


def _json(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    document = _parse_json(path.read_text(encoding="utf-8"), str(path))
    if isinstance(document, dict) and isinstance(document.get("data"), list):
        document = document["data"]
    if not isinstance(document, list):
        raise DatasetError(f"{path}: a .json dataset must be an array of objects (or {{'data': [...]}})")
    for index, record in enumerate(document):
        yield f"{path}:row {index}", _object(record, f"{path}:row {index}")


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
