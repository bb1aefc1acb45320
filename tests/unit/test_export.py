"""`finch export --format merged`: a registry entry becomes one plain 16-bit transformers model
that computes what base + adapter computed (for QLoRA: what the 4-bit base + adapter computed)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from typer.testing import CliRunner

from finch.cli import app
from finch.config import dump_config, validate_config
from finch.export.merged import export_merged
from finch.fingerprint import fingerprint_model_folder
from finch.registry.store import publish
from tests.conftest import make_adapter, run_config_dict

IDS = torch.randint(0, 2000, (2, 24), generator=torch.Generator().manual_seed(0))


def register(tmp_path: Path, model_dir: Path, name: str, b_std: float = 0.5, **sections) -> Path:
    """A random adapter published as `name` with the manifest a training run writes."""
    config = validate_config(run_config_dict(tmp_path, model_dir, ["unused.jsonl"], name=name, **sections))
    adapter = make_adapter(model_dir, tmp_path / f"{name}-files", seed=3, b_std=b_std)
    files = {f: adapter / f for f in ("adapter_config.json", "adapter_model.safetensors")}
    manifest = {
        "config": dump_config(config),
        "template": "chat",
        "base_model": {"id": str(model_dir), "fingerprint": fingerprint_model_folder(model_dir)},
    }
    publish(tmp_path / "registry", name, files, manifest)
    return adapter


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model.float().eval()(input_ids=IDS).logits


def test_merged_export_is_a_plain_16_bit_model_with_the_adapter_in_it(tmp_path, tiny_model_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    adapter = register(tmp_path, tiny_model_dir, "facts")
    out = export_merged(tmp_path / "registry", "facts", tmp_path / "export")

    files = {p.name for p in out.iterdir()}
    assert {
        "config.json",
        "model.safetensors",
        "generation_config.json",
        "tokenizer.json",
        "finch_export.json",
    } <= files
    assert not any(f.startswith("adapter_") or f.endswith(".bin") for f in files)
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"  # fp32 training -> bf16 export
    assert json.loads((out / "finch_export.json").read_text())["source"] == "facts@v1"
    merged = AutoModelForCausalLM.from_pretrained(out)
    assert merged.dtype == torch.bfloat16 and merged.config.use_cache
    reference = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), adapter)
    expected, base = logits(reference), logits(AutoModelForCausalLM.from_pretrained(tiny_model_dir))
    # equal up to bf16 rounding of the weights (8-bit mantissa: about 2% here), far below what the
    # adapter changes (a missing merge would leave all of it)
    error, effect = (logits(merged) - expected).abs().max(), (expected - base).abs().max()
    assert error < 0.05 * effect, (error, effect)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.chat_template and tokenizer.eos_token == "<|im_end|>"


def test_qlora_adapter_merges_into_the_dequantized_4_bit_base(tmp_path, tiny_model_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from finch.models.loading import load_base_model

    adapter = register(tmp_path, tiny_model_dir, "q", train={"method": "qlora"}, qlora={"compute_dtype": "float32"})
    out = export_merged(tmp_path / "registry", "q", tmp_path / "export", dtype="float16")

    merged = AutoModelForCausalLM.from_pretrained(out)
    assert merged.dtype == torch.float16
    config = validate_config(
        run_config_dict(tmp_path, tiny_model_dir, ["unused.jsonl"], qlora={"compute_dtype": "float32"})
    )
    four_bit = load_base_model(config.model, str(tiny_model_dir), quantization=config.qlora)
    trained = logits(PeftModel.from_pretrained(four_bit, adapter))  # what QLoRA training computed
    on_original = logits(PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), adapter))
    merged_logits = logits(merged)
    # the merge reproduces the 4-bit model, not the adapter on the original 16-bit weights
    assert (merged_logits - trained).abs().max() < 0.2 * (merged_logits - on_original).abs().max()


def test_existing_output_needs_overwrite_and_bad_refs_fail_clearly(tmp_path, tiny_model_dir):
    register(tmp_path, tiny_model_dir, "facts")
    (tmp_path / "export").mkdir()
    (tmp_path / "export" / "keep.txt").write_text("mine")
    runner = CliRunner()
    refused = runner.invoke(
        app, ["export", "facts", "--output", str(tmp_path / "export"), "--registry", str(tmp_path / "registry")]
    )
    assert refused.exit_code == 2 and "pass --overwrite" in refused.output
    assert (tmp_path / "export" / "keep.txt").read_text() == "mine"
    unknown = runner.invoke(
        app, ["export", "nope", "--output", str(tmp_path / "x"), "--registry", str(tmp_path / "registry")]
    )
    assert unknown.exit_code == 2 and "nope" in unknown.output and not (tmp_path / "x").exists()
    replaced = runner.invoke(
        app,
        [
            "export",
            "facts",
            "--output",
            str(tmp_path / "export"),
            "--overwrite",
            "--registry",
            str(tmp_path / "registry"),
        ],
    )
    assert replaced.exit_code == 0, replaced.output
    assert not (tmp_path / "export" / "keep.txt").exists() and (tmp_path / "export" / "model.safetensors").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".export.")]  # no staging folder left
