"""A training run's settings (`RunSettings`: OUT, Ray, workers, storage, checkpoints, resume,
MLflow) and its MLflow run, from the driver: opened with the recipe and the data it reads, always
closed (FINISHED, FAILED, or KILLED on SIGINT/SIGTERM), the final model logged and registered.
`flows.train` imports both (and re-exports RunSettings)."""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import signal
import tempfile
import threading
from pathlib import Path

from clip_core.train import TrainConfig
from clip_core.train.checks import model_config
from clip_core.train.config import absolute
from clip_core.weights import export_model, is_uri
from flows.lineage import corpus_dataset, eval_dataset
from flows.serving import PYFUNC_ARTIFACT, save_pyfunc
from flows.tracking import Tracker, corpus_tags, default_tracking_uri, git_commit
from flows.train_storage import join


@dataclasses.dataclass(frozen=True)
class RunSettings:
    """Where and how a training runs: OUT, Ray and the workers' resources, checkpoints, resume, MLflow."""

    output: str = ""  # OUT (a folder or an fsspec URI): model/, metrics.jsonl, mlflow.db, ray/
    name: str = "clip-train"  # the run's folder under the storage path, and its MLflow name
    ray_address: str | None = None  # default RAY_ADDRESS, else a local cluster on 127.0.0.1
    workers: int = 1  # Ray Train workers (data-parallel ranks)
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0
    storage_path: str | None = None  # Ray's checkpoints (a folder or an fsspec URI); default OUT/ray
    shared_storage: bool = False  # a local storage path that every node mounts (NFS): allowed on a multi-node cluster
    checkpoint_every: int = 500
    checkpoint_minutes: float | None = None  # also checkpoint when this long has passed (decided at log steps)
    num_to_keep: int = 3  # checkpoints Ray keeps
    max_failures: int = 0  # worker failures Ray recovers from
    resume: str = "auto"  # auto: continue this run's checkpoints; never: fresh; else a checkpoint folder
    mlflow_uri: str | None = None  # default MLFLOW_TRACKING_URI or sqlite:///OUT/mlflow.db (./mlflow.db: remote OUT)
    experiment: str = "clip"
    mlflow_parent_run_id: str | None = None  # nest the run under a pipeline run
    log_every: int = 10  # steps between progress lines and MLflow rows (metrics.jsonl has every step)
    ray_logs: bool = False  # show Ray's and the workers' log lines (else progress lines only)
    peak_tflops: float | None = None  # per device, for MFU

    def __post_init__(self):
        for name in ("output", "storage_path"):  # Ray workers run in another folder: local paths absolute
            object.__setattr__(self, name, absolute(getattr(self, name)))
        if self.resume_from:
            object.__setattr__(self, "resume", absolute(self.resume))
        for name in ("workers", "checkpoint_every", "num_to_keep", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.checkpoint_minutes is not None and not self.checkpoint_minutes > 0:
            raise ValueError(f"checkpoint_minutes must be > 0, got {self.checkpoint_minutes}")

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



def open_run(cfg: TrainConfig, run: RunSettings, urls: list[str]) -> tuple[Tracker, str | None]:
    """Open the MLflow run; a resumed run first ends the RUNNING run its killed predecessor left."""
    tracker = Tracker(run.mlflow_uri or default_tracking_uri(run.output), output=run.output)
    tags = {"git_commit": git_commit(str(Path(__file__).resolve().parent)), **corpus_tags(cfg.corpus, len(urls)),
            "output": run.output}
    if run.mlflow_parent_run_id:  # a stage of a pipeline run (flows/pipeline.py)
        tags |= {"mlflow.parentRunId": run.mlflow_parent_run_id, "stage": "train"}
    if run.resume != "never":
        ended = tracker.end_stale(run.experiment, run.name, {"output": run.output})
        tags |= {"continues_runs": ",".join(ended)} if ended else {}
    # the model trained: the preset with --image-size / --context-length applied
    params = {**cfg.to_dict(), **run.to_dict(), "preset_config": model_config(cfg).to_dict()}
    run_id = tracker.start(run.experiment, run.name, params, tags)
    tracker.log_inputs([(functools.partial(corpus_dataset, cfg.corpus), "training"),
                        *((functools.partial(eval_dataset, d), "evaluation") for d in cfg.eval)])
    return tracker, run_id


@contextlib.contextmanager
def closing(tracker: Tracker):
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


def export_model_to_run(result, run: RunSettings, tracker: Tracker, preset: str) -> Path | str:
    """The final model (safetensors + config.json) to OUT/model (a local folder or a URI); logged and registered."""
    with result.checkpoint.as_directory() as folder, tempfile.TemporaryDirectory() as tmp:
        model_dir = export_model(folder, join(run.output, "model"))
        # MLflow logs a local folder: for a remote OUT, the same two files staged here
        logged = export_model(folder, Path(tmp) / "model") if is_uri(model_dir) else model_dir
        tracker.log_artifacts(str(logged), "model")
        # the registered version: a pyfunc that embeds texts and images (flows/serving.py)
        tracker.log_artifacts(str(save_pyfunc(logged, Path(tmp) / PYFUNC_ARTIFACT)), PYFUNC_ARTIFACT)
    tracker.register(f"clip-{preset}", PYFUNC_ARTIFACT)
    return model_dir
