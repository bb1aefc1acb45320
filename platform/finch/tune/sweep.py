"""`finch tune SWEEP.yaml`: a Ray Tune search over a run config's training settings.

Each trial is a whole `finch train` run on Ray Train (Ray 2.60's Train V2 pattern for Tune: a
function trainable that builds the TorchTrainer, with a callback that forwards the workers'
reports to Tune). The data is prepared once, on the driver, and shared by every trial. Trials
report their eval loss at every evaluation; ASHA stops the ones that trail; the best finished
trial's adapter is registered with its lineage (sweep, trial, parameters).

Folders (output_dir/NAME): Tune's experiment state, `trials/trial-ID` (each trial's Ray Train run
and checkpoints), `results.csv` and `results.png`. `--resume` continues an interrupted sweep:
finished trials stay, and unfinished ones continue from their last Ray Train checkpoint.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback
from rich.console import Console

from finch.config import (
    ConfigError,
    EvalTaskConfig,
    LoraConfig,
    RunConfig,
    SweepConfig,
    dump_config,
    load_config,
    set_dotted,
    validate_config,
)
from finch.data.pipeline import PreparedData, prepare_datasets
from finch.models.source import ModelSource, resolve_model_source
from finch.precision import Device, training_precision
from finch.registry.models import check_init_adapter_base, pin_init_adapter
from finch.registry.store import RegistryEntry
from finch.runtime import init_ray
from finch.train.run import check_memory, fit, print_data_stats, print_precision, register, workers_device
from finch.tune.report import TrialResult, plot_trials, print_results, write_results_csv

METRIC, MODE = "eval_loss", "min"
console = Console(soft_wrap=True)  # log lines stay whole in files and pipes


class SweepError(RuntimeError):
    """A sweep that cannot start or finish; the message says what to do."""


class SweepInterrupted(SweepError):
    """Stopped (Ctrl-C) before every trial ended; `--resume` continues it."""


class EvalReportsToTune(TuneReportCallback):
    """Forward to Tune only the reports that carry an eval loss: the ones ASHA and the searchers
    compare (Tune refuses a result without its metric), one Tune iteration per evaluation."""

    def after_report(self, run_context, metrics, checkpoint):
        if METRIC in metrics[0]:
            super().after_report(run_context, metrics, checkpoint)


def sweep(config: SweepConfig, resume: bool = False) -> RegistryEntry:
    base = pin_init_adapter(base_run_config(config))
    check_space(config, base)
    sweep_dir = config.sweep_dir
    if sweep_dir.exists() and not resume:
        raise FileExistsError(f"sweep folder {sweep_dir} exists; pass --resume to continue it")
    device = workers_device(base.scale)
    print_precision(training_precision(base, device))
    model = resolve_model_source(base.model)
    check_init_adapter_base(base, model)
    check_memory(base, model, device)
    init_ray()
    prepared = prepare_datasets(base.data, model, base.train.objective)
    print_data_stats(prepared)
    trainable = trial_trainable(base, model, prepared, sweep_dir, device)
    if resume:
        if not tune.Tuner.can_restore(str(sweep_dir)):
            raise SweepError(f"nothing to resume: {sweep_dir} holds no Tune experiment")
        tuner = tune.Tuner.restore(str(sweep_dir), trainable, resume_unfinished=True, resume_errored=True)
    else:
        tuner = tune.Tuner(
            trainable,
            param_space=search_space(config),
            tune_config=tune_config(config),
            run_config=tune.RunConfig(name=config.name, storage_path=str(sweep_dir.parent), verbose=1),
        )
    grid = tuner.fit()
    if interrupted(sweep_dir):
        raise SweepInterrupted(f"sweep {config.name} stopped before every trial ended; continue it with --resume")
    results = [TrialResult.from_tune(r, METRIC) for r in grid]
    task_result = score_trials(config, base, model, prepared, results) if config.metric != METRIC else None
    best = best_trial(results, config)
    print_results(results, best, config, console)
    write_results_csv(results, sweep_dir / "results.csv", config.metric)
    plot_trials(results, best, sweep_dir / "results.png", f"{config.name}: {METRIC} per trial")
    entry = register_best(config, base, model, prepared, best, device)
    if task_result is not None:
        from finch.eval.run import score_record
        from finch.registry.store import record_scores

        record_scores(
            entry, task_result.fingerprint, score_record(ranking_task(config, base), task_result, trial_name(best))
        )
    return entry


def score_trials(
    config: SweepConfig, base: RunConfig, model: ModelSource, prepared: PreparedData, results: list[TrialResult]
) -> Any:
    """Score every finished trial's adapter on the ranking task, all in one engine; sets task_score."""
    from finch.eval.run import evaluate_checkpoints

    finished = {trial_name(r): r for r in results if r.finished}
    if not finished:
        return None
    task = ranking_task(config, base)
    adapters = {name: r.checkpoint_path for name, r in finished.items()}
    result = evaluate_checkpoints(task, base, model, prepared.template, adapters, config.sweep_dir / "evals")
    metric = config.metric.partition("/")[2]
    for name, trial in finished.items():
        trial.task_score = result.score(name, metric)
    return result


def trial_name(result: TrialResult) -> str:
    return f"trial-{result.trial_id}"


def interrupted(sweep_dir: Path) -> bool:
    """Whether Tune stopped on Ctrl-C before every trial ended. It then saves its state, marks the
    trials it stops as ended in the results it returns, and returns normally: only the saved state
    (what --resume restores) still holds them as running."""
    saved = tune.ExperimentAnalysis(str(sweep_dir))
    return any(trial.status not in ("TERMINATED", "ERROR") for trial in saved.trials)


def base_run_config(config: SweepConfig) -> RunConfig:
    base = load_config(config.run, config.overrides)
    if not base.has_eval:
        raise ConfigError(
            f"{config.run}: a sweep stops trials early by eval loss; set data.eval_files or data.eval_fraction"
        )
    if config.metric != METRIC:
        ranking_task(config, base)
    return base


def ranking_task(config: SweepConfig, base: RunConfig) -> EvalTaskConfig:
    """The train.eval_tasks entry that `metric` ('task/metric') names."""
    task_name, _, metric = config.metric.partition("/")
    tasks = {task.name: task for task in base.train.eval_tasks}
    if task_name not in tasks or metric not in {m.key for m in tasks[task_name].metrics}:
        offered = [f"{t.name}/{m.key}" for t in tasks.values() for m in t.metrics]
        raise ConfigError(
            f"metric {config.metric!r} is not a task metric of {config.run}'s train.eval_tasks; "
            f"choose eval_loss or one of: {', '.join(offered) or '(none: the run has no train.eval_tasks)'}"
        )
    if base.train.method == "full":
        raise ConfigError(
            "a task metric ranks LoRA and QLoRA trials (one engine, every trial's adapter); rank full fine-tuning by eval_loss"
        )
    return tasks[task_name]


def check_space(config: SweepConfig, base: RunConfig) -> None:
    """Build a trial config from every listed value and range end, so a bad key or value fails
    now, naming it, and not in the middle of the sweep."""
    for key, kind, values in config.search.dimensions():
        if base.lora.init_adapter and key.removeprefix("lora.") in LoraConfig.SHAPE and key.startswith("lora."):
            raise ConfigError(
                f"search.space.{key}: the adapter's shape is lora.init_adapter's ({base.lora.init_adapter}); "
                "a sweep that continues an adapter cannot vary it"
            )
        for value in values:
            try:
                trial_config(base, {key: value}, "check", Path("."))
            except ConfigError as err:
                raise ConfigError(
                    f"search.space.{key}.{kind}: {value!r} does not make a valid run config: {err}"
                ) from None


def trial_config(base: RunConfig, params: dict[str, Any], trial_id: str, sweep_dir: Path) -> RunConfig:
    """The base run config with a trial's parameters; it trains as its own run under the sweep."""
    raw = dump_config(base) | {"name": f"trial-{trial_id}", "output_dir": str(sweep_dir / "trials")}
    raw["tracking"] = {**raw["tracking"], "mlflow": False}  # the sweep's results table is the record
    for key, value in params.items():
        set_dotted(raw, key, value)
    return validate_config(raw, origin=f"trial {trial_id}")


def search_space(config: SweepConfig) -> dict[str, Any]:
    def domain(kind: str, values: list[Any]) -> Any:
        if kind == "grid":
            return tune.grid_search(values)
        if kind == "choice":
            return tune.choice(values)
        if kind == "uniform":
            return tune.uniform(*values)
        if kind == "loguniform":
            return tune.loguniform(*values)
        return tune.randint(values[0], values[1] + 1)  # randint's high is exclusive; finch's is inclusive

    return {key: domain(kind, values) for key, kind, values in config.search.dimensions()}


def tune_config(config: SweepConfig) -> tune.TuneConfig:
    search, stopping = config.search, config.early_stopping
    # Each searcher gets the concurrency limit itself: Tune ignores TuneConfig.max_concurrent_trials
    # (with a warning) for a BasicVariantGenerator passed in.
    if search.algorithm == "optuna":
        from ray.tune.search import ConcurrencyLimiter
        from ray.tune.search.optuna import OptunaSearch

        searcher = ConcurrencyLimiter(
            OptunaSearch(metric=METRIC, mode=MODE, seed=search.seed), max_concurrent=config.max_concurrent_trials
        )
    else:
        from ray.tune.search import BasicVariantGenerator

        searcher = BasicVariantGenerator(random_state=search.seed, max_concurrent=config.max_concurrent_trials)
    scheduler = None
    if stopping.enabled:
        from ray.tune.schedulers import ASHAScheduler

        # time is Tune's training_iteration: one per evaluation (EvalReportsToTune)
        scheduler = ASHAScheduler(grace_period=stopping.grace_period, reduction_factor=stopping.reduction_factor)
    return tune.TuneConfig(
        metric=METRIC,
        mode=MODE,
        search_alg=searcher,
        scheduler=scheduler,
        num_samples=search.num_samples,
    )


def trial_trainable(
    base: RunConfig, model: ModelSource, prepared: PreparedData, sweep_dir: Path, device: Device
) -> Any:
    def run_trial(params: dict[str, Any], prepared: PreparedData) -> None:
        trial_id = tune.get_context().get_trial_id()
        config = trial_config(base, params, trial_id, sweep_dir)
        # Started again under the same name (a resumed sweep), Ray Train continues from the
        # trial's last checkpoint.
        fit(config, model, prepared, device, callbacks=[EvalReportsToTune()])

    # The trial process only waits on its Ray Train run; the workers hold the CPUs.
    return tune.with_resources(tune.with_parameters(run_trial, prepared=prepared), {"CPU": 0.01})


def best_trial(results: list[TrialResult], config: SweepConfig) -> TrialResult:
    finished = [r for r in results if r.finished]
    if not finished:
        errors = "; ".join(f"{r.trial_id}: {r.error}" for r in results if r.error)
        raise SweepError(f"no trial finished training{': ' + errors if errors else ''}")
    if config.metric == METRIC:
        return min(finished, key=lambda r: r.final_metric)
    scored = [r for r in finished if r.task_score is not None]
    if not scored:
        raise SweepError(f"no finished trial got a {config.metric} score (see {config.sweep_dir / 'evals'})")
    pick = max if config.mode == "max" else min
    # Ties (common for accuracies on small sets) go to the lower eval loss.
    return pick(scored, key=lambda r: (r.task_score, -r.final_metric if config.mode == "max" else r.final_metric))


def register_best(
    config: SweepConfig, base: RunConfig, model: ModelSource, prepared: PreparedData, best: TrialResult, device: Device
) -> RegistryEntry:
    from ray.train import Checkpoint

    trial = trial_config(base, best.params, best.trial_id, config.sweep_dir)
    named = trial.model_copy(update={"name": config.register_as or config.name})
    lineage = {
        "sweep": config.name,
        "sweep_dir": str(config.sweep_dir),
        "trial": best.trial_id,
        "params": best.params,
        METRIC: best.final_metric,
    }
    if best.task_score is not None:
        lineage[config.metric] = best.task_score
    if base.lora.init_adapter:
        lineage["init_adapter"] = base.lora.init_adapter
    return register(named, model, prepared, Checkpoint(best.checkpoint_path), trial.run_dir, device, lineage)


def load_sweep_config(path: str | Path, overrides: list[str] | None = None) -> SweepConfig:
    return load_config(path, overrides, schema=SweepConfig)
