"""finch's hyperparameters -> Hugging Face `TrainingArguments` names: the one place that maps them,
for the HF Trainer (SFT, pre-training) and TRL's DPOConfig and RewardConfig alike."""

from __future__ import annotations

from typing import Any

from finch.config import RunConfig


def hf_arguments(config: RunConfig, output_dir: str) -> dict[str, Any]:
    """finch config -> TrainingArguments keyword arguments (shared by HF Trainer and TRL configs)."""
    train, has_eval = config.train, config.has_eval
    return dict(
        output_dir=output_dir,
        learning_rate=train.lr,
        num_train_epochs=train.epochs,
        max_steps=train.max_steps or -1,
        per_device_train_batch_size=train.batch_size,
        per_device_eval_batch_size=train.batch_size,
        gradient_accumulation_steps=train.grad_accum,
        lr_scheduler_type=train.scheduler,
        warmup_steps=train.warmup_ratio,  # transformers 5: a value below 1 is a ratio of total steps
        weight_decay=train.weight_decay,
        max_grad_norm=train.max_grad_norm,
        seed=train.seed,
        data_seed=train.seed,
        logging_steps=train.logging_steps,
        eval_strategy=("steps" if train.eval_steps else "epoch") if has_eval else "no",
        eval_steps=train.eval_steps,
        eval_on_start=has_eval,
        save_strategy="steps" if train.save_steps else "epoch",
        save_steps=train.save_steps,
        save_total_limit=2,
        # FSDP checkpoints activations through its own wrapper (fsdp_config) instead.
        gradient_checkpointing=train.gradient_checkpointing and config.scale.strategy != "fsdp",
        # The driver resolved 'auto' (finch/precision.py): autocast on GPUs over fp32/fp16 weights,
        # never on CPU, where the weights already carry the fast dtype.
        bf16=train.mixed_precision == "bf16",
        fp16=train.mixed_precision == "fp16",
        neftune_noise_alpha=train.neftune_alpha,
        prediction_loss_only=True,  # evaluation keeps losses only, not every batch's logits
        # The collators pick the columns they need; HF's column filter would drop num_tokens,
        # with which RowCollator cuts a packed batch's unused padding.
        remove_unused_columns=False,
        use_cpu=not config.scale.use_gpu,
        report_to=[],
        disable_tqdm=True,
        dataloader_num_workers=0,
        ddp_find_unused_parameters=False,
        **fsdp_arguments(config),
    )


def fsdp_arguments(config: RunConfig) -> dict[str, Any]:
    """FSDP2 (torch fully_shard via accelerate): each transformer block (the model's
    `_no_split_modules`) is one shard unit; rank 0 alone loads the weights and accelerate
    broadcasts them into the shards (models/loading.load_trainable_model); checkpoints are sharded
    (each rank writes its part, no full gather per save); the final save gathers one full model
    (see worker.save_final)."""
    if config.scale.strategy != "fsdp":
        return {}
    return {
        "fsdp": True,
        "fsdp_config": {
            "version": 2,
            "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
            "state_dict_type": "SHARDED_STATE_DICT",
            "cpu_ram_efficient_loading": True,
            "activation_checkpointing": config.train.gradient_checkpointing,
        },
    }
