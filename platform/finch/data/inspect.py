"""`finch data inspect`: what the pipeline makes of a config's data, before any training."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from finch.config import RunConfig
from finch.data.pipeline import prepare_datasets
from finch.models.source import resolve_model_source
from finch.runtime import init_ray

console = Console()


def inspect_data(config: RunConfig, histogram: Path | None = None) -> dict[str, Any]:
    model = resolve_model_source(config.model)
    init_ray()
    prepared = prepare_datasets(config.data, model, config.train.objective)
    stats = prepared.stats
    histogram = histogram or config.run_dir / "token_lengths.png"
    histogram.parent.mkdir(parents=True, exist_ok=True)
    plot_lengths(stats["length_histogram"], config.data.max_length, histogram)
    console.print(stats_table(stats, prepared.template))
    console.print(f"finch: token-length histogram written to {histogram}")
    return stats


def stats_table(stats: dict[str, Any], template: str) -> Table:
    table = Table(title="finch data inspect", show_header=False)
    efficiency = stats["packing_efficiency"]
    rows = [
        ("template", template),
        ("examples", f"{stats['examples']:,}"),
        ("eval examples", f"{stats.get('eval_examples', 0):,}"),
        ("tokens (after truncation)", f"{stats['tokens']:,}"),
        ("answer tokens (carry loss)", f"{stats['trainable_tokens']:,}"),
        (
            "length min / mean / p50 / p95 / max",
            "{length_min} / {length_mean:.1f} / {length_p50:.0f} / {length_p95:.0f} / {length_max}".format(**stats),
        ),
        ("truncated to max_length", f"{stats['truncated']:,} (max_length {stats['max_length']})"),
        ("dropped (no answer left)", f"{stats['dropped_no_answer']:,}"),
        ("training rows", f"{stats['rows']:,}"),
        ("packing efficiency", f"{efficiency:.3f}" if efficiency is not None else "packing off"),
    ]
    for name, value in rows:
        table.add_row(name, value)
    return table


def plot_lengths(histogram: list[int], max_length: int, path: Path) -> Path:
    """histogram[n]: how many examples are n tokens long."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4))
    distinct = sum(1 for count in histogram if count)
    axis.hist(range(len(histogram)), weights=histogram, bins=min(50, max(10, distinct)), color="#4477aa")
    axis.axvline(max_length, color="#cc3311", linestyle="--", label=f"max_length {max_length}")
    axis.set_xlabel("tokens per example")
    axis.set_ylabel("examples")
    axis.set_title(f"Token lengths ({sum(histogram):,} examples)")
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
