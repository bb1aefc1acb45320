"""Full fine-tuning under FSDP: only the first rank reads the checkpoint; every other rank builds
the model without weights (accelerate then broadcasts rank 0's tensors into the shards). Without
this every rank of a node holds the whole model in host RAM (8 x 32 GB for an 8B model in fp32)."""

from __future__ import annotations

import torch

from finch.config import validate_config
from finch.models.loading import load_trainable_model
from finch.train.arguments import fsdp_arguments
from tests.conftest import run_config_dict


def fsdp_config(tmp_path, model_dir):
    return validate_config(
        run_config_dict(
            tmp_path,
            model_dir,
            ["unused.jsonl"],
            train={"method": "full", "mixed_precision": "bf16"},
            qlora={"compute_dtype": "float32"},  # every type explicit: nothing to resolve on this GPU-less machine
            scale={"num_workers": 2, "use_gpu": True, "strategy": "fsdp"},
        )
    )


def test_ranks_after_the_first_build_the_model_without_reading_weights(tmp_path, tiny_model_dir):
    import shutil

    config = fsdp_config(tmp_path, tiny_model_dir)
    config_only = tmp_path / "config-only"  # a rank that read the weights would fail here
    shutil.copytree(tiny_model_dir, config_only, ignore=shutil.ignore_patterns("*.safetensors"))
    first = load_trainable_model(config, str(tiny_model_dir), rank=0)
    other = load_trainable_model(config, str(config_only), rank=1)
    # what accelerate's broadcast fills: the same names, shapes and dtypes on every rank...
    shapes = {name: (p.shape, p.dtype) for name, p in first.state_dict().items()}
    assert {name: (p.shape, p.dtype) for name, p in other.state_dict().items()} == shapes
    # ...each parameter with storage of its own: accelerate maps them to their shards by address
    addresses = [p.data_ptr() for p in other.parameters()]
    assert all(addresses) and len(set(addresses)) == len(addresses)
    # buffers that are not in the checkpoint (rotary frequencies) stay real: nothing broadcasts them
    for (name, buffer), (_, mine) in zip(first.named_buffers(), other.named_buffers()):
        assert torch.equal(mine, buffer), name
    assert other.training and first.training


def test_a_rank_without_weights_takes_almost_no_memory(tmp_path, tiny_model_dir):
    import psutil
    from transformers import LlamaConfig

    folder = tmp_path / "bigger"  # 200 MiB of fp32 weights, if they were read or written
    LlamaConfig(
        vocab_size=32000,
        hidden_size=512,
        intermediate_size=2048,
        num_hidden_layers=6,
        num_attention_heads=8,
        num_key_value_heads=8,
    ).save_pretrained(folder)
    process = psutil.Process()
    before = process.memory_info().rss
    model = load_trainable_model(fsdp_config(tmp_path, tiny_model_dir), str(folder), rank=1)
    grown_mib = (process.memory_info().rss - before) / 2**20
    parameters_mib = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    assert parameters_mib > 190 and grown_mib < 0.2 * parameters_mib, f"grew {grown_mib:.0f} MiB"


def test_fsdp_has_accelerate_broadcast_the_first_rank_weights(tmp_path, tiny_model_dir):
    arguments = fsdp_arguments(fsdp_config(tmp_path, tiny_model_dir))
    assert arguments["fsdp_config"]["cpu_ram_efficient_loading"] is True
