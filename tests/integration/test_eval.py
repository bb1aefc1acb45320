"""`finch eval` on a real local Ray cluster and real vLLM (the CPU build here), against transformers + PEFT.

The base model and two adapters answer in the same engine's batches; every answer must be one of
transformers' greedy answers (allowing for near-ties, tests/greedy.py), the reference perplexity
must equal the training loss computed by hand, and the scores must land in the registry.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml

from finch.config import validate_config
from finch.data.tokenization import IGNORE_INDEX, final_answer_span, prompt_token_ids, tokenize_sample
from finch.fingerprint import fingerprint_model_folder
from finch.models.tokenizer import load_tokenizer
from finch.registry.store import publish, resolve_entry
from tests.conftest import make_adapter, run_config_dict, write_jsonl
from tests.greedy import greedy_answers, load_reference

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]
NEW_TOKENS = 6
ROWS = [
    {"messages": [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."}]},
    {"messages": [{"role": "user", "content": "Count to three."}, {"role": "assistant", "content": "One two three"}]},
    {"prompt": "Say hello in French.", "completion": "Bonjour"},
    {"messages": [{"role": "user", "content": "A prompt without a reference."}]},
    {"messages": [{"role": "user", "content": "word " * 200}, {"role": "assistant", "content": "too long"}]},
]


def answer_length(answer: str, reference: str | None, example: dict) -> int:
    """A user metric, imported by path."""
    return len(answer)


@dataclass
class Results:
    """What `finch eval` wrote: summary.json and examples.jsonl."""

    run_dir: Path
    summary: dict
    records: list[dict]
    fingerprint: str
    output: str


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory, tiny_serving_model_dir):
    """One `finch eval` run as a user starts it: base, two adapters and a fully fine-tuned entry (a copy of the base)."""
    tmp = tmp_path_factory.mktemp("eval")
    registry = tmp / "registry"
    manifest_config = validate_config(run_config_dict(tmp, tiny_serving_model_dir, ["unused.jsonl"])).model_dump(
        mode="json"
    )
    base = {"id": str(tiny_serving_model_dir), "fingerprint": fingerprint_model_folder(tiny_serving_model_dir)}
    for name, seed in (("a1", 1), ("a2", 2)):
        adapter = make_adapter(tiny_serving_model_dir, tmp / name, seed)
        files = {f: adapter / f for f in ("adapter_config.json", "adapter_model.safetensors")}
        publish(registry, name, files, {"base_model": base, "template": "chat", "config": manifest_config})
    model_files = {f.name: f for f in tiny_serving_model_dir.iterdir() if f.is_file()}
    publish(
        registry, "full", model_files, {"base_model": base, "template": "chat", "config": manifest_config}, kind="model"
    )
    data = write_jsonl(tmp / "eval.jsonl", ROWS)
    config = {
        "name": "smoke",
        "models": ["base", "a1", "a2@v1", "full"],
        "registry_dir": str(registry),
        "output_dir": str(tmp / "evals"),
        "model": {"path": str(tiny_serving_model_dir), "dtype": "float32"},
        "data": {"files": [str(data)]},
        "metrics": [
            "exact_match",
            "contains",
            "answer_tokens",
            "perplexity",
            {"name": "python", "function": "tests.integration.test_eval:answer_length", "label": "chars"},
        ],
        "generation": {"max_tokens": NEW_TOKENS},
        "engine": {"max_model_len": 128},
    }
    (tmp / "eval.yaml").write_text(yaml.safe_dump(config))
    env = os.environ | {"PYTHONPATH": str(REPO)}  # the user metric lives in this test module
    env.pop("RAY_ADDRESS", None)
    done = subprocess.run(
        [sys.executable, "-m", "finch.cli", "eval", "eval.yaml"],
        cwd=tmp,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    run_dir = tmp / "evals" / "smoke"
    summary = json.loads((run_dir / "summary.json").read_text())
    records = [json.loads(line) for line in (run_dir / "examples.jsonl").read_text().splitlines()]
    return Results(run_dir, summary["summary"], records, summary["dataset"]["fingerprint"], done.stdout), registry, tmp


def test_answers_equal_transformers_greedy_for_base_adapters_and_a_full_model(evaluated, tiny_serving_model_dir):
    result, registry, tmp = evaluated
    tokenizer = load_tokenizer(str(tiny_serving_model_dir))
    # the fully fine-tuned entry is a copy of the base weights on an engine of its own: the base's answers
    models = {"base": None, "a1@v1": tmp / "a1", "a2@v1": tmp / "a2", "full@v1": None}
    seen = set()
    for record in result.records[:4]:
        ids = prompt_token_ids(record["prompt"], tokenizer, "chat")
        for model, adapter_dir in models.items():
            reference = load_reference(tiny_serving_model_dir, adapter_dir)
            expected = [
                tokenizer.decode(a, skip_special_tokens=True)
                for a in greedy_answers(reference, ids, NEW_TOKENS, tokenizer.eos_token_id)
            ]
            got = record["answers"][model]["text"]
            assert got in expected, f"{model} on {record['prompt']}: vLLM {got!r} is none of transformers' {expected}"
            seen.add(got)
    assert len(seen) > 4  # the adapters change the answers, so the comparison can fail


def test_reference_perplexity_is_the_training_loss_on_the_answer(evaluated, tiny_serving_model_dir):
    result, _, tmp = evaluated
    tokenizer = load_tokenizer(str(tiny_serving_model_dir))
    model = load_reference(tiny_serving_model_dir, tmp / "a1")
    record = result.records[1]
    example = tokenize_sample(
        {"messages": [*record["prompt"], {"role": "assistant", "content": record["reference"]}]},
        "chat",
        tokenizer,
        10_000,
    )
    start, end = final_answer_span(example.labels)
    labels = torch.tensor([[IGNORE_INDEX] * start + example.labels[start:end]])
    with torch.no_grad():
        loss = model(input_ids=torch.tensor([example.input_ids[:end]]), labels=labels).loss
    assert record["answers"]["a1@v1"]["scores"]["perplexity"] == pytest.approx(math.exp(float(loss)), rel=1e-4)
    assert record["answers"]["a1@v1"]["reference_nll"][1] == end - start


def test_failing_rows_are_counted_and_prompt_only_rows_not_scored_against_a_reference(evaluated):
    result, _, _ = evaluated
    too_long, prompt_only = result.records[4], result.records[3]
    assert "max_model_len" in too_long["answers"]["base"]["errors"]["exact_match"]
    assert prompt_only["reference"] is None and prompt_only["answers"]["a1@v1"]["scores"]["exact_match"] is None
    assert prompt_only["answers"]["a1@v1"]["scores"]["chars"] == len(prompt_only["answers"]["a1@v1"]["text"])
    summary = result.summary["a2@v1"]
    assert summary["exact_match"]["errors"] == 1 and summary["exact_match"]["not_applicable"] == 1
    assert summary["exact_match"]["scored"] == 3
    tokens = [r["answers"]["a2@v1"]["tokens"] for r in result.records[:4]]
    assert summary["answer_tokens"]["mean"] == pytest.approx(sum(tokens) / 4)


def test_results_are_written_and_scores_recorded_in_the_registry(evaluated):
    result, registry, _ = evaluated
    assert len(result.records) == len(ROWS) and result.records[0]["answers"].keys() == {
        "base",
        "a1@v1",
        "a2@v1",
        "full@v1",
    }
    assert (result.run_dir / "summary.png").stat().st_size > 10_000
    assert "smoke: 5 examples" in result.output and "a2@v1" in result.output  # the table
    for ref in ("a1@v1", "a2@v1", "full@v1"):
        record = resolve_entry(registry, ref).manifest["evals"][result.fingerprint]
        assert record["task"] == "smoke" and record["examples"] == len(ROWS)
        assert record["scores"]["perplexity"] == pytest.approx(result.summary[ref]["perplexity"]["mean"])
        assert record["baseline"]["chars"] == result.summary["base"]["chars"]["mean"]
