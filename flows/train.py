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
is checked before Ray starts. On a cluster that is this machine alone, torch.distributed
meets through a file and gloo/NCCL bind the loopback interface: nothing listens beyond
127.0.0.1. The MLflow run is always closed: FINISHED, FAILED, or KILLED on SIGINT/SIGTERM.
The command line (`clip-pipeline train`, `python -m flows.commands.train`) is flows/commands/train.py.
"""
from __future__ import annotations

import collections
import contextlib
import dataclasses
import ipaddress
import json
import math
import os
import shutil
import signal
import socket
import tempfile
import threading
import time
from pathlib import Path

import ray
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer
from ray.train.torch.config import _set_torch_distributed_env_vars, _setup_torch_process_group, _TorchBackend

from clip_core.config import load_preset
from clip_core.errors import InputError
from clip_core.model import create_model
from clip_core.train import DataStats, TrainConfig, build_training, restore_training
from clip_core.train.checkpoint import save_train_state
from clip_core.train.checks import RESUME_FIX, check_checkpoint_matches, check_training_inputs
from clip_core.train.config import absolute
from clip_core.train.loop import NonFiniteLossError
from clip_core.train.optim import unwrap
from clip_core.weights import export_model, latest_checkpoint
from flows.common import loopback_ray
from flows.tracking import (MetricsCallback, Tracker, ZeroShotEval, corpus_tags, default_tracking_uri,
                            flops_per_sample, git_commit, peak_flops)


class TrainingError(RuntimeError):
    """Training stopped (non-finite loss, worker failures); the message names the last checkpoint."""


@dataclasses.dataclass(frozen=True)
class RunSettings:
    """Where and how a training runs: OUT, Ray and the workers' resources, checkpoints, resume, MLflow."""

    output: str = ""  # OUT: model/, metrics.jsonl, mlflow.db, ray/
    name: str = "clip-train"  # the run's folder under the storage path, and its MLflow name
    ray_address: str | None = None  # default RAY_ADDRESS, else a local cluster on 127.0.0.1
    workers: int = 1  # Ray Train workers (data-parallel ranks)
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0
    storage_path: str | None = None  # Ray's checkpoints; default OUT/ray
    checkpoint_every: int = 500
    num_to_keep: int = 3  # checkpoints Ray keeps
    max_failures: int = 0  # worker failures Ray recovers from
    resume: str = "auto"  # auto: continue this run's checkpoints; never: fresh; else a checkpoint folder
    mlflow_uri: str | None = None  # default MLFLOW_TRACKING_URI or sqlite:///OUT/mlflow.db
    experiment: str = "clip"
    mlflow_parent_run_id: str | None = None  # nest the run under a pipeline run
    log_every: int = 10  # steps between MLflow rows (metrics.jsonl has every step)
    peak_tflops: float | None = None  # per device, for MFU

    def __post_init__(self):
        for name in ("output", "storage_path"):  # Ray workers run in another folder: local paths absolute
            object.__setattr__(self, name, absolute(getattr(self, name)))
        if self.resume_from:
            object.__setattr__(self, "resume", absolute(self.resume))
        for name in ("workers", "checkpoint_every", "num_to_keep", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")

    @property
    def resume_from(self) -> str | None:
        """The checkpoint folder --resume names; None for auto and never."""
        return None if self.resume in ("auto", "never") else self.resume

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def field_names(cls) -> set[str]:
        return {f.name for f in dataclasses.fields(cls)}

    @classmethod
    def from_dict(cls, d: dict) -> RunSettings:
        return cls(**d)


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


def _rank0_callbacks(cfg: TrainConfig, run: RunSettings, config: dict, world: int, loader, device) -> list:
    with torch.device("meta"):
        meta = create_model(cfg.preset, **({"vision_cfg": {"image_size": cfg.image_size}} if cfg.image_size else {}))
    tracker = Tracker(config["tracking_uri"] if config["run_id"] else None, config["run_id"])

    def extras(t) -> dict:
        data = loader.stats()
        return {"logit_scale": unwrap(t.model).logit_scale.exp().item(), "data_skipped": data.skipped,
                "data_truncated": data.skip_reasons["truncated"], "data_excluded": data.excluded,
                "data_epoch": data.epoch}

    metrics = MetricsCallback(tracker, Path(run.output) / "metrics.jsonl", run.log_every, world,
                              flops_per_sample(meta, meta.config.vision.image_size, meta.config.text.context_length),
                              peak_flops(run.peak_tflops, device), extras)
    return [metrics] + ([ZeroShotEval(cfg.eval, cfg.eval_every, metrics, device)] if cfg.eval else [])


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
    trainer, loader = build_training(cfg, rank=rank, world_size=world, device=device,
                                     wrap=ray.train.torch.prepare_model, urls=config["urls"])

    # [3] Resume: Ray's latest checkpoint (a restarted worker, a rerun), else --resume PATH
    # ====================================================================================
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None and run.resume_from:
        checkpoint = ray.train.Checkpoint(run.resume_from)
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            loader = restore_training(folder, trainer, loader)

    # [4] Callbacks: reports and checkpoints on every rank; metrics and eval on rank 0
    # ===============================================================================
    options = {**cfg.to_dict(), **run.to_dict()}  # saved in train_state.pt: every option of the run
    history, reporter = History(), RayReport(run.checkpoint_every, rank, loader, {"train_config": options})
    reporter.last = trainer.step if checkpoint is not None else -1
    rank0 = _rank0_callbacks(cfg, run, config, world, loader, device) if rank == 0 else []
    trainer.callbacks = [history, reporter, *rank0, *config.get("callbacks", [])]

    # [5] Train; a non-finite loss (the same on every rank) ends cleanly, keeping the last checkpoint
    # ==============================================================================================
    try:
        trainer.fit(loader, cfg.total_steps)
    except NonFiniteLossError as e:
        ray.train.report({"step": trainer.step, "nonfinite": 1.0})
        return {"error": str(e), "step": trainer.step, "history": list(history.rows)}
    return {"step": trainer.step, "history": list(history.rows), "data": loader.stats().to_dict()}


# ----- torch.distributed on loopback (a local run) -----

def _loopback_interface() -> str:
    """The loopback network interface's name: "lo" on Linux, "lo0" on macOS."""
    return next((name for _, name in socket.if_nameindex() if name.startswith("lo")), "lo")


def _use_loopback() -> None:
    """On a worker: gloo and NCCL open their sockets on the loopback interface only."""
    lo = _loopback_interface()
    os.environ["GLOO_SOCKET_IFNAME"] = os.environ["NCCL_SOCKET_IFNAME"] = lo
    os.environ["MASTER_ADDR"] = "127.0.0.1"  # for any library that reads it; the store below is a file


class _LoopbackTorchBackend(_TorchBackend):
    """Ray's torch backend with a file rendezvous instead of its env:// TCPStore.

    torch's TCPStore server, which Ray's env:// rendezvous starts on rank 0, listens on every
    interface whatever MASTER_ADDR says (the address only tells clients where to connect),
    and has no authentication. On one machine a FileStore does the same job with no socket.
    """

    def on_start(self, worker_group, backend_config: TorchConfig) -> None:
        self.folder = tempfile.mkdtemp(prefix="clip-rendezvous-")  # fresh per start: a restart never reuses it
        store = Path(self.folder, "store").as_uri()
        worker_group.execute(_use_loopback)
        worker_group.execute(_set_torch_distributed_env_vars)
        n = len(worker_group)
        ray.get([worker_group.execute_single_async(i, _setup_torch_process_group, backend=backend_config.backend,
                                                   world_rank=i, world_size=n, init_method=store,
                                                   timeout_s=backend_config.timeout_s) for i in range(n)])

    def on_shutdown(self, worker_group, backend_config: TorchConfig) -> None:
        try:
            super().on_shutdown(worker_group, backend_config)
        finally:
            shutil.rmtree(getattr(self, "folder", ""), ignore_errors=True)


@dataclasses.dataclass
class LoopbackTorchConfig(TorchConfig):
    """TorchConfig for a cluster whose every node is this machine: nothing listens beyond 127.0.0.1."""

    @property
    def backend_cls(self):
        return _LoopbackTorchBackend


def local_cluster() -> bool:
    """Whether every node of the connected Ray cluster is on a loopback address (one machine)."""
    addresses = [node["NodeManagerAddress"] for node in ray.nodes() if node.get("Alive")]
    try:
        return bool(addresses) and all(ipaddress.ip_address(a).is_loopback for a in addresses)
    except ValueError:  # a host name, not an address: not provably this machine
        return False


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


def connect_ray(run: RunSettings) -> None:
    """ray.init on --ray-address / RAY_ADDRESS, else a local cluster on 127.0.0.1 in a temp dir we own."""
    address = run.ray_address or os.environ.get("RAY_ADDRESS")
    if address:
        _check_ray_address(address)
    if ray.is_initialized():
        return
    if address:
        ray.init(address=address)
        return
    # logical CPUs: enough for every worker plus Ray's own actors (one CPU would time out)
    cpus = max(os.cpu_count() or 1, math.ceil(run.workers * run.cpus_per_worker) + 1, 2)
    with loopback_ray():
        ray.init(num_cpus=cpus, include_dashboard=False, _temp_dir=tempfile.mkdtemp(prefix="ray"))


def _run_config(run: RunSettings) -> RunConfig:
    name = run.name if run.resume != "never" else f"{run.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    return RunConfig(name=name, storage_path=run.storage_path,
                     checkpoint_config=CheckpointConfig(num_to_keep=run.num_to_keep),
                     failure_config=FailureConfig(max_failures=run.max_failures))


def _open_run(cfg: TrainConfig, run: RunSettings, urls: list[str]) -> tuple[Tracker, str | None]:
    """Open the MLflow run; a resumed run first ends the RUNNING run its killed predecessor left."""
    tracker = Tracker(run.mlflow_uri or default_tracking_uri(run.output))
    tags = {"git_commit": git_commit(str(Path(__file__).resolve().parent)), **corpus_tags(cfg.corpus, len(urls)),
            "output": run.output}
    if run.mlflow_parent_run_id:  # a stage of a pipeline run (flows/pipeline.py)
        tags |= {"mlflow.parentRunId": run.mlflow_parent_run_id, "stage": "train"}
    if run.resume != "never":
        ended = tracker.end_stale(run.experiment, run.name, {"output": run.output})
        tags |= {"continues_runs": ",".join(ended)} if ended else {}
    params = {**cfg.to_dict(), **run.to_dict(), "preset_config": load_preset(cfg.preset).to_dict()}
    return tracker, tracker.start(run.experiment, run.name, params, tags)


@contextlib.contextmanager
def _closing(tracker: Tracker):
    """The MLflow run never stays RUNNING: KILLED on SIGTERM/SIGINT, FAILED on an error (re-raised)."""
    terminated = []

    def on_sigterm(signum, frame):
        terminated.append(signum)
        # SystemExit is what a blocking ray.get lets through (Ray swallows other exceptions from handlers)
        raise SystemExit(128 + signum)

    main = threading.current_thread() is threading.main_thread()  # signal handlers live in the main thread
    previous = signal.signal(signal.SIGTERM, on_sigterm) if main else None
    try:
        yield
    except BaseException as e:
        # during fit() Ray Train's own SIGINT handler aborts the run and exits: a SystemExit here too
        killed = terminated or isinstance(e, (KeyboardInterrupt, SystemExit))
        tracker.end("KILLED" if killed else "FAILED")
        if terminated:  # Ray re-raises its own SystemExit: keep the signal's exit status
            raise SystemExit(128 + terminated[0]) from None
        raise
    finally:
        if main:
            signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


def _export(result, run: RunSettings, tracker: Tracker, preset: str) -> Path:
    """The final model (safetensors + config.json) to OUT/model, whole or not at all; logged and registered."""
    with result.checkpoint.as_directory() as folder:
        model_dir = export_model(folder, Path(run.output) / "model")
    tracker.log_artifacts(str(model_dir), "model")
    tracker.register(f"clip-{preset}", "model")
    return model_dir


def _checked(cfg: TrainConfig, run: RunSettings) -> tuple[RunSettings, list[str]]:
    """The run's settings with OUT and the storage path resolved, and the corpus's shards.

    Every input is checked here, before Ray, MLflow or OUT are touched: InputError names the fix.
    """
    output = Path(run.output).resolve()
    if output.exists() and not output.is_dir():
        raise InputError(str(output), "OUT is a file, not a folder", "give a folder for the training's outputs")
    cfg.check_workers(run.workers)
    run = _auto_resume(dataclasses.replace(run, output=str(output), storage_path=run.storage_path or str(output / "ray")))
    urls = check_training_inputs(cfg, run.resume_from)
    _check_ray_checkpoint(cfg, run)
    output.mkdir(parents=True, exist_ok=True)
    return run, urls


def _auto_resume(run: RunSettings) -> RunSettings:
    """--resume auto after a kill that came before Ray recorded the run: its newest whole step folder.

    Ray Train resumes from its snapshot (checkpoint_manager_snapshot.json); a driver killed right
    after a checkpoint was written can leave the folder without the record, and finished work
    must not be lost, so that folder is resumed as if named with --resume PATH (local storage).
    """
    if run.resume != "auto" or "://" in run.storage_path:
        return run
    folder = Path(run.storage_path) / run.name
    if (folder / "checkpoint_manager_snapshot.json").exists():
        return run  # Ray resumes from its own record
    latest = latest_checkpoint(folder)
    return dataclasses.replace(run, resume=str(latest)) if latest else run


def _ray_checkpoint(run: RunSettings) -> Path | None:
    """The checkpoint Ray Train restores for this run name: its snapshot's latest (local storage only)."""
    if run.resume == "never" or "://" in run.storage_path:
        return None
    folder = Path(run.storage_path) / run.name
    snapshot = folder / "checkpoint_manager_snapshot.json"
    try:
        latest = json.loads(snapshot.read_text()).get("latest_checkpoint_result") or {}
    except FileNotFoundError:
        return None
    except (ValueError, AttributeError) as e:
        raise InputError(str(snapshot), f"not Ray's JSON record of a run ({e})", RESUME_FIX) from None
    name = latest.get("checkpoint_dir_name") if isinstance(latest, dict) else None
    return folder / name if isinstance(name, str) else None  # another layout (a newer Ray): Ray checks it itself


def _check_ray_checkpoint(cfg: TrainConfig, run: RunSettings) -> None:
    """The checkpoint Ray would resume from exists, is whole and is of the configured model."""
    folder = _ray_checkpoint(run)
    if folder is None:
        return
    if not folder.is_dir():
        raise InputError(str(folder), f"Ray's record of run {run.name!r} names this checkpoint, and it is gone",
                         "start afresh with --resume never or a new OUT")
    check_checkpoint_matches(folder, cfg)


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
    TrainingError, ConnectionError."""
    # [1] Check the inputs before starting anything
    run, urls = _checked(config, run)
    # [2] Connect to Ray, then open the MLflow run: options, preset, commit, corpus
    connect_ray(run)
    tracker, run_id = _open_run(config, run, urls)
    with _closing(tracker):
        # [3] The TorchTrainer; configs cross to the workers as plain dicts
        trainer = _torch_trainer(run, {"train": config.to_dict(), "run": run.to_dict(), "urls": urls,
                                       "run_id": run_id, "tracking_uri": tracker.uri,
                                       "callbacks": list(callbacks or [])})
        # [4] Train; failures come back with the last checkpoint named
        try:
            result = trainer.fit()
        except ray.train.TrainingFailedError as e:
            raise TrainingError(f"training failed: {e}; checkpoints stay under {run.storage_path}") from e
        value = result.return_value or {}
        if "error" in value:
            where = result.checkpoint.path if result.checkpoint else "none was written"
            raise TrainingError(f"{value['error']}; training stopped, last good checkpoint: {where}")
        # [5] The final model to OUT/model, MLflow artifact and registry
        model_dir = _export(result, run, tracker, config.preset)
    tracker.end("FINISHED")
    return TrainSummary(steps=value.get("step"), model=str(model_dir), checkpoint=result.checkpoint.path,
                        mlflow_run_id=run_id, tracking_uri=tracker.uri, history=value.get("history", []),
                        data=DataStats(**value.get("data", {})))
