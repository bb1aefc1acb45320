"""Training under faults that kill more than a worker (tests/integration/test_resume.py covers a
killed worker): the `finch train` process and the Ray cluster it started, SIGKILLed together the
moment a checkpoint is being written, then the same run resumed; and a registry write killed midway."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from finch.registry.store import list_adapters, publish
from tests.conftest import REPO, data_file, run_config_dict

pytestmark = pytest.mark.integration
STEPS = 12
FINCH = [sys.executable, "-m", "finch.cli"]


def run_config(tmp_path: Path, model_dir: Path) -> Path:
    config = run_config_dict(
        tmp_path,
        model_dir,
        [str(data_file("sft/gsm8k_chat_train.jsonl"))],
        name="killed",
        train={"max_steps": STEPS, "save_steps": 4, "batch_size": 2},
    )
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def clean_env() -> dict[str, str]:
    """The CLI starts a Ray cluster of its own, not the test session's."""
    return {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}


def kill_group_when(process: subprocess.Popen, appears: Path, timeout_s: float = 300) -> None:
    """SIGKILL the process and everything in its session (the local Ray cluster it started, its
    training worker) as soon as `appears` exists: mid-write of that checkpoint."""
    deadline = time.monotonic() + timeout_s
    while not appears.exists():
        assert process.poll() is None, f"finch train ended (rc {process.returncode}) before {appears.name}"
        assert time.monotonic() < deadline, f"{appears} never appeared"
        time.sleep(0.005)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=60)


def session_processes(session_id: int) -> list[int]:
    import psutil

    alive = []
    for proc in psutil.process_iter(["pid"]):
        try:
            # a killed process whose parent died too stays a zombie where nothing reaps orphans
            if os.getsid(proc.pid) == session_id and proc.status() != psutil.STATUS_ZOMBIE:
                alive.append(proc.pid)
        except (ProcessLookupError, psutil.NoSuchProcess):
            pass
    return alive


def registered_checkpoints(run_dir: Path) -> list[str]:
    """The checkpoints Ray Train recorded as complete (what a resumed run may start from)."""
    snapshot = run_dir / "checkpoint_manager_snapshot.json"
    results = json.loads(snapshot.read_text())["checkpoint_results"] if snapshot.exists() else []
    return [result["checkpoint_dir_name"] for result in results]


def trained_steps(run_dir: Path) -> list[int]:
    history = json.loads((run_dir / "final" / "log_history.json").read_text())
    return [entry["step"] for entry in history if "loss" in entry]


def test_killed_driver_and_cluster_mid_checkpoint_resume_to_the_exact_step(tiny_model_dir, tmp_path):
    config_path = run_config(tmp_path, tiny_model_dir)
    run_dir = tmp_path / "runs" / "killed"
    first = subprocess.Popen(
        [*FINCH, "train", str(config_path)],
        cwd=REPO,
        env=clean_env(),
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    kill_group_when(first, run_dir / "checkpoint-8")
    # Ray's workers leave on their own once their raylet is gone: none trains on into the run folder
    deadline = time.monotonic() + 60
    while session_processes(first.pid) and time.monotonic() < deadline:
        time.sleep(1)
    assert session_processes(first.pid) == [], "processes of the killed run are still running"
    if "checkpoint-8" not in registered_checkpoints(run_dir):
        # Ray had not recorded it: make sure it is torn, as a copy killed midway leaves it
        optimizer = run_dir / "checkpoint-8" / "optimizer.pt"
        if optimizer.exists():
            optimizer.write_bytes(optimizer.read_bytes()[: optimizer.stat().st_size // 2])
    assert not (tmp_path / "registry" / "killed").exists()

    again = subprocess.run(
        [*FINCH, "train", str(config_path)], cwd=REPO, env=clean_env(), capture_output=True, text=True, timeout=600
    )
    assert again.returncode != 0 and "--resume" in again.stdout + again.stderr  # a plain re-run never trains over it

    resumed = subprocess.run(
        [*FINCH, "train", "--resume", str(run_dir)],
        cwd=REPO,
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert trained_steps(run_dir) == list(range(1, STEPS + 1))  # each step once: none lost, none repeated
    [entry] = list_adapters(tmp_path / "registry")
    assert entry.ref == "killed@v1" and entry.manifest["metrics"]["step"] == STEPS
    assert (entry.path / "adapter_model.safetensors").stat().st_size > 0


PUBLISH_BIG = """
import sys
from pathlib import Path
from finch.registry.store import publish
folder = Path(sys.argv[1])
publish(sys.argv[2], "big", {"adapter_config.json": folder / "adapter_config.json",
                             "adapter_model.safetensors": folder / "adapter_model.safetensors"}, {})
"""


def test_a_registry_write_killed_midway_leaves_no_entry_and_the_next_write_is_complete(tmp_path):
    source = tmp_path / "adapter"
    source.mkdir()
    (source / "adapter_config.json").write_text("{}")
    with (source / "adapter_model.safetensors").open("wb") as big:  # large enough to be killed while copying
        big.write(os.urandom(1 << 20) * 256)
    registry = tmp_path / "registry"
    writer = subprocess.Popen([sys.executable, "-c", PUBLISH_BIG, str(source), str(registry)], cwd=REPO)
    staging = registry / "big"
    while not any(p.name.startswith(".staging-") and any(p.iterdir()) for p in staging.glob(".staging-*")):
        assert writer.poll() is None, "the write finished before it could be killed"
        time.sleep(0.005)
    writer.send_signal(signal.SIGKILL)
    writer.wait(timeout=30)
    assert list_adapters(registry) == []  # the half-copied folder is invisible to readers
    (source / "adapter_model.safetensors").write_bytes(b"small")
    entry = publish(registry, "big", {f.name: f for f in source.iterdir()}, {})
    assert entry.ref == "big@v1" and [e.ref for e in list_adapters(registry)] == ["big@v1"]
    assert (entry.path / "adapter_model.safetensors").read_bytes() == b"small"
