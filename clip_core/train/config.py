"""Training options: one dataclass, filled from a JSON/YAML file and the command line.

The defaults follow CLIP (Radford et al. 2021, Section 2.5): AdamW with decoupled weight
decay on weights only, linear warmup then cosine decay, mixed precision, gradient
checkpointing, the similarity matrix sharded across workers (local loss). The CLI overrides
the file, the file overrides the defaults. `batch_size` is global: it is split over
`workers` and then over `accum_steps` micro-batches.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from clip_core.config import load_preset

PRECISIONS = ("bf16", "fp16", "fp32")


def _absolute(path: str | None) -> str | None:
    """A local path made absolute; URIs (s3://, file://) and empty values unchanged."""
    if not path or "://" in path:
        return path
    return os.path.abspath(path)


@dataclass
class TrainConfig:
    corpus: str = ""
    output: str = ""
    preset: str = "tiny"
    image_size: int | None = None  # override the preset's resolution (tests: 32 px)
    steps: int | None = None
    samples: int | None = None
    batch_size: int = 256
    lr: float = 5e-4
    warmup: int = 100
    weight_decay: float = 0.2
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-6
    precision: str = "bf16"
    grad_checkpointing: bool = False
    accum_steps: int = 1
    local_loss: bool = True
    compile: bool = False
    seed: int = 0
    workers: int = 1
    gpus_per_worker: float = 0.0
    cpus_per_worker: float = 1.0
    data_workers: int = 2
    shuffle_buffer: int = 1000
    resampled: bool = False
    checkpoint_every: int = 500
    num_to_keep: int = 3
    max_failures: int = 0
    resume: str = "auto"  # auto: continue this run's checkpoints; never: fresh; else a checkpoint folder
    storage_path: str | None = None  # Ray's checkpoints; default OUT/ray
    name: str = "clip-train"
    ray_address: str | None = None
    mlflow_uri: str | None = None  # default MLFLOW_TRACKING_URI or sqlite:///OUT/mlflow.db
    experiment: str = "clip"
    mlflow_parent_run_id: str | None = None  # nest the run under a pipeline run
    log_every: int = 10
    eval: list[str] = field(default_factory=list)
    exclude: str | None = None  # keys to leave out: dedup's matches.parquet, or a text file
    eval_every: int = 0  # 0: only at the end
    peak_tflops: float | None = None  # per device, for MFU

    def __post_init__(self):
        self.betas = tuple(self.betas)
        # Ray workers run in their own working directory: local paths must be absolute
        for name in ("corpus", "output", "exclude", "storage_path"):
            setattr(self, name, _absolute(getattr(self, name)))
        self.eval = [_absolute(e) for e in self.eval or []]
        self.validate()

    def validate(self) -> None:
        """Raise ValueError on options that cannot train."""
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        load_preset(self.preset)  # unknown presets raise, listing the known ones
        for name in ("batch_size", "workers", "accum_steps", "checkpoint_every", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.batch_size % (self.workers * self.accum_steps):
            raise ValueError(f"batch_size {self.batch_size} is not divisible by workers x accum_steps "
                             f"= {self.workers} x {self.accum_steps}")
        if self.steps is not None and self.steps < 1 or self.samples is not None and self.samples < 1:
            raise ValueError("steps and samples must be >= 1")

    @property
    def total_steps(self) -> int:
        """Optimizer steps: --steps, or --samples over the global batch."""
        if self.steps is not None:
            return self.steps
        if self.samples is not None:
            return math.ceil(self.samples / self.batch_size)
        raise ValueError("give --steps or --samples")

    @property
    def batch_per_worker(self) -> int:
        return self.batch_size // self.workers

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        """Build from a dict; unknown keys raise."""
        d = {k.replace("-", "_"): v for k, v in d.items()}
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown training options: {unknown}")
        return cls(**d)

    @classmethod
    def from_sources(cls, file: str | None = None, **overrides) -> TrainConfig:
        """Defaults < file (JSON or YAML) < overrides."""
        return cls.from_dict({**(read_config_file(file) if file else {}), **overrides})


def read_config_file(path: str) -> dict:
    """A dict of options from a .json, .yaml or .yml file."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"no config file at {path}")
    if p.suffix in (".yaml", ".yml"):
        import yaml

        data = yaml.safe_load(p.read_text())
    else:
        data = json.loads(p.read_text())
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a mapping of options, got {type(data).__name__}")
    return data


def add_train_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The options of `clip-pipeline train CORPUS OUT`; unset options keep file/default values."""
    S = argparse.SUPPRESS
    opt = parser.add_argument
    opt("corpus", help="WebDataset shards: a folder, glob or .tar (local, file://, s3://)")
    opt("output", help="output folder: final model, metrics, mlflow.db, Ray checkpoints")
    opt("--config", default=None, help="JSON/YAML file with the same keys; the command line wins")
    opt("--preset", default=S, help="model preset (see `clip-pipeline models`)")
    opt("--image-size", type=int, default=S, help="override the preset's image resolution")
    opt("--steps", type=int, default=S, help="optimizer steps")
    opt("--samples", type=int, default=S, help="samples seen in all (instead of --steps)")
    opt("--batch-size", type=int, default=S, help="global batch size (all workers, all micro-batches)")
    opt("--lr", type=float, default=S)
    opt("--warmup", type=int, default=S, help="linear warmup steps before the cosine decay")
    opt("--weight-decay", type=float, default=S)
    opt("--precision", choices=PRECISIONS, default=S)
    opt("--grad-checkpointing", action=argparse.BooleanOptionalAction, default=S)
    opt("--accum-steps", type=int, default=S, help="micro-batches per step; every negative is kept")
    opt("--local-loss", action=argparse.BooleanOptionalAction, default=S,
        help="each worker scores its own rows against all gathered features")
    opt("--compile", action=argparse.BooleanOptionalAction, default=S, help="torch.compile the model")
    opt("--seed", type=int, default=S)
    opt("--workers", type=int, default=S, help="Ray Train workers (data-parallel ranks)")
    opt("--gpus-per-worker", type=float, default=S)
    opt("--cpus-per-worker", type=float, default=S, help="logical CPUs per worker (0.5 on a laptop)")
    opt("--data-workers", type=int, default=S, help="DataLoader processes per worker")
    opt("--shuffle-buffer", type=int, default=S)
    opt("--resampled", action=argparse.BooleanOptionalAction, default=S,
        help="draw shards with replacement (virtual epochs)")
    opt("--checkpoint-every", type=int, default=S, help="steps between checkpoints")
    opt("--num-to-keep", type=int, default=S, help="checkpoints Ray keeps")
    opt("--max-failures", type=int, default=S, help="worker failures Ray recovers from")
    opt("--resume", default=S, help="auto (continue this run), never, or a checkpoint folder")
    opt("--storage-path", default=S, help="Ray storage for checkpoints (local or s3://); default OUT/ray")
    opt("--name", default=S, help="run name under the storage path")
    opt("--ray-address", default=S, help="Ray cluster address; default RAY_ADDRESS or a local cluster")
    opt("--mlflow-uri", default=S, help="tracking URI; default MLFLOW_TRACKING_URI or sqlite:///OUT/mlflow.db")
    opt("--experiment", default=S, help="MLflow experiment name")
    opt("--log-every", type=int, default=S)
    opt("--exclude", default=S, metavar="KEYS",
        help="leave these samples out: dedup's matches.parquet (column key) or a text file of keys")
    opt("--eval", nargs="+", default=S, metavar="EVALDIR", help="eval sets for periodic zero-shot accuracy")
    opt("--eval-every", type=int, default=S, help="steps between zero-shot evaluations (0: at the end)")
    opt("--peak-tflops", type=float, default=S, help="peak FLOP/s per device (TFLOP/s) for MFU")
    return parser


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """TrainConfig from parsed arguments: file first, then what was given on the command line."""
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    given = {k: v for k, v in vars(args).items() if k in fields}  # other parsers' options are not ours
    return TrainConfig.from_sources(getattr(args, "config", None), **given)


def run_train_command(args: argparse.Namespace) -> int:
    """Transition shim: the handler lives in flows.train; remove once flows/cli.py registers it from there."""
    from flows.train import run_train_command as run

    return run(args)
