"""`finch registry list` and `finch registry show`: what the registry holds, as tables."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from finch.registry.store import RegistryEntry, list_adapters, resolve_entry


def describe_training(entry: RegistryEntry) -> dict[str, str]:
    config = entry.manifest.get("config", {})
    train = config.get("train", {})
    data = entry.manifest.get("dataset", {})
    return {
        "kind": entry.kind,
        "method": f"{train.get('method', '?')} {train.get('objective', '?')}",
        "base": entry.manifest.get("base_model", {}).get("id", "?"),
        "data": ", ".join(Path(f).name for f in data.get("train_files", [])),
        "created": entry.manifest.get("created_at", "?")[:16].replace("T", " "),
    }


def eval_scores(entry: RegistryEntry) -> list[tuple[str, str, float | None, float | None, dict[str, Any]]]:
    """(task, metric, score, base model's score, the whole record) for every recorded evaluation."""
    rows = []
    for record in entry.manifest.get("evals", {}).values():
        for metric, score in record.get("scores", {}).items():
            rows.append((record.get("task", "?"), metric, score, record.get("baseline", {}).get(metric), record))
    return sorted(rows, key=lambda row: (row[0], row[1]))


def short(score: float | None) -> str:
    return "-" if score is None else f"{score:.3g}"


def print_list(registry_dir: str | Path, console: Console) -> list[RegistryEntry]:
    entries = list_adapters(registry_dir)
    table = Table(title=f"registry {Path(registry_dir).resolve()}: {len(entries)} entries")
    for column in ("entry", "kind", "method", "base", "data", "created", "eval scores"):
        table.add_column(column, overflow="fold")
    for entry in entries:
        scores = ", ".join(f"{task}/{metric} {short(score)}" for task, metric, score, _, _ in eval_scores(entry))
        table.add_row(entry.ref, *describe_training(entry).values(), scores or "-")
    console.print(table)
    return entries


def print_entry(registry_dir: str | Path, ref: str, console: Console) -> RegistryEntry:
    entry = resolve_entry(registry_dir, ref)
    details = Table(title=f"{entry.ref} at {entry.path}", show_header=False)
    details.add_column("", style="bold")
    details.add_column("", overflow="fold")
    facts = describe_training(entry) | {
        "versions": ", ".join(e.ref for e in list_adapters(registry_dir) if e.name == entry.name),
        "template": str(entry.manifest.get("template", "?")),
        "final metrics": ", ".join(
            f"{k} {short(v)}" for k, v in entry.manifest.get("metrics", {}).items() if isinstance(v, float)
        ),
        "lineage": ", ".join(f"{k}: {v}" for k, v in entry.manifest.get("lineage", {}).items()) or "-",
    }
    for key, value in facts.items():
        details.add_row(key, value or "-")
    console.print(details)
    scores = eval_scores(entry)
    if scores:
        table = Table(title=f"{entry.ref}: evaluations")
        for column in ("task", "metric", "score", "base model", "examples", "data", "evaluated"):
            table.add_column(column, overflow="fold")
        for task, metric, score, baseline, record in scores:
            files = ", ".join(Path(f).name for f in record.get("files", []))
            table.add_row(
                task,
                metric,
                short(score),
                short(baseline),
                str(record.get("examples", "?")),
                files,
                str(record.get("evaluated_at", "?"))[:16].replace("T", " "),
            )
        console.print(table)
    return entry
