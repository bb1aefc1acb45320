"""The per-worker training loop that Ray Train runs on every worker (one process per device).

It uses the HF `Trainer`: rows arrive already tokenized, masked and packed by Ray Data, so
TRL's SFTTrainer would only redo that work; HF Trainer brings DDP, accumulation, schedulers,
clipping and the checkpoint format (model, optimizer, scheduler, RNG, step) that users know.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import ray.train
import torch
from torch.utils.data import Dataset
from transformers import PrinterCallback, Trainer, TrainerCallback, TrainingArguments

from finch.config import RunConfig, validate_config
from finch.data.pipeline import load_tokenizer
from finch.models.loading import load_trainable_model
from finch.train.collate import RowCollator

FINAL_CHECKPOINT = "final"
SHOWN_METRICS = ("loss", "eval_loss", "learning_rate", "grad_norm", "train_loss", "train_runtime")
LOG_HISTORY_FILE = "log_history.json"


class Rows(Dataset):
    """A worker's rows in memory: a map-style dataset, so HF Trainer shards it across ranks
    with its DistributedSampler and knows the epoch length for schedules and resume."""

    def __init__(self, shard: Any):
        self.rows = list(shard.iter_rows()) if shard is not None else []

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.rows[index]


class RayReportCallback(TrainerCallback):
    """Report every logged metric to Ray, and each HF checkpoint as a Ray checkpoint.

    `ray.train.report` is a barrier: HF Trainer calls on_log/on_save on every rank at the
    same steps, so all workers report equally often.
    """

    def on_log(self, args, state, control, logs=None, **kwargs):
        metrics = {**(logs or {}), "step": state.global_step, "epoch": state.epoch or 0.0}
        ray.train.report(metrics=metrics)
        shown = ", ".join(f"{k} {metrics[k]:.4g}" for k in SHOWN_METRICS if k in metrics)
        if state.is_world_process_zero and shown:
            print(f"finch: step {state.global_step}/{state.max_steps}  {shown}", flush=True)

    def on_save(self, args, state, control, **kwargs):
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        checkpoint = ray.train.Checkpoint.from_directory(folder) if state.is_world_process_zero else None
        ray.train.report(
            metrics={"step": state.global_step}, checkpoint=checkpoint, checkpoint_dir_name=folder.name
        )


def train_loop_per_worker(payload: dict[str, Any]) -> None:
    config = validate_config(payload["config"])
    # Ray Train logs every report at INFO through the root logger; finch prints its own line.
    logging.getLogger().setLevel(logging.WARNING)
    torch.set_num_threads(torch_threads(config))
    tokenizer = load_tokenizer(payload["model_path"], config.model.trust_remote_code)
    train_rows = Rows(ray.train.get_dataset_shard("train"))
    eval_rows = Rows(ray.train.get_dataset_shard("eval")) if config.has_eval else None

    model = load_trainable_model(config, payload["model_path"])
    # HF checkpoints are scratch: each one is copied into Ray's storage as it is saved.
    with tempfile.TemporaryDirectory(prefix="finch-hf-") as scratch:
        trainer = Trainer(
            model=model,
            args=training_arguments(config, scratch),
            train_dataset=train_rows,
            eval_dataset=eval_rows,
            data_collator=RowCollator(tokenizer.pad_token_id),
            callbacks=[RayReportCallback()],
        )
        trainer.remove_callback(PrinterCallback)  # RayReportCallback prints a compact line instead
        trainer.train(resume_from_checkpoint=restore_latest_checkpoint(scratch))
        report_final(trainer)


def restore_latest_checkpoint(scratch: str) -> str | None:
    """The checkpoint to resume from, copied into the HF scratch folder, or None for a new run.

    Ray hands back the last reported checkpoint after a worker failure (FailureConfig) and when
    a run is started again under the same name (`finch train --resume`). HF Trainer then
    restores adapter weights, optimizer, scheduler, RNG state and the step, and skips the
    batches the checkpoint had already consumed, so no step is trained or counted twice.
    """
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return None
    folder = Path(scratch) / Path(checkpoint.path).name
    checkpoint.to_directory(str(folder))
    return str(folder)


def torch_threads(config: RunConfig) -> int:
    """Threads per worker: as configured, else the CPUs Ray reserved for it if set, else an even
    share of the machine (Ray reserves 1 CPU by default, which would leave cores idle)."""
    scale = config.scale
    if scale.torch_threads:
        return scale.torch_threads
    if scale.cpus_per_worker:
        return max(1, int(scale.cpus_per_worker))
    return max(1, (os.cpu_count() or 1) // scale.num_workers)


def training_arguments(config: RunConfig, output_dir: str) -> TrainingArguments:
    train, has_eval = config.train, config.has_eval
    return TrainingArguments(
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
        gradient_checkpointing=train.gradient_checkpointing,
        use_cpu=not config.scale.use_gpu,
        bf16=False,  # the weights already carry the chosen dtype; autocast on top only costs time on CPU
        report_to=[],
        disable_tqdm=True,
        dataloader_num_workers=0,
        ddp_find_unused_parameters=False,
    )


def report_final(trainer: Trainer) -> None:
    """Rank 0 hands the trained adapter and the log history to the driver as the last checkpoint."""
    metrics = {"step": trainer.state.global_step, **last_values(trainer.state.log_history)}
    if not trainer.is_world_process_zero():
        ray.train.report(metrics=metrics, checkpoint_dir_name=FINAL_CHECKPOINT)
        return
    with tempfile.TemporaryDirectory() as folder:
        trainer.model.save_pretrained(folder, safe_serialization=True)
        Path(folder, LOG_HISTORY_FILE).write_text(json.dumps(trainer.state.log_history, indent=1))
        ray.train.report(
            metrics=metrics, checkpoint=ray.train.Checkpoint.from_directory(folder), checkpoint_dir_name=FINAL_CHECKPOINT
        )


def last_values(log_history: list[dict[str, Any]]) -> dict[str, float]:
    """The latest value of every numeric metric in an HF Trainer log history."""
    merged: dict[str, float] = {}
    for entry in log_history:
        merged.update({k: v for k, v in entry.items() if isinstance(v, (int, float))})
    return merged
