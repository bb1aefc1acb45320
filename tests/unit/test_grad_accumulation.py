"""Gradient accumulation of k micro-batches of b rows equals one batch of k*b rows.

Runs finch's own TrainingArguments mapping and collator through HF Trainer (no Ray), on packed
rows whose examples carry different numbers of answer tokens: a per-micro-batch mean would weigh
tokens unequally, so this checks the loss is normalized over the whole accumulated batch.
"""

from __future__ import annotations

import random

import torch
from transformers import Trainer

from finch.config import ModelConfig, validate_config
from finch.data.packing import pack_examples
from finch.models.loading import apply_lora, load_base_model
from finch.train.collate import RowCollator
from finch.train.trainers import training_arguments
from tests.conftest import run_config_dict


def packed_rows(seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    examples = [[rng.randrange(2000) for _ in range(rng.randint(5, 30))] for _ in range(12)]
    prompt_lengths = [rng.randint(0, len(e) - 2) for e in examples]
    labels = [[-100] * k + e[k:] for k, e in zip(prompt_lengths, examples)]
    rows = pack_examples(examples, labels, max_length=32, pad_id=0)
    return [{k: rows[k][i] for k in ("input_ids", "labels", "position_ids")} for i in range(len(rows["input_ids"]))]


def adapter_after_one_step(tmp_path, model_dir, rows, batch_size: int, grad_accum: int) -> dict[str, torch.Tensor]:
    config = validate_config(
        run_config_dict(
            tmp_path,
            model_dir,
            ["unused.jsonl"],
            lora={"dropout": 0.0},
            train={
                "max_steps": 1,
                "batch_size": batch_size,
                "grad_accum": grad_accum,
                "lr": 1.0,
                "scheduler": "constant",
                "max_grad_norm": 1e9,
            },
        )
    )
    torch.manual_seed(0)
    model = apply_lora(load_base_model(ModelConfig(path=str(model_dir), dtype="float32"), str(model_dir)), config.lora)
    args = training_arguments(config, str(tmp_path / f"hf-{batch_size}x{grad_accum}"))
    args.save_strategy = "no"
    # Plain SGD without clipping: the update is lr * gradient, so any error in loss scaling shows.
    # (Adam's first step is about lr * sign(gradient), and clipping rescales; both would hide it.)
    args.optim = "sgd"
    trainer = Trainer(model=model, args=args, train_dataset=rows, data_collator=RowCollator(pad_id=0))
    # Same rows in the same order for both runs: the comparison is about the arithmetic only.
    trainer._get_train_sampler = lambda *a, **k: torch.utils.data.SequentialSampler(rows)
    trainer.train()
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_accumulated_micro_batches_match_one_large_batch(tmp_path, tiny_model_dir):
    rows = packed_rows()[:4]
    assert len(rows) == 4
    large = adapter_after_one_step(tmp_path, tiny_model_dir, rows, batch_size=4, grad_accum=1)
    accumulated = adapter_after_one_step(tmp_path, tiny_model_dir, rows, batch_size=2, grad_accum=2)
    single_row = adapter_after_one_step(tmp_path, tiny_model_dir, rows[:1], batch_size=1, grad_accum=1)
    for name in large:
        torch.testing.assert_close(accumulated[name], large[name], atol=1e-6, rtol=1e-4)
    # and the comparison can fail: a different batch gives a different update
    assert any(not torch.allclose(single_row[n], large[n], atol=1e-5) for n in large)
