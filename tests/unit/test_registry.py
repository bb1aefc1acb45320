import json
import threading
from pathlib import Path

import pytest

from finch.registry.store import MANIFEST, RegistryError, list_adapters, publish, resolve_entry


@pytest.fixture
def adapter_files(tmp_path) -> dict[str, Path]:
    files = {"adapter_config.json": tmp_path / "cfg.json", "adapter_model.safetensors": tmp_path / "w.safetensors"}
    files["adapter_config.json"].write_text(json.dumps({"r": 8}))
    files["adapter_model.safetensors"].write_bytes(b"weights")
    return files


def test_versions_increase_and_refs_resolve(tmp_path, adapter_files):
    registry = tmp_path / "registry"
    first = publish(registry, "concierge", adapter_files, {"metrics": {"loss": 1.0}})
    second = publish(registry, "concierge", adapter_files, {"metrics": {"loss": 0.5}})
    assert (first.version, second.version) == (1, 2)
    assert sorted(p.name for p in second.path.iterdir()) == sorted(
        ["adapter_config.json", "adapter_model.safetensors", MANIFEST]
    )
    assert resolve_entry(registry, "concierge").version == 2
    assert resolve_entry(registry, "concierge@v1").manifest["metrics"] == {"loss": 1.0}
    assert resolve_entry(registry, "concierge@2").ref == "concierge@v2"
    assert [a.ref for a in list_adapters(registry)] == ["concierge@v1", "concierge@v2"]


@pytest.mark.parametrize("ref", ["../etc", "a/../../b", "/abs", "name@latest", ""])
def test_bad_refs_are_refused_without_touching_the_filesystem(tmp_path, ref):
    with pytest.raises(RegistryError):
        resolve_entry(tmp_path, ref)


def test_unknown_adapter_and_version(tmp_path, adapter_files):
    publish(tmp_path, "a", adapter_files, {})
    with pytest.raises(RegistryError, match="no adapter named 'b'"):
        resolve_entry(tmp_path, "b")
    with pytest.raises(RegistryError, match="has no version 7"):
        resolve_entry(tmp_path, "a@v7")


def test_failed_write_leaves_no_entry(tmp_path, adapter_files):
    adapter_files["adapter_model.safetensors"].unlink()  # copying it fails half way through the entry
    with pytest.raises(FileNotFoundError):
        publish(tmp_path, "broken", adapter_files, {})
    assert list((tmp_path / "broken").iterdir()) == []
    assert list_adapters(tmp_path) == []


def test_half_written_folder_is_invisible(tmp_path, adapter_files):
    """A crashed writer leaves a folder without manifest (or a staging dir): readers skip it."""
    (tmp_path / "a" / "v1").mkdir(parents=True)
    (tmp_path / "a" / ".staging-x").mkdir()
    with pytest.raises(RegistryError):
        resolve_entry(tmp_path, "a")
    assert publish(tmp_path, "a", adapter_files, {}).version == 2


def test_concurrent_publishers_get_distinct_versions(tmp_path, adapter_files):
    results = []
    threads = [
        threading.Thread(target=lambda: results.append(publish(tmp_path, "c", adapter_files, {}))) for _ in range(8)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(r.version for r in results) == list(range(1, 9))
    assert all(json.loads((r.path / MANIFEST).read_text())["version"] == r.version for r in results)


def test_missing_adapter_file_and_bad_name_are_refused(tmp_path, adapter_files):
    with pytest.raises(RegistryError, match="lacks adapter_model.safetensors"):
        publish(tmp_path, "a", {"adapter_config.json": adapter_files["adapter_config.json"]}, {})
    with pytest.raises(RegistryError, match="must match"):
        publish(tmp_path, "../evil", adapter_files, {})


def test_eval_scores_merge_into_the_manifest_per_dataset_and_survive_concurrent_writers(tmp_path, adapter_files):
    from finch.registry.store import record_scores

    entry = publish(tmp_path, "triage", adapter_files, {"metrics": {"loss": 0.4}})
    record_scores(entry, "sha256:aa", {"task": "t", "scores": {"json_valid": 0.5, "rouge_l": 0.2}, "counts": {}})
    record_scores(entry, "sha256:aa", {"task": "t", "scores": {"json_valid": 0.75}, "counts": {}})
    record_scores(entry, "sha256:bb", {"task": "other", "scores": {"exact_match": 1.0}, "counts": {}})
    manifest = resolve_entry(tmp_path, "triage@v1").manifest
    assert manifest["evals"]["sha256:aa"]["scores"] == {
        "json_valid": 0.75,
        "rouge_l": 0.2,
    }  # re-scored metric replaced, others kept
    assert manifest["evals"]["sha256:bb"]["scores"] == {"exact_match": 1.0} and manifest["metrics"] == {"loss": 0.4}

    def write(index: int) -> None:
        record_scores(entry, f"sha256:{index}", {"task": "t", "scores": {"m": float(index)}, "counts": {}})

    threads = [threading.Thread(target=write, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    evals = resolve_entry(tmp_path, "triage@v1").manifest["evals"]
    assert all(evals[f"sha256:{i}"]["scores"] == {"m": float(i)} for i in range(8))  # no writer lost another's scores
    assert sorted(p.name for p in entry.path.iterdir() if not p.name.startswith(".")) == sorted(
        [*adapter_files, MANIFEST]
    )


def test_registry_list_and_show_print_versions_lineage_and_eval_scores(tmp_path, adapter_files):
    from typer.testing import CliRunner

    from finch.cli import app
    from finch.registry.store import record_scores

    manifest = {
        "base_model": {"id": "org/base"},
        "config": {"train": {"method": "lora", "objective": "sft"}},
        "dataset": {"train_files": ["data/triage.jsonl"]},
        "template": "alpaca",
        "lineage": {"sweep": "s1"},
    }
    publish(tmp_path, "triage", adapter_files, manifest)
    entry = publish(tmp_path, "triage", adapter_files, manifest)
    record_scores(
        entry,
        "sha256:aa",
        {
            "task": "heldout",
            "files": ["jobs/data/heldout.jsonl"],
            "examples": 12,
            "scores": {"json_valid": 0.917},
            "baseline": {"json_valid": 0.083},
            "counts": {},
        },
    )
    runner = CliRunner()
    listed = runner.invoke(app, ["registry", "list", "--registry", str(tmp_path)], env={"COLUMNS": "200"})
    assert listed.exit_code == 0, listed.output
    assert "triage@v1" in listed.output and "triage@v2" in listed.output and "heldout/json_valid 0.917" in listed.output
    shown = runner.invoke(app, ["registry", "show", "triage", "--registry", str(tmp_path)], env={"COLUMNS": "200"})
    assert shown.exit_code == 0, shown.output
    for text in (
        "triage@v2",
        "triage@v1, triage@v2",
        "sweep: s1",
        "lora sft",
        "org/base",
        "heldout",
        "0.917",
        "0.083",
        "heldout.jsonl",
    ):
        assert text in shown.output
    missing = runner.invoke(app, ["registry", "show", "nope", "--registry", str(tmp_path)])
    assert missing.exit_code == 2 and "no adapter named 'nope'" in missing.output
