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
from clip_core.transforms import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD, normalize_images
from clip_core.train.precision import resolve_precision

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}


class NonFiniteLossError(FloatingPointError):
    """The loss or the gradient norm became NaN or infinite; no update was applied."""


def make_autocast(precision: str, device: torch.device) -> Callable:
    """A context factory: autocast to bf16/fp16 on `device`, or nothing for fp32 (resolve "auto" first)."""
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


class NormalizeImages:
    """A batch's uint8 images (first element) normalised on the device they reached: a quarter of the
    bytes cross from the loader to the device, and the arithmetic is the loader's (same values)."""

    def __init__(self, mean=OPENAI_DATASET_MEAN, std=OPENAI_DATASET_STD):
        self.mean, self.std = tuple(mean), tuple(std)

    def __call__(self, batch: tuple) -> tuple:
        images, *rest = batch
        if images.dtype == torch.uint8:
            images = normalize_images(images, self.mean, self.std)
        return (images, *rest)


def scalar(x) -> float:
    """A metric as a float (a 0-dim tensor is read here: a host sync on a GPU)."""
    return float(x.item()) if torch.is_tensor(x) else float(x)


class Trainer:
    """Optimizer steps over batches with callbacks; `step` counts completed updates.

    `prepare` turns a batch on the device into the model's inputs (NormalizeImages). With
    `check_every` 1 the loss and gradient norm are read every step and a non-finite one stops
    training before its update; with N > 1 (a GPU: no host sync in the step) they stay on the
    device as 0-dim tensors in `metrics` and are checked every N steps and before every
    checkpoint (`check_finite`): a bad step is then named when found, and no checkpoint after it
    is written.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, loss_fn: Callable, *,
                 schedule=None, precision: str = "fp32", accum_steps: int = 1,
                 post_step: Callable[[nn.Module], None] | None = None, max_grad_norm: float | None = None,
                 device: torch.device | str = "cpu", callbacks: Iterable = (),
                 prepare: Callable[[tuple], tuple] | None = None, check_every: int = 1):
        self.model, self.optimizer, self.loss_fn = model, optimizer, loss_fn
        self.schedule, self.accum_steps, self.post_step = schedule, accum_steps, post_step
        self.max_grad_norm = max_grad_norm
        self.device = torch.device(device)
        self.requested_precision = precision
        self.precision = resolve_precision(precision, self.device)  # "auto" settled once, for this device
        self.autocast = make_autocast(self.precision, self.device)
        self.scaler = make_scaler(self.precision, self.device)
        self.callbacks = list(callbacks)
        self.prepare, self.check_every = prepare, max(int(check_every), 1)
        self._unchecked: list[tuple[int, torch.Tensor, torch.Tensor]] = []  # (step, loss, grad norm) on the device
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
        last_end = None  # when the previous step's update finished: step_wall spans its callbacks too
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
            if last_end is not None:
                self.metrics["step_wall"] = t2 - last_end  # data, step and the previous step's callbacks
            last_end = t2
            if self.step % self.check_every == 0 or self.step == steps:
                self.check_finite()
            self.fire("on_step_end")
        self.fire("on_train_end")
        return self.metrics

    def train_step(self, batch: Sequence) -> dict:
        """One optimizer update on `batch`; raises NonFiniteLossError before a bad update."""
        self.model.train()
        lr = self.schedule.apply(self.optimizer, self.step) if self.schedule else self.optimizer.param_groups[0]["lr"]
        self.optimizer.zero_grad(set_to_none=True)
        scale = self.scaler.scale if self.scaler else (lambda x: x)
        inputs = _to(batch, self.device)
        if self.prepare is not None:
            inputs = self.prepare(inputs)
        loss = forward_backward(self.model, self.loss_fn, inputs, self.accum_steps, self.autocast, scale)
        loss = _world_mean(loss.float())
        grad_norm = self._unscaled_grad_norm()
        if self.check_every > 1:  # read later, with others: no host sync here
            self._unchecked.append((self.step + 1, loss, grad_norm))
            self._update()
            return {"loss": loss, "lr": lr, "grad_norm": grad_norm}
        loss, grad_norm = loss.item(), float(grad_norm)
        if not math.isfinite(loss):
            raise NonFiniteLossError(f"loss is {loss} at step {self.step}; no update applied")
        if not math.isfinite(grad_norm) and self.scaler is None:
            raise NonFiniteLossError(f"gradient norm is {grad_norm} at step {self.step}; no update applied")
        self._update()
        return {"loss": loss, "lr": lr, "grad_norm": grad_norm}

    def check_finite(self) -> None:
        """Read the unchecked steps' loss and gradient norm (one host sync); NonFiniteLossError names the first bad one."""
        if not self._unchecked:
            return
        steps = [s for s, _, _ in self._unchecked]
        losses = torch.stack([x for _, x, _ in self._unchecked]).tolist()
        norms = torch.stack([g.float() for _, _, g in self._unchecked]).tolist()
        self._unchecked.clear()
        for step, loss, norm in zip(steps, losses, norms):
            if not math.isfinite(loss) or (not math.isfinite(norm) and self.scaler is None):
                what = f"loss is {loss}" if not math.isfinite(loss) else f"gradient norm is {norm}"
                raise NonFiniteLossError(f"{what} at step {step - 1}, found at step {self.step}; "
                                         "no checkpoint was written after it")

    def _unscaled_grad_norm(self) -> torch.Tensor:
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        params = [p for g in self.optimizer.param_groups for p in g["params"] if p.grad is not None]
        if self.max_grad_norm is None:
            return torch.nn.utils.get_total_norm([p.grad for p in params])
        return torch.nn.utils.clip_grad_norm_(params, self.max_grad_norm)

    def _update(self) -> None:
        if self.scaler is not None:
            self.scaler.step(self.optimizer)  # skips the step on inf/NaN gradients
            self.scaler.update()
        else:
            self.optimizer.step()
        if self.post_step is not None:
            self.post_step(self.model)
