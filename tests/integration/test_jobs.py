"""`ray job submit` against a Ray cluster of the test's own (`ray start --head`, token auth on):
a training job and a sweep job, as a user submits them from the repository root."""

from __future__ import annotations

import csv
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from finch.registry.store import resolve_entry
from tests.conftest import free_ports, run_config_dict, write_jsonl
from tests.integration.test_train_e2e import FACTS

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
RUNTIME_ENV = '{"py_modules": ["platform/finch"]}'  # finch importable on a cluster that lacks it


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A head node of our own, stopped by signalling its `ray start --block` process: never
    `ray stop`, which would stop every Ray cluster on the machine. Its own temp folder keeps
    `ray start`'s address record out of /tmp/ray, where later `ray.init()` calls would find it."""
    gcs, dashboard, client, agent, metrics = free_ports(5)
    temp_dir = tempfile.mkdtemp(prefix="finch-ray-", dir="/tmp")  # short: Ray's socket paths live under it
    token = secrets.token_hex(16)
    env = os.environ | {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token, "PATH": f"{BIN}:{os.environ['PATH']}"}
    env.pop("RAY_ADDRESS", None)
    head = subprocess.Popen(
        [
            str(BIN / "ray"),
            "start",
            "--head",
            "--block",
            f"--port={gcs}",
            f"--dashboard-port={dashboard}",
            "--dashboard-host=127.0.0.1",
            f"--temp-dir={temp_dir}",
            f"--ray-client-server-port={client}",
            f"--dashboard-agent-listen-port={agent}",
            f"--metrics-export-port={metrics}",
            "--num-cpus=2",
            "--include-dashboard=true",
            "--disable-usage-stats",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    address = f"http://127.0.0.1:{dashboard}"
    try:
        wait_until_up(address, env)
        yield address, env, tmp_path_factory.mktemp("jobs")
    finally:
        head.terminate()  # `ray start --block` stops the processes it started
        head.wait(timeout=120)
        shutil.rmtree(temp_dir, ignore_errors=True)


def ray_cli(*args: str, env: dict, timeout: int = 60) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "ray"), *args], env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)


def wait_until_up(address: str, env: dict, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if ray_cli("job", "list", "--address", address, env=env).returncode == 0:
            return
        time.sleep(2)
    raise TimeoutError(f"the test's Ray head at {address} did not come up")


def submit_and_wait(address: str, env: dict, name: str, *entrypoint: str, timeout_s: float = 900) -> str:
    submitted = ray_cli(
        "job",
        "submit",
        "--address",
        address,
        "--submission-id",
        name,
        "--no-wait",
        "--working-dir",
        ".",
        "--runtime-env-json",
        RUNTIME_ENV,
        "--",
        *entrypoint,
        env=env,
    )
    assert submitted.returncode == 0, submitted.stdout + submitted.stderr
    deadline = time.monotonic() + timeout_s
    status = ""
    while time.monotonic() < deadline:
        # the CLI ends with "Job 'NAME' succeeded" / "failed" / "was stopped" once the job is over
        status = ray_cli("job", "status", "--address", address, name, env=env).stdout.lower()
        if any(f"job '{name}' {state}" in status for state in ("succeeded", "failed", "was stopped")):
            break
        time.sleep(5)
    logs = ray_cli("job", "logs", "--address", address, name, env=env).stdout
    assert f"job '{name}' succeeded" in status, status + logs[-4000:]
    return logs


def test_jobs_need_the_clusters_token(cluster):
    address, env, _ = cluster
    anonymous = ray_cli(
        "job", "list", "--address", address, env={k: v for k, v in env.items() if not k.startswith("RAY_AUTH")}
    )
    assert anonymous.returncode != 0
    wrong = ray_cli("job", "list", "--address", address, env=env | {"RAY_AUTH_TOKEN": "not-the-token"})
    assert wrong.returncode != 0


def test_train_and_sweep_jobs_register_adapters_on_the_cluster(cluster, tiny_serving_model_dir):
    """Both jobs also score a task (finch eval on vLLM, in the job): the train job after training,
    the sweep to rank its trial. One trial: ranking several by a task score is
    tests/unit/test_eval_config.py's, running them tests/integration/test_tune.py's."""
    address, env, tmp = cluster
    data = write_jsonl(tmp / "facts.jsonl", FACTS)
    task = {
        "name": "facts",
        "data": {"files": [str(write_jsonl(tmp / "facts_eval.jsonl", FACTS[:8]))]},
        "metrics": ["contains", "rouge_l"],
        "generation": {"max_tokens": 12},
    }
    run = run_config_dict(
        tmp,
        tiny_serving_model_dir,
        [str(data)],
        name="facts-job",
        data={"max_length": 128, "eval_fraction": 0.2},
        train={"max_steps": 4, "eval_steps": 2, "save_steps": 2, "lr": 5e-3, "eval_tasks": [task]},
    )
    run["tracking"] = {"mlflow": False}
    (tmp / "run.yaml").write_text(yaml.safe_dump(run))
    sweep = {
        "name": "facts-sweep",
        "run": str(tmp / "run.yaml"),
        "output_dir": str(tmp / "sweeps"),
        "search": {"algorithm": "grid", "space": {"lora.r": {"grid": [4]}}},
        "early_stopping": {"enabled": False},
        "metric": "facts/rouge_l",
        "mode": "max",
    }
    (tmp / "sweep.yaml").write_text(yaml.safe_dump(sweep))

    logs = submit_and_wait(address, env, "finch-train", "python", "jobs/finetune.py", "--config", str(tmp / "run.yaml"))
    assert "registered adapter facts-job@v1" in logs
    entry = resolve_entry(tmp / "registry", "facts-job")
    assert entry.manifest["config"]["train"]["max_steps"] == 4
    (scores,) = entry.manifest["evals"].values()
    assert scores["task"] == "facts" and scores["examples"] == 8 and set(scores["baseline"]) == {"contains", "rouge_l"}
    assert 0 <= scores["scores"]["rouge_l"] <= 1

    logs = submit_and_wait(address, env, "finch-sweep", "python", "jobs/sweep.py", "--config", str(tmp / "sweep.yaml"))
    assert "sweep facts-sweep: 1 trial, best" in logs
    best = resolve_entry(tmp / "registry", "facts-sweep")
    lineage = best.manifest["lineage"]
    assert lineage["sweep"] == "facts-sweep" and lineage["params"] == {"lora.r": 4}
    with (tmp / "sweeps" / "facts-sweep" / "results.csv").open() as handle:
        trials = list(csv.DictReader(handle))
    assert [float(t["facts/rouge_l"]) for t in trials] == [lineage["facts/rouge_l"]]
    assert [e["scores"]["rouge_l"] for e in best.manifest["evals"].values()] == [lineage["facts/rouge_l"]]
