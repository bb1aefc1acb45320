"""KTO (Kahneman-Tversky Optimization) with TRL's `KTOTrainer` on preference pairs that finch
already tokenized.

KTO learns from answers judged one at a time (desirable or not) rather than from pairs: each pair
gives its chosen answer as desirable and its rejected one as undesirable, both under the pair's
prompt. Its loss compares each answer's log-ratio to the reference with an estimate of the
policy's KL from the reference, taken on mismatched prompt/answer sequences made within each batch
(TRL trains the rows in order for that: `train_sampling_strategy: sequential`). finch keeps a
pair's two answers next to each other, so a batch of train.batch_size pairs is 2 x batch_size
answers, as in DPO, and each answer's KL sequence takes the same-kind answer of the pair before it
in the batch (TRL's rotation by one row would pair an answer with its own prompt). The reference
is the base with the adapter disabled for LoRA/QLoRA (the adapter the run started from with
lora.init_adapter), a frozen copy of the base for full fine-tuning.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from trl import KTOConfig, KTOTrainer

from finch.config import RunConfig
from finch.models.loading import frozen_reference
from finch.train.arguments import hf_arguments
from finch.train.mixins import PretokenizedTrlTrainer
from finch.train.rows import Row, arrow_dataset


class PretokenizedKTOTrainer(PretokenizedTrlTrainer, KTOTrainer):
    """KTO on rows of prompt_ids/completion_ids/label (unpaired) that finch made from its pairs."""

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        if not self.calculate_KL:
            return dataset
        return dataset.map(
            mismatched_answers, batched=True, batch_size=args.per_device_train_batch_size, desc="KL answers"
        )


def mismatched_answers(batch: dict[str, list]) -> dict[str, list]:
    """A batch of pairs' answers (chosen_1, rejected_1, chosen_2, ...) -> each one's KL answer, the
    same-kind answer of the pair before it (the last pair's for the first): another prompt's."""
    answers = batch["completion_ids"]
    return {**batch, "KL_completion_ids": answers[-2:] + answers[:-2]}


def unpaired(row: Row) -> Iterator[Row]:
    """A preference row -> its chosen answer, desirable, and its rejected one, undesirable."""
    yield {"prompt_ids": row["prompt_ids"], "completion_ids": row["chosen_ids"], "label": True}
    yield {"prompt_ids": row["prompt_ids"], "completion_ids": row["rejected_ids"], "label": False}


def kto_arguments(config: RunConfig, output_dir: str) -> KTOConfig:
    kto, pairs = config.kto, config.train.batch_size
    return KTOConfig(
        **hf_arguments(config, output_dir)
        | {"per_device_train_batch_size": 2 * pairs, "per_device_eval_batch_size": 2 * pairs},
        beta=kto.beta,
        desirable_weight=kto.desirable_weight,
        undesirable_weight=kto.undesirable_weight,
        loss_type=kto.loss_type,
        # The KL estimate pairs rows with their batch neighbours: TRL trains them in order for it.
        train_sampling_strategy="sequential" if kto.loss_type == "kto" else "random",
        max_length=None,  # finch cut the pairs to data.max_length already
    )


def build_kto_trainer(config: RunConfig, model: Any, tokenizer: Any, args: KTOConfig, train_rows, eval_rows):
    return PretokenizedKTOTrainer(
        model=model,
        ref_model=frozen_reference(config, model),
        args=args,
        train_dataset=arrow_dataset(train_rows, args.output_dir, unpaired),
        eval_dataset=arrow_dataset(eval_rows, args.output_dir, unpaired) if eval_rows is not None else None,
        processing_class=tokenizer,
    )
