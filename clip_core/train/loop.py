"""The training loop: steps over batches, reports through callbacks (minGPT's trainer shape).

CLIP (Radford et al. 2021), Section 2.5: AdamW, warmup + cosine schedule, mixed precision
(bf16 autocast, or fp16 with a gradient scaler), the temperature clipped after each step.
The loop knows nothing about the model, the data source or the tracker: it calls
`model(*batch)`, `loss_fn(*outputs)`, an optional `post_step(model)` (the temperature clip)
and, after each step, every callback's `on_step_end(trainer)`. Callbacks read
`trainer.step` and `trainer.metrics`; Ray reporting, checkpoints, MLflow and evaluation
are callbacks.
"""
from __future__ import annotations

import contextlib
import math
import time
from typing import Callable, Iterable, Sequence

import torch
import torch.distributed as dist
from torch import nn

from clip_core.train.accum import forward_backward

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}


class NonFiniteLossError(FloatingPointError):
    """The loss or the gradient norm became NaN or infinite; no update was applied."""


def make_autocast(precision: str, device: torch.device) -> Callable:
    """A context factory: autocast to bf16/fp16 on `device`, or nothing for fp32."""
    dtype = AUTOCAST_DTYPES[precision]
    if dtype is None:
        return contextlib.nullcontext
    return lambda: torch.autocast(device.type, dtype=dtype)


def make_scaler(precision: str, device: torch.device):
    """A GradScaler for fp16, else None."""
    return torch.amp.GradScaler(device.type) if precision == "fp16" else None


def _world_mean(x: torch.Tensor) -> torch.Tensor:
    """Mean over data-parallel ranks (every rank sees the same value)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        x = x.clone()
        dist.all_reduce(x)
        x /= dist.get_world_size()
    return x


def _to(batch: Sequence, device: torch.device) -> tuple:
    return tuple(x.to(device, non_blocking=True) if torch.is_tensor(x) else x for x in batch)


class Trainer:
    """Optimizer steps over batches with callbacks; `step` counts completed updates."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, loss_fn: Callable, *,
                 schedule=None, precision: str = "fp32", accum_steps: int = 1,
                 post_step: Callable[[nn.Module], None] | None = None, max_grad_norm: float | None = None,
                 device: torch.device | str = "cpu", callbacks: Iterable = ()):
        self.model, self.optimizer, self.loss_fn = model, optimizer, loss_fn
        self.schedule, self.accum_steps, self.post_step = schedule, accum_steps, post_step
        self.max_grad_norm = max_grad_norm
        self.device = torch.device(device)
        self.autocast = make_autocast(precision, self.device)
        self.scaler = make_scaler(precision, self.device)
        self.callbacks = list(callbacks)
        self.step = 0
        self.metrics: dict = {}

    def fire(self, event: str) -> None:
        """Call `event(trainer)` on every callback that has it."""
        for callback in self.callbacks:
            fn = getattr(callback, event, None)
            if fn is not None:
                fn(self)

    def fit(self, batches: Iterable, steps: int) -> dict:
        """Train until `step == steps`; returns the last step's metrics."""
        it = iter(batches)
        self.fire("on_train_start")
        while self.step < steps:
            t0 = time.perf_counter()
            batch = next(it)
            t1 = time.perf_counter()
            metrics = self.train_step(batch)
            t2 = time.perf_counter()
            self.step += 1
            n = batch[0].shape[0]
            self.metrics = {**metrics, "step_time": t2 - t0, "data_time": t1 - t0,
                            "data_wait": (t1 - t0) / (t2 - t0), "samples": n, "samples_per_s": n / (t2 - t0)}
            self.fire("on_step_end")
        self.fire("on_train_end")
        return self.metrics

    def train_step(self, batch: Sequence) -> dict:
        """One optimizer update on `batch`; raises NonFiniteLossError before a bad update."""
        self.model.train()
        lr = self.schedule.apply(self.optimizer, self.step) if self.schedule else self.optimizer.param_groups[0]["lr"]
        self.optimizer.zero_grad(set_to_none=True)
        scale = self.scaler.scale if self.scaler else (lambda x: x)
        loss = forward_backward(self.model, self.loss_fn, _to(batch, self.device), self.accum_steps,
                                self.autocast, scale)
        loss = _world_mean(loss.float()).item()
        if not math.isfinite(loss):
            raise NonFiniteLossError(f"loss is {loss} at step {self.step}; no update applied")
        grad_norm = self._unscaled_grad_norm()
        if not math.isfinite(grad_norm) and self.scaler is None:
            raise NonFiniteLossError(f"gradient norm is {grad_norm} at step {self.step}; no update applied")
        self._update()
        return {"loss": loss, "lr": lr, "grad_norm": grad_norm}

    def _unscaled_grad_norm(self) -> float:
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        params = [p for g in self.optimizer.param_groups for p in g["params"] if p.grad is not None]
        if self.max_grad_norm is None:
            return float(torch.nn.utils.get_total_norm([p.grad for p in params]))
        return float(torch.nn.utils.clip_grad_norm_(params, self.max_grad_norm))

    def _update(self) -> None:
        if self.scaler is not None:
            self.scaler.step(self.optimizer)  # skips the step on inf/NaN gradients
            self.scaler.update()
        else:
            self.optimizer.step()
        if self.post_step is not None:
            self.post_step(self.model)
