"""A finished sweep on screen and on disk: a rich table, results.csv and a plot of every trial."""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from finch.run_folder import FINAL_CHECKPOINT


@dataclass
class TrialResult:
    trial_id: str
    params: dict[str, Any]
    final_metric: float  # the metric at the trial's last report (its final weights when finished)
    evaluations: int
    checkpoint_path: str | None
    error: str | None
    history: list[tuple[int, float]] = field(default_factory=list)  # (step, metric) per evaluation
    task_score: float | None = None  # the sweep's task metric (finch eval) of the final adapter, when it ranks by one

    @property
    def finished(self) -> bool:
        """Trained to the end (not stopped early by ASHA, not failed)."""
        return (
            self.error is None
            and self.checkpoint_path is not None
            and Path(self.checkpoint_path).name == FINAL_CHECKPOINT
        )

    @property
    def status(self) -> str:
        if self.error:
            return "failed"
        return "finished" if self.finished else "stopped early"

    @classmethod
    def from_tune(cls, result: Any, metric: str) -> TrialResult:
        metrics = result.metrics or {}
        frame = result.metrics_dataframe
        history = []
        if frame is not None and metric in frame:
            rows = frame[["step", metric]].dropna()
            history = [(int(step), float(value)) for step, value in rows.itertuples(index=False)]
        return cls(
            trial_id=metrics.get("trial_id") or Path(result.path).name,
            params=dict(result.config or {}),
            final_metric=float(metrics.get(metric, math.nan)),
            evaluations=len(history),
            checkpoint_path=metrics.get("checkpoint_path"),
            error=str(result.error).splitlines()[0] if result.error else None,
            history=history,
        )


def print_results(results: list[TrialResult], best: TrialResult, sweep: Any, console: Console) -> None:
    keys = list(sweep.search.space)
    task_metric = [sweep.metric] if sweep.metric != "eval_loss" else []
    trials = f"{len(results)} trial{'s' * (len(results) != 1)}"
    table = Table(title=f"sweep {sweep.name}: {trials}, best {best.trial_id} by {sweep.metric}")
    for column in ["trial", *keys, "status", "evals", "eval_loss", *task_metric]:
        table.add_column(column, justify="left" if column in ("trial", "status") else "right")
    for r in sorted(
        results,
        key=lambda r: (r is not best, not r.finished, r.final_metric if not math.isnan(r.final_metric) else math.inf),
    ):
        style = "bold green" if r is best else None
        scores = [format_value(r.task_score) if r.task_score is not None else "-" for _ in task_metric]
        table.add_row(
            r.trial_id,
            *(format_value(r.params.get(k)) for k in keys),
            r.status,
            str(r.evaluations),
            f"{r.final_metric:.4f}",
            *scores,
            style=style,
        )
    console.print(table)


def write_results_csv(results: list[TrialResult], path: Path, metric: str = "eval_loss") -> None:
    keys = sorted({k for r in results for k in r.params})
    task_metric = [metric] if metric != "eval_loss" else []
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["trial", *keys, "status", "evaluations", "eval_loss", *task_metric, "checkpoint", "error"])
        for r in results:
            scores = [r.task_score if r.task_score is not None else "" for _ in task_metric]
            writer.writerow(
                [
                    r.trial_id,
                    *(r.params.get(k) for k in keys),
                    r.status,
                    r.evaluations,
                    r.final_metric,
                    *scores,
                    r.checkpoint_path or "",
                    r.error or "",
                ]
            )


def plot_trials(results: list[TrialResult], best: TrialResult, path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(8, 4.5))
    for r in results:
        if not r.history:
            continue
        steps, values = zip(*r.history)
        is_best = r is best
        params = ", ".join(f"{key.rsplit('.', 1)[-1]}={format_value(value)}" for key, value in r.params.items())
        axes.plot(
            steps,
            values,
            marker="o",
            linewidth=2.5 if is_best else 1,
            alpha=1 if is_best else 0.6,
            label=f"{params}{' (best)' if is_best else ''}{'' if r.finished else ' - ' + r.status}",
        )
    axes.set(title=title, xlabel="step", ylabel="eval loss")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def format_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)
