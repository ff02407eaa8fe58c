"""AdamW parameter groups, warmup + cosine schedule and the temperature clip.

CLIP (Radford et al. 2021), Section 2.5: Adam with decoupled weight decay "applied to all
weights that are not gains or biases", cosine learning-rate decay, and a learnable
temperature "clipped to prevent scaling the logits by more than 100". Table 19: betas
(0.9, 0.98), eps 1e-6, weight decay 0.2. As open_clip, embeddings and logit_scale are not
decayed either.
"""
from __future__ import annotations

import math

import torch
from torch import nn

NO_DECAY_NAMES = ("embedding", "logit_scale", "ln", "bn", "bias")
MAX_LOGIT_SCALE = math.log(100.0)


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module inside DDP (`.module`) and torch.compile (`._orig_mod`) wrappers."""
    while True:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner


def no_weight_decay(name: str, param: torch.Tensor) -> bool:
    """Gains, biases, embeddings and logit_scale: 1-d tensors or names that say so."""
    return param.ndim < 2 or any(key in name for key in NO_DECAY_NAMES)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups: decayed weights and everything else (weight_decay 0)."""
    decay, no_decay = [], []
    for name, param in unwrap(model).named_parameters():
        if param.requires_grad:
            (no_decay if no_weight_decay(name, param) else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, lr: float, weight_decay: float = 0.2,
                    betas=(0.9, 0.98), eps: float = 1e-6, fused: bool | None = None) -> torch.optim.AdamW:
    """AdamW with CLIP's hyper-parameters and no decay on gains/biases/embeddings.

    fused=None: the fused CUDA kernel when every parameter is on a GPU (one launch per step
    instead of one per tensor group), the foreach implementation otherwise.
    """
    if fused is None:
        fused = all(p.is_cuda for p in model.parameters())
    return torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=tuple(betas), eps=eps,
                             fused=fused or None)


class WarmupCosine:
    """lr(step): linear from base_lr/warmup to base_lr over `warmup` steps, then cosine to 0."""

    def __init__(self, base_lr: float, warmup: int, total: int):
        self.base_lr, self.warmup, self.total = base_lr, warmup, total

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return self.base_lr * (step + 1) / self.warmup
        decay_steps = max(self.total - self.warmup, 1)
        progress = min((step - self.warmup) / decay_steps, 1.0)
        return 0.5 * (1.0 + math.cos(math.pi * progress)) * self.base_lr

    def apply(self, optimizer: torch.optim.Optimizer, step: int) -> float:
        """Set every group's lr for `step`; returns it."""
        lr = self(step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        return lr

    def state_dict(self) -> dict:
        return {"base_lr": self.base_lr, "warmup": self.warmup, "total": self.total}

    def load_state_dict(self, state: dict) -> None:
        self.base_lr, self.warmup, self.total = state["base_lr"], state["warmup"], state["total"]


@torch.no_grad()
def clamp_logit_scale(model: nn.Module, max_value: float = MAX_LOGIT_SCALE) -> None:
    """Keep exp(logit_scale) in [1, 100] (Section 2.5)."""
    unwrap(model).logit_scale.clamp_(0.0, max_value)
