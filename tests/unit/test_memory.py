"""finch's memory estimate (finch/memory.py): how it responds to the settings that decide memory,
and the shipped GPU configs checked against the GPUs they name. Architectures are the real models'
(from their published configs), built without weights."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import LlamaConfig, Qwen2Config

from finch.config import ConfigError, RunConfig, ServeConfig, load_config
from finch.memory import Architecture, estimate_training, training_memory
from finch.models.loading import meta_base_model
from finch.models.source import ModelSource
from finch.precision import Device, resolved, training_precision
from finch.serve.app import check_serving_memory
from finch.train.run import OutOfMemoryError, check_memory

ROOT = Path(__file__).resolve().parents[2]
LLAMA3_8B = LlamaConfig(
    vocab_size=128256,
    hidden_size=4096,
    intermediate_size=14336,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    tie_word_embeddings=False,
)
QWEN2_7B = Qwen2Config(
    vocab_size=152064,
    hidden_size=3584,
    intermediate_size=18944,
    num_hidden_layers=28,
    num_attention_heads=28,
    num_key_value_heads=4,
    tie_word_embeddings=False,
)
# What torch reports as each GPU's memory
A10G, L40S, A100_40GB = (
    Device("cuda", name, True, "compute capability 8.x", memory_gib=gib)
    for name, gib in (("A10G", 22.5), ("L40S", 44.4), ("A100-SXM4-40GB", 39.4))
)
T4 = Device("cuda", "T4", False, "compute capability 7.5", memory_gib=14.6)
# Each shipped config, the architecture of the model it names, and the GPU its comments size it for.
GPU_CONFIGS = {
    "llama3_8b_qlora_sft.yaml": (LLAMA3_8B, A10G),
    "llama3_8b_dpo.yaml": (LLAMA3_8B, A100_40GB),
    "llama3_8b_full_fsdp.yaml": (LLAMA3_8B, A100_40GB),
    "qwen2_7b_pretrain.yaml": (QWEN2_7B, A100_40GB),
}


def saved(architecture, tmp_path) -> str:
    folder = tmp_path / type(architecture).__name__
    architecture.save_pretrained(folder)
    return str(folder)


def gpu_config(name: str, tmp_path, **changes) -> tuple[RunConfig, str, Device]:
    architecture, gpu = GPU_CONFIGS[name]
    config = load_config(ROOT / "jobs" / "gpu" / name, schema=RunConfig)
    config = resolved(config, training_precision(config, gpu))
    for section, values in changes.items():
        config = config.model_copy(update={section: getattr(config, section).model_copy(update=values)})
    return config, saved(architecture, tmp_path), gpu


@pytest.mark.parametrize("name", sorted(GPU_CONFIGS))
def test_each_gpu_job_config_fits_the_gpu_it_names_and_is_printed(name, tmp_path, capsys):
    config, folder, gpu = gpu_config(name, tmp_path)
    assert gpu.name.split("-")[0] in (ROOT / "jobs" / "gpu" / name).read_text()  # the comment names it
    check_memory(config, ModelSource(config.model.path, folder), gpu)
    assert f"per GPU worker (estimate; {gpu.name}" in capsys.readouterr().out


def test_a_run_that_cannot_fit_is_refused_before_it_starts(tmp_path):
    config, folder, _ = gpu_config("llama3_8b_full_fsdp.yaml", tmp_path)
    with pytest.raises(OutOfMemoryError, match=r"needs about \d+\.\d GiB per GPU and T4 has 14.6: turn on"):
        check_memory(config, ModelSource(config.model.path, folder), T4)


def test_the_estimate_moves_with_what_decides_memory(tmp_path):
    config, folder, _ = gpu_config("llama3_8b_qlora_sft.yaml", tmp_path)
    arch = Architecture.of(meta_base_model(config.model, folder))

    def total(method="qlora", **train) -> dict:
        changed = config.model_copy(update={"train": config.train.model_copy(update={"method": method, **train})})
        return estimate_training(changed, arch, trained=arch.parameters if method == "full" else 10**8).parts

    qlora, lora = total(), total("lora")
    assert qlora["weights"] < 0.5 * lora["weights"]  # 4-bit linear layers
    assert 14 < lora["weights"] < 16  # 8B parameters in bf16
    assert total(gradient_checkpointing=False)["activations"] > 5 * qlora["activations"]
    assert total(batch_size=8)["activations"] == pytest.approx(2 * qlora["activations"])
    # finch's chunked loss does not grow with the tokens; full logits would (FSDP uses the model's own loss)
    assert total(batch_size=8)["loss"] == qlora["loss"] < 1


def test_fsdp_shards_weights_and_training_state_but_not_activations(tmp_path):
    config, folder, _ = gpu_config("llama3_8b_full_fsdp.yaml", tmp_path)
    sharded = training_memory(config, folder).parts
    whole = training_memory(
        config.model_copy(update={"scale": config.scale.model_copy(update={"num_workers": 1})}), folder
    ).parts
    assert sharded["weights"] == pytest.approx(whole["weights"] / 8)
    assert sharded["training state"] == pytest.approx(whole["training state"] / 8)
    assert sharded["activations"] == whole["activations"]


def test_serving_is_refused_when_the_kv_cache_cannot_hold_one_full_request(tmp_path, capsys):
    config = load_config(ROOT / "serve" / "gpu_production.yaml", schema=ServeConfig)
    config = config.model_copy(update={"model": config.model.model_copy(update={"dtype": "bfloat16"})})
    model = ModelSource(config.model.path, saved(LLAMA3_8B, tmp_path))
    check_serving_memory(config, model, L40S)  # the GPU serve/gpu_production.yaml is sized for
    assert "KV cache for about" in capsys.readouterr().out
    with pytest.raises(ConfigError, match="KV cache would hold about [0-9,]+ tokens, less than one request"):
        check_serving_memory(config, model, A10G)
    two_a10g = config.server.model_copy(update={"gpus_per_replica": 2})
    check_serving_memory(config.model_copy(update={"server": two_a10g}), model, A10G)  # split over two
