"""finch eval's inputs without an engine: configs, rows, engine groups and the adapters vLLM can take."""

from __future__ import annotations

import json

import pytest

from finch.config import ConfigError, EngineConfig, EvalConfig, SweepConfig, validate_config
from finch.data.readers import DatasetError
from finch.eval.examples import dataset_fingerprint, read_examples
from finch.eval.targets import EngineGroup, Target
from finch.models.source import ModelSource
from finch.registry.store import publish
from finch.serve.engine import AdapterRefused, check_servable
from tests.conftest import write_jsonl


def eval_config(tmp_path, **fields) -> EvalConfig:
    data = write_jsonl(tmp_path / "eval.jsonl", [{"prompt": "2+2?", "completion": "4"}])
    return validate_config(
        {"name": "t", "data": {"files": [str(data)]}, "metrics": ["exact_match"], **fields}, schema=EvalConfig
    )


def test_metric_settings_and_names_are_checked_when_the_config_loads(tmp_path):
    with pytest.raises(ConfigError, match="metric json_field needs 'field'"):
        eval_config(tmp_path, metrics=["json_field"])
    with pytest.raises(ConfigError, match="is not a regular expression"):
        eval_config(tmp_path, metrics=[{"name": "regex", "pattern": "(unclosed"}])
    with pytest.raises(ConfigError, match=r"metrics \['contains'\] appear twice"):
        eval_config(tmp_path, metrics=["contains", {"name": "contains", "text": "x"}])
    with pytest.raises(ConfigError, match=r"unknown key 'generation.temprature' \(did you mean 'temperature'\?\)"):
        eval_config(tmp_path, generation={"temprature": 0.5})
    labelled = eval_config(tmp_path, metrics=["contains", {"name": "contains", "text": "x", "label": "has_x"}])
    assert [m.key for m in labelled.metrics] == ["contains", "has_x"]


def test_a_sweep_ranked_by_a_task_metric_needs_a_mode():
    base = {"name": "s", "run": "r.yaml", "search": {"space": {"train.lr": {"choice": [1e-4]}}}}
    with pytest.raises(ConfigError, match="set mode"):
        validate_config({**base, "metric": "gsm8k/numeric_match"}, schema=SweepConfig)
    with pytest.raises(ConfigError, match="lower is better"):
        validate_config({**base, "mode": "max"}, schema=SweepConfig)
    assert validate_config({**base, "metric": "gsm8k/numeric_match", "mode": "max"}, schema=SweepConfig).mode == "max"


def test_a_sweep_ranked_by_a_task_metric_picks_the_best_score_and_breaks_ties_by_eval_loss():
    from finch.tune.report import TrialResult
    from finch.tune.sweep import SweepError, best_trial

    def trial(name, eval_loss, score, checkpoint="final"):
        return TrialResult(name, {}, eval_loss, 3, f"/runs/{name}/{checkpoint}", None, task_score=score)

    base = {"name": "s", "run": "r.yaml", "search": {"space": {"train.lr": {"choice": [1e-4]}}}}
    accuracy = validate_config({**base, "metric": "gsm8k/numeric_match", "mode": "max"}, schema=SweepConfig)
    errors = validate_config({**base, "metric": "gsm8k/errors", "mode": "min"}, schema=SweepConfig)
    by_loss = validate_config(base, schema=SweepConfig)
    results = [
        trial("low-loss", 0.5, 0.25),
        trial("tie-worse-loss", 0.9, 0.75),
        trial("tie-better-loss", 0.7, 0.75),
        trial("stopped-early", 0.1, 1.0, checkpoint="checkpoint-2"),  # ASHA stopped it: never the best
        trial("unscored", 0.2, None),
    ]
    assert best_trial(results, accuracy).trial_id == "tie-better-loss"
    assert best_trial(results, errors).trial_id == "low-loss"
    assert best_trial(results, by_loss).trial_id == "unscored"  # eval loss ranks every finished trial
    with pytest.raises(SweepError, match="no finished trial got a gsm8k/numeric_match score"):
        best_trial([trial("unscored", 0.2, None)], accuracy)


def test_rows_become_prompts_and_references_in_every_format(tmp_path):
    rows = [
        {
            "messages": [
                {"role": "system", "content": "S"},
                {"role": "user", "content": "Q1"},
                {"role": "assistant", "content": "A1"},
                {"role": "user", "content": "Q2"},
                {"role": "assistant", "content": "A2"},
            ]
        },
        {"instruction": "Translate", "input": "hi", "output": "salut"},
        {"prompt": "P", "chosen": "good", "rejected": "bad"},
        {"messages": [{"role": "user", "content": "judge me"}]},
    ]
    data = write_jsonl(tmp_path / "rows.jsonl", rows)
    config = validate_config(
        {"name": "t", "data": {"files": [str(data)], "system_prompt": "Be brief."}, "metrics": ["json_valid"]},
        schema=EvalConfig,
    )
    first, alpaca, preference, prompt_only = read_examples(config.data)
    assert (
        first.reference == "A2"
        and [m["content"] for m in first.messages] == ["S", "Q1", "A1", "Q2"]
        and first.prompt == "Q2"
    )
    assert alpaca.reference == "salut" and alpaca.messages[0] == {"role": "system", "content": "Be brief."}
    assert preference.reference == "good" and preference.messages[-1]["content"] == "P"
    assert prompt_only.reference is None and prompt_only.source.endswith("rows.jsonl:4")
    limited = config.data.model_copy(update={"limit": 2})
    assert len(read_examples(limited)) == 2 and dataset_fingerprint(limited) != dataset_fingerprint(config.data)


def test_raw_text_and_broken_rows_are_refused_with_file_and_line(tmp_path):
    data = write_jsonl(tmp_path / "text.jsonl", [{"prompt": "p", "completion": "c"}, {"text": "just text"}])
    config = validate_config(
        {"name": "t", "data": {"files": [str(data)]}, "metrics": ["json_valid"]}, schema=EvalConfig
    )
    with pytest.raises(DatasetError, match=r"text.jsonl:2: a raw text row has no prompt"):
        read_examples(config.data)
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"prompt": "p", "completion": "c"}\n{"prompt": \n')
    with pytest.raises(DatasetError, match=r"broken.jsonl:2"):
        read_examples(config.data.model_copy(update={"files": [str(broken)]}))


def adapter(tmp_path, name: str, **config) -> object:
    folder = tmp_path / f"src-{name}"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps({"r": 8, "target_modules": ["q_proj", "v_proj"], **config}))
    (folder / "adapter_model.safetensors").write_bytes(b"weights")
    files = {f: folder / f for f in ("adapter_config.json", "adapter_model.safetensors")}
    return publish(tmp_path / "registry", name, files, {"base_model": {"fingerprint": "sha256:base"}})


def test_engine_slots_and_rank_grow_to_fit_every_adapter_in_one_batch(tmp_path):
    targets = [Target("base", "chat", None)] + [
        Target(e.ref, "chat", None, str(e.path), e)
        for e in (
            adapter(tmp_path, "a", r=8),
            adapter(tmp_path, "b", r=16, rank_pattern={"q_proj": 96}),
            adapter(tmp_path, "c"),
        )
    ]
    group = EngineGroup(ModelSource("m", "m"), None, tuple(targets))
    cpu = group.engine_settings(EngineConfig(max_loras=2, max_lora_rank=8, max_cpu_loras=2), on_gpu=False)
    assert (cpu.max_loras, cpu.max_cpu_loras, cpu.max_lora_rank) == (
        4,
        4,
        128,
    )  # 3 adapters + the zero adapter; 96 -> vLLM's 128
    gpu = group.engine_settings(EngineConfig(max_loras=8, max_lora_rank=256), on_gpu=True)
    assert (gpu.max_loras, gpu.max_lora_rank) == (8, 128)  # no bigger than needed: LoRA products are sized by it
    only_base = EngineGroup(ModelSource("m", "m"), None, (targets[0],)).engine_settings(EngineConfig(), on_gpu=False)
    assert (only_base.max_loras, only_base.max_lora_rank) == (
        4,
        8,
    )  # the zero adapter (rank 1) fits vLLM's smallest rank


def test_adapters_named_by_full_module_paths_are_servable(tmp_path):
    """PEFT writes full paths (model.layers.0.mlp.up_proj) as target_modules when an adapter has few modules."""
    full_paths = adapter(
        tmp_path, "full", target_modules=["model.layers.0.mlp.up_proj", "model.layers.1.self_attn.q_proj"]
    )
    check_servable(full_paths, "sha256:base", max_lora_rank=64)
    other = adapter(tmp_path, "other", target_modules=["model.layers.0.mlp.fc1"])
    with pytest.raises(AdapterRefused, match="does not serve with LoRA: fc1"):
        check_servable(other, "sha256:base", max_lora_rank=64)
    with pytest.raises(AdapterRefused, match="another base model"):
        check_servable(full_paths, "sha256:other", max_lora_rank=64)
