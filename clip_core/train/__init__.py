"""Contrastive training of CLIP (Radford et al. 2021, Section 2.5), without orchestration.

`build_training` assembles a model, AdamW, the warmup-cosine schedule, the (distributed)
CLIP loss, the model-agnostic `Trainer` and this rank's shard stream from a `TrainConfig`
(the recipe); `restore_training` puts a checkpoint back into them. flows/train.py runs the
same pieces under Ray Train with the run's settings; tests and notebooks run them in-process.
"""
from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path
from typing import Callable, Iterable

import torch
from torch import nn

from clip_core.loss import ClipLoss
from clip_core.model import create_model
from clip_core.train.checkpoint import load_train_state
from clip_core.train.config import TrainConfig
from clip_core.train.data import DataConfig, DataStats, ShardLoader, load_excluded_keys
from clip_core.train.loop import NonFiniteLossError, NormalizeImages, Trainer
from clip_core.train.optim import WarmupCosine, build_optimizer, clamp_logit_scale, unwrap

__all__ = ["TrainConfig", "DataStats", "Trainer", "NonFiniteLossError", "build_model_for", "build_training",
           "restore_training", "data_config"]


def build_model_for(cfg: TrainConfig) -> nn.Module:
    """A freshly initialised CLIP of the configured preset (seeded)."""
    torch.manual_seed(cfg.seed)
    model = create_model(cfg.preset, **cfg.model_overrides())
    model.set_grad_checkpointing(cfg.grad_checkpointing)
    return model


def data_config(cfg: TrainConfig, model: nn.Module, rank: int, world_size: int, device: torch.device) -> DataConfig:
    """This rank's DataConfig: per-worker batch, the model's resolution and context."""
    clip = unwrap(model).config
    return DataConfig(corpus=cfg.corpus, batch_size=cfg.batch_size // world_size, image_size=clip.vision.image_size,
                      context_length=clip.text.context_length, seed=cfg.seed, shuffle_buffer=cfg.shuffle_buffer,
                      resampled=cfg.resampled, num_workers=cfg.data_workers, rank=rank, world_size=world_size,
                      pin_memory=device.type == "cuda", exclude=load_excluded_keys(cfg.exclude),
                      exclude_source=cfg.exclude, normalize=False)  # uint8 to the device, normalised there


def build_training(cfg: TrainConfig, *, rank: int = 0, world_size: int = 1, device="cpu",
                   wrap: Callable[[nn.Module], nn.Module] | None = None, callbacks: Iterable = (),
                   urls: list[str] | None = None, check_every: int = 1) -> tuple[Trainer, ShardLoader]:
    """(trainer, loader) for one rank; `wrap` puts the model into DDP (Ray's prepare_model).

    The loader yields uint8 images that the trainer normalises on the device; the model is
    compiled when cfg.compile says so (None: on CUDA); `check_every` > 1 reads the loss and
    gradient norm every so many steps instead of every step (Trainer)."""
    device = torch.device(device)
    model = build_model_for(cfg).to(device)
    optimizer = build_optimizer(model, cfg.lr, cfg.weight_decay, cfg.betas, cfg.eps)
    if wrap is not None:
        model = wrap(model)
    if cfg.compile or (cfg.compile is None and device.type == "cuda"):
        model = torch.compile(model)
    loss = ClipLoss(local_loss=cfg.local_loss, gather_with_grad=True, rank=rank, world_size=world_size)
    trainer = Trainer(model, optimizer, loss, schedule=WarmupCosine(cfg.lr, cfg.warmup, cfg.total_steps),
                      precision=cfg.precision, accum_steps=cfg.accum_steps, post_step=clamp_logit_scale,
                      device=device, callbacks=callbacks, prepare=NormalizeImages(), check_every=check_every)
    loader = ShardLoader(data_config(cfg, model, rank, world_size, device), urls)
    return trainer, loader


def restore_training(folder: str | Path, trainer: Trainer, loader: ShardLoader) -> ShardLoader:
    """Load a checkpoint into trainer and loader; returns the loader to train from.

    A schedule changed on the command line (--steps, --lr, --warmup) wins over the saved one,
    with a warning. A data position saved under another layout (world size, data workers)
    cannot continue exactly: the stream restarts with a seed shifted by the step, with a warning.
    """
    configured = trainer.schedule.state_dict() if trainer.schedule is not None else None
    state = load_train_state(folder, trainer)
    if configured is not None and state["schedule"] not in (None, configured):
        warnings.warn(f"the schedule of {folder} was {state['schedule']}; continuing with the configured {configured}")
        trainer.schedule.load_state_dict(configured)
    ranks = (state.get("data") or {}).get("ranks", [])
    rank = loader.cfg.rank
    try:
        loader.load_state_dict(ranks[rank])
        return loader
    except (IndexError, KeyError, ValueError) as e:
        warnings.warn(f"cannot continue the data position of {folder} ({e}); restarting the stream with a new seed")
        cfg = dataclasses.replace(loader.cfg, seed=loader.cfg.seed + trainer.step)
        return ShardLoader(cfg, loader.urls)
