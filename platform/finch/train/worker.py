"""The per-worker training loop that Ray Train runs on every worker (one process per device).

It runs an HF `Trainer` (train/trainers.py): HF brings DDP/FSDP, accumulation, schedulers,
clipping and the checkpoint format (model, optimizer, scheduler, RNG, step) that users know.
This module is the Ray glue: rows in, metrics and checkpoints out, restore after failures.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import ray.train
import torch
from transformers import PrinterCallback, Trainer, TrainerCallback, set_seed
from transformers.utils.logging import disable_progress_bar

from finch.config import RunConfig, validate_config
from finch.models.loading import load_trainable_model
from finch.models.tokenizer import load_tokenizer
from finch.registry.models import load_init_adapter
from finch.run_folder import FINAL_CHECKPOINT, LOG_HISTORY_FILE
from finch.train.rows import RowStore, node_rows, rows_root, write_shard_on_this_node
from finch.train.trainers import build_trainer


class RayReportCallback(TrainerCallback):
    """Report every logged metric to Ray, and each HF checkpoint as a Ray checkpoint; rank 0
    also sends the metrics to the driver's progress queue (train/progress.py).

    `ray.train.report` is a barrier: HF Trainer calls on_log/on_save on every rank at the
    same steps, so all workers report equally often.
    """

    def __init__(self, progress_queue: Any = None):
        self.progress_queue = progress_queue

    def on_log(self, args, state, control, logs=None, **kwargs):
        metrics = {**(logs or {}), "step": state.global_step, "epoch": state.epoch or 0.0}
        ray.train.report(metrics=metrics)
        if state.is_world_process_zero and self.progress_queue is not None:
            self.progress_queue.put({**metrics, "max_steps": state.max_steps})

    def on_step_end(self, args, state, control, **kwargs):
        # Progress between logged steps (a slow CPU step can take a minute): the driver's bar moves
        # and its log shows the run is alive. Not a Ray report, so no barrier.
        if state.is_world_process_zero and self.progress_queue is not None:
            self.progress_queue.put({"step": state.global_step, "max_steps": state.max_steps})

    def on_save(self, args, state, control, **kwargs):
        # Every rank uploads what it wrote (rank 0 the model and trainer state, each rank its RNG
        # state, and under FSDP its weight and optimizer shards); Ray merges them into one folder.
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        checkpoint = ray.train.Checkpoint.from_directory(folder) if folder.is_dir() else None
        ray.train.report(metrics={"step": state.global_step}, checkpoint=checkpoint, checkpoint_dir_name=folder.name)
        if not state.is_world_process_zero:
            # HF rotates old checkpoints on rank 0 only; the other ranks' copies are in Ray's storage now.
            shutil.rmtree(folder, ignore_errors=True)


def train_loop_per_worker(payload: dict[str, Any]) -> None:
    config = validate_config(payload["config"])
    # Ray Train logs every report at INFO through the root logger; finch prints its own line. Ray
    # Data's shard notices and transformers' weight-loading bar would reach the driver's log as
    # prefixed lines from every worker.
    logging.getLogger().setLevel(logging.WARNING)
    logging.getLogger("ray.data").setLevel(logging.ERROR)
    disable_progress_bar()
    torch.set_num_threads(torch_threads(config))
    if config.scale.use_gpu:
        # fp32 matmuls (full fine-tuning's master weights, fp32 LoRA) on TF32 tensor cores, as
        # Ampere and newer GPUs allow; older GPUs ignore it.
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    model_folder = payload["model"].here()
    tokenizer = load_tokenizer(model_folder, config.model.trust_remote_code)
    if config.train.online_rl:
        train_rows, eval_rows = payload["prompts"], None
    else:
        train_rows = worker_rows("train", **payload["rows"])
        eval_rows = worker_rows("eval", **payload["rows"]) if config.has_eval else None

    set_seed(config.train.seed)  # LoRA init (and dropout) must not depend on what ran before in this process
    model = load_trainable_model(config, model_folder, rank=ray.train.get_context().get_world_rank())
    load_init_adapter(model, config)
    # HF checkpoints are scratch: each one is copied into Ray's storage as it is saved.
    with tempfile.TemporaryDirectory(prefix="finch-hf-") as scratch, latest_checkpoint() as resume_from:
        trainer = build_trainer(config, model, tokenizer, train_rows, eval_rows, scratch, payload.get("rollouts"))
        trainer.add_callback(RayReportCallback(payload.get("progress_queue")))
        trainer.remove_callback(PrinterCallback)  # the driver shows progress instead
        trainer.train(resume_from_checkpoint=resume_from)
        evaluate_final_weights(trainer)
        report_final(trainer, tokenizer)  # a barrier: after it no worker reads rows
    if ray.train.get_context().get_local_rank() == 0:
        shutil.rmtree(rows_root() / payload["rows"]["folder"], ignore_errors=True)


def worker_rows(split: str, folder: str, key: str) -> RowStore:
    """This run's rows of one split, on the node's disk (train/rows.py)."""
    write = functools.partial(write_shard_on_this_node, ray.train.get_dataset_shard(split))
    return node_rows(rows_root() / folder / split, key, write)


@contextlib.contextmanager
def latest_checkpoint() -> Iterator[str | None]:
    """The folder of the checkpoint to resume from, or None for a new run.

    Ray hands back the last reported checkpoint after a worker failure (FailureConfig) and when
    a run is started again under the same name (`finch train --resume`). HF Trainer then
    restores the weights, optimizer, scheduler, RNG state and the step, and skips the batches
    the checkpoint had already consumed, so no step is trained or counted twice.
    """
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        yield None
        return
    with checkpoint.as_directory() as folder:  # local storage: no copy
        yield folder


def torch_threads(config: RunConfig) -> int:
    """Threads per worker: as configured, else the CPUs Ray reserved for it if set, else an even
    share of the machine (Ray reserves 1 CPU by default, which would leave cores idle)."""
    scale = config.scale
    if scale.torch_threads:
        return scale.torch_threads
    if scale.cpus_per_worker:
        return max(1, int(scale.cpus_per_worker))
    return max(1, (os.cpu_count() or 1) // scale.num_workers)


def evaluate_final_weights(trainer: Trainer) -> None:
    """One more evaluation when the last one ran before the last step, so the eval loss that the
    manifest records (and a sweep ranks trials by) is the registered weights' own."""
    if trainer.eval_dataset is None:
        return
    evaluated = [entry["step"] for entry in trainer.state.log_history if "eval_loss" in entry]
    if not evaluated or evaluated[-1] != trainer.state.global_step:
        trainer.evaluate()


def report_final(trainer: Trainer, tokenizer: Any) -> None:
    """Rank 0 hands the trained weights and the log history to the driver as the last checkpoint."""
    metrics = {"step": trainer.state.global_step, **last_values(trainer.state.log_history)}
    with tempfile.TemporaryDirectory() as folder:
        save_final(trainer, tokenizer, folder)
        checkpoint = ray.train.Checkpoint.from_directory(folder) if trainer.is_world_process_zero() else None
        ray.train.report(metrics=metrics, checkpoint=checkpoint, checkpoint_dir_name=FINAL_CHECKPOINT)


def save_final(trainer: Trainer, tokenizer: Any, folder: str) -> None:
    """The adapter, or for full fine-tuning the whole model with its tokenizer (a standalone HF
    folder), plus the log history. Every rank must call it: under FSDP they gather the weights."""
    if trainer.is_fsdp_enabled:
        trainer.accelerator.state.fsdp_plugin.set_state_dict_type("FULL_STATE_DICT")
    if not is_peft(trainer.model):
        trainer.model.config.use_cache = True  # off only for packed training (models/loading.py)
    trainer.save_model(folder)  # writes on rank 0 only
    if not trainer.is_world_process_zero():
        return
    if not is_peft(trainer.model):
        tokenizer.save_pretrained(folder)
    Path(folder, "training_args.bin").unlink(missing_ok=True)  # a pickle: never part of a registry entry
    Path(folder, LOG_HISTORY_FILE).write_text(json.dumps(trainer.state.log_history, indent=1))


def is_peft(model: Any) -> bool:
    return hasattr(model, "peft_config")


def last_values(log_history: list[dict[str, Any]]) -> dict[str, float]:
    """The latest value of every numeric metric in an HF Trainer log history."""
    merged: dict[str, float] = {}
    for entry in log_history:
        merged.update({k: v for k, v in entry.items() if isinstance(v, (int, float))})
    return merged
