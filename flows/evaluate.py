"""Prefect flow `evaluate` and MLflow logging of evaluation results (Radford et al. 2021, Section 3).

Thin: one task runs clip_core.eval.run.evaluate (checkpoint + eval sets -> result JSONs),
another logs the returned CLIP_benchmark-shaped records to MLflow when a tracking URI or
run id is given, through flows.tracking.Tracker (a server that is down only warns). MLflow
metric names cannot hold "@", so `recall@5` is logged as `recall_at_5`, under
`eval/{dataset}/{task}/`.
"""
from __future__ import annotations

import functools
import math
import re
from collections.abc import Sequence
from pathlib import Path

from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from clip_core.errors import InputError
from clip_core.eval.run import evaluate as run_evaluation
from flows.lineage import eval_dataset
from flows.tracking import Tracker

__all__ = ["evaluate", "evaluate_checkpoint", "log_results_to_mlflow", "mlflow_metrics"]


def mlflow_metrics(records: Sequence[dict]) -> dict[str, float]:
    """{"eval/{dataset}/{task}/{metric}": value} for every finite metric of the records."""
    out = {}
    for r in records:
        for name, value in r["metrics"].items():
            if isinstance(value, (int, float)) and math.isfinite(value):
                key = f"eval/{r['dataset']}/{r['task']}/{name.replace('@', '_at_')}"
                out[re.sub(r"[^\w./\- :]", "_", key)] = float(value)
    return out


def _tags(records: Sequence[dict]) -> dict:
    return {"eval.models": ",".join(sorted({r["model"] for r in records})),
            "eval.datasets": ",".join(sorted({r["dataset"] for r in records}))}


def log_results_to_mlflow(records: Sequence[dict], out_dir: str | Path | None = None, *,
                          tracking_uri: str | None = None, run_id: str | None = None,
                          experiment: str = "clip-eval", eval_dirs: Sequence[str] = ()) -> str | None:
    """Log metrics (+ the result folder as artifacts) into run_id, or a new run; returns the run id.

    Through flows.tracking.Tracker: a server that is down, or goes down, is warned about and the
    results stay on disk (None is returned when no run could be opened). A run id the server
    does not know is bad input.
    """
    import mlflow

    uri = tracking_uri or mlflow.get_tracking_uri()  # MLFLOW_TRACKING_URI or MLflow's default store
    tracker = Tracker(uri, run_id, elsewhere="the results are on disk only")
    if run_id and tracker.run_exists(run_id) is False:
        raise InputError("--mlflow-run-id", f"MLflow at {uri} has no run {run_id}",
                         "give the id of an existing run, or leave it out to log into a new run")
    if run_id:
        tracker.set_tags(_tags(records))
    else:
        tracker.start(experiment, "evaluate", {}, _tags(records))
    tracker.log_metrics(mlflow_metrics(records), step=0)
    tracker.log_inputs([(functools.partial(eval_dataset, d), "evaluation") for d in eval_dirs])
    if out_dir is not None and Path(out_dir).is_dir():
        tracker.log_artifacts(str(out_dir), "eval")
    if not run_id:
        tracker.end()
    return tracker.run_id


@task(name="evaluate-checkpoint", cache_policy=NO_CACHE)
def evaluate_checkpoint(checkpoint: str, eval_dirs: list[str], tasks: list[str], out_dir: str,
                        options: dict) -> list[dict]:
    """Checkpoint + eval sets in, result records out (JSONs written under out_dir)."""
    return run_evaluation(checkpoint, eval_dirs, tasks, out_dir, progress=False, **options)


@task(name="log-eval-to-mlflow", retries=2, retry_delay_seconds=5, cache_policy=NO_CACHE)
def log_to_mlflow(records: list[dict], out_dir: str, tracking_uri: str | None, run_id: str | None,
                  experiment: str, eval_dirs: Sequence[str] = ()) -> str | None:
    """Records in, MLflow run id out."""
    return log_results_to_mlflow(records, out_dir, tracking_uri=tracking_uri, run_id=run_id, experiment=experiment,
                                 eval_dirs=eval_dirs)


@flow(name="evaluate")
def evaluate(checkpoint: str, eval_dirs: list[str], tasks: list[str] | None = None, out_dir: str = "eval_results",
             batch_size: int = 64, dataset_names: list[str] | None = None, model_name: str | None = None,
             paper_prompts: bool = False, device: str | None = None, num_workers: int = 0,
             mlflow_uri: str | None = None, mlflow_run_id: str | None = None,
             mlflow_experiment: str = "clip-eval") -> list[dict]:
    """Evaluate a checkpoint on eval sets; log to MLflow when a URI or run id is given."""
    options = dict(batch_size=batch_size, dataset_names=dataset_names, model_name=model_name,
                   paper_prompts=paper_prompts, device=device, num_workers=num_workers)
    eval_dirs = [str(d) for d in eval_dirs]
    records = evaluate_checkpoint(str(checkpoint), eval_dirs, list(tasks or ["zeroshot"]), str(out_dir), options)
    if mlflow_uri or mlflow_run_id:
        log_to_mlflow(records, str(out_dir), mlflow_uri, mlflow_run_id, mlflow_experiment, eval_dirs)
    return records
