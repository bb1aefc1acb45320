"""The HF trainer a worker runs, built from the run config.

SFT and pre-training use the HF `Trainer` on rows that Ray Data already tokenized, masked and
packed (TRL's SFTTrainer would only redo that work); DPO, KTO, reward models, GRPO and RLOO use
TRL (train/dpo.py, kto.py, reward.py, grpo.py). Arguments come
from train/arguments.py, finch's changes to the trainers' behaviour from train/mixins.py.
"""

from __future__ import annotations

from typing import Any

from torch.utils.data import Dataset
from transformers import Trainer, TrainingArguments

from finch.config import RunConfig
from finch.precision import resolved_here
from finch.train.arguments import hf_arguments
from finch.train.collate import RowCollator
from finch.train.loss import LabelledHead, supports_labelled_head
from finch.train.mixins import (
    DdpGradientsInBuckets,
    FsdpOrRefuse,
    LabelledPositionsLoss,
    LayerwiseLrDecay,
    PeakMemoryLogging,
    PerplexityLogging,
    ReturnFreedMemory,
)


def training_arguments(config: RunConfig, output_dir: str) -> TrainingArguments:
    config = resolved_here(config)
    # TRL is imported for the objectives that use it only.
    if config.train.online_rl:
        from finch.train.grpo import online_rl_arguments

        return online_rl_arguments(config, output_dir)
    if config.train.objective == "dpo":
        from finch.train.dpo import dpo_arguments

        return dpo_arguments(config, output_dir)
    if config.train.objective == "kto":
        from finch.train.kto import kto_arguments

        return kto_arguments(config, output_dir)
    if config.train.objective == "reward":
        from finch.train.reward import reward_arguments

        return reward_arguments(config, output_dir)
    return TrainingArguments(**hf_arguments(config, output_dir))


class FinchTrainer(
    FsdpOrRefuse,
    DdpGradientsInBuckets,
    PerplexityLogging,
    PeakMemoryLogging,
    LayerwiseLrDecay,
    LabelledPositionsLoss,
    Trainer,
):
    pass


def uses_flash_attention(model: Any) -> bool:
    return str(model.config._attn_implementation).startswith("flash_attention")


def build_trainer(
    config: RunConfig,
    model: Any,
    tokenizer: Any,
    train_rows: Dataset | list[dict],
    eval_rows: Dataset | None,
    output_dir: str,
    rollouts: Any = None,
) -> Trainer:
    """`train_rows`: GRPO's and RLOO's prompt rows (rl/prompts.py), else the worker's row store;
    `rollouts`: their rollout engine (rl/rollouts.py)."""
    config = resolved_here(config)
    args = training_arguments(config, output_dir)
    if config.train.online_rl:
        from finch.train.grpo import build_online_rl_trainer

        trainer = build_online_rl_trainer(config, model, tokenizer, args, train_rows, rollouts)
    elif config.train.objective == "dpo":
        from finch.train.dpo import build_dpo_trainer

        trainer = build_dpo_trainer(config, model, tokenizer, args, train_rows, eval_rows)
    elif config.train.objective == "kto":
        from finch.train.kto import build_kto_trainer

        trainer = build_kto_trainer(config, model, tokenizer, args, train_rows, eval_rows)
    elif config.train.objective == "reward":
        from finch.train.reward import build_reward_trainer

        trainer = build_reward_trainer(config, model, tokenizer, args, train_rows, eval_rows)
    else:
        trainer = FinchTrainer(
            model=model,
            args=args,
            train_dataset=train_rows,
            eval_dataset=eval_rows,
            data_collator=RowCollator(tokenizer.pad_token_id, flatten=uses_flash_attention(model)),
        )
    trainer.layer_lr_decay = config.train.layer_lr_decay
    trainer.add_callback(ReturnFreedMemory())
    # FSDP shards the head's weight outside the model's forward, where the labelled head would run.
    next_token = config.train.objective in ("sft", "pretrain")  # TRL computes the other objectives' losses
    if next_token and config.scale.strategy != "fsdp" and supports_labelled_head(model):
        trainer.labelled_head = LabelledHead(model)
    return trainer
