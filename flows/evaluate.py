"""Prefect flow `evaluate` and MLflow logging of evaluation results (Radford et al. 2021, Section 3).

Thin: one task runs clip_core.eval.run.evaluate (checkpoint + eval sets -> result JSONs),
another logs the returned CLIP_benchmark-shaped records to MLflow when a tracking URI or
run id is given. MLflow metric names cannot hold "@", so `recall@5` is logged as
`recall_at_5`, under `eval/{dataset}/{task}/`.
"""
from __future__ import annotations

import math
import re
import time
from collections.abc import Sequence
from pathlib import Path

from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from clip_core.eval.run import evaluate as run_evaluation
from flows.tracking import local_artifact_location

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


def _run_id(client, run_id: str | None, experiment: str) -> tuple[str, bool]:
    """The run to log into, and whether it was created here."""
    if run_id:
        client.get_run(run_id)  # fails early on an unknown id
        return run_id, False
    found = client.get_experiment_by_name(experiment)
    experiment_id = found.experiment_id if found else client.create_experiment(
        experiment, artifact_location=local_artifact_location(client.tracking_uri))
    return client.create_run(experiment_id, run_name="evaluate").info.run_id, True


def log_results_to_mlflow(records: Sequence[dict], out_dir: str | Path | None = None, *,
                          tracking_uri: str | None = None, run_id: str | None = None,
                          experiment: str = "clip-eval") -> str:
    """Log metrics (+ the result folder as artifacts) into run_id, or a new run; returns the run id."""
    from mlflow import MlflowClient
    from mlflow.entities import Metric, RunTag

    client = MlflowClient(tracking_uri)
    run_id, created = _run_id(client, run_id, experiment)
    now = int(time.time() * 1000)
    metrics = [Metric(k, v, now, 0) for k, v in mlflow_metrics(records).items()]
    models = sorted({r["model"] for r in records})
    datasets = sorted({r["dataset"] for r in records})
    tags = [RunTag("eval.models", ",".join(models)), RunTag("eval.datasets", ",".join(datasets))]
    client.log_batch(run_id, metrics=metrics, tags=tags)
    if out_dir is not None and Path(out_dir).is_dir():
        client.log_artifacts(run_id, str(out_dir), artifact_path="eval")
    if created:
        client.set_terminated(run_id)
    return run_id


@task(name="evaluate-checkpoint", cache_policy=NO_CACHE)
def evaluate_checkpoint(checkpoint: str, eval_dirs: list[str], tasks: list[str], out_dir: str,
                        options: dict) -> list[dict]:
    """Checkpoint + eval sets in, result records out (JSONs written under out_dir)."""
    return run_evaluation(checkpoint, eval_dirs, tasks, out_dir, progress=False, **options)


@task(name="log-eval-to-mlflow", retries=2, retry_delay_seconds=5, cache_policy=NO_CACHE)
def log_to_mlflow(records: list[dict], out_dir: str, tracking_uri: str | None, run_id: str | None,
                  experiment: str) -> str:
    """Records in, MLflow run id out."""
    return log_results_to_mlflow(records, out_dir, tracking_uri=tracking_uri, run_id=run_id, experiment=experiment)


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
        log_to_mlflow(records, str(out_dir), mlflow_uri, mlflow_run_id, mlflow_experiment)
    return records
