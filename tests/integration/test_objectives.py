"""Full fine-tuning, continued pre-training and DPO through `finch train` (CLI, local Ray cluster)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import yaml

from finch.registry.store import ADAPTER_FILES, resolve_entry
from tests.conftest import data_file, run_config_dict
from tests.integration.test_train_e2e import finch

pytestmark = pytest.mark.integration


def run(tmp_path: Path, model_dir: Path, name: str, files: list[str], **sections) -> tuple[Path, str]:
    config = run_config_dict(tmp_path, model_dir, files, name=name, **sections)
    (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(config))
    result = finch("train", f"{name}.yaml", cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return tmp_path / "registry", result.stdout


def mlflow_history(tmp_path: Path, metric: str) -> list[tuple[int, float]]:
    os.environ["MLFLOW_ALLOW_FILE_STORE"] = "true"
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=(tmp_path / "runs" / "mlruns").as_uri())
    run_id = (tmp_path / "runs").glob("*/mlflow_run_id").__next__().read_text()
    assert client.get_run(run_id).info.status == "FINISHED"
    return [(m.step, m.value) for m in client.get_metric_history(run_id, metric)]


def test_dpo_run_registers_an_adapter_and_tracks_reward_margins(tmp_path, tiny_model_dir):
    pairs = str(data_file("preference/orca_dpo_pairs_openai_format.jsonl"))
    registry, stdout = run(
        tmp_path,
        tiny_model_dir,
        "prefs",
        [pairs],
        data={"max_length": 256, "eval_fraction": 0.1},
        train={"objective": "dpo", "max_steps": 6, "eval_steps": 3, "lr": 5e-3},
    )
    entry = resolve_entry(registry, "prefs")
    assert entry.kind == "adapter" and all((entry.path / f).exists() for f in ADAPTER_FILES)
    history = json.loads((tmp_path / "runs" / "prefs" / "final" / "log_history.json").read_text())
    first_eval = next(e for e in history if "eval_loss" in e)
    assert first_eval["eval_loss"] == pytest.approx(math.log(2), abs=1e-4)
    assert entry.manifest["metrics"]["eval_rewards/margins"] > 0
    assert "finch: step 6/6" in stdout and "margin" in stdout
    margins = mlflow_history(tmp_path, "rewards/margins")
    assert [step for step, _ in margins] == list(range(1, 7))


def test_reward_model_is_registered_with_its_held_out_accuracy_and_never_served_as_a_generator(
    tmp_path, tiny_model_dir
):
    from finch.fingerprint import fingerprint_model_folder
    from finch.serve.engine import AdapterRefused, check_servable

    pairs = str(data_file("preference/orca_dpo_pairs_openai_format.jsonl"))
    registry, stdout = run(
        tmp_path,
        tiny_model_dir,
        "judge",
        [pairs],
        data={"max_length": 256, "eval_fraction": 0.1},
        train={"objective": "reward", "max_steps": 6, "eval_steps": 3, "lr": 5e-3},
    )
    entry = resolve_entry(registry, "judge")
    assert entry.kind == "adapter" and json.loads((entry.path / "adapter_config.json").read_text())["task_type"] == (
        "SEQ_CLS"
    )
    assert 0.0 <= entry.manifest["metrics"]["eval_accuracy"] <= 1.0  # on the 10% of pairs held out
    assert "finch: step 6/6" in stdout and "eval accuracy" in stdout
    assert [step for step, _ in mlflow_history(tmp_path, "eval_accuracy")] == [0, 3, 6]
    with pytest.raises(AdapterRefused, match="judge@v1 is a reward model: it scores answers"):
        check_servable(entry, fingerprint_model_folder(tiny_model_dir), max_lora_rank=64)
    chat = finch("chat", "--adapter", "judge", "--prompt", "hi", cwd=tmp_path)
    assert chat.returncode != 0 and "judge@v1 is a reward model" in chat.stdout + chat.stderr


def test_pretraining_trains_every_token_and_reports_perplexity(tmp_path, tiny_model_dir):
    # a slice of tinyshakespeare: blank-line separated speeches become documents
    text = data_file("pretrain/tinyshakespeare.txt").read_text().split("\n\n")[:300]
    corpus = tmp_path / "shakespeare.txt"
    corpus.write_text("\n\n".join(text))
    registry, stdout = run(
        tmp_path,
        tiny_model_dir,
        "bard",
        [str(corpus)],
        data={"max_length": 128, "eval_fraction": 0.1},
        train={"objective": "pretrain", "max_steps": 8, "eval_steps": 4, "lr": 1e-2},
    )
    entry = resolve_entry(registry, "bard")
    stats = entry.manifest["dataset"]["stats"]
    # every token carries loss except the one-token overlap that starts each continuation chunk
    assert stats["truncated"] == 0 and stats["examples"] > len(text)
    assert stats["trainable_tokens"] == stats["tokens"] - (stats["examples"] - len(text))
    evals = [(s, v) for s, v in mlflow_history(tmp_path, "eval_perplexity")]
    assert [s for s, _ in evals] == [0, 4, 8]
    assert evals[-1][1] < evals[0][1]
    assert entry.manifest["metrics"]["eval_perplexity"] == pytest.approx(
        math.exp(entry.manifest["metrics"]["eval_loss"])
    )


def test_full_fine_tuning_registers_a_standalone_model_that_chat_serves(tmp_path, tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    data = data_file("sft/gsm8k_chat_train.jsonl")
    registry, _ = run(tmp_path, tiny_model_dir, "fullsft", [str(data)], train={"method": "full", "max_steps": 4})
    entry = resolve_entry(registry, "fullsft")
    assert entry.kind == "model"
    files = {p.name for p in entry.path.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "loss.png", "finch_manifest.json"} <= files
    assert not files & {*ADAPTER_FILES, "training_args.bin"}
    AutoTokenizer.from_pretrained(entry.path)
    trained = AutoModelForCausalLM.from_pretrained(entry.path).state_dict()
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict()
    assert all(not (trained[k] == base[k]).all() for k in base)
    result = finch("chat", "--adapter", "fullsft", "--prompt", "What is 2+3?", "--max-new-tokens", "8", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "fullsft@v1" in result.stdout and "base" in result.stdout
