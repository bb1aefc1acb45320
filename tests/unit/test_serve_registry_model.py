"""`finch serve` with a fully fine-tuned registry entry as its base model (model.path 'registry:NAME[@vN]'),
and the DoRA notice at the start of training. No Ray, no vLLM: tests/integration/test_serve_full_model.py serves one."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from finch.config import ConfigError, ModelConfig, ServeConfig, validate_config
from finch.fingerprint import fingerprint_model_folder
from finch.models.source import resolve_model_source
from finch.registry.models import resolve_served_model
from finch.registry.store import RegistryEntry, RegistryError, publish, record_scores
from finch.serve.app import base_template
from finch.serve.engine import check_servable
from finch.train.run import announce_dora
from tests.conftest import make_tiny_model_dir, make_tokenizer, run_config_dict


def register_full_model(
    registry: Path, name: str, model_dir: Path, base_dir: Path, template: str = "chat"
) -> RegistryEntry:
    """A fully fine-tuned entry as `finch train` (train.method full) publishes one, without training:
    model_dir's files, trained on base_dir."""
    files = {f.name: f for f in model_dir.iterdir() if f.is_file()}
    base = {"id": str(base_dir), "fingerprint": fingerprint_model_folder(base_dir)}
    return publish(registry, name, files, {"base_model": base, "template": template}, kind="model")


def register_fake_adapter(registry: Path, name: str, base_dir: Path, tmp_path: Path) -> RegistryEntry:
    """An adapter entry whose manifest says it was trained on base_dir (weights are not read here)."""
    config, weights = tmp_path / f"{name}.json", tmp_path / f"{name}.safetensors"
    config.write_text(json.dumps({"r": 8, "target_modules": ["q_proj", "v_proj"]}))
    weights.write_bytes(b"weights")
    files = {"adapter_config.json": config, "adapter_model.safetensors": weights}
    base = {"id": str(base_dir), "fingerprint": fingerprint_model_folder(base_dir)}
    return publish(registry, name, files, {"base_model": base, "template": "chat"})


@pytest.fixture
def registry(tmp_path, tiny_model_dir) -> Path:
    """'full' in two versions (the second in the alpaca template), fine-tuned from the tiny model
    (other weights), and an adapter 'lora' on the tiny model."""
    registry = tmp_path / "registry"
    fine_tuned = make_tiny_model_dir(tmp_path / "fine-tuned", seed=1)
    register_full_model(registry, "full", fine_tuned, tiny_model_dir)
    register_full_model(registry, "full", fine_tuned, tiny_model_dir, template="alpaca")
    register_fake_adapter(registry, "lora", tiny_model_dir, tmp_path)
    return registry


def served(path: str, registry: Path):
    return resolve_served_model(ModelConfig(path=path), registry)


def test_a_registry_ref_serves_the_entry_folder_latest_version_unless_pinned(registry):
    latest, entry = served("registry:full", registry)
    assert entry.ref == "full@v2" and latest.here() == str(registry.resolve() / "full" / "v2")
    pinned, entry = served("registry:full@v1", registry)
    assert entry.ref == "full@v1" and pinned.folder == str(registry.resolve() / "full" / "v1")


def test_a_plain_model_path_resolves_as_before(registry, tiny_model_dir):
    source, entry = served(str(tiny_model_dir), registry)
    assert entry is None and source == resolve_model_source(ModelConfig(path=str(tiny_model_dir)))


@pytest.mark.parametrize(
    ("path", "problem"),
    [
        ("registry:nope", "no adapter named 'nope'"),
        ("registry:full@v7", "has no version 7"),
        ("registry:../full", "must look like name or name@vN"),
        (
            "registry:lora",
            "lora@v1 is a LoRA adapter, not a fully fine-tuned model: serve its base model .* in adapters",
        ),
    ],
)
def test_a_ref_that_is_no_full_model_of_the_registry_is_a_config_error_naming_model_path(registry, path, problem):
    with pytest.raises(ConfigError, match=f"model.path '{path}': .*{problem}"):
        served(path, registry)


def test_an_entry_without_safetensors_weights_is_refused(registry):
    for weights in (registry / "full" / "v2").glob("*.safetensors"):
        weights.unlink()
    with pytest.raises(RegistryError, match="full@v2 has no \\*.safetensors weights"):
        served("registry:full", registry)


@pytest.mark.parametrize(
    ("model", "key"),
    [({"trust_remote_code": True}, "model.trust_remote_code"), ({"revision": "main"}, "model.revision")],
)
def test_registry_entries_take_no_model_code_and_no_hub_revision(model, key):
    with pytest.raises(ConfigError, match=key):
        validate_config({"model": {"path": "registry:full", **model}}, schema=ServeConfig)


def test_other_commands_say_a_registry_ref_is_for_finch_serve():
    with pytest.raises(ConfigError, match="model.path 'registry:full': only `finch serve` resolves registry entries"):
        resolve_model_source(ModelConfig(path="registry:full"))


def test_the_base_is_served_in_the_entry_template_unless_the_config_names_one(registry):
    _, entry = served("registry:full", registry)  # trained in alpaca; the tokenizer has a chat template
    assert base_template("auto", entry, make_tokenizer()) == "alpaca"
    assert base_template("chat", entry, make_tokenizer()) == "chat"
    assert base_template("auto", None, make_tokenizer()) == "chat"


def test_adapters_trained_on_the_fine_tune_serve_on_it_not_on_its_base(registry, tmp_path, tiny_model_dir):
    source, entry = served("registry:full@v1", registry)
    on_top = register_fake_adapter(registry, "ontop", Path(source.folder), tmp_path)
    record_scores(entry, "sha256:data", {"scores": {"exact_match": 1.0}})  # rewrites the manifest, not the weights
    check_servable(on_top, fingerprint_model_folder(source.here()), max_lora_rank=8)  # what the engine compares
    with pytest.raises(RegistryError, match="trained on another base model"):
        check_servable(on_top, fingerprint_model_folder(tiny_model_dir), max_lora_rank=8)


def dora_run(tmp_path: Path, model_dir: Path, **train):
    return validate_config(run_config_dict(tmp_path, model_dir, ["unused.jsonl"], lora={"use_dora": True}, train=train))


def test_a_dora_run_says_at_its_start_that_vllm_will_refuse_it_and_what_to_do_instead(tmp_path, tiny_model_dir, capsys):
    announce_dora(dora_run(tmp_path, tiny_model_dir))
    notice = capsys.readouterr().out
    assert "vLLM does not serve DoRA adapters" in notice and "finch export tiny --output exports/tiny" in notice
    announce_dora(dora_run(tmp_path, tiny_model_dir, method="full"))  # full fine-tuning trains no adapter
    assert capsys.readouterr().out == ""


def test_a_dora_run_with_eval_tasks_is_refused_before_training(tmp_path, tiny_model_dir):
    task = {"name": "t", "data": {"files": ["unused.jsonl"]}, "metrics": ["exact_match"]}
    with pytest.raises(ConfigError, match="lora.use_dora with train.eval_tasks: .*finch export tiny"):
        announce_dora(dora_run(tmp_path, tiny_model_dir, eval_tasks=[task]))


def test_reward_models_are_refused_wherever_text_would_be_generated(tmp_path, tiny_model_dir):
    """A reward model (train.objective reward) scores answers; serving it, by name or as the base
    model, and evaluating it on generated answers are refused by name, adapter or full model."""
    from finch.config import EvalConfig
    from finch.eval.targets import engine_groups
    from finch.serve.engine import AdapterRefused

    registry = tmp_path / "registry"
    reward = {"config": {"train": {"objective": "reward"}}}
    adapter = register_fake_adapter(registry, "rm", tiny_model_dir, tmp_path)
    adapter = publish(registry, "rm", {f.name: f for f in adapter.path.iterdir()}, {**adapter.manifest, **reward})
    full = register_full_model(registry, "rmfull", tiny_model_dir, tiny_model_dir)
    full = publish(registry, "rmfull", {f.name: f for f in full.path.iterdir()}, {**full.manifest, **reward}, "model")
    refusal = "is a reward model: it scores answers and does not generate text"
    with pytest.raises(AdapterRefused, match=f"rm@v2 {refusal}, so it cannot be served"):
        check_servable(adapter, fingerprint_model_folder(tiny_model_dir), max_lora_rank=64)
    with pytest.raises(ConfigError, match=f"model.path 'registry:rmfull': rmfull@v2 {refusal}"):
        served("registry:rmfull", registry)
    for entry in (adapter, full):
        evaluation = EvalConfig.model_validate(
            {
                "name": "rm-eval",
                "models": [entry.ref],
                "registry_dir": str(registry),
                "data": {"files": ["x.jsonl"]},
                "metrics": ["exact_match"],
            }
        )
        with pytest.raises(RegistryError, match=f"{entry.ref} {refusal}, so it cannot be evaluated"):
            engine_groups(evaluation)
