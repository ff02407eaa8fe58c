"""Ray Train wiring for CLIP's contrastive training (Radford et al. 2021, Section 2.5).

The one place that talks to Ray. The driver checks the inputs, opens the MLflow run,
connects to Ray (RAY_ADDRESS or a local cluster) and runs a TorchTrainer (gloo on CPU,
nccl on GPU) whose workers run `train_func`: the library's model, loss, loop and shard
stream, with Ray reporting as a callback. Every worker calls `ray.train.report` at
checkpoint steps (a barrier); only rank 0 passes the checkpoint. A worker that dies is
restarted by Ray (FailureConfig) and continues from `ray.train.get_checkpoint()`; a rerun
with the same OUT and name continues from the run's last checkpoint.

`train(config, run)` takes the recipe (clip_core.train.TrainConfig: model, data,
optimisation) and the run's settings (`RunSettings`: OUT, Ray, workers and their resources,
storage, checkpoints, resume, MLflow) and returns a `TrainSummary`; both cross to the workers
as plain dicts. Every input (corpus, --exclude, --eval, the checkpoint a run would continue)
is checked before Ray starts. OUT and the storage path may be fsspec URIs (s3://): Ray stores
checkpoints through the URI's fsspec filesystem, and the model, metrics.jsonl and (with a SQLite
store) MLflow's artifacts land under OUT. A cluster of several nodes with a local storage path
is refused before any worker starts, unless --shared-storage says the path is shared (NFS).
On a cluster that is this machine alone, torch.distributed
meets through a file and gloo/NCCL bind the loopback interface: nothing listens beyond
127.0.0.1. The MLflow run is always closed: FINISHED, FAILED, or KILLED on SIGINT/SIGTERM.
The command line (`clip-pipeline train`, `python -m flows.commands.train`) is flows/commands/train.py.
"""
from __future__ import annotations

import collections
import dataclasses
import json
import logging
import math
import os
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

from clip_core.errors import InputError
from clip_core.model import create_model
from clip_core.train import DataStats, TrainConfig, build_training, restore_training
from clip_core.train.checkpoint import save_train_state
from clip_core.train.checks import RESUME_FIX, check_checkpoint_matches, check_training_inputs
from clip_core.train.loop import NonFiniteLossError, scalar
from clip_core.train.optim import unwrap
from clip_core.train.precision import precision_note
from clip_core.weights import is_uri, latest_checkpoint
from flows.common import check_ray_address, loopback_ray
from flows.train_backend import LoopbackTorchConfig, local_cluster
from flows.train_progress import ProgressBoard, ProgressCallback, watch_progress
from flows.train_run import RunSettings, closing, export_model_to_run, open_run  # noqa: F401  (RunSettings: the interface)
from flows.train_storage import (_as_uri, _check_writable, _checkpoint_at, _exists, _local, join,
                                 storage_filesystem)
from flows.tracking import (MetricsCallback, Tracker, ZeroShotEval, flops_per_sample, peak_flops)

SNAPSHOT = "checkpoint_manager_snapshot.json"  # Ray Train's record of a run's checkpoints


class TrainingError(RuntimeError):
    """Training stopped (non-finite loss, worker failures); the message names the last checkpoint."""


@dataclasses.dataclass(frozen=True)
class TrainSummary:
    """What a finished training returns: the exported model, the last checkpoint, the MLflow run, the last steps."""

    steps: int
    model: str  # OUT/model: model.safetensors + config.json
    checkpoint: str  # the last checkpoint folder (with train_state.pt)
    mlflow_run_id: str | None
    tracking_uri: str | None
    history: list[dict] = dataclasses.field(default_factory=list)  # rank 0's {step, loss, grad_norm}
    data: DataStats = dataclasses.field(default_factory=DataStats)  # rank 0's samples: good, skipped, excluded
    precision_resolved: str | None = None  # what --precision (auto: bf16 where native, else fp32) became on rank 0

    @property
    def final_loss(self) -> float | None:
        return self.history[-1]["loss"] if self.history else None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ----- on every worker -----

class History:
    """Loss and gradient norm of the last `limit` steps, returned to the driver by rank 0."""

    def __init__(self, limit: int = 10_000):
        self.rows = collections.deque(maxlen=limit)

    def on_step_end(self, trainer) -> None:
        m = trainer.metrics  # on a GPU 0-dim tensors, read when the rows are
        self.rows.append({"step": trainer.step, "loss": m["loss"], "grad_norm": m["grad_norm"]})

    def floats(self) -> list[dict]:
        return [{k: scalar(v) for k, v in row.items()} for row in self.rows]


class RayReport:
    """Every `every` steps, every `minutes` (rank 0's clock, decided at log steps) and at the end: all
    ranks report (a barrier); rank 0 adds the checkpoint."""

    def __init__(self, every: int, rank: int, loader, extra: dict, minutes: float | None = None, log_every: int = 1):
        self.every, self.rank, self.loader, self.extra = every, rank, loader, extra
        self.minutes, self.log_every, self.since = minutes, log_every, time.monotonic()
        self.last, self.scratch = -1, None

    def on_step_end(self, trainer) -> None:
        if trainer.step % self.every == 0 or self._time_is_up(trainer.step):
            self.report(trainer)

    def _time_is_up(self, step: int) -> bool:
        """At log steps: rank 0 says whether `minutes` have passed since the last checkpoint; every rank hears it."""
        if not self.minutes or step % self.log_every:
            return False
        due = time.monotonic() - self.since >= 60 * self.minutes
        return bool(_gather(due)[0])  # rank 0's answer, the same on every rank

    def on_train_end(self, trainer) -> None:
        if self.last != trainer.step:
            self.report(trainer)

    def report(self, trainer) -> None:
        trainer.check_finite()  # never a checkpoint after a non-finite step (every rank holds the same losses)
        self.since = time.monotonic()
        ranks = _gather(self.loader.state_dict())  # collective: every rank's data position
        metrics = {"step": trainer.step, "loss": scalar(trainer.metrics.get("loss", math.nan))}
        self.last = trainer.step
        if self.rank != 0:
            ray.train.report(metrics)
            return
        # written locally here, uploaded by Ray in the background (training goes on meanwhile), the local
        # copy deleted once uploaded; Ray records the checkpoint only when its upload is whole, and
        # waits for the last upload before the run ends
        self.scratch = self.scratch or tempfile.mkdtemp(prefix="clip-ckpt-")  # one folder a run, emptied by Ray
        folder = save_train_state(Path(self.scratch) / f"step_{trainer.step:08d}", trainer, {"ranks": ranks},
                                  self.extra)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(folder)),
                         checkpoint_dir_name=f"step_{trainer.step:08d}",
                         checkpoint_upload_mode=ray.train.CheckpointUploadMode.ASYNC,
                         delete_local_checkpoint_after_upload=True)


def _gather(obj) -> list:
    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _rank0_callbacks(cfg: TrainConfig, run: RunSettings, config: dict, world: int, loader, device,
                     precision: str) -> list:
    with torch.device("meta"):
        meta = create_model(cfg.preset, **cfg.model_overrides())
    tracker = Tracker(config["tracking_uri"] if config["run_id"] else None, config["run_id"], output=run.output)
    note = precision_note(cfg.precision, precision, device)  # the choice --precision auto made, shown once
    if config.get("progress"):
        config["progress"].note.remote(note)
    else:
        print(note)
    tracker.log_params({"precision_resolved": precision})

    def extras(t) -> dict:
        data = loader.stats()
        return {"logit_scale": unwrap(t.model).logit_scale.detach().exp(), "data_skipped": data.skipped,
                "data_truncated": data.skip_reasons["truncated"], "data_excluded": data.excluded,
                "data_epoch": data.epoch}

    metrics = MetricsCallback(tracker, join(run.output, "metrics.jsonl"), run.log_every, world,
                              flops_per_sample(meta, meta.config.vision.image_size, meta.config.text.context_length),
                              peak_flops(run.peak_tflops, device), extras, checkpoint_every=run.checkpoint_every)
    progress = [ProgressCallback(config["progress"], cfg.total_steps, run.log_every, world)] if config.get("progress") else []
    return [metrics, *progress] + ([ZeroShotEval(cfg.eval, cfg.eval_every, metrics, device)] if cfg.eval else [])


def _ddp(model: torch.nn.Module) -> torch.nn.Module:
    """DDP through Ray, with gradients kept as views into the all-reduce buckets (no copy in or out of them)."""
    return ray.train.torch.prepare_model(model, parallel_strategy_kwargs={"gradient_as_bucket_view": True})


def train_func(config: dict) -> dict:
    """One Ray Train worker: build, resume, train; rank 0 returns its loss history."""
    # [1] This worker: rank, world size, device
    # ========================================
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    cfg, run = TrainConfig.from_dict(config["train"]), RunSettings.from_dict(config["run"])
    device = ray.train.torch.get_device()

    # [2] Model in DDP, AdamW, schedule, distributed loss, this rank's shard stream
    # ============================================================================
    # on a GPU the loss is read at log steps, not every step (no host sync in the step)
    trainer, loader = build_training(cfg, rank=rank, world_size=world, device=device, wrap=_ddp, urls=config["urls"],
                                     check_every=run.log_every if device.type == "cuda" else 1)

    # [3] Resume: Ray's latest checkpoint (a restarted worker, a rerun), else --resume PATH
    # ====================================================================================
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None and run.resume_from:
        checkpoint = _checkpoint_at(run.resume_from)
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            loader = restore_training(folder, trainer, loader)

    # [4] Callbacks: metrics and eval on rank 0, then reports and checkpoints on every rank
    # ====================================================================================
    options = {**cfg.to_dict(), **run.to_dict()}  # saved in train_state.pt: every option of the run
    history = History()
    reporter = RayReport(run.checkpoint_every, rank, loader, {"train_config": options}, run.checkpoint_minutes,
                         run.log_every)
    reporter.last = trainer.step if checkpoint is not None else -1
    rank0 = _rank0_callbacks(cfg, run, config, world, loader, device, trainer.precision) if rank == 0 else []
    # metrics before the checkpoint: a remote metrics.jsonl is uploaded up to a step before it is checkpointed
    trainer.callbacks = [history, *rank0, reporter, *config.get("callbacks", [])]

    # [5] Train; a non-finite loss (the same on every rank) ends cleanly, keeping the last checkpoint
    # ==============================================================================================
    try:
        trainer.fit(loader, cfg.total_steps)
    except NonFiniteLossError as e:
        for callback in rank0:  # a remote metrics.jsonl gets the rows up to the bad step
            getattr(callback, "flush", lambda: None)()
        ray.train.report({"step": trainer.step, "nonfinite": 1.0})
        return {"error": str(e), "step": trainer.step, "history": history.floats()}
    return {"step": trainer.step, "history": history.floats(), "data": loader.stats().to_dict(),
            "precision_resolved": trainer.precision}


# ----- on the driver -----

def connect_ray(run: RunSettings) -> None:
    """ray.init on --ray-address / RAY_ADDRESS, else a local cluster on 127.0.0.1 in a temp dir we own."""
    address = run.ray_address or os.environ.get("RAY_ADDRESS")
    if address:
        check_ray_address("--ray-address", address)  # bad input: before any work, exit 2
    if ray.is_initialized():
        return
    quiet = {"log_to_driver": run.ray_logs, **({} if run.ray_logs else {"logging_level": logging.WARNING})}
    if address:
        ray.init(address=address, **quiet)
        return
    # logical CPUs: enough for every worker plus Ray's own actors (one CPU would time out)
    cpus = max(os.cpu_count() or 1, math.ceil(run.workers * run.cpus_per_worker) + 1, 2)
    with loopback_ray():
        ray.init(num_cpus=cpus, include_dashboard=False, _temp_dir=tempfile.mkdtemp(prefix="ray"), **quiet)


def _run_config(run: RunSettings) -> RunConfig:
    name = run.name if run.resume != "never" else f"{run.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    filesystem, storage = storage_filesystem(run.storage_path) if is_uri(run.storage_path) else (None, run.storage_path)
    return RunConfig(name=name, storage_path=storage, storage_filesystem=filesystem,
                     checkpoint_config=CheckpointConfig(num_to_keep=run.num_to_keep),
                     failure_config=FailureConfig(max_failures=run.max_failures))


def _checked(cfg: TrainConfig, run: RunSettings) -> tuple[RunSettings, list[str]]:
    """The run's settings with OUT and the storage path resolved, and the corpus's shards.

    Every input is checked here, before Ray, MLflow or OUT are touched: InputError names the fix.
    """
    output, storage = _local(run.output), _local(run.storage_path)
    if is_uri(output):
        _check_writable(output, "OUT")
    else:
        output = str(Path(output).resolve())
        if Path(output).exists() and not Path(output).is_dir():
            raise InputError(output, "OUT is a file, not a folder", "give a folder for the training's outputs")
    if storage and is_uri(storage):
        _check_writable(storage, "--storage-path")
    cfg.check_workers(run.workers)
    run = _auto_resume(dataclasses.replace(run, output=output, storage_path=storage or join(output, "ray")))
    urls = check_training_inputs(cfg, run.resume_from)
    _check_ray_checkpoint(cfg, run)
    return run, urls


def _auto_resume(run: RunSettings) -> RunSettings:
    """--resume auto after a kill that came before Ray recorded the run: its newest whole step folder.

    Ray Train resumes from its snapshot (checkpoint_manager_snapshot.json); a driver killed right
    after a checkpoint was written can leave the folder without the record, and finished work
    must not be lost, so that folder is resumed as if named with --resume PATH (local or remote storage).
    """
    if run.resume != "auto":
        return run
    folder = join(run.storage_path, run.name)
    if _exists(join(folder, SNAPSHOT)):
        return run  # Ray resumes from its own record
    latest = latest_checkpoint(folder)
    return dataclasses.replace(run, resume=str(latest)) if latest else run


def _ray_checkpoint(run: RunSettings) -> str | None:
    """The checkpoint Ray Train restores for this run name: its snapshot's latest (a path or a URI)."""
    if run.resume == "never":
        return None
    folder = join(run.storage_path, run.name)
    snapshot = join(folder, SNAPSHOT)
    fs, path = fsspec.core.url_to_fs(snapshot)
    try:
        latest = json.loads(fs.cat_file(path)).get("latest_checkpoint_result") or {}
    except FileNotFoundError:
        return None
    except (ValueError, AttributeError) as e:
        raise InputError(snapshot, f"not Ray's JSON record of a run ({e})", RESUME_FIX) from None
    name = latest.get("checkpoint_dir_name") if isinstance(latest, dict) else None
    return join(folder, name) if isinstance(name, str) else None  # another layout (a newer Ray): Ray checks it itself


def _check_ray_checkpoint(cfg: TrainConfig, run: RunSettings) -> None:
    """The checkpoint Ray would resume from exists, is whole and is of the configured model."""
    folder = _ray_checkpoint(run)
    if folder is None:
        return
    fs, path = fsspec.core.url_to_fs(folder)
    if not fs.isdir(path):
        raise InputError(folder, f"Ray's record of run {run.name!r} names this checkpoint, and it is gone",
                         "start afresh with --resume never or a new OUT")
    check_checkpoint_matches(folder, cfg)


def check_shared_storage(run: RunSettings) -> None:
    """On a cluster of several nodes, checkpoints and OUT must be storage every node sees: else InputError.

    A local folder on a multi-node cluster would split the checkpoints over the nodes' disks
    (Ray Train V2 syncs nothing), and rank 0, wherever it runs, writes metrics.jsonl there.
    """
    nodes = sum(1 for node in ray.nodes() if node.get("Alive"))
    local = [(what, path) for what, path in (("--storage-path", run.storage_path), ("OUT", run.output))
             if not is_uri(path)]
    if nodes < 2 or run.shared_storage or not local:
        return
    what, path = local[0]
    raise InputError(f"{what} {path}", f"a local folder, and the Ray cluster has {nodes} nodes: each node would keep "
                     "its own part of the checkpoints and outputs", "give an s3:// (or other fsspec) URI as OUT and "
                     "--storage-path, or add --shared-storage if every node mounts this folder at the same path (NFS)")


def _prepare_output(run: RunSettings) -> None:
    """A local OUT is created once every check has passed (an object store needs no folders)."""
    if not is_uri(run.output):
        Path(run.output).mkdir(parents=True, exist_ok=True)


def _torch_trainer(run: RunSettings, loop_config: dict) -> TorchTrainer:
    """Workers (gloo on CPU, nccl on GPU) with their resources, storage, checkpoints, failures."""
    use_gpu = run.gpus_per_worker > 0
    resources = {"CPU": run.cpus_per_worker, **({"GPU": run.gpus_per_worker} if use_gpu else {})}
    torch_config = (LoopbackTorchConfig if local_cluster() else TorchConfig)(backend="nccl" if use_gpu else "gloo")
    return TorchTrainer(train_func, train_loop_config=loop_config, torch_config=torch_config,
                        scaling_config=ScalingConfig(num_workers=run.workers, use_gpu=use_gpu,
                                                     resources_per_worker=resources),
                        run_config=_run_config(run))


def train(config: TrainConfig, run: RunSettings, callbacks: list | None = None) -> TrainSummary:
    """Train the recipe `config` on Ray as `run` says; raises InputError (before anything starts),
    TrainingError (the run started, then failed)."""
    # [1] Check the inputs before starting anything
    run, urls = _checked(config, run)
    # [2] Connect to Ray; several nodes need shared storage (checked before any worker starts)
    connect_ray(run)
    check_shared_storage(run)
    _prepare_output(run)
    # [3] Open the MLflow run: options, preset, commit, corpus
    tracker, run_id = open_run(config, run, urls)
    with closing(tracker):
        # [4] The TorchTrainer; configs cross to the workers as plain dicts
        board = ProgressBoard.remote()  # rank 0 posts progress, a driver thread prints it
        trainer = _torch_trainer(run, {"train": config.to_dict(), "run": run.to_dict(), "urls": urls,
                                       "run_id": run_id, "tracking_uri": tracker.uri,
                                       "callbacks": list(callbacks or []), "progress": board})
        # [5] Train; failures come back with the last checkpoint named
        try:
            with watch_progress(board):
                result = trainer.fit()
        except ray.train.TrainingFailedError as e:
            raise TrainingError(f"training failed: {e}; checkpoints stay under {run.storage_path}") from e
        value = result.return_value or {}
        if "error" in value:
            where = _as_uri(run.storage_path, result.checkpoint.path) if result.checkpoint else "none was written"
            raise TrainingError(f"{value['error']}; training stopped, last good checkpoint: {where}")
        # [6] The final model to OUT/model, MLflow artifact and registry
        model_dir = export_model_to_run(result, run, tracker, config.preset)
    tracker.end("FINISHED")
    return TrainSummary(steps=value.get("step"), model=str(model_dir),
                        checkpoint=_as_uri(run.storage_path, result.checkpoint.path),
                        mlflow_run_id=run_id, tracking_uri=tracker.uri, history=value.get("history", []),
                        data=DataStats(**value.get("data", {})), precision_resolved=value.get("precision_resolved"))
