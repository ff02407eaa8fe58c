"""Forward/backward of one step, with gradient accumulation that keeps every negative.

A contrastive loss does not decompose over micro-batches: each sample's loss depends on
every other sample in the batch (CLIP, Radford et al. 2021, Section 2.5 trains with 32,768
negatives). Accumulation therefore follows GradCache (Gao et al. 2021) and open_clip's
accum-freq: (1) encode every micro-batch without gradients and cache the outputs; (2)
compute the loss once on the cached outputs, made leaves, and backpropagate to them;
(3) re-encode each micro-batch with gradients and backpropagate the cached output
gradients into the parameters. The parameter gradient equals that of one big batch.

The model is any module returning per-sample outputs (dim 0 = batch) and shared scalars
(e.g. logit_scale); the loss takes the model's outputs in order.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Sequence

import torch
from torch import nn

Scale = Callable[[torch.Tensor], torch.Tensor]


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


def _as_tuple(outputs) -> tuple:
    return tuple(outputs) if isinstance(outputs, (tuple, list)) else (outputs,)


def _is_per_sample(x: torch.Tensor, n: int) -> bool:
    return x.ndim > 0 and x.shape[0] == n


def forward_backward(model: nn.Module, loss_fn: Callable, inputs: Sequence[torch.Tensor],
                     accum_steps: int = 1, autocast=contextlib.nullcontext,
                     scale: Scale = _identity) -> torch.Tensor:
    """Gradients of loss_fn(*model(*inputs)) into the parameters; returns the detached loss."""
    if accum_steps == 1:
        with autocast():
            loss = loss_fn(*_as_tuple(model(*inputs)))
        scale(loss).backward()
        return loss.detach()
    return _cached_backward(model, loss_fn, inputs, accum_steps, autocast, scale)


def _split(inputs: Sequence[torch.Tensor], k: int) -> list[tuple]:
    n = inputs[0].shape[0]
    if n % k:
        raise ValueError(f"batch of {n} does not split into {k} equal micro-batches")
    return list(zip(*(x.split(n // k) for x in inputs)))


def _leaves(cached: list[tuple], n: int) -> list[torch.Tensor]:
    """Outputs as leaves: per-sample outputs joined over micro-batches, shared ones from the first."""
    leaves = []
    for i, first in enumerate(cached[0]):
        x = torch.cat([c[i] for c in cached]) if _is_per_sample(first, n) else first
        leaves.append(x.detach().requires_grad_(x.is_floating_point()))
    return leaves


def _surrogate(outputs: tuple, leaves: list[torch.Tensor], rows: slice, n: int, last: bool):
    """A scalar whose gradient w.r.t. `outputs` is the cached gradient of the loss."""
    total = 0.0
    for out, leaf in zip(outputs, leaves):
        if leaf.grad is None:
            continue
        if _is_per_sample(out, n):
            total = total + (out * leaf.grad[rows]).sum()
        elif last:  # a shared output (logit_scale) takes its whole gradient once
            total = total + (out * leaf.grad).sum()
    return total


def _cached_backward(model, loss_fn, inputs, k, autocast, scale) -> torch.Tensor:
    micro = _split(inputs, k)
    n = micro[0][0].shape[0]
    with torch.no_grad(), autocast():
        cached = [_as_tuple(model(*m)) for m in micro]  # (1) outputs without graphs
    leaves = _leaves(cached, n)
    with autocast():
        loss = loss_fn(*leaves)  # (2) every negative, once
    scale(loss).backward()
    no_sync = getattr(model, "no_sync", contextlib.nullcontext)  # DDP: all-reduce on the last only
    for j, m in enumerate(micro):  # (3) re-encode with gradients
        last = j == k - 1
        with (contextlib.nullcontext() if last else no_sync()), autocast():
            outputs = _as_tuple(model(*m))
            surrogate = _surrogate(outputs, leaves, slice(j * n, (j + 1) * n), n, last)
        surrogate.backward()
    return loss.detach()
