"""Reward models with TRL's `RewardTrainer` on preference pairs that finch already tokenized.

The model is the base with a one-output sequence-classification head (models/loading.py): the
reward of a prompt and answer is the head's output at the last token. The loss is the
Bradley-Terry one, -log sigmoid(reward(chosen) - reward(rejected)), plus TRL's optional centring
term; TRL logs the pairs' accuracy (chosen scored above rejected) and margin, and the registry
keeps the held-out accuracy. With LoRA the new head trains whole beside the adapters and is saved
with them.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from trl import RewardConfig, RewardTrainer

from finch.config import RunConfig
from finch.train.arguments import hf_arguments
from finch.train.mixins import PretokenizedTrlTrainer
from finch.train.rows import Row, arrow_dataset


class PretokenizedRewardTrainer(PretokenizedTrlTrainer, RewardTrainer):
    """RewardTrainer on rows of chosen_ids/rejected_ids, each a whole prompt + answer."""


def reward_arguments(config: RunConfig, output_dir: str) -> RewardConfig:
    return RewardConfig(
        **hf_arguments(config, output_dir),
        center_rewards_coefficient=config.reward.center_rewards_coefficient,
        max_length=None,  # finch cut the pairs to data.max_length already
    )


def whole_answers(row: Row) -> Iterator[Row]:
    """A preference row (prompt_ids, chosen_ids, rejected_ids: answers alone) -> the two sequences
    the reward model scores, prompt and answer each."""
    yield {
        "chosen_ids": row["prompt_ids"] + row["chosen_ids"],
        "rejected_ids": row["prompt_ids"] + row["rejected_ids"],
    }


def build_reward_trainer(
    config: RunConfig, model: Any, tokenizer: Any, args: RewardConfig, train_rows, eval_rows
) -> PretokenizedRewardTrainer:
    return PretokenizedRewardTrainer(
        model=model,
        args=args,
        train_dataset=arrow_dataset(train_rows, args.output_dir, whole_answers),
        eval_dataset=arrow_dataset(eval_rows, args.output_dir, whole_answers) if eval_rows is not None else None,
        processing_class=tokenizer,
    )
