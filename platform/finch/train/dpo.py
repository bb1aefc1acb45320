"""DPO with TRL's `DPOTrainer` on preference pairs that finch already tokenized.

The reference model: with LoRA/QLoRA it is the base with the adapter disabled (no second copy
is held); with full fine-tuning a frozen copy of the base. TRL turns all dropout off (its
`disable_dropout` default, so lora.dropout and model.dropout do not apply) so that policy and
reference agree at the start, which is what makes the first loss exactly ln 2 for the sigmoid loss.

Log-probabilities come from TRL's fused LM head (`add_fused_lm_head`): tiles of at most 4,096
positions by 32,768 vocabulary entries, recomputed in backward, never the [tokens x vocabulary]
logits. Off Triton devices it scores the prompt positions too (fixed tile shapes); on GPUs only
the answer tokens.
"""

from __future__ import annotations

from typing import Any

from trl import DPOConfig, DPOTrainer

from finch.config import RunConfig
from finch.models.loading import frozen_reference
from finch.train.arguments import hf_arguments
from finch.train.mixins import PretokenizedTrlTrainer
from finch.train.rows import arrow_dataset


class PretokenizedDPOTrainer(PretokenizedTrlTrainer, DPOTrainer):
    """DPO on rows of prompt_ids/chosen_ids/rejected_ids."""


def dpo_arguments(config: RunConfig, output_dir: str) -> DPOConfig:
    return DPOConfig(
        **hf_arguments(config, output_dir),
        beta=config.dpo.beta,
        loss_type=[config.dpo.loss_type],
        label_smoothing=config.dpo.label_smoothing,
        max_length=None,  # finch cut the pairs to data.max_length already
    )


def build_dpo_trainer(config: RunConfig, model: Any, tokenizer: Any, args: DPOConfig, train_rows, eval_rows):
    return PretokenizedDPOTrainer(
        model=model,
        ref_model=frozen_reference(config, model),
        args=args,
        train_dataset=arrow_dataset(train_rows, args.output_dir),
        eval_dataset=arrow_dataset(eval_rows, args.output_dir) if eval_rows is not None else None,
        processing_class=tokenizer,
    )
