"""DPO with TRL's `DPOTrainer` on preference pairs that finch already tokenized.

The reference model: with LoRA/QLoRA it is the base with the adapter disabled (no second copy
is held); with full fine-tuning a frozen copy of the base. TRL turns all dropout off (its
`disable_dropout` default, so lora.dropout and model.dropout do not apply) so that policy and
reference agree at the start, which is what makes the first loss exactly ln 2 for the sigmoid loss.
"""

from __future__ import annotations

from typing import Any

from trl import DPOConfig, DPOTrainer

from finch.config import RunConfig
from finch.models.loading import load_base_model
from finch.train.trainers import LayerwiseLrDecay, hf_arguments


class PretokenizedDPOTrainer(LayerwiseLrDecay, DPOTrainer):
    """Rows arrive as prompt_ids/chosen_ids/rejected_ids, rendered by finch's templates exactly
    like SFT data and inference prompts; TRL's own preparation would re-render them from text."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if "ref" in getattr(self.model, "peft_config", {}):
            # TRL copies a PEFT model's adapter into a frozen "ref" adapter. For finch's fresh adapter
            # that equals the disabled adapter, and the copy breaks resume: HF Trainer then restores
            # only the "ref" subfolder of a checkpoint and leaves the trained adapter at its init.
            self.model.delete_adapter("ref")
            self.model.set_adapter("default")
        if getattr(self.model, "is_loaded_in_4bit", False):
            # TRL casts QLoRA adapters to bf16; finch keeps them fp32 as in QLoRA SFT, since small
            # DPO-sized updates are lost to bf16 rounding.
            for param in self.model.parameters():
                if param.requires_grad:
                    param.data = param.data.float()

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        return dataset


def dpo_arguments(config: RunConfig, output_dir: str) -> DPOConfig:
    return DPOConfig(
        **hf_arguments(config, output_dir),
        beta=config.dpo.beta,
        loss_type=[config.dpo.loss_type],
        label_smoothing=config.dpo.label_smoothing,
        max_length=None,  # finch cut the pairs to data.max_length already
    )


def build_dpo_trainer(config: RunConfig, model: Any, tokenizer: Any, args: DPOConfig, train_rows, eval_rows):
    from datasets import Dataset

    reference = None
    if config.train.method == "full":
        reference = load_base_model(config.model, model.name_or_path, config.scale.use_gpu)
        reference.eval().requires_grad_(False)
    return PretokenizedDPOTrainer(
        model=model,
        ref_model=reference,
        args=args,
        train_dataset=Dataset.from_list(list(train_rows)),
        eval_dataset=Dataset.from_list(list(eval_rows)) if eval_rows is not None else None,
        processing_class=tokenizer,
    )
