"""Experiment tracking: one MLflow run per finch run (params, step metrics, loss plot).

finch logs from the driver with `MlflowClient` and an explicit run id: metrics reach the driver
through the progress queue (train/progress.py), so workers need no tracking setup, and a resumed
run (`--resume`) keeps appending to the MLflow run it started.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from finch.config import RunConfig, dump_config

RUN_ID_FILE = "mlflow_run_id"
NOT_METRICS = {"step", "epoch", "max_steps"}


class MlflowTracker:
    def __init__(self, config: RunConfig, resume: bool):
        uri = config.mlflow_uri
        if uri.startswith("file:"):
            # MLflow 3 keeps its file store in maintenance mode behind this opt-in; a local folder
            # needs no server or database, which is what a default should need.
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=uri)
        self.uri = uri
        id_file = config.run_dir / RUN_ID_FILE
        if resume and id_file.exists() and self._reopen(id_file.read_text().strip()):
            return
        experiment = self.client.get_experiment_by_name(config.tracking.experiment)
        experiment_id = (
            experiment.experiment_id if experiment else self.client.create_experiment(config.tracking.experiment)
        )
        run = self.client.create_run(
            experiment_id,
            run_name=config.name,
            tags={"finch.method": config.train.method, "finch.objective": config.train.objective},
        )
        self.run_id = run.info.run_id
        id_file.write_text(self.run_id)
        self.log_params(dump_config(config))

    def _reopen(self, run_id: str) -> bool:
        """Continue the MLflow run of an interrupted finch run, if this store still has it."""
        from mlflow.exceptions import MlflowException

        try:
            self.client.update_run(run_id, status="RUNNING")
        except MlflowException:
            return False
        self.run_id = run_id
        return True

    def log_params(self, config: dict[str, Any]) -> None:
        from mlflow.entities import Param

        params = [Param(key, str(value)[:500]) for key, value in flatten(config).items()]
        for start in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(self.run_id, params=params[start : start + 100])

    def log_metrics(self, metrics: dict[str, Any]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        step = int(metrics.get("step", 0))
        values = [
            Metric(key, float(value), now, step)
            for key, value in metrics.items()
            if key not in NOT_METRICS and isinstance(value, (int, float)) and not isinstance(value, bool)
        ]
        if values:
            self.client.log_batch(self.run_id, metrics=values)

    def finish(self, artifacts: list[Path], failed: bool = False) -> None:
        for path in artifacts:
            self.client.log_artifact(self.run_id, str(path))
        self.client.set_terminated(self.run_id, status="FAILED" if failed else "FINISHED")


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'train': {'lr': 1}} -> {'train.lr': 1}"""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat
