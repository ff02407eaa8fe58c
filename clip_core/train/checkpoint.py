"""Training checkpoints: the model as released plus the state to resume, and the callback that saves them.

A checkpoint folder (`step_NNNNNNNN`, laid out and written whole by clip_core.weights) holds
`model.safetensors` and `config.json`, readable like the weights CLIP (Radford et al. 2021)
released, and `train_state.pt`: step, optimizer (AdamW moments), gradient scaler, schedule,
the data position of every rank and the RNG states. This module turns a Trainer into that
state and back.
"""
from __future__ import annotations

import random
import shutil
from pathlib import Path

import numpy as np
import torch

from clip_core.train.optim import unwrap
from clip_core.weights import (MODEL_FILE, STATE_FILE, latest_checkpoint, load_state_dict, read_safetensors,
                               read_train_state, step_folders, verify_checkpoint, write_checkpoint)

__all__ = ["STATE_FILE", "capture_rng", "restore_rng", "training_state", "save_train_state", "load_train_state",
           "read_train_state", "verify_checkpoint", "step_folders", "latest_checkpoint", "CheckpointCallback"]


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
    """Write model.safetensors, config.json and train_state.pt into `folder`, whole or not at all."""
    return write_checkpoint(unwrap(trainer.model), folder, training_state(trainer, data, extra))


def load_train_state(folder: str | Path, trainer, restore_rng_states: bool = True) -> dict:
    """Load weights, optimizer, scaler, schedule and step into `trainer`; returns the state."""
    folder = Path(folder)
    state = read_train_state(folder)
    model = unwrap(trainer.model)
    weights = read_safetensors(folder / MODEL_FILE, device=str(next(model.parameters()).device))
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


class CheckpointCallback:
    """Save `root/step_N` every `every` steps and at the end; keep the newest `num_to_keep`."""

    def __init__(self, root: str | Path, every: int, data_state=None, num_to_keep: int | None = None,
                 extra: dict | None = None):
        self.root, self.every, self.data_state = Path(root), every, data_state
        self.num_to_keep, self.extra = num_to_keep, extra
        self.last_saved: Path | None = None

    def save(self, trainer) -> Path:
        getattr(trainer, "check_finite", lambda: None)()  # never a checkpoint after a non-finite step
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
