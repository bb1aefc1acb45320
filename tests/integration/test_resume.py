"""Fault tolerance: a killed training worker resumes from the last checkpoint, and an interrupted
run continues with `resume=True`; either way every optimizer step happens exactly once."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest

from finch.config import validate_config
from finch.train.run import RunExistsError, load_run_config, train
from tests.conftest import data_file, run_config_dict

pytestmark = pytest.mark.integration
STEPS = 12


def gsm8k_config(tmp_path: Path, model_dir: Path, **scale):
    return validate_config(
        run_config_dict(
            tmp_path,
            model_dir,
            [str(data_file("sft/gsm8k_chat_train.jsonl"))],
            name="resumable",
            train={"max_steps": STEPS, "save_steps": 4, "batch_size": 2},
            scale=scale,
        )
    )


def kill_worker_once_checkpoint_exists(
    run_dir: Path, checkpoint: str, actor_class: str = "RayTrainWorker"
) -> tuple[threading.Thread, list[int]]:
    """SIGKILL the training worker process (or another actor's) as soon as `checkpoint` is
    persisted; returns the thread and the list it fills with the killed pids."""
    import ray
    from ray.util.state import list_actors

    # This cluster's address: without it the state API refuses when another Ray runs on the machine.
    address = ray.get_runtime_context().gcs_address

    def killer():
        deadline = time.monotonic() + 300
        while not (run_dir / checkpoint).exists():
            if time.monotonic() > deadline:
                return
            time.sleep(0.2)
        workers = list_actors(address=address, filters=[("class_name", "=", actor_class), ("state", "=", "ALIVE")])
        for worker in workers:
            os.kill(worker["pid"], signal.SIGKILL)
            killed.append(worker["pid"])

    killed: list[int] = []
    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    return thread, killed


def trained_steps(run_dir: Path) -> list[int]:
    history = json.loads((run_dir / "final" / "log_history.json").read_text())
    return [entry["step"] for entry in history if "loss" in entry]


def test_killed_worker_resumes_from_last_checkpoint(ray_local, tiny_model_dir, tmp_path):
    config = gsm8k_config(tmp_path, tiny_model_dir, max_failures=2)
    killer, killed = kill_worker_once_checkpoint_exists(config.run_dir, "checkpoint-4")
    entry = train(config)
    killer.join(timeout=5)
    assert killed, "the worker was never killed: the test did not exercise a restart"
    assert trained_steps(config.run_dir) == list(range(1, STEPS + 1))
    assert entry.manifest["metrics"]["step"] == STEPS


def test_interrupted_run_continues_with_resume(ray_local, tiny_model_dir, tmp_path):
    config = gsm8k_config(tmp_path, tiny_model_dir, max_failures=0)
    killer, killed = kill_worker_once_checkpoint_exists(config.run_dir, "checkpoint-8")
    with pytest.raises(Exception, match="(?i)fail"):
        train(config)
    killer.join(timeout=5)
    assert killed
    assert not (config.run_dir / "final").exists()
    with pytest.raises(RunExistsError, match="--resume"):
        train(config)
    changed = validate_config(
        {**config.model_dump(mode="json"), "data": {**config.data.model_dump(), "max_length": 64}}
    )
    with pytest.raises(RunExistsError, match="changed since the interrupted run: data.max_length"):
        train(changed, resume=True)

    # what `finch train --resume RUN_FOLDER` does: the config comes from the run folder
    entry = train(load_run_config(config.run_dir), resume=True)
    assert trained_steps(config.run_dir) == list(range(1, STEPS + 1))
    assert entry.version == 1
    with pytest.raises(RunExistsError, match="already finished"):
        train(config, resume=True)


def test_grpo_survives_a_killed_rollout_engine_and_a_killed_worker(ray_local, tiny_serving_model_dir, tmp_path):
    """The rollout engine actor killed after step 2's checkpoint, the training worker after step 4's:
    the engine restarts, the workers restart from the last checkpoint and publish its policy again,
    and every step trains once, each on the policy published after the step before."""
    steps = 6
    config = validate_config(
        run_config_dict(
            tmp_path,
            tiny_serving_model_dir,
            [str(data_file("sft/gsm8k_chat_train.jsonl"))],
            name="grpo-faults",
            data={"max_length": 96, "overlong": "skip"},
            train={"objective": "grpo", "max_steps": steps, "save_steps": 2, "batch_size": 4},
            grpo={"num_generations": 4, "max_completion_length": 6, "rewards": [{"name": "regex", "pattern": "[0-9]"}]},
            scale={"max_failures": 3},
        )
    )
    engine_killer, engines = kill_worker_once_checkpoint_exists(config.run_dir, "checkpoint-2", "RolloutEngine")
    worker_killer, workers = kill_worker_once_checkpoint_exists(config.run_dir, "checkpoint-4")
    entry = train(config)
    engine_killer.join(timeout=5)
    worker_killer.join(timeout=5)
    assert engines and workers, "nothing was killed: the test did not exercise a restart"
    history = json.loads((config.run_dir / "final" / "log_history.json").read_text())
    versions = [(e["step"], e["rollouts/policy_version"]) for e in history if "rollouts/policy_version" in e]
    assert versions == [(step, step - 1) for step in range(1, steps + 1)]
    assert entry.manifest["metrics"]["step"] == steps
