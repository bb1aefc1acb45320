"""What each training method trains, and how finch's hyperparameters reach HF (no Ray)."""

from __future__ import annotations

import pytest
import torch

from finch.config import ConfigError, validate_config
from finch.models.loading import load_trainable_model
from finch.train.mixins import layer_depth
from finch.train.trainers import build_trainer, training_arguments
from tests.conftest import make_tokenizer, run_config_dict
from tests.unit.test_grad_accumulation import packed_rows


def trained(tmp_path, model_dir, steps: int = 3, train: dict | None = None, **sections):
    train = {"max_steps": steps, "lr": 1e-2, "save_steps": 1000, **(train or {})}
    config = validate_config(run_config_dict(tmp_path, model_dir, ["unused.jsonl"], train=train, **sections))
    torch.manual_seed(0)
    model = load_trainable_model(config, str(model_dir))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = build_trainer(config, model, make_tokenizer(), packed_rows(), None, str(tmp_path / "hf"))
    trainer.train()
    after = dict(model.named_parameters())
    changed = {n for n in before if not torch.equal(before[n], after[n].detach())}
    return model, set(before), changed, trainer


def test_full_fine_tuning_changes_every_parameter(tmp_path, tiny_model_dir):
    _, names, changed, _ = trained(tmp_path, tiny_model_dir, train={"method": "full"})
    assert names and changed == names


def test_lora_changes_only_the_adapter(tmp_path, tiny_model_dir):
    _, names, changed, _ = trained(tmp_path, tiny_model_dir, train={"method": "lora"})
    adapter = {n for n in names if "lora_" in n}
    assert adapter and changed == adapter


def test_dora_learns_magnitudes_too(tmp_path, tiny_model_dir):
    _, names, changed, _ = trained(tmp_path, tiny_model_dir, lora={"use_dora": True})
    magnitudes = {n for n in names if "lora_magnitude_vector" in n}
    assert magnitudes and magnitudes <= changed
    assert changed == {n for n in names if "lora_" in n}


def test_layer_lr_decay_gives_lower_layers_smaller_learning_rates(tmp_path, tiny_model_dir):
    model, _, _, trainer = trained(tmp_path, tiny_model_dir, steps=1, train={"method": "full", "layer_lr_decay": 0.5})
    lr_of = {}
    names = {id(p): n for n, p in model.named_parameters()}
    for group in trainer.optimizer.param_groups:
        for param in group["params"]:
            lr_of[names[id(param)]] = group["initial_lr"]
    top = 1e-2
    assert lr_of["lm_head.weight"] == pytest.approx(top)
    assert lr_of["model.layers.1.mlp.up_proj.weight"] == pytest.approx(top * 0.5)
    assert lr_of["model.layers.0.mlp.up_proj.weight"] == pytest.approx(top * 0.25)
    assert lr_of["model.embed_tokens.weight"] == pytest.approx(top * 0.125)
    # weight decay stays off for norms in their own groups
    decays = {names[id(p)]: g["weight_decay"] for g in trainer.optimizer.param_groups for p in g["params"]}
    assert decays["model.layers.0.input_layernorm.weight"] == 0.0


def test_layer_depth_reads_common_block_names():
    assert layer_depth("base_model.model.model.layers.11.self_attn.q_proj.lora_A.default.weight", 12) == 12
    assert layer_depth("transformer.h.0.attn.c_attn.weight", 12) == 1
    assert layer_depth("transformer.wte.weight", 12) == 0
    assert layer_depth("model.norm.weight", 12) == 13


def test_model_dropout_overrides_the_model_config(tmp_path, tiny_model_dir):
    config = validate_config(run_config_dict(tmp_path, tiny_model_dir, ["x.jsonl"], model={"dropout": 0.3}))
    model = load_trainable_model(config, str(tiny_model_dir))
    assert model.config.attention_dropout == 0.3


def test_hyperparameters_map_to_hf_training_arguments(tmp_path, tiny_model_dir):
    config = validate_config(
        run_config_dict(
            tmp_path,
            tiny_model_dir,
            ["x.jsonl"],
            train={
                "lr": 3e-4,
                "scheduler": "cosine",
                "warmup_ratio": 0.1,
                "weight_decay": 0.01,
                "max_grad_norm": 0.5,
                "batch_size": 3,
                "grad_accum": 4,
                "epochs": 2,
                "max_steps": None,
                "neftune_alpha": 5.0,
                "mixed_precision": "bf16",
                "gradient_checkpointing": True,
                "seed": 7,
            },
        )
    )
    args = training_arguments(config, str(tmp_path / "hf"))
    assert (args.learning_rate, args.lr_scheduler_type.value, args.warmup_steps) == (3e-4, "cosine", 0.1)
    assert (args.weight_decay, args.max_grad_norm, args.seed) == (0.01, 0.5, 7)
    assert (args.per_device_train_batch_size, args.gradient_accumulation_steps, args.num_train_epochs) == (3, 4, 2)
    assert args.neftune_noise_alpha == 5.0 and args.bf16 and not args.fp16 and args.gradient_checkpointing
    dpo = validate_config(
        run_config_dict(
            tmp_path, tiny_model_dir, ["x.jsonl"], train={"objective": "dpo"}, dpo={"beta": 0.3, "loss_type": "ipo"}
        )
    )
    dpo_args = training_arguments(dpo, str(tmp_path / "hf"))
    assert (dpo_args.beta, dpo_args.loss_type, dpo_args.learning_rate) == (0.3, ["ipo"], 3e-3)
    kto = validate_config(
        run_config_dict(
            tmp_path,
            tiny_model_dir,
            ["x.jsonl"],
            train={"objective": "kto", "batch_size": 3},
            kto={"beta": 0.2, "desirable_weight": 1.5, "loss_type": "apo_zero_unpaired"},
        )
    )
    kto_args = training_arguments(kto, str(tmp_path / "hf"))
    assert (kto_args.beta, kto_args.desirable_weight, kto_args.loss_type) == (0.2, 1.5, "apo_zero_unpaired")
    assert (kto_args.per_device_train_batch_size, kto_args.train_sampling_strategy) == (6, "random")  # 3 pairs


@pytest.mark.parametrize(
    ("sections", "message"),
    [
        ({"train": {"mixed_precision": "fp16"}}, "fp16 needs GPUs"),
        ({"scale": {"strategy": "fsdp", "use_gpu": True}}, "fsdp shards full fine-tuning"),
        ({"scale": {"strategy": "fsdp"}, "train": {"method": "full"}}, "fsdp needs GPUs"),
        ({"train": {"method": "full"}, "model": {"dtype": "bfloat16"}}, "full needs model.dtype float32"),
        ({"train": {"objective": "dpo", "neftune_alpha": 5}}, "neftune_alpha does not apply to dpo"),
        ({"train": {"objective": "kto", "batch_size": 1}}, "kto estimates its KL term .* at least 2"),
        ({"kto": {"loss_type": "sigmoid"}}, "kto.loss_type"),
        ({"dpo": {"label_smoothing": 0.1}}, "loss_type robust only"),
        ({"train": {"eval_steps": 10}}, "eval_steps needs eval data"),
        ({"name": "mlruns"}, "reserved"),
        ({"train": {"objective": "pretrain"}, "data": {"format": "alpaca"}}, "pretrain trains on raw text"),
        ({"train": {"method": "dora"}}, "train.method"),
        ({"dpo": {"loss_type": "nope"}}, "dpo.loss_type"),
        ({"train": {"layer_lr_decay": 1.5}}, "train.layer_lr_decay"),
    ],
)
def test_settings_that_do_not_fit_are_refused(tmp_path, tiny_model_dir, sections, message):
    with pytest.raises(ConfigError, match=message):
        validate_config(run_config_dict(tmp_path, tiny_model_dir, ["x.jsonl"], **sections))
