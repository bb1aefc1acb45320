"""Live training progress on the driver's console, fed by rank 0 through a Ray queue.

Ray Train's own callbacks run in its controller actor, whose output reaches the console only
as prefixed log lines; a queue actor brings each logged step to the driver instead, which
draws a rich progress bar on a terminal (plain lines otherwise, e.g. under `ray job submit`)
and forwards the metrics to the trackers (MLflow).
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

T = TypeVar("T")
HEARTBEAT_S = 60.0
SHOWN = (
    ("loss", "loss"),
    ("eval_loss", "eval loss"),
    ("eval_perplexity", "eval ppl"),
    ("rewards/margins", "margin"),
    ("eval_rewards/margins", "eval margin"),
    ("accuracy", "accuracy"),  # reward models: pairs whose chosen answer scores higher, and by how much
    ("eval_accuracy", "eval accuracy"),
    ("margin", "margin"),
    ("eval_margin", "eval margin"),
    ("reward", "reward"),  # GRPO: the weighted reward's mean over the step's completions, the KL to the base
    ("reward_std", "reward std"),
    ("kl", "kl"),
    ("completions/mean_length", "completion tokens"),
    ("learning_rate", "lr"),
    ("grad_norm", "grad norm"),
    ("train_loss", "mean train loss"),
    ("peak_rss_gib", "worker peak RSS GiB"),
    ("peak_gpu_gib", "worker peak GPU GiB"),
)


def metrics_line(metrics: dict[str, Any]) -> str:
    return "  ".join(
        f"{label} {metrics[key]:.4g}" for key, label in SHOWN if isinstance(metrics.get(key), (int, float))
    )


class TrainingProgress:
    """Runs `fit` in the calling thread while a background thread shows what rank 0 reports."""

    def __init__(self, title: str, console: Console, trackers: list[Any] = ()):
        from ray.util.queue import Queue

        self.queue = Queue(actor_options={"num_cpus": 0})
        self.title = title
        self.console = console
        self.trackers = list(trackers)
        self._done = threading.Event()

    def run(self, fit: Callable[[], T]) -> T:
        # fit stays in the main thread: Ray installs signal handlers, which only works there.
        live = self.console.is_terminal
        progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            TextColumn("{task.fields[metrics]}"),
            console=self.console,
            disable=not live,
        )
        task = progress.add_task(self.title, total=None, metrics="starting workers")
        if not live:
            self.console.print(
                f"finch: {self.title}: starting the training workers (each loads the model)", highlight=False
            )
        self._started = self._last_line = time.monotonic()
        watcher = threading.Thread(target=self._watch, args=(progress, task, live), daemon=True)
        with progress:
            watcher.start()
            try:
                return fit()
            finally:
                self._done.set()
                watcher.join()  # it drains what is queued, then stops
                self.queue.shutdown()

    def _watch(self, progress: Progress, task: Any, live: bool) -> None:
        while True:
            try:
                metrics = self.queue.get(timeout=0.5)
            except queue.Empty:
                if self._done.is_set():
                    return
                continue
            try:
                self._show(metrics, progress, task, live)
                for tracker in self.trackers:
                    tracker.log_metrics(metrics)
            except Exception as err:  # a tracking server hiccup must not end progress or training
                self.console.print(f"[yellow]finch: could not show or track step {metrics.get('step')}: {err}[/]")

    def _show(self, metrics: dict[str, Any], progress: Progress, task: Any, live: bool) -> None:
        step, total = metrics.get("step", 0), metrics.get("max_steps")
        text = metrics_line(metrics)
        is_eval = any(key.startswith("eval_") for key in metrics)
        if live:
            progress.update(task, completed=step, total=total, **({} if is_eval or not text else {"metrics": text}))
            if is_eval:
                progress.console.print(f"finch: step {step}/{total}  {text}")
            return
        now = time.monotonic()
        # A step without metrics (between logging steps) is printed for the first step, then at most
        # once a minute: a log shows that training runs, and how fast, without a line per step.
        if text or step == 1 or now - self._last_line >= HEARTBEAT_S:
            elapsed = f"  ({now - self._started:.0f} s since workers started)" if not text else ""
            self.console.print(f"finch: step {step}/{total}  {text}{elapsed}".rstrip(), highlight=False)
            self._last_line = now
