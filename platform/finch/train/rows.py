"""A training worker's rows on local disk, read one row at a time.

Ray Data hands every worker all rows (train/run.py: HF Trainer's sampler shards them by index,
which is what keeps resume exact). Held as Python lists they cost ~83 bytes per token in every
worker, so memory grew with the dataset. Here the first worker of a node has its shard streamed
from Ray's object store into one flat int32 file per list column plus the row offsets; every
worker of the node then reads a row with `pread` when the sampler asks for it.

The copy runs in a Ray task of its own on the node, not in the training worker: reading the
object store maps its shared-memory pages into the reader, where they count as resident memory
for as long as the process lives, and the training worker would carry every block it had read.

`pread` and not a memory map: read pages stay in the page cache, shared by the node's workers and
dropped under memory pressure, and never count toward a worker's resident memory, which stays
flat however large the dataset is. Not HF `datasets` either (Arrow, memory-mapped) for the same
reason; DPO still converts to it, because TRL accepts nothing else (train/dpo.py).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

VALUE_TYPE = np.int32  # token ids, labels (-100) and positions
COLUMNS_FILE = "columns.json"  # written last: a folder without it is incomplete
WRITE_BATCH_ROWS = 256


def rows_root() -> Path:
    """Where a node keeps the rows of its running trainings (one folder per run)."""
    return Path(tempfile.gettempdir()) / "finch-rows"


def run_rows_name(run_name: str, run_dir: Path) -> str:
    """A run's folder under rows_root(): its name and a digest of its run folder, so that runs of
    one name from different output folders (two users of one cluster) never share rows."""
    return f"{run_name}-{hashlib.sha256(str(run_dir.resolve()).encode()).hexdigest()[:12]}"


class RowStore:
    """Map-style dataset (what torch's DataLoader indexes) over a folder written by `write_rows`: a
    row is a dict of int32 numpy arrays (list columns) and Python ints (scalar columns). No torch
    import: the task that writes the rows loads this module and needs none."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        layout = json.loads((self.folder / COLUMNS_FILE).read_text())
        self.offsets = {name: np.load(self.folder / f"{name}.offsets.npy") for name in layout["lists"]}
        self.scalars = {name: np.load(self.folder / f"{name}.npy") for name in layout["scalars"]}
        self.length = layout["rows"]
        self._descriptors: dict[str, int] = {}

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not -self.length <= index < self.length:
            raise IndexError(f"row {index} of {self.length}")
        index %= self.length
        row: dict[str, Any] = {name: self._read(name, index) for name in self.offsets}
        row.update({name: values[index].item() for name, values in self.scalars.items()})
        return row

    def _read(self, column: str, index: int) -> np.ndarray:
        start, end = self.offsets[column][index : index + 2]
        if column not in self._descriptors:
            self._descriptors[column] = os.open(self.folder / f"{column}.bin", os.O_RDONLY)
        size = np.dtype(VALUE_TYPE).itemsize
        return np.frombuffer(
            os.pread(self._descriptors[column], int(end - start) * size, int(start) * size), VALUE_TYPE
        )

    def __getstate__(self) -> dict[str, Any]:  # descriptors do not travel between processes
        return {**self.__dict__, "_descriptors": {}}


def write_rows(batches: Iterable[pa.Table], folder: Path, key: str) -> RowStore:
    """Write Arrow batches of rows into `folder` (list columns as flat values plus offsets, other
    columns as one array each); `key` names the data, so a later reader can tell it is current."""
    folder.mkdir(parents=True, exist_ok=True)
    lengths: dict[str, list[np.ndarray]] = {}
    scalars: dict[str, list[np.ndarray]] = {}
    with contextlib.ExitStack() as files:
        values: dict[str, Any] = {}
        for batch in batches:
            for name in batch.column_names:
                column = batch.column(name)
                if not pa.types.is_list(column.type) and not pa.types.is_large_list(column.type):
                    scalars.setdefault(name, []).append(column.to_numpy())
                    continue
                if name not in values:
                    values[name] = files.enter_context(open(folder / f"{name}.bin", "wb"))
                for chunk in column.chunks:
                    # safe cast: an id that does not fit int32 raises instead of wrapping around
                    pc.cast(chunk.flatten(), pa.int32()).to_numpy().tofile(values[name])
                    lengths.setdefault(name, []).append(chunk.value_lengths().to_numpy())
    counts = {len(np.concatenate(parts)) for parts in [*lengths.values(), *scalars.values()]}
    if len(counts) > 1:
        raise ValueError(f"columns of different lengths in {folder}: {counts}")
    for name, parts in lengths.items():
        np.save(
            folder / f"{name}.offsets.npy", np.concatenate([[0], np.cumsum(np.concatenate(parts))]).astype(np.int64)
        )
    for name, parts in scalars.items():
        np.save(folder / f"{name}.npy", np.concatenate(parts))
    layout = {"key": key, "rows": counts.pop() if counts else 0, "lists": sorted(lengths), "scalars": sorted(scalars)}
    (folder / COLUMNS_FILE).write_text(json.dumps(layout))
    return RowStore(folder)


def node_rows(folder: Path, key: str, write: Callable[[Path, str], Any]) -> RowStore:
    """The rows in `folder`, written there by `write(folder, key)` for the first of the node's
    workers to take the folder's lock; the others wait for it and read the same files. A folder
    left by an earlier run (another key) or by a writer that died (no columns file) is written anew."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    with open(folder.parent / f"{folder.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also when the process dies
        if current_key(folder) != key:
            shutil.rmtree(folder, ignore_errors=True)
            write(folder, key)
        return RowStore(folder)


def write_shard_on_this_node(shard: Any, folder: Path, key: str) -> None:
    """Write a Ray Data shard's rows into `folder` from a task on this node (see the module's docstring).
    The task takes no CPU: the training workers may hold every one (a 2-core machine)."""
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    ray.get(_write_shard.options(scheduling_strategy=here).remote(shard, str(folder), key))


@ray.remote(num_cpus=0)
def _write_shard(shard: Any, folder: str, key: str) -> None:
    write_rows(shard.iter_batches(batch_size=WRITE_BATCH_ROWS, batch_format="pyarrow"), Path(folder), key)


def current_key(folder: Path) -> str | None:
    try:
        return json.loads((folder / COLUMNS_FILE).read_text())["key"]
    except (OSError, ValueError, KeyError):
        return None


Row = dict[str, Any]


def iterate(rows: RowStore, transform: Callable[[Row], Iterable[Row]] | None = None) -> Iterator[Row]:
    """Every row as a dict of Python lists and ints (what HF `datasets` builds a table from), or
    the rows `transform` makes of it, when given."""
    for index in range(len(rows)):
        row = {name: value.tolist() if isinstance(value, np.ndarray) else value for name, value in rows[index].items()}
        yield from transform(row) if transform else (row,)


def arrow_dataset(rows: RowStore, scratch: str, transform: Callable[[Row], Iterable[Row]] | None = None) -> Any:
    """The rows (each one's `transform`, when given) as an HF dataset, the only kind TRL's trainers
    take: written to an Arrow file in `scratch` a batch at a time and memory-mapped, never a whole
    copy in memory."""
    from datasets import Dataset

    return Dataset.from_generator(
        iterate,
        gen_kwargs={"rows": rows, "transform": transform},
        cache_dir=str(Path(scratch) / "arrow"),
        keep_in_memory=False,
    )
