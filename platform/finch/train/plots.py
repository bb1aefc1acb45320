"""The loss curve PNG written into every run folder and registry entry (plus reward margins for DPO,
pair accuracy for reward models, and the reward and KL for GRPO)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def series(log_history: list[dict[str, Any]], key: str) -> list[tuple[int, float]]:
    return [(e["step"], e[key]) for e in log_history if key in e]


def reward_terms(log_history: list[dict[str, Any]]) -> list[str]:
    """The keys of a GRPO run's separate rewards (TRL's rewards/<key>/mean) when it has several: their
    weighted sum alone can hide one rising while another falls."""
    keys = sorted(
        {key for entry in log_history for key in entry if key.startswith("rewards/") and key.endswith("/mean")}
    )
    return keys if len(keys) > 1 else []


def plot_loss(log_history: list[dict[str, Any]], path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # (y label, train key, eval key, further keys drawn dashed beside them)
    panels = [("loss", "loss", "eval_loss", [])]
    if series(log_history, "rewards/margins"):
        panels.append(("reward margin (chosen - rejected)", "rewards/margins", "eval_rewards/margins", []))
    if series(log_history, "accuracy"):
        panels.append(("accuracy (chosen scored higher)", "accuracy", "eval_accuracy", []))
    if series(log_history, "reward"):
        panels.append(("reward (mean over the step's completions)", "reward", "eval_reward", reward_terms(log_history)))
    if series(log_history, "kl"):
        panels.append(("kl (policy to reference)", "kl", "eval_kl", []))
    figure, axes = plt.subplots(1, len(panels), figsize=(7 * len(panels), 4), squeeze=False)
    for axis, (ylabel, train_key, eval_key, terms) in zip(axes[0], panels):
        if train := series(log_history, train_key):
            axis.plot(*zip(*train), label=f"train {ylabel.split(' ')[0]}")
        if evals := series(log_history, eval_key):
            axis.plot(*zip(*evals), marker="o", label=f"eval {ylabel.split(' ')[0]}")
        for key in terms:
            axis.plot(*zip(*series(log_history, key)), linestyle="--", label=key.split("/")[1] + " (unweighted)")
        axis.set_xlabel("optimizer step")
        axis.set_ylabel(ylabel)
        axis.grid(alpha=0.3)
        axis.legend()
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
