"""Training on a real chat dataset (GSM8K in OpenAI messages format) lowers held-out loss."""

from __future__ import annotations

import json

import pytest

from finch.config import validate_config
from finch.train.run import train
from tests.conftest import data_file, run_config_dict

pytestmark = pytest.mark.integration


def test_eval_loss_falls_on_gsm8k(ray_local, tiny_model_dir, tmp_path):
    config = validate_config(
        run_config_dict(
            tmp_path,
            tiny_model_dir,
            [str(data_file("sft/gsm8k_chat_train.jsonl"))],
            name="gsm8k",
            data={"eval_fraction": 0.1, "max_length": 256},
            train={
                "lr": 1e-2,
                "max_steps": 24,
                "batch_size": 4,
                "eval_steps": 12,
                "save_steps": 12,
                "scheduler": "constant",
            },
        )
    )
    entry = train(config)
    history = json.loads((config.run_dir / "final" / "log_history.json").read_text())
    evals = [(e["step"], e["eval_loss"]) for e in history if "eval_loss" in e]
    assert [step for step, _ in evals] == [0, 12, 24]
    assert evals[0][1] > evals[1][1] > evals[2][1], evals
    assert evals[-1][1] < evals[0][1] - 0.2, evals
    assert entry.manifest["metrics"]["eval_loss"] == evals[-1][1]
    assert entry.manifest["dataset"]["stats"]["eval_examples"] == 45
