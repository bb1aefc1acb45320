"""`finch train` and `finch chat` as a user runs them: real CLI processes, a real local Ray cluster."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from finch.chat import ChatSession
from finch.fingerprint import fingerprint_model_folder
from finch.registry.store import resolve_entry
from tests.conftest import run_config_dict, write_jsonl

pytestmark = pytest.mark.integration
FINCH = [sys.executable, "-m", "finch.cli"]
FACTS = [
    {
        "instruction": f"What is the code word for room {n}?",
        "input": "",
        "output": f"The code word for room {n} is lantern-{n}.",
    }
    for n in range(40)
]


def finch(*args: str, cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([*FINCH, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_plain_model_dir):
    """One real `finch train` run, shared by the checks below."""
    tmp_path = tmp_path_factory.mktemp("e2e")
    data = write_jsonl(tmp_path / "facts.jsonl", FACTS)
    config = run_config_dict(tmp_path, tiny_plain_model_dir, [str(data)], name="facts")
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config))
    result = finch("train", "run.yaml", "train.lr=5e-3", cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return tmp_path, result


def test_registry_entry_has_peft_files_and_a_complete_manifest(trained, tiny_plain_model_dir):
    tmp_path, _ = trained
    entry = resolve_entry(tmp_path / "registry", "facts")
    assert entry.ref == "facts@v1"
    assert sorted(p.name for p in entry.path.iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
        "finch_manifest.json",
        "loss.png",
    ]
    manifest = entry.manifest
    assert manifest["base_model"] == {
        "id": str(tiny_plain_model_dir),
        "revision": None,  # a hub commit for hub ids
        "fingerprint": fingerprint_model_folder(tiny_plain_model_dir),
    }
    assert manifest["dataset"]["fingerprint"].startswith("sha256:")
    assert manifest["dataset"]["stats"]["examples"] == len(FACTS)
    assert manifest["config"]["train"]["lr"] == 5e-3  # the override, resolved
    assert manifest["config"]["data"]["packing"] is True  # a default, filled in
    assert manifest["template"] == "alpaca"  # the tokenizer has no chat template
    assert manifest["metrics"]["step"] == 6 and manifest["metrics"]["train_loss"] > 0
    assert manifest["finch_version"] and manifest["created_at"].endswith("+00:00")
    # what the run computed in, and why: the config's float32 is kept, on this machine's CPU
    assert manifest["precision"]["weights"] == "float32" and manifest["precision"]["mixed_precision"] == "no"
    assert (
        manifest["precision"]["device"]["kind"] == "cpu" and "measured" in manifest["precision"]["device"]["evidence"]
    )
    run_dir = tmp_path / "runs" / "facts"
    assert (run_dir / "loss.png").stat().st_size > 1000
    history = json.loads((run_dir / "final" / "log_history.json").read_text())
    assert [e["step"] for e in history if "loss" in e] == [1, 2, 3, 4, 5, 6]
    assert {p.name for p in run_dir.glob("checkpoint-*")} == {"checkpoint-3", "checkpoint-6"}


def test_the_first_line_says_the_precision_and_every_step_line_arrives_through_a_pipe(trained):
    _, result = trained  # stdout was a pipe, as under `ray job submit` or `make demo > log`
    lines = [line for line in result.stdout.splitlines() if line.startswith("finch:")]
    assert lines[0].startswith("finch: precision float32 weights on ") and "CPU" in lines[0]
    assert "finch: facts: starting the training workers" in result.stdout
    steps = [line for line in lines if line.startswith("finch: step ")]
    assert steps[0].startswith("finch: step 1/6")  # the first step is shown before any logging step
    assert any(line.startswith("finch: step 6/6") for line in steps)
    assert "PreemptionWatcher" not in result.stdout + result.stderr  # Ray's error line on local clusters


def test_adapter_loads_with_plain_peft_and_changes_the_model(trained, tiny_plain_model_dir):
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    tmp_path, _ = trained
    entry = resolve_entry(tmp_path / "registry", "facts")
    base = AutoModelForCausalLM.from_pretrained(tiny_plain_model_dir, dtype=torch.float32)
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        base_logits = base(input_ids=ids).logits
        model = PeftModel.from_pretrained(base, entry.path).eval()
        tuned_logits = model(input_ids=ids).logits
    saved = load_file(entry.path / "adapter_model.safetensors")
    assert saved and all(".lora_" in key for key in saved)
    assert any("lora_B" in key and value.abs().sum() > 0 for key, value in saved.items())
    assert not torch.allclose(base_logits, tuned_logits)


def test_chat_shows_base_and_adapter_side_by_side(trained):
    tmp_path, _ = trained
    result = finch(
        "chat",
        "--adapter",
        "facts",
        "--prompt",
        "What is the code word for room 3?",
        "--max-new-tokens",
        "8",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "finch: generating in float32 on " in result.stdout  # the run's explicit dtype, kept
    # The table shows each model's greedy answer under its name, in that order, and they differ.
    expected = ChatSession.from_registry(tmp_path / "registry", ["facts"]).side_by_side(
        "What is the code word for room 3?", max_new_tokens=8
    )
    assert list(expected) == ["base", "facts@v1"] and expected["base"] != expected["facts@v1"]
    assert table_columns(result.stdout) == [squeezed(f"{name}{answer}") for name, answer in expected.items()]


def squeezed(text: str) -> str:
    return "".join(text.split())


def table_columns(printed: str) -> list[str]:
    """Each column of the rich table in `printed`, its cells joined without whitespace (rich wraps them)."""
    lines = printed.replace("┃", "│").splitlines()  # the header row's rule is heavy
    rows = [line.strip().strip("│").split("│") for line in lines if line.lstrip().startswith("│")]
    return ["".join(squeezed(row[i]) for row in rows) for i in range(len(rows[0]))]


def test_second_run_with_same_name_needs_overwrite(trained):
    tmp_path, _ = trained
    result = finch("train", "run.yaml", cwd=tmp_path)
    assert result.returncode == 2 and "--overwrite" in result.stdout


def test_bad_config_key_fails_before_any_work(trained):
    tmp_path, _ = trained
    result = finch("train", "run.yaml", "train.learning_rate=1", cwd=tmp_path, timeout=120)
    assert result.returncode == 2
    assert "unknown key 'train.learning_rate'" in result.stdout
    assert "Traceback" not in result.stdout + result.stderr


def test_bad_dataset_row_names_file_and_line(tmp_path, tiny_plain_model_dir):
    data = tmp_path / "bad.jsonl"
    data.write_text(
        json.dumps(FACTS[0]) + "\n" + json.dumps({"instruction": "Q", "output": ["not", "a", "string"]}) + "\n"
    )
    config = run_config_dict(tmp_path, tiny_plain_model_dir, [str(data)], name="bad")
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config))
    result = finch("train", "run.yaml", cwd=tmp_path)
    assert result.returncode == 2, result.stderr[-2000:]
    assert f"{data}:2: field output: expected a string, got list" in " ".join(result.stdout.split())
    assert not (tmp_path / "registry" / "bad").exists() or not any((tmp_path / "registry" / "bad").iterdir())
