"""`finch eval`: answers from the base model and registry entries, scored, kept and compared.

Top to bottom: read the examples -> group the models by engine -> generate (generate.py; one
Ray Data batch job per engine group) -> reference perplexity if asked (perplexity.py) -> score
(metrics.py, judge.py) -> write results (report.py) and record each entry's scores in its
registry manifest, keyed by dataset fingerprint and metric.
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from finch.config import EvalConfig, EvalTaskConfig, MetricConfig, RunConfig
from finch.eval.examples import EvalExample, dataset_fingerprint, read_examples
from finch.eval.metrics import TEXT_METRICS, MetricError, summarize, text_scorer
from finch.eval.perplexity import perplexity
from finch.eval.targets import BASE, EngineGroup, Target, engine_groups, untrusted
from finch.models.source import ModelSource
from finch.registry.store import RegistryEntry, record_scores
from finch.runtime import init_ray

console = Console()


@dataclass
class EvalResult:
    run_dir: Path
    fingerprint: str
    summary: dict[str, dict[str, dict[str, Any]]]  # model -> metric key -> summarize()
    records: list[dict[str, Any]]  # per example: prompt, reference, each model's answer and scores

    def score(self, model: str, metric: str) -> float | None:
        return self.summary[model][metric]["mean"]


def evaluate(config: EvalConfig) -> EvalResult:
    return evaluate_groups(config, engine_groups(config))


def evaluate_groups(config: EvalConfig, groups: list[EngineGroup]) -> EvalResult:
    examples = read_examples(config.data)
    # Built before any engine starts: a bad schema or user function fails in seconds, not minutes.
    scorers = {m.key: text_scorer(m) for m in config.metrics if m.name in TEXT_METRICS}
    models = [t.name for g in groups for t in g.targets]
    console.print(
        f"finch: evaluating {', '.join(models)} on {len(examples)} examples of {', '.join(config.data.files)}",
        highlight=False,
    )
    init_ray()
    dtypes = [served_dtype(config, group) for group in groups]
    answers = generate_all(config, groups, dtypes, examples)
    scores = score_all(config, groups, dtypes, examples, answers, scorers)
    result = write_results(config, examples, models, answers, scores)
    if config.record:
        record_in_registry(config, groups, result)
    return result


def generate_all(
    config: EvalConfig, groups: list[EngineGroup], dtypes: list[str], examples: list[EvalExample]
) -> dict[tuple[int, str], dict]:
    from finch.eval.generate import generate_answers

    answers: dict[tuple[int, str], dict] = {}
    total = sum(len(g.targets) for g in groups) * len(examples)
    columns = (TextColumn("finch: generating"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=False) as progress:
        task = progress.add_task("answers", total=total)
        for group, dtype in zip(groups, dtypes):
            rows = generate_answers(
                group,
                examples,
                config.engine,
                config.generation,
                dtype,
                engine_count(config),
                config.use_gpu,
                lambda: progress.advance(task),
            )
            answers |= {(row["example"], row["target"]): row for row in rows}
    return answers


def served_dtype(config: EvalConfig, group: EngineGroup) -> str:
    """The group's model.dtype resolved for the engines' device, said once (as finch serve does)."""
    from finch.precision import device_of_workers, inference_dtype

    device = device_of_workers(config.use_gpu)
    dtype, warnings = inference_dtype(group.model_config.dtype, device)
    console.print(
        f"finch: {group.model.path} generates in {dtype} on {device.name}: {device.evidence}",
        highlight=False,
        soft_wrap=True,
    )
    for warning in warnings:
        console.print(f"[yellow]finch: warning: {warning}[/]", highlight=False, soft_wrap=True)
    return dtype


def engine_count(config: EvalConfig) -> int:
    """One engine on a CPU machine; one per GPU of the cluster (or num_engines)."""
    import ray

    if not config.use_gpu:
        return 1
    return config.num_engines or max(1, int(ray.cluster_resources().get("GPU", 0)))


def score_all(
    config: EvalConfig,
    groups: list[EngineGroup],
    dtypes: list[str],
    examples: list[EvalExample],
    answers: dict[tuple[int, str], dict],
    scorers: dict[str, Callable],
) -> dict[tuple[int, str], dict[str, Any]]:
    """(example, model) -> {"scores": {metric: value or None}, "errors": {metric: message}}."""
    by_index = {e.index: e for e in examples}
    scores = {key: {"scores": {}, "errors": {}} for key in answers}
    for metric in config.metrics:
        if metric.name in TEXT_METRICS:
            values = text_scores(scorers[metric.key], answers, by_index)
        elif metric.name == "answer_tokens":
            values = {key: (float(row["answer_tokens"]), None) for key, row in answers.items()}
        elif metric.name == "perplexity":
            values = {}
            for key, (total, tokens) in reference_nll_all(config, groups, dtypes, examples).items():
                values[key] = (math.exp(total / tokens) if tokens else None, None)
                scores[key]["reference_nll"] = [total, tokens]  # the summary weighs every token the same
        else:
            values = judge_scores_of(metric, answers, by_index)
        for key, (value, error) in values.items():
            scores[key]["scores"][metric.key] = value
            if error:
                scores[key]["errors"][metric.key] = error
    for key, row in answers.items():  # a row that got no answer is an error for every answer-based metric
        if row["error"]:
            for metric in config.metrics:
                if metric.name != "perplexity":
                    scores[key]["scores"][metric.key] = None
                    scores[key]["errors"][metric.key] = row["error"]
    return scores


def text_scores(scorer: Callable, answers: dict, by_index: dict[int, EvalExample]) -> dict[tuple[int, str], tuple]:
    values = {}
    for key, row in answers.items():
        example = by_index[row["example"]]
        try:
            values[key] = (
                scorer(row["answer"], example.reference, {"messages": example.messages, "source": example.source}),
                None,
            )
        except MetricError as err:
            values[key] = (None, str(err))
    return values


def reference_nll_all(
    config: EvalConfig, groups: list[EngineGroup], dtypes: list[str], examples: list[EvalExample]
) -> dict[tuple[int, str], tuple]:
    from finch.eval.perplexity import reference_nll

    nll: dict[tuple[int, str], tuple] = {}
    for group, dtype in zip(groups, dtypes):
        nll |= reference_nll(group, examples, dtype, config.use_gpu, engine_count(config))
    return nll


def judge_scores_of(
    metric: MetricConfig, answers: dict, by_index: dict[int, EvalExample]
) -> dict[tuple[int, str], tuple]:
    from finch.eval.judge import judge_scores

    keys = [key for key, row in answers.items() if not row["error"]]
    items = [
        {"prompt": by_index[k[0]].prompt, "answer": answers[k]["answer"], "reference": by_index[k[0]].reference}
        for k in keys
    ]
    console.print(
        f"finch: {metric.key}: asking {metric.judge.model} at {metric.judge.url} about {len(items)} answers",
        highlight=False,
    )
    return dict(zip(keys, judge_scores(metric.judge, items)))


def summarize_scores(
    config: EvalConfig, models: list[str], scores: dict[tuple[int, str], dict]
) -> dict[str, dict[str, dict]]:
    summary: dict[str, dict[str, dict]] = {}
    for model in models:
        rows = [row for (_, name), row in scores.items() if name == model]
        summary[model] = {}
        for metric in config.metrics:
            values = [row["scores"].get(metric.key) for row in rows if metric.key not in row["errors"]]
            summary[model][metric.key] = summarize(values, errors=sum(metric.key in row["errors"] for row in rows))
            if metric.name == "perplexity":
                summary[model][metric.key]["mean"] = perplexity(
                    [tuple(r["reference_nll"]) for r in rows if "reference_nll" in r]
                )
    return summary


def write_results(
    config: EvalConfig, examples: list[EvalExample], models: list[str], answers: dict, scores: dict
) -> EvalResult:
    from finch.eval.report import plot_summary, print_table, write_examples, write_json_atomic

    run_dir = config.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    fingerprint = dataset_fingerprint(config.data)
    summary = summarize_scores(config, models, scores)
    records = [
        {
            "index": e.index,
            "source": e.source,
            "prompt": e.messages,
            "reference": e.reference,
            "answers": {
                model: {
                    "text": answers[(e.index, model)]["answer"],
                    "tokens": answers[(e.index, model)]["answer_tokens"],
                    "finish_reason": answers[(e.index, model)]["finish_reason"],
                    **scores[(e.index, model)],
                }
                for model in models
            },
        }
        for e in examples
    ]
    write_examples(run_dir / "examples.jsonl", records)
    write_json_atomic(
        run_dir / "summary.json",
        {
            "task": config.name,
            "models": models,
            "summary": summary,
            "dataset": {"files": config.data.files, "fingerprint": fingerprint, "examples": len(examples)},
            "config": config.model_dump(mode="json"),
            "evaluated_at": now(),
        },
    )
    title = f"{config.name}: {len(examples)} examples"
    chart = plot_summary(run_dir / "summary.png", title, summary)
    print_table(console, title, summary)
    console.print(
        f"finch: per-example answers and scores in {run_dir / 'examples.jsonl'}, chart {chart}", highlight=False
    )
    return EvalResult(run_dir, fingerprint, summary, records)


def record_in_registry(config: EvalConfig, groups: list[EngineGroup], result: EvalResult) -> None:
    """Each evaluated entry's manifest gets its scores (and the base model's, when evaluated, to compare)."""
    entries = [t for g in groups for t in g.targets if t.entry is not None]
    for target in entries:
        record_scores(target.entry, result.fingerprint, score_record(config, result, target.name))
    if entries:
        console.print(
            f"finch: scores recorded in the registry manifests under evals[{result.fingerprint[:19]}...]",
            highlight=False,
        )


def score_record(config: EvalTaskConfig, result: EvalResult, model: str) -> dict[str, Any]:
    """What a registry manifest keeps of one model's evaluation."""
    summary = result.summary[model]
    record = {
        "task": config.name,
        "files": config.data.files,
        "examples": len(result.records),
        "scores": {metric: s["mean"] for metric, s in summary.items()},
        "counts": {metric: {k: v for k, v in s.items() if k != "mean"} for metric, s in summary.items()},
        "generation": config.generation.model_dump(mode="json"),
        "evaluated_at": now(),
    }
    if BASE in result.summary:
        record["baseline"] = {metric: s["mean"] for metric, s in result.summary[BASE].items()}
    return record


def now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def evaluate_after_training(config: RunConfig, entry: RegistryEntry) -> dict[str, float | None]:
    """train.eval_tasks: each task for the base model and the new entry, in the template it was
    trained with; returns the entry's scores as {'task/metric': score}."""
    scores: dict[str, float | None] = {}
    for task in config.train.eval_tasks:
        result = evaluate(
            task_config(
                task,
                config,
                models=[BASE, entry.ref],
                model=config.model,
                template=entry.manifest["template"],
                registry_dir=config.registry_dir,
                output_dir=str(config.run_dir / "evals"),
            )
        )
        scores |= {f"{task.name}/{metric}": value["mean"] for metric, value in result.summary[entry.ref].items()}
    return scores


def evaluate_checkpoints(
    task: EvalTaskConfig,
    run: RunConfig,
    model: ModelSource,
    template: str,
    adapters: dict[str, str],
    output_dir: Path,
) -> EvalResult:
    """A task for LoRA adapters that are not in the registry (a sweep's trials: name -> folder), in one engine."""
    config = task_config(task, run, models=list(adapters), record=False, output_dir=str(output_dir))
    targets = tuple(Target(name, template, run.data.system_prompt, folder) for name, folder in adapters.items())
    return evaluate_groups(config, [EngineGroup(model, untrusted(run.model), targets)])


def task_config(task: EvalTaskConfig, run: RunConfig, **fields: Any) -> EvalConfig:
    """An eval task of a run config as `finch eval` takes it, on the run's kind of device."""
    return EvalConfig(**task.model_dump(by_alias=True), use_gpu=run.scale.use_gpu, **fields)
