"""MLflow for pipeline runs: one parent run per pipeline run, one child run per stage.

Metric names are fixed per stage (`corpus/curated`, `crawl/success_rate`, ...), so the
MLflow compare view lines runs up. Tracking is best effort through `Tracker`: a tracking
server that is down never fails a stage.
"""
from __future__ import annotations

import os
from pathlib import Path

from flows.tracking import Tracker, flatten, git_commit

EXPERIMENT = "clip-pipeline"


def tracking_uri(storage: str) -> str:
    """MLFLOW_TRACKING_URI, else SQLite beside the pipeline's local storage."""
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    root = Path(storage if "://" not in storage else ".").resolve()
    root.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{root / 'mlflow.db'}"


def start_parent(uri: str, run_name: str, params: dict) -> Tracker:
    """Open the pipeline's parent run."""
    tracker = Tracker(uri)
    tracker.start(EXPERIMENT, run_name, params, {"git_commit": git_commit(), "kind": "pipeline"})
    return tracker


def start_child(parent: Tracker, stage: str, params: dict) -> Tracker:
    """An open child run of `parent` for one stage."""
    child = Tracker(parent.uri)
    if parent.run_id:
        child.start(EXPERIMENT, stage, params, {"mlflow.parentRunId": parent.run_id, "stage": stage})
    return child


def log_stage(parent: Tracker | None, stage: str, params: dict, metrics: dict, files: list[str] = (),
              inputs: list = ()) -> None:
    """A finished child run for one stage, with its params, metrics, small output files and the
    datasets it read (`Tracker.log_inputs`' (dataset factory, context) pairs)."""
    if parent is None or parent.run_id is None:
        return
    child = start_child(parent, stage, params)
    child.log_inputs(list(inputs))
    numbers = {k: v for k, v in flatten(metrics).items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    child.log_metrics(numbers, step=0)
    parent.log_metrics(numbers, step=0)
    for file in files:
        if "://" not in file and Path(file).is_file():
            child.log_artifact(file, stage)
    child.end()
