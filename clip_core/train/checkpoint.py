"""Training checkpoints: the model as released (safetensors, OpenAI names) plus the state to resume.

A checkpoint folder holds `model.safetensors` and `config.json` (readable by
`clip_core.model.load_checkpoint`, like the weights CLIP (Radford et al. 2021) released) and
`train_state.pt`: step, optimizer (AdamW moments), gradient scaler, schedule, the data
position of every rank and the RNG states. Writes are atomic: the folder is built under a
temporary name and renamed into place, so a crash leaves the previous checkpoint whole.
"""
from __future__ import annotations

import os
import random
import re
import shutil
import uuid
import zipfile
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open

from clip_core.config import CLIPConfig
from clip_core.errors import InputError
from clip_core.model import load_state_dict, read_config, read_safetensors, read_torch_weights, save_checkpoint
from clip_core.train.optim import unwrap

STATE_FILE = "train_state.pt"
STEP_DIR = re.compile(r"^step_(\d+)$")


def capture_rng() -> dict:
    """Python, numpy, torch (and CUDA) RNG states."""
    np_state = np.random.get_state(legacy=False)
    return {
        "python": random.getstate(),
        "numpy": {"bit_generator": np_state["bit_generator"], "key": torch.from_numpy(np_state["state"]["key"].copy()),
                  "pos": np_state["state"]["pos"], "has_gauss": np_state["has_gauss"],
                  "gauss": np_state["gauss"]},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def restore_rng(state: dict) -> None:
    """Inverse of capture_rng."""
    random.setstate(_tuples(state["python"]))
    n = state["numpy"]
    np.random.set_state({"bit_generator": n["bit_generator"], "has_gauss": n["has_gauss"], "gauss": n["gauss"],
                         "state": {"key": n["key"].numpy().astype(np.uint32), "pos": n["pos"]}})
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _tuples(x):
    """Lists back to tuples (random.setstate wants nested tuples)."""
    return tuple(_tuples(v) for v in x) if isinstance(x, (list, tuple)) else x


def training_state(trainer, data: dict | None = None, extra: dict | None = None) -> dict:
    """Everything but the weights that a resume needs."""
    return {
        "step": trainer.step,
        "optimizer": trainer.optimizer.state_dict(),
        "scaler": trainer.scaler.state_dict() if trainer.scaler is not None else None,
        "schedule": trainer.schedule.state_dict() if trainer.schedule is not None else None,
        "data": data,
        "rng": capture_rng(),
        "extra": extra or {},
    }


def save_train_state(folder: str | Path, trainer, data: dict | None = None, extra: dict | None = None) -> Path:
    """Write model.safetensors, config.json and train_state.pt into `folder`, atomically."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.parent / f".{folder.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        save_checkpoint(unwrap(trainer.model), tmp)
        torch.save(training_state(trainer, data, extra), tmp / STATE_FILE)
        _replace(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def _replace(tmp: Path, folder: Path) -> None:
    """Rename `tmp` to `folder`; an existing `folder` is moved aside first, then removed."""
    old = None
    if folder.exists():
        old = folder.parent / f".{folder.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(folder, old)
    os.replace(tmp, folder)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def read_train_state(folder: str | Path) -> dict:
    """The train_state.pt of a checkpoint folder (tensors on the CPU)."""
    path = Path(folder) / STATE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no {STATE_FILE} in {folder}: not a training checkpoint")
    return read_torch_weights(path)


def verify_checkpoint(folder: str | Path) -> CLIPConfig:
    """The model config of a whole checkpoint folder; InputError naming the damaged or missing file.

    Cheap: reads the safetensors header (which must cover the file) and the zip directory of
    train_state.pt (at its end, so a cut file has none), not the tensors.
    """
    folder = Path(folder)
    fix = "resume from another checkpoint (--resume FOLDER), or start afresh with --resume never or a new OUT"
    for name in ("config.json", "model.safetensors", STATE_FILE):
        if not (folder / name).is_file():
            raise InputError(str(folder), f"not a whole training checkpoint: no {name}", fix)
    try:
        with safe_open(str(folder / "model.safetensors"), "pt"):
            pass
    except SafetensorError as e:
        raise InputError(str(folder / "model.safetensors"), f"truncated or not a safetensors file ({e})", fix) from None
    try:
        zipfile.ZipFile(folder / STATE_FILE).close()
    except (zipfile.BadZipFile, OSError) as e:
        raise InputError(str(folder / STATE_FILE), f"truncated or damaged ({e})", fix) from None
    return read_config(folder / "config.json")


def load_train_state(folder: str | Path, trainer, restore_rng_states: bool = True) -> dict:
    """Load weights, optimizer, scaler, schedule and step into `trainer`; returns the state."""
    folder = Path(folder)
    state = read_train_state(folder)
    model = unwrap(trainer.model)
    weights = read_safetensors(folder / "model.safetensors", device=str(next(model.parameters()).device))
    load_state_dict(model, weights)
    trainer.optimizer.load_state_dict(state["optimizer"])
    if trainer.scaler is not None and state["scaler"] is not None:
        trainer.scaler.load_state_dict(state["scaler"])
    if trainer.schedule is not None and state["schedule"] is not None:
        trainer.schedule.load_state_dict(state["schedule"])
    trainer.step = state["step"]
    if restore_rng_states:
        restore_rng(state["rng"])
    return state


def step_folders(root: str | Path) -> list[Path]:
    """Complete `step_N` checkpoint folders under `root`, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir()
             if (m := STEP_DIR.match(p.name)) and (p / STATE_FILE).is_file()]
    return [p for _, p in sorted(found)]


def latest_checkpoint(root: str | Path) -> Path | None:
    """The newest complete checkpoint folder under `root`, or None."""
    folders = step_folders(root)
    return folders[-1] if folders else None


class CheckpointCallback:
    """Save `root/step_N` every `every` steps and at the end; keep the newest `num_to_keep`."""

    def __init__(self, root: str | Path, every: int, data_state=None, num_to_keep: int | None = None,
                 extra: dict | None = None):
        self.root, self.every, self.data_state = Path(root), every, data_state
        self.num_to_keep, self.extra = num_to_keep, extra
        self.last_saved: Path | None = None

    def save(self, trainer) -> Path:
        data = self.data_state() if self.data_state else None
        self.last_saved = save_train_state(self.root / f"step_{trainer.step:08d}", trainer, data, self.extra)
        if self.num_to_keep:
            for old in step_folders(self.root)[: -self.num_to_keep]:
                shutil.rmtree(old, ignore_errors=True)
        return self.last_saved

    def on_step_end(self, trainer) -> None:
        if trainer.step % self.every == 0:
            self.save(trainer)

    def on_train_end(self, trainer) -> None:
        if self.last_saved is None or self.last_saved.name != f"step_{trainer.step:08d}":
            self.save(trainer)
