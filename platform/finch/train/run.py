"""`finch train`: resolve the base model, prepare data on Ray Data, fit on Ray Train, register the result."""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from rich.console import Console

import finch
from finch.config import ConfigError, RunConfig, ScaleConfig, dump_config, load_config
from finch.data.pipeline import PreparedData, prepare_datasets
from finch.fingerprint import fingerprint_model_folder, fingerprint_paths
from finch.memory import training_memory
from finch.models.loading import trainable_parameter_count
from finch.models.source import ModelSource, resolve_model_source
from finch.precision import Device, Precision, device_of_workers, resolved, training_precision
from finch.registry.models import check_init_adapter_base, check_reward_models, pin_init_adapter, pin_reward_models
from finch.registry.store import ADAPTER_FILES, RegistryEntry, publish
from finch.run_folder import FINAL_CHECKPOINT, LOG_HISTORY_FILE
from finch.runtime import OutputFolderError, init_ray
from finch.train.plots import plot_loss
from finch.train.progress import TrainingProgress
from finch.train.rows import rows_root, run_rows_name
from finch.train.tracking import MlflowTracker, flatten
from finch.train.worker import last_values, train_loop_per_worker

console = Console(soft_wrap=True)  # log lines stay whole in files and pipes


# What a checkpoint's weights, optimizer state and data position depend on.
RESUME_MUST_MATCH = (
    "model.",
    "data.",
    "lora.",
    "qlora.",
    "train.method",
    "train.objective",
    "train.batch_size",
    "train.grad_accum",
    "train.layer_lr_decay",
    "grpo.num_generations",  # how many prompts a step takes: the data position
    "scale.num_workers",
    "scale.strategy",
)


CHECKPOINTS_KEPT = 3  # Ray Train's CheckpointConfig(num_to_keep)
# Bytes per trained parameter in a checkpoint: its weight (fp32 at most) and Adam's two fp32 moments.
CHECKPOINT_BYTES_PER_PARAMETER = 12


class RunExistsError(FileExistsError):
    pass


def train(config: RunConfig, overwrite: bool = False, resume: bool = False) -> RegistryEntry:
    announce_dora(config)
    # Pinned before the run folder keeps the config: a resume reads the same entries.
    config = pin_reward_models(pin_init_adapter(config))
    run_dir = prepare_run_dir(config, overwrite, resume)
    device = workers_device(config.scale)
    print_precision(training_precision(config, device))
    model = resolve_model_source(config.model)
    check_init_adapter_base(config, model)
    check_memory(config, model, device)
    check_free_space(config, model.folder)
    init_ray()
    prepared = prepare_data(config, model)
    check_reward_models(config, model, prepared.template)
    print_data_stats(prepared)
    check_space_for_rows(prepared)
    tracker = MlflowTracker(config, resume) if config.tracking.mlflow else None
    progress = TrainingProgress(config.name, console, [tracker] if tracker else [])
    try:
        final_checkpoint = progress.run(lambda: fit(config, model, prepared, device, progress.queue))
        started_from = {"init_adapter": config.lora.init_adapter} if config.lora.init_adapter else None
        entry = register(config, model, prepared, final_checkpoint, run_dir, device, lineage=started_from)
        if config.train.eval_tasks:
            from finch.eval.run import evaluate_after_training

            task_scores = evaluate_after_training(config, entry)
            if tracker:
                tracker.log_metrics({f"task/{key}": value for key, value in task_scores.items() if value is not None})
    except BaseException:
        if tracker:
            with contextlib.suppress(Exception):  # the training error is the one to report
                tracker.finish([], failed=True)
        raise
    if tracker:
        tracker.finish([run_dir / "loss.png", run_dir / "config.json"])
        console.print(f"finch: metrics in MLflow at {tracker.uri} (run {tracker.run_id})")
    return entry


def announce_dora(config: RunConfig) -> None:
    """DoRA adapters train, chat and export, but vLLM does not serve them: say so before training
    rather than when `finch serve` refuses the result, and refuse train.eval_tasks, which score on vLLM."""
    if config.train.method == "full" or not config.lora.use_dora:
        return
    alternative = (
        f"`finch export {config.name} --output exports/{config.name}` merges it into a full model; serve or evaluate "
        "that folder as model.path (with the template it trained in, named in its finch_export.json)"
    )
    if config.train.eval_tasks:
        raise ConfigError(
            f"lora.use_dora with train.eval_tasks: the tasks run on vLLM, which does not serve DoRA adapters; "
            f"drop train.eval_tasks, then {alternative}"
        )
    console.print(
        f"[yellow]finch: notice: lora.use_dora: vLLM does not serve DoRA adapters, so `finch serve` and `finch eval` "
        f"will refuse {config.name}; {alternative}. `finch chat` runs the adapter as it is.[/]",
        highlight=False,
    )


def prepare_data(config: RunConfig, model: ModelSource) -> PreparedData:
    if config.train.online_rl:
        from finch.rl.prompts import prepare_prompts

        return prepare_prompts(config, model)
    return prepare_datasets(config.data, model, config.train.objective)


def workers_device(scale: ScaleConfig) -> Device:
    """The device the training workers get (a GPU is probed through Ray, on a GPU node)."""
    if scale.use_gpu:
        init_ray()
    return device_of_workers(scale.use_gpu, scale.accelerator_type)


class OutOfMemoryError(ConfigError):
    pass


def check_memory(config: RunConfig, model: ModelSource, device: Device) -> None:
    """On GPUs: print the memory a worker needs (finch/memory.py) and refuse a run that would not
    fit, before any data is prepared or weights are loaded."""
    if device.kind != "cuda":
        return  # host RAM: Python, torch and Ray dwarf the arithmetic on small models (docs/training.md)
    estimate = training_memory(resolved(config, training_precision(config, device)), model.folder)
    console.print(f"finch: memory {estimate.describe()} (estimate; {device.name}: {device.memory_gib:.1f} GiB)")
    if estimate.total > device.memory_gib:
        raise OutOfMemoryError(
            f"this run needs about {estimate.total:.1f} GiB per GPU and {device.name} has {device.memory_gib:.1f}: "
            "turn on train.gradient_checkpointing, lower train.batch_size (raise train.grad_accum to keep the "
            "batch) or data.max_length, use train.method qlora, or shard with scale.strategy fsdp"
        )


def print_precision(precision: Precision) -> None:
    console.print(f"finch: precision {precision.describe()}", highlight=False)
    for warning in precision.warnings:
        console.print(f"[yellow]finch: warning: {warning}[/]", highlight=False)


def prepare_run_dir(config: RunConfig, overwrite: bool, resume: bool) -> Path:
    """Fail before any work on a taken run name, a run that cannot be resumed, or an unwritable
    output/registry folder."""
    run_dir = config.run_dir
    if overwrite and resume:
        raise RunExistsError("--overwrite and --resume exclude each other")
    if resume:
        check_resumable(config)
    elif run_dir.exists():
        if not overwrite:
            raise RunExistsError(
                f"run folder {run_dir} exists; pass --resume to continue it, --overwrite to start over"
            )
        shutil.rmtree(run_dir)
    for folder in (run_dir, Path(config.registry_dir)):
        try:
            folder.mkdir(parents=True, exist_ok=True)
            probe = folder / ".finch-write-test"
            probe.write_text("")
            probe.unlink()
        except OSError as err:
            raise OutputFolderError(f"cannot write to {folder}: {err.strerror}") from None
    (run_dir / "config.json").write_text(json.dumps(dump_config(config), indent=2))
    return run_dir


def check_free_space(config: RunConfig, model_path: str) -> None:
    """Fail before training, not at the first checkpoint, when the run folder's disk cannot hold the
    checkpoints Ray keeps, the one being written and the final weights."""
    parameters = trainable_parameter_count(config, model_path)
    needed = parameters * CHECKPOINT_BYTES_PER_PARAMETER * (CHECKPOINTS_KEPT + 2)
    free = shutil.disk_usage(config.run_dir).free
    if free < needed:
        raise OutputFolderError(
            f"{config.run_dir} has {free / 2**20:,.0f} MiB free; this run's checkpoints ({parameters:,} trained "
            f"parameters, {CHECKPOINTS_KEPT} kept) need about {needed / 2**20:,.0f} MiB: free space or set output_dir"
        )


def check_space_for_rows(prepared: PreparedData) -> None:
    """Fail before training when this machine's temp folder cannot hold the rows that the workers
    copy there (train/rows.py): about half their size in Ray's object store (int64 there, int32 on disk)."""
    needed = sum(rows.size_bytes() for rows in (prepared.train, prepared.eval) if rows is not None) // 2
    folder = rows_root().parent
    free = shutil.disk_usage(folder).free
    if free < needed:
        raise OutputFolderError(
            f"{folder} has {free / 2**20:,.0f} MiB free; the training rows need about {needed / 2**20:,.0f} MiB "
            "there on every node (train/rows.py): free space or point TMPDIR at a larger disk"
        )


def load_run_config(run_folder: str | Path, overrides: list[str] | None = None) -> RunConfig:
    """The config an existing run folder was started with (`finch train --resume RUN`), with
    overrides on top; the folder stays where it is, whatever the working directory."""
    folder = Path(run_folder).resolve()
    if not (folder / "config.json").is_file():
        raise ConfigError(f"--resume {run_folder}: not a finch run folder (no config.json in {folder})")
    base = {**json.loads((folder / "config.json").read_text()), "output_dir": str(folder.parent)}
    config = load_config(base=base, overrides=overrides)
    if config.name != folder.name:
        raise ConfigError(f"--resume {run_folder}: the run is named {config.name!r}, not {folder.name!r}")
    return config


def check_resumable(config: RunConfig) -> None:
    """Resuming needs checkpoints, an unfinished run, and every setting in RESUME_MUST_MATCH
    unchanged (a checkpoint's weights, optimizer state and data position mean nothing otherwise)."""
    run_dir = config.run_dir
    if not any(run_dir.glob("checkpoint-*")):
        raise RunExistsError(f"nothing to resume: {run_dir} holds no checkpoint")
    if (run_dir / FINAL_CHECKPOINT).exists():
        raise RunExistsError(
            f"run {config.name} already finished; its adapter is in {config.registry_dir}/{config.name}"
        )
    saved = flatten(json.loads((run_dir / "config.json").read_text()))
    current = flatten(dump_config(config))
    # A key the saved config lacks came with a newer finch, whose default keeps the old behaviour.
    changed = [
        key for key in current if key.startswith(RESUME_MUST_MATCH) and key in saved and saved[key] != current[key]
    ]
    if changed:
        raise RunExistsError(f"cannot resume {config.name}: changed since the interrupted run: {', '.join(changed)}")


def fit(
    config: RunConfig, model: ModelSource, prepared: PreparedData, device: Device, progress_queue=None, callbacks=()
):
    import ray.data
    import ray.train
    from ray.train.torch import TorchTrainer

    datasets = {name: rows for name, rows in (("train", prepared.train), ("eval", prepared.eval)) if rows is not None}
    # Workers train with every 'auto' type resolved for `device`; run folders and manifests keep 'auto'.
    worker_config = resolved(config, training_precision(config, device))
    # Workers find lora.init_adapter in the registry whatever their working directory.
    worker_config = worker_config.model_copy(update={"registry_dir": str(Path(config.registry_dir).resolve())})
    with rollout_engine(worker_config, model) as rollouts:
        trainer = TorchTrainer(
            train_loop_per_worker,
            train_loop_config={
                "config": dump_config(worker_config),
                "model": model,  # each worker finds it on its own node
                "progress_queue": progress_queue,
                # Where the workers keep the rows on their nodes' disks, and a key that is the same for
                # every worker of this fit and changes with the next: restarts after a failure reuse the
                # files, a new run rewrites them (train/rows.py).
                "rows": {"folder": run_rows_name(config.name, config.run_dir), "key": uuid.uuid4().hex},
                "prompts": prepared.prompts,  # GRPO's
                "rollouts": rollouts,
            },
            scaling_config=scaling_config(config),
            run_config=ray.train.RunConfig(
                name=config.name,
                storage_path=str(config.run_dir.parent),
                checkpoint_config=ray.train.CheckpointConfig(num_to_keep=CHECKPOINTS_KEPT),
                # A failed worker restarts the group from the last checkpoint (see worker.latest_checkpoint).
                failure_config=ray.train.FailureConfig(max_failures=config.scale.max_failures),
                logging_config=ray.train.LoggingConfig(log_level="WARNING"),
                # Without this Ray Train echoes every print of a worker twice (its logger and stdout).
                worker_runtime_env={"env_vars": {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}},
                callbacks=list(callbacks),
            ),
            datasets=datasets,
            # Each worker receives all rows, in the same order (HF Trainer's DistributedSampler shards
            # them by index, so ranks must agree on what index i is); one worker per node writes them
            # to disk, the node's workers read them from there (train/rows.py).
            dataset_config=ray.train.DataConfig(
                datasets_to_split=[], execution_options=ray.data.ExecutionOptions(preserve_order=True)
            ),
        )
        result = trainer.fit()
    if result.checkpoint is None or not result.checkpoint.path.endswith(FINAL_CHECKPOINT):
        raise RuntimeError(f"training ended without a final adapter checkpoint (latest: {result.checkpoint})")
    return result.checkpoint


@contextlib.contextmanager
def rollout_engine(config: RunConfig, model: ModelSource) -> Iterator[Any]:
    """GRPO's and RLOO's rollout engines (rl/rollouts.py), Ray actors for the length of the fit, as
    one RolloutClient; None for the other objectives. `config`: with its dtypes resolved for the
    workers' device, which the engines share so that their log-probabilities are the trainer's."""
    if not config.train.online_rl:
        yield None
        return
    import ray

    from finch.rl.rollouts import RolloutClient, RolloutEngine, rollout_engine_settings

    gpus = 1 if config.scale.use_gpu else 0
    # No CPU reserved: rollouts and training steps take turns, and the workers hold the CPUs. A dead
    # engine is started again; the call that was running fails its worker, and Ray Train restarts
    # the workers from the last checkpoint, whose policy they publish first (train/grpo.py).
    actor_class = ray.remote(num_cpus=0, num_gpus=gpus, max_restarts=config.scale.max_failures)(RolloutEngine)
    settings = rollout_engine_settings(config)
    engines = tuple(
        actor_class.options(scheduling_strategy=placement).remote(
            model, config.model.dtype, settings, gpus=gpus, full_weights=config.train.method == "full"
        )
        for placement in engine_placements(config.grpo.rollout_engines, gpus)
    )
    try:
        yield RolloutClient(engines)
    finally:
        for engine in engines:
            with contextlib.suppress(Exception):  # a dead actor has nothing left to shut down
                ray.get(engine.shutdown.remote(), timeout=60)
            ray.kill(engine)


def engine_placements(count: int, gpus: int) -> list[Any]:
    """Where rollout engines go: on GPUs, where Ray finds free ones (SPREAD across nodes); on CPU,
    round the nodes that have CPUs. An engine that reserves no resource is not reliably spread by
    Ray: SPREAD, and a soft node affinity too, put two such engines on one node of two now and then
    (measured on ray.cluster_utils clusters), so each is pinned to its node. The cost: an engine
    whose node is lost is not started elsewhere, and the run fails at its next rollouts (resume it
    from its last checkpoint); a killed engine process is restarted on its node as before."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    if gpus:
        return ["SPREAD"] * count
    nodes = sorted(node["NodeID"] for node in ray.nodes() if node["Alive"] and node["Resources"].get("CPU", 0) > 0)
    return [NodeAffinitySchedulingStrategy(nodes[i % len(nodes)], soft=False) for i in range(count)]


def scaling_config(config: RunConfig):
    import ray.train

    scale = config.scale
    return ray.train.ScalingConfig(
        num_workers=scale.num_workers,
        use_gpu=scale.use_gpu,
        resources_per_worker={"CPU": scale.cpus_per_worker or 1},
        accelerator_type=scale.accelerator_type,
    )


def register(
    config: RunConfig,
    model: ModelSource,
    prepared: PreparedData,
    checkpoint,
    run_dir: Path,
    device: Device,
    lineage: dict | None = None,
) -> RegistryEntry:
    """Publish the final checkpoint as `config.name`: the adapter files, or for full fine-tuning the
    whole model folder; `lineage` (e.g. the sweep and trial it won) goes into the manifest."""
    kind = "model" if config.train.method == "full" else "adapter"
    train = config.train
    title = f"{config.name}: {train.method} {train.objective} on {config.model.path}"
    with checkpoint.as_directory() as folder:
        log_history = json.loads(Path(folder, LOG_HISTORY_FILE).read_text())
        loss_png = plot_loss(log_history, run_dir / "loss.png", title)
        if kind == "adapter":
            files = {name: Path(folder, name) for name in ADAPTER_FILES}
        else:
            files = {p.name: p for p in Path(folder).iterdir() if p.is_file() and p.name != LOG_HISTORY_FILE}
        files["loss.png"] = loss_png
        entry_manifest = manifest(config, model, prepared, log_history, run_dir, training_precision(config, device))
        entry_manifest |= {"lineage": lineage} if lineage else {}
        entry = publish(config.registry_dir, config.name, files, entry_manifest, kind)
    console.print(f"[green]finch: registered {kind} {entry.ref}[/] at {entry.path}")
    return entry


def manifest(
    config: RunConfig,
    model: ModelSource,
    prepared: PreparedData,
    log_history: list[dict],
    run_dir: Path,
    precision: Precision,
) -> dict:
    metrics = last_values(log_history)
    stats = {k: v for k, v in prepared.stats.items() if k != "length_histogram"}
    return {
        "base_model": {
            "id": config.model.path,
            "revision": model.revision,
            "fingerprint": fingerprint_model_folder(model.folder),
        },
        "dataset": {
            "fingerprint": fingerprint_paths(
                config.data.train_files + config.data.eval_files, extra=json.dumps(dump_config(config)["data"])
            ),
            "train_files": config.data.train_files,
            "eval_files": config.data.eval_files,
            "stats": stats,
        },
        "template": prepared.template,
        "config": dump_config(config),
        "precision": precision.manifest(),
        "metrics": metrics,
        "finch_version": finch.__version__,
        "created_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "run_dir": str(run_dir),
    }


def print_data_stats(prepared: PreparedData) -> None:
    stats = prepared.stats
    if prepared.prompts is not None:
        console.print(
            f"finch: data {stats['prompts']} prompts, {stats['tokens']} tokens"
            + (f", skipped {stats['skipped_overlong']} over-long" if stats["skipped_overlong"] else "")
            + f", template {prepared.template}"
        )
        return
    efficiency = stats.get("packing_efficiency")
    bad_rows, overlong = stats["skipped_bad_rows"], stats["skipped_overlong"]
    console.print(
        f"finch: data {stats['examples']} examples ({stats['dropped_no_answer']} dropped, "
        f"{stats.get('eval_examples', 0)} held out for eval), {stats['tokens']} tokens "
        f"(mean {stats['length_mean']:.0f}, max {stats['length_max']}), {stats['truncated']} truncated, "
        + (f"skipped {bad_rows} bad rows and {overlong} over-long, " if bad_rows or overlong else "")
        + f"{stats['rows']} rows"
        + (f", packing efficiency {efficiency:.3f}" if efficiency else "")
        + f", template {prepared.template}"
    )
