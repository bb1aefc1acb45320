"""Process-wide setup: connecting to Ray (the cluster in RAY_ADDRESS, else the one `ray start`
last started on this machine if it still answers, else a local one started here) and finch's
cache folder."""

from __future__ import annotations

import logging
import os
import socket
from pathlib import Path


class OutputFolderError(OSError):
    """A run or registry folder cannot take what a training run is about to write."""


def cache_root() -> Path:
    """Where finch keeps what it generates once per machine: $FINCH_CACHE_DIR or ~/.cache/finch."""
    return Path(os.environ.get("FINCH_CACHE_DIR") or Path.home() / ".cache" / "finch")


def init_ray() -> None:
    import ray
    import ray.data

    if ray.is_initialized():
        return
    address = cluster_address()
    if address == "local":
        # Ray Train's preemption watcher follows node drains (spot instances, autoscaler downscaling);
        # a one-machine cluster finch starts has none, and the watcher's start logs an error-level
        # core-worker line on every run (ray-project/ray#53727). Clusters keep it. Ray Train passes the
        # driver's value on to its controller.
        os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
        # Serve's controller gives its HTTP proxy 3 readiness checks of 5 s to start, then kills it,
        # and `finch serve` fails with ActorDiedError. A proxy starting on a busy 2-core machine took
        # longer (measured: 37 s, beside two other Ray jobs). 3 x 30 s; an idle machine's proxy
        # is ready within seconds, so this never delays it. Ray's processes inherit the variable.
        os.environ.setdefault("RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S", "30")
    ray.init(
        address=address,
        logging_level=logging.WARNING,
        # Workers import finch from the same environment; keep their tokenizers single-threaded
        # so Ray Data tasks don't oversubscribe the cores. Their output goes to log files that Ray
        # forwards: unbuffered, each line arrives when it is printed.
        runtime_env={
            "env_vars": {"TOKENIZERS_PARALLELISM": "false", "HF_HUB_DISABLE_TELEMETRY": "1", "PYTHONUNBUFFERED": "1"}
        },
    )
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    context.print_on_execution_start = False
    # Blocks come out in input order, not in the order tasks finish: the same data gives the same
    # training rows in every run, which resuming a run relies on.
    context.execution_options.preserve_order = True
    # A bad dataset row should surface as finch's DatasetError ("file:line: field ..."),
    # not wrapped in Ray Data's generic UserCodeException.
    context.raise_original_map_exception = True
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    logging.getLogger("ray.train").setLevel(logging.WARNING)


def cluster_address() -> str:
    """RAY_ADDRESS if set; else the address `ray start` left in Ray's temp folder, if a cluster
    still answers there; else "local".

    Ray itself connects to that recorded address even when its cluster is gone (killed without
    `ray stop`, machine rebooted) and then waits for minutes before failing; finch checks first
    and starts a local cluster instead, saying so.
    """
    from ray._private.utils import read_ray_address  # Ray's own reader of `ray start`'s record

    if os.environ.get("RAY_ADDRESS"):
        return os.environ["RAY_ADDRESS"]
    recorded = read_ray_address()
    if not recorded:
        return "local"
    host, _, port = recorded.rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=3).close()
        return recorded
    except (OSError, ValueError):
        logging.getLogger("finch").warning(
            "the Ray cluster `ray start` last started here (%s) does not answer; starting a local one "
            "(`ray stop` clears that record, RAY_ADDRESS picks a cluster)",
            recorded,
        )
        return "local"
