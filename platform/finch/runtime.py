"""Process-wide setup: connecting to Ray (the cluster in RAY_ADDRESS if set, else a local one
started here) and finch's cache folder."""

from __future__ import annotations

import logging
import os
from pathlib import Path


def cache_root() -> Path:
    """Where finch keeps what it generates once per machine: $FINCH_CACHE_DIR or ~/.cache/finch."""
    return Path(os.environ.get("FINCH_CACHE_DIR") or Path.home() / ".cache" / "finch")


def init_ray() -> None:
    import ray
    import ray.data

    if ray.is_initialized():
        return
    ray.init(
        address=os.environ.get("RAY_ADDRESS"),
        logging_level=logging.WARNING,
        # Workers import finch from the same environment; keep their tokenizers single-threaded
        # so Ray Data tasks don't oversubscribe the cores.
        runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false", "HF_HUB_DISABLE_TELEMETRY": "1"}},
    )
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    context.print_on_execution_start = False
    # A bad dataset row should surface as finch's DatasetError ("file:line: field ..."),
    # not wrapped in Ray Data's generic UserCodeException.
    context.raise_original_map_exception = True
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    logging.getLogger("ray.train").setLevel(logging.WARNING)
