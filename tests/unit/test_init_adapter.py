"""lora.init_adapter: a run that trains on from a registry adapter (an SFT adapter aligned with DPO
or GRPO, say) starts from that adapter's weights and shape, pinned to the version it found, and
refuses an adapter that cannot be its start, naming the key."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from finch.config import ConfigError, validate_config
from finch.models.loading import load_trainable_model
from finch.registry.models import check_init_adapter_base, load_init_adapter, pin_init_adapter
from tests.conftest import make_tiny_model_dir, model_source, register_adapter, run_config_dict

SEVEN_PROJECTIONS = sorted(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])


def run_config(tmp_path, model_dir, lora: dict, **sections):
    config = run_config_dict(tmp_path, model_dir, ["unused.jsonl"], **sections)
    config["lora"] = {"dropout": 0.0, **lora}  # only what the test sets
    return validate_config(config)


def test_the_run_takes_the_latest_version_pinned_and_its_shape(tmp_path, tiny_model_dir):
    registry = tmp_path / "registry"
    register_adapter(registry, tiny_model_dir, "sft", seed=1, r=8)
    latest = register_adapter(registry, tiny_model_dir, "sft", seed=2, r=4)
    config = pin_init_adapter(run_config(tmp_path, tiny_model_dir, {"init_adapter": "sft"}))
    lora = config.lora
    assert (lora.init_adapter, lora.r, lora.alpha, lora.target_modules) == ("sft@v2", 4, 8, SEVEN_PROJECTIONS)
    assert validate_config(config.model_dump()) == config  # what the run folder keeps, and a resume reads
    check_init_adapter_base(config, model_source(tiny_model_dir))

    model = load_trainable_model(config, str(tiny_model_dir))
    load_init_adapter(model, config)
    saved = load_file(latest.path / "adapter_model.safetensors")
    trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
    assert len(trainable) == len(saved) == 2 * 2 * 7  # A and B, 2 layers, 7 projections
    for name, weight in saved.items():
        torch.testing.assert_close(trainable[name.replace(".weight", ".default.weight")], weight, msg=name)


def test_an_adapter_that_cannot_be_the_start_is_refused_by_name(tmp_path, tiny_model_dir):
    registry = tmp_path / "registry"
    register_adapter(registry, tiny_model_dir, "sft", r=8)
    register_adapter(registry, tiny_model_dir, "judge", objective="reward")
    for lora, sections, message in [
        ({"init_adapter": "sft", "r": 16}, {}, r"lora.r is 16, but lora.init_adapter sft@v1 was trained with 8"),
        ({"init_adapter": "sft", "use_dora": True}, {}, r"lora.use_dora is True, .* with False"),
        ({"init_adapter": "nope"}, {}, r"lora.init_adapter 'nope': no adapter named 'nope'"),
        ({"init_adapter": "sft@v3"}, {}, r"lora.init_adapter 'sft@v3': adapter 'sft' has no version 3"),
        ({"init_adapter": "judge"}, {}, r"judge@v1 is a reward model, and train.objective sft trains a generating"),
        ({"init_adapter": "sft"}, {"train": {"objective": "reward"}}, r"sft@v1 is a generating adapter"),
    ]:
        with pytest.raises(ConfigError, match=message):
            pin_init_adapter(run_config(tmp_path, tiny_model_dir, lora, **sections))
    with pytest.raises(ConfigError, match=r"lora.init_adapter continues a LoRA adapter .* \(`finch export`\)"):
        run_config(tmp_path, tiny_model_dir, {"init_adapter": "sft"}, train={"method": "full"})
    with pytest.raises(ConfigError, match="lora.init_adapter"):
        run_config(tmp_path, tiny_model_dir, {"init_adapter": "../sft"})

    other_base = make_tiny_model_dir(tmp_path / "other-base", seed=1)
    config = pin_init_adapter(run_config(tmp_path, other_base, {"init_adapter": "sft"}))
    with pytest.raises(ConfigError, match="sft@v1 was trained on .*, not on model.path .* fingerprints differ"):
        check_init_adapter_base(config, model_source(other_base))
