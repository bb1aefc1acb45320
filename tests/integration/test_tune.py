"""`finch tune` as a user runs it: a real CLI process, Ray Tune over Ray Train trials on a local cluster."""

from __future__ import annotations

import csv
import json
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from finch.config import SweepConfig, validate_config
from finch.registry.store import resolve_entry
from finch.tune.sweep import search_space, tune_config
from tests.conftest import run_config_dict, write_jsonl
from tests.integration.test_train_e2e import FACTS, FINCH, finch

pytestmark = pytest.mark.integration
GOOD_LR, USELESS_LR = 5e-3, 1e-7


def write_sweep(tmp_path: Path, model_dir: Path, **sweep) -> Path:
    data = write_jsonl(tmp_path / "facts.jsonl", FACTS)
    run = run_config_dict(
        tmp_path,
        model_dir,
        [str(data)],
        name="facts",
        data={"max_length": 128, "eval_fraction": 0.2},
        train={"max_steps": 8, "eval_steps": 2, "save_steps": 2, "scheduler": "constant"},
    )
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(run))
    config = {
        "name": "lr-sweep",
        "run": "run.yaml",
        "output_dir": str(tmp_path / "sweeps"),
        "register_as": "facts-best",
        "search": {"algorithm": "grid", "space": {"train.lr": {"grid": [GOOD_LR, USELESS_LR]}}},
        "early_stopping": {"grace_period": 2, "reduction_factor": 2},
    } | sweep
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump(config))
    return tmp_path / "sweep.yaml"


def interrupt_after_first_checkpoint(tmp_path: Path) -> subprocess.CompletedProcess:
    """Start `finch tune`, and press Ctrl-C once the first trial has a checkpoint."""
    process = subprocess.Popen(
        [*FINCH, "tune", "sweep.yaml"], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    trials = tmp_path / "sweeps" / "lr-sweep" / "trials"
    deadline = time.monotonic() + 600
    while not any(trials.glob("trial-*/checkpoint_manager_snapshot.json")) and time.monotonic() < deadline:
        assert process.poll() is None, process.stdout.read()[-4000:]
        time.sleep(1)
    process.send_signal(signal.SIGINT)
    stdout, _ = process.communicate(timeout=300)
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, "")


def test_interrupted_sweep_resumes_stops_a_trailing_trial_and_registers_the_best(tmp_path, tiny_plain_model_dir):
    write_sweep(tmp_path, tiny_plain_model_dir)
    interrupted = interrupt_after_first_checkpoint(tmp_path)
    assert interrupted.returncode == 2 and "continue it with --resume" in interrupted.stdout, interrupted.stdout[-4000:]
    assert not (tmp_path / "registry" / "facts-best").exists()

    result = finch("tune", "sweep.yaml", "--resume", cwd=tmp_path, timeout=900)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    sweep_dir = tmp_path / "sweeps" / "lr-sweep"
    rows = list(csv.DictReader((sweep_dir / "results.csv").open()))
    by_lr = {float(row["train.lr"]): row for row in rows}
    # trials run one at a time in grid order: the useless lr trails the good one at its second
    # evaluation (ASHA's first rung) and is stopped there
    assert by_lr[GOOD_LR]["status"] == "finished" and by_lr[USELESS_LR]["status"] == "stopped early"
    assert int(by_lr[USELESS_LR]["evaluations"]) == 2 < int(by_lr[GOOD_LR]["evaluations"])
    assert (sweep_dir / "results.png").stat().st_size > 10_000
    assert "sweep lr-sweep: 2 trials" in result.stdout and "stopped early" in result.stdout

    entry = resolve_entry(tmp_path / "registry", "facts-best")
    lineage = entry.manifest["lineage"]
    assert lineage["sweep"] == "lr-sweep" and lineage["trial"] == by_lr[GOOD_LR]["trial"]
    assert lineage["params"] == {"train.lr": GOOD_LR}
    assert entry.manifest["config"]["train"]["lr"] == GOOD_LR
    # the registered eval loss is the final weights' own (an evaluation after the last step)
    assert entry.manifest["metrics"]["eval_loss"] == pytest.approx(float(by_lr[GOOD_LR]["eval_loss"]))
    trial_run = sweep_dir / "trials" / f"trial-{lineage['trial']}"
    # the interrupted trial went on from its checkpoint: its history holds the evaluations from
    # before the interrupt, then the resumed run's first one at the checkpoint's step
    evaluated = [
        e["step"] for e in json.loads((trial_run / "final" / "log_history.json").read_text()) if "eval_loss" in e
    ]
    assert evaluated.count(0) == 1 and len(evaluated) > len(set(evaluated)), evaluated

    again = finch("tune", "sweep.yaml", cwd=tmp_path)
    assert again.returncode == 2 and "--resume" in again.stdout


def test_bad_search_values_fail_before_any_trial(tmp_path, tiny_plain_model_dir):
    write_sweep(tmp_path, tiny_plain_model_dir, search={"space": {"train.batch_size": {"choice": [4, 0]}}})
    result = finch("tune", "sweep.yaml", cwd=tmp_path)
    assert result.returncode == 2
    assert "search.space.train.batch_size.choice: 0 does not make a valid run config" in result.stdout
    assert not (tmp_path / "sweeps").exists()


def test_optuna_and_random_searchers_accept_finch_spaces():
    space = {
        "train.lr": {"loguniform": [1e-5, 1e-3]},
        "lora.r": {"choice": [8, 16]},
        "train.epochs": {"randint": [1, 3]},
    }
    for algorithm in ("optuna", "random"):
        sweep = validate_config(
            {
                "name": "s",
                "run": "r.yaml",
                "search": {"algorithm": algorithm, "space": space},
                "max_concurrent_trials": 3,
            },
            schema=SweepConfig,
        )
        searcher = tune_config(sweep).search_alg
        assert searcher.max_concurrent == 3  # the searcher itself holds the limit (Tune drops it otherwise)
        assert searcher.set_search_properties("eval_loss", "min", search_space(sweep))
        if algorithm == "optuna":
            suggestion = searcher.suggest("trial-1")
            assert 1e-5 <= suggestion["train.lr"] <= 1e-3 and suggestion["lora.r"] in (8, 16)
            assert 1 <= suggestion["train.epochs"] <= 3
