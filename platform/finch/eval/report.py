"""What `finch eval` leaves behind: per-example JSONL, summary JSON, a terminal table and a chart."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table


def write_json_atomic(path: Path, document: Any) -> None:
    staging = path.with_name(f".{path.name}.{os.getpid()}")
    staging.write_text(json.dumps(document, indent=2, sort_keys=True))
    os.replace(staging, path)


def write_examples(path: Path, records: list[dict[str, Any]]) -> None:
    staging = path.with_name(f".{path.name}.{os.getpid()}")
    with staging.open("w") as out:
        for record in records:
            out.write(json.dumps(record, ensure_ascii=False) + "\n")
    os.replace(staging, path)


def format_score(summary: dict[str, Any]) -> str:
    mean = summary["mean"]
    text = "n/a" if mean is None else (f"{mean:.3f}" if abs(mean) < 100 else f"{mean:.1f}")
    if summary["errors"]:
        text += f" ({summary['errors']} err)"
    return text


def print_table(console: Console, title: str, summary: dict[str, dict[str, dict[str, Any]]]) -> None:
    """Models as rows, metrics as columns."""
    metrics = list(next(iter(summary.values())))
    table = Table(title=title)
    table.add_column("model")
    for metric in metrics:
        table.add_column(metric, justify="right")
    for model, scores in summary.items():
        table.add_row(model, *(format_score(scores[m]) for m in metrics))
    console.print(table)


def plot_summary(path: Path, title: str, summary: dict[str, dict[str, dict[str, Any]]]) -> Path:
    """One panel per metric (their scales differ), one bar per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = list(next(iter(summary.values())))
    models = list(summary)
    figure, axes = plt.subplots(1, len(metrics), figsize=(max(4, 1.2 * len(models)) * len(metrics), 4), squeeze=False)
    for axis, metric in zip(axes[0], metrics):
        values = [summary[m][metric]["mean"] or 0.0 for m in models]
        bars = axis.bar(range(len(models)), values, color=[f"C{i}" for i in range(len(models))])
        axis.bar_label(bars, labels=[format_score(summary[m][metric]).split(" ")[0] for m in models], fontsize=8)
        axis.set_xticks(range(len(models)), models, rotation=30, ha="right", fontsize=8)
        axis.set_title(metric)
        axis.grid(axis="y", alpha=0.3)
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
