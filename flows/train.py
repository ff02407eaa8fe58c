"""Ray Train wiring for CLIP's contrastive training (Radford et al. 2021, Section 2.5).

The one place that talks to Ray. The driver checks the inputs, opens the MLflow run,
connects to Ray (RAY_ADDRESS or a local cluster) and runs a TorchTrainer (gloo on CPU,
nccl on GPU) whose workers run `train_func`: the library's model, loss, loop and shard
stream, with Ray reporting as a callback. Every worker calls `ray.train.report` at
checkpoint steps (a barrier); only rank 0 passes the checkpoint. A worker that dies is
restarted by Ray (FailureConfig) and continues from `ray.train.get_checkpoint()`; a rerun
with the same OUT and name continues from the run's last checkpoint.
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import math
import os
import shutil
import socket
import sys
import tempfile
import time
from pathlib import Path

import fsspec
import ray
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer

from clip_core.config import load_preset
from clip_core.model import create_model
from clip_core.train import TrainConfig, build_training, restore_training
from clip_core.train.checkpoint import save_train_state
from clip_core.train.data import check_corpus
from clip_core.train.loop import NonFiniteLossError
from clip_core.train.optim import unwrap
from flows.common import loopback_ray
from flows.tracking import (MetricsCallback, Tracker, ZeroShotEval, corpus_tags, default_tracking_uri,
                            flops_per_sample, git_commit, peak_flops)


class TrainingError(RuntimeError):
    """Training stopped (non-finite loss, worker failures); the message names the last checkpoint."""


# ----- on every worker -----

class History:
    """Loss and gradient norm of the last `limit` steps, returned to the driver by rank 0."""

    def __init__(self, limit: int = 10_000):
        self.rows = collections.deque(maxlen=limit)

    def on_step_end(self, trainer) -> None:
        m = trainer.metrics
        self.rows.append({"step": trainer.step, "loss": m["loss"], "grad_norm": m["grad_norm"]})


class RayReport:
    """Every `every` steps and at the end: all ranks report (a barrier); rank 0 adds the checkpoint."""

    def __init__(self, every: int, rank: int, loader, extra: dict):
        self.every, self.rank, self.loader, self.extra = every, rank, loader, extra
        self.last = -1

    def on_step_end(self, trainer) -> None:
        if trainer.step % self.every == 0:
            self.report(trainer)

    def on_train_end(self, trainer) -> None:
        if self.last != trainer.step:
            self.report(trainer)

    def report(self, trainer) -> None:
        ranks = _gather(self.loader.state_dict())  # collective: every rank's data position
        metrics = {"step": trainer.step, "loss": trainer.metrics.get("loss", math.nan)}
        self.last = trainer.step
        if self.rank != 0:
            ray.train.report(metrics)
            return
        with tempfile.TemporaryDirectory() as tmp:
            folder = save_train_state(Path(tmp) / "checkpoint", trainer, {"ranks": ranks}, self.extra)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(folder)),
                             checkpoint_dir_name=f"step_{trainer.step:08d}")


def _gather(obj) -> list:
    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _rank0_callbacks(cfg: TrainConfig, config: dict, world: int, loader, device) -> list:
    with torch.device("meta"):
        meta = create_model(cfg.preset, **({"vision_cfg": {"image_size": cfg.image_size}} if cfg.image_size else {}))
    tracker = Tracker(config["tracking_uri"] if config["run_id"] else None, config["run_id"])
    extras = lambda t: {"logit_scale": unwrap(t.model).logit_scale.exp().item(),  # noqa: E731
                        "data_skipped": loader.stats()["skipped"], "data_epoch": loader.stats()["epoch"]}
    metrics = MetricsCallback(tracker, Path(cfg.output) / "metrics.jsonl", cfg.log_every, world,
                              flops_per_sample(meta, meta.config.vision.image_size, meta.config.text.context_length),
                              peak_flops(cfg.peak_tflops, device), extras)
    return [metrics] + ([ZeroShotEval(cfg.eval, cfg.eval_every, metrics, device)] if cfg.eval else [])


def train_func(config: dict) -> dict:
    """One Ray Train worker: build, resume, train; rank 0 returns its loss history."""
    # [1] This worker: rank, world size, device
    # ========================================
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    cfg, device = TrainConfig.from_dict(config["train"]), ray.train.torch.get_device()

    # [2] Model in DDP, AdamW, schedule, distributed loss, this rank's shard stream
    # ============================================================================
    trainer, loader = build_training(cfg, rank=rank, world_size=world, device=device,
                                     wrap=ray.train.torch.prepare_model, urls=config["urls"])

    # [3] Resume: Ray's latest checkpoint (a restarted worker, a rerun), else --resume PATH
    # ====================================================================================
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None and config.get("resume_from"):
        checkpoint = ray.train.Checkpoint(config["resume_from"])
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            loader = restore_training(folder, trainer, loader)

    # [4] Callbacks: reports and checkpoints on every rank; metrics and eval on rank 0
    # ===============================================================================
    history, reporter = History(), RayReport(cfg.checkpoint_every, rank, loader, {"train_config": cfg.to_dict()})
    reporter.last = trainer.step if checkpoint is not None else -1
    rank0 = _rank0_callbacks(cfg, config, world, loader, device) if rank == 0 else []
    trainer.callbacks = [history, reporter, *rank0, *config.get("callbacks", [])]

    # [5] Train; a non-finite loss (the same on every rank) ends cleanly, keeping the last checkpoint
    # ==============================================================================================
    try:
        trainer.fit(loader, cfg.total_steps)
    except NonFiniteLossError as e:
        ray.train.report({"step": trainer.step, "nonfinite": 1.0})
        return {"error": str(e), "step": trainer.step, "history": list(history.rows)}
    return {"step": trainer.step, "history": list(history.rows), "data": loader.stats()}


# ----- on the driver -----

def _check_ray_address(address: str) -> None:
    """Fail fast with a clear error when host:port does not accept connections."""
    hostport = address.split("://", 1)[-1].rstrip("/")
    host, _, port = hostport.rpartition(":")
    if address == "auto" or not port.isdigit():
        return
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
    except OSError as e:
        raise ConnectionError(f"cannot reach the Ray cluster at {address}: {e}") from e


def connect_ray(cfg: TrainConfig) -> None:
    """ray.init on --ray-address / RAY_ADDRESS, else a local cluster on 127.0.0.1 in a temp dir we own."""
    address = cfg.ray_address or os.environ.get("RAY_ADDRESS")
    if address:
        _check_ray_address(address)
    if ray.is_initialized():
        return
    if address:
        ray.init(address=address)
        return
    # logical CPUs: enough for every worker plus Ray's own actors (one CPU would time out)
    cpus = max(os.cpu_count() or 1, math.ceil(cfg.workers * cfg.cpus_per_worker) + 1, 2)
    with loopback_ray():
        ray.init(num_cpus=cpus, include_dashboard=False, _temp_dir=tempfile.mkdtemp(prefix="ray"))


def _is_dir(uri: str) -> bool:
    fs, path = fsspec.core.url_to_fs(uri)
    return fs.isdir(path)


def _absolute(path: str) -> str:
    """Local paths made absolute; URIs (s3://, gs://, ...) unchanged."""
    return path if "://" in path else str(Path(path).resolve())


def _run_config(cfg: TrainConfig) -> RunConfig:
    name = cfg.name if cfg.resume != "never" else f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    return RunConfig(name=name, storage_path=cfg.storage_path,
                     checkpoint_config=CheckpointConfig(num_to_keep=cfg.num_to_keep),
                     failure_config=FailureConfig(max_failures=cfg.max_failures))


def _open_run(cfg: TrainConfig, urls: list[str]) -> tuple[Tracker, str | None]:
    tracker = Tracker(cfg.mlflow_uri or default_tracking_uri(cfg.output))
    tags = {"git_commit": git_commit(str(Path(__file__).resolve().parent)), **corpus_tags(cfg.corpus, len(urls))}
    if cfg.mlflow_parent_run_id:  # a stage of a pipeline run (flows/pipeline.py)
        tags |= {"mlflow.parentRunId": cfg.mlflow_parent_run_id, "stage": "train"}
    params = {**cfg.to_dict(), "preset_config": load_preset(cfg.preset).to_dict()}
    return tracker, tracker.start(cfg.experiment, cfg.name, params, tags)


def _export(result, output: Path, tracker: Tracker, cfg: TrainConfig) -> Path:
    """Copy the final model (safetensors + config.json) to OUT/model; log and register it."""
    model_dir = output / "model"
    with result.checkpoint.as_directory() as folder:
        shutil.rmtree(model_dir, ignore_errors=True)
        model_dir.mkdir(parents=True)
        for name in ("model.safetensors", "config.json"):
            shutil.copy2(Path(folder) / name, model_dir / name)
    tracker.log_artifacts(str(model_dir), "model")
    tracker.register(f"clip-{cfg.preset}", "model")
    return model_dir


def _checked(cfg: TrainConfig) -> tuple[TrainConfig, list[str]]:
    """The config with absolute local paths (Ray Train workers run in the run's folder) and the shards."""
    urls, _ = check_corpus(cfg.corpus), cfg.total_steps
    missing = [p for p in cfg.eval if not _is_dir(p)]
    if missing:
        raise FileNotFoundError(f"eval sets not found: {missing}")
    output = Path(cfg.output).resolve()
    output.mkdir(parents=True, exist_ok=True)
    resume = cfg.resume if cfg.resume in ("auto", "never") else _absolute(cfg.resume)
    return dataclasses.replace(cfg, output=str(output), eval=[_absolute(p) for p in cfg.eval], resume=resume,
                               storage_path=_absolute(cfg.storage_path or str(output / "ray"))), urls


def _torch_trainer(cfg: TrainConfig, loop_config: dict) -> TorchTrainer:
    """Workers (gloo on CPU, nccl on GPU) with their resources, storage, checkpoints, failures."""
    use_gpu = cfg.gpus_per_worker > 0
    resources = {"CPU": cfg.cpus_per_worker, **({"GPU": cfg.gpus_per_worker} if use_gpu else {})}
    return TorchTrainer(train_func, train_loop_config=loop_config,
                        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
                        scaling_config=ScalingConfig(num_workers=cfg.workers, use_gpu=use_gpu,
                                                     resources_per_worker=resources),
                        run_config=_run_config(cfg))


def train(cfg: TrainConfig, callbacks: list | None = None) -> dict:
    """Run CLIP training on Ray; returns a summary. Raises TrainingError, ValueError, ConnectionError."""
    # [1] Check the inputs before starting anything
    cfg, urls = _checked(cfg)
    # [2] Connect to Ray, then open the MLflow run: options, preset, commit, corpus
    connect_ray(cfg)
    tracker, run_id = _open_run(cfg, urls)
    # [3] The TorchTrainer; configs cross to the workers as plain dicts
    resume_from = None if cfg.resume in ("auto", "never") else cfg.resume
    trainer = _torch_trainer(cfg, {"train": cfg.to_dict(), "urls": urls, "run_id": run_id, "tracking_uri": tracker.uri,
                                   "resume_from": resume_from, "callbacks": list(callbacks or [])})
    # [4] Train; failures come back with the last checkpoint named
    try:
        result = trainer.fit()
    except ray.train.TrainingFailedError as e:
        tracker.end("FAILED")
        raise TrainingError(f"training failed: {e}; checkpoints stay under {cfg.storage_path}") from e
    value = result.return_value or {}
    if "error" in value:
        tracker.end("FAILED")
        where = result.checkpoint.path if result.checkpoint else "none was written"
        raise TrainingError(f"{value['error']}; training stopped, last good checkpoint: {where}")
    # [5] The final model to OUT/model, MLflow artifact and registry
    model_dir = _export(result, Path(cfg.output), tracker, cfg)
    tracker.end("FINISHED")
    return {"steps": value.get("step"), "model": str(model_dir), "checkpoint": result.checkpoint.path,
            "mlflow_run_id": run_id, "tracking_uri": tracker.uri, "history": value.get("history", []),
            "data": value.get("data", {})}


def main(argv: list[str] | None = None) -> int:
    """`python -m flows.train CORPUS OUT [options]`: what `clip-pipeline train` and Ray Jobs run."""
    from clip_core.train.config import add_train_arguments, run_train_command

    parser = argparse.ArgumentParser(prog="python -m flows.train", description="CLIP contrastive training on Ray Train")
    return run_train_command(add_train_arguments(parser).parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
