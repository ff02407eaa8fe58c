"""The training recipe: what is trained, on which data, and how it is optimised (a frozen config).

The defaults follow CLIP (Radford et al. 2021, Section 2.5): AdamW with decoupled weight
decay on weights only, linear warmup then cosine decay, mixed precision, gradient
checkpointing, the similarity matrix sharded across workers (local loss). `batch_size` is
global: it is split over the run's workers and then over `accum_steps` micro-batches.

Where and how a run executes (Ray, workers and their resources, storage, MLflow,
checkpoints kept, resume) is not part of the recipe: flows/train.py's RunSettings holds it.
A file of options (JSON or YAML) is read by `read_config_file`; the command line that fills
both lives in flows/commands/train.py.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

from clip_core.config import load_preset
from clip_core.errors import check

PRECISIONS = ("auto", "bf16", "fp16", "fp32")  # auto: bf16 where native, else fp32 (train/precision.py)


def absolute(path: str | None) -> str | None:
    """A local path made absolute (Ray workers run in another folder); URIs and empty values unchanged."""
    if not path or "://" in path:
        return path
    return os.path.abspath(path)


@dataclass(frozen=True)
class TrainConfig:
    """The recipe: data, model, precision, optimisation, steps, seed, zero-shot sets watched while training."""

    # data
    corpus: str = ""  # WebDataset shards: a folder, glob or .tar (local, file://, s3://)
    exclude: str | None = None  # keys to leave out: dedup's matches.parquet, or a text file
    data_workers: int = 2  # DataLoader processes per worker (part of the stream layout)
    shuffle_buffer: int = 1000
    resampled: bool = False
    # model and precision
    preset: str = "tiny"
    image_size: int | None = None  # override the preset's resolution (tests: 32 px)
    context_length: int | None = None  # override the preset's text context (short captions: a cheaper text tower)
    precision: str = "auto"
    grad_checkpointing: bool = False
    compile: bool | None = None  # torch.compile the model; None: on CUDA yes, elsewhere no
    # optimisation
    steps: int | None = None
    samples: int | None = None
    batch_size: int = 256
    accum_steps: int = 1
    lr: float = 5e-4
    warmup: int = 100
    weight_decay: float = 0.2
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-6
    local_loss: bool = True
    seed: int = 0
    # zero-shot accuracy during training
    eval: tuple[str, ...] = ()
    eval_every: int = 0  # 0: only at the end

    def __post_init__(self):
        set_ = object.__setattr__  # frozen: normalise once, here
        set_(self, "betas", tuple(self.betas))
        set_(self, "eval", tuple(absolute(e) for e in self.eval or ()))
        for name in ("corpus", "exclude"):
            set_(self, name, absolute(getattr(self, name)))
        self.validate()

    def validate(self) -> None:
        """Raise ValueError on options that cannot train."""
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        for name in ("image_size", "context_length"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        # unknown presets raise, listing the known ones; so does a resolution the model cannot take
        load_preset(self.preset).replace(**self.model_overrides())
        for name in ("batch_size", "accum_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.steps is not None and self.steps < 1 or self.samples is not None and self.samples < 1:
            raise ValueError("steps and samples must be >= 1")

    def model_overrides(self) -> dict:
        """The preset's fields this config overrides, as create_model and CLIPConfig.replace take them."""
        out = {}
        if self.image_size:
            out["vision_cfg"] = {"image_size": self.image_size}
        if self.context_length:
            out["text_cfg"] = {"context_length": self.context_length}
        return out

    def check_workers(self, workers: int) -> None:
        """InputError unless the global batch splits evenly over `workers` x `accum_steps` micro-batches."""
        check(workers >= 1, "--workers", f"must be >= 1, got {workers}")
        check(self.batch_size % (workers * self.accum_steps) == 0, "--batch-size",
              f"batch_size {self.batch_size} is not divisible by workers x accum_steps = {workers} x "
              f"{self.accum_steps}", "give a global batch size that is a multiple of --workers x --accum-steps")

    @property
    def total_steps(self) -> int:
        """Optimizer steps: --steps, or --samples over the global batch."""
        if self.steps is not None:
            return self.steps
        if self.samples is not None:
            return math.ceil(self.samples / self.batch_size)
        raise ValueError("give --steps or --samples")

    def replace(self, **changes) -> TrainConfig:
        """A copy with some options changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        """Plain values (lists, not tuples, for the eval sets), as they cross to Ray workers and into MLflow."""
        return {**dataclasses.asdict(self), "eval": list(self.eval)}

    @classmethod
    def field_names(cls) -> set[str]:
        return {f.name for f in dataclasses.fields(cls)}

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        """Build from a dict (dashes or underscores); unknown keys raise."""
        d = {k.replace("-", "_"): v for k, v in d.items()}
        unknown = sorted(set(d) - cls.field_names())
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
    return {k.replace("-", "_"): v for k, v in data.items()}
