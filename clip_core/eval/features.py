"""Batched feature extraction from frozen encoders, shared by every evaluator.

CLIP (Radford et al. 2021), Section 3: zero-shot transfer, retrieval and linear probes all
read the frozen image and text encoders; nothing is trained here. Works with any object
that has `encode_image(images)` and `encode_text(ids)` (a `CLIP`, or a test double).
Features come back as float32 on the CPU, L2-normalised unless asked otherwise.
"""
from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

from clip_core.errors import InputError
from clip_core.eval.datasets import Sample, iter_samples, read_image
from clip_core.tokenizer import tokenize
from clip_core.transforms import image_transform

__all__ = ["SplitFeatures", "encode_images", "encode_texts", "extract_split", "model_device",
           "progress_bar", "batched"]

Tokenizer = Callable[[list[str]], torch.Tensor]


@dataclass
class SplitFeatures:
    """Image features of one split with each sample's label or captions, in index order."""

    image_features: torch.Tensor  # (N, D)
    keys: list[str]
    labels: np.ndarray | None = None  # (N,) int64
    captions: list[tuple[str, ...]] | None = None


def model_device(model) -> torch.device:
    """The device of the model's first parameter (CPU for parameter-free models)."""
    params = getattr(model, "parameters", None)
    first = next(iter(params()), None) if callable(params) else None
    return first.device if first is not None else torch.device("cpu")


def progress_bar(iterable: Iterable, progress: bool | None = None, **kwargs) -> Iterable:
    """tqdm over `iterable`; progress=None shows it only when stderr is a terminal."""
    show = sys.stderr.isatty() if progress is None else progress
    return tqdm(iterable, disable=not show, **kwargs)


def batched(items: Iterable, size: int) -> Iterator[list]:
    """Consecutive lists of `size` items (the last may be shorter)."""
    if size < 1:
        raise ValueError(f"batch size must be >= 1, got {size}")
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


@contextlib.contextmanager
def _eval_mode(model):
    """Eval mode (BatchNorm statistics, no dropout) for the duration, then restore."""
    was_training = bool(getattr(model, "training", False))
    if was_training:
        model.eval()
    try:
        yield
    finally:
        if was_training:
            model.train()


def _default_transform(model) -> Callable[[Image.Image], torch.Tensor]:
    config = getattr(model, "config", None)
    if config is None:
        raise ValueError("model has no .config.vision.image_size; pass transform=")
    return image_transform(config.vision.image_size)


def _default_tokenizer(model) -> Tokenizer:
    context_length = int(getattr(model, "context_length", 77))
    return lambda texts: tokenize(texts, context_length=context_length, truncate=True)


def _finish(chunks: list[torch.Tensor], normalize: bool) -> torch.Tensor:
    if not chunks:
        raise ValueError("nothing to encode (empty input)")
    x = torch.cat(chunks).float()
    return F.normalize(x, dim=-1) if normalize else x


@torch.no_grad()
def _encode_image_batches(model, batches: Iterable[torch.Tensor], device, normalize: bool) -> torch.Tensor:
    device = torch.device(device) if device is not None else model_device(model)
    with _eval_mode(model):
        chunks = [model.encode_image(x.to(device)).float().cpu() for x in batches]  # (B, D) each
    return _finish(chunks, normalize)


def encode_images(model, images: Iterable[Image.Image | torch.Tensor], *, batch_size: int = 64,
                  transform: Callable | None = None, device: torch.device | str | None = None,
                  normalize: bool = True, progress: bool | None = None, total: int | None = None,
                  desc: str = "images") -> torch.Tensor:
    """(N, D) image features of PIL images (transformed) or (3, S, S) tensors, in batches."""
    transform = transform or _default_transform(model)
    bar = progress_bar(images, progress, total=total, desc=desc, unit="img")
    batches = (torch.stack([im if isinstance(im, torch.Tensor) else transform(im) for im in batch])
               for batch in batched(bar, batch_size))
    return _encode_image_batches(model, batches, device, normalize)


@torch.no_grad()
def encode_texts(model, texts: Sequence[str], *, batch_size: int = 256, tokenizer: Tokenizer | None = None,
                 device: torch.device | str | None = None, normalize: bool = True,
                 progress: bool | None = None, desc: str = "texts") -> torch.Tensor:
    """(N, D) text features; long texts are truncated to the model's context length."""
    device = torch.device(device) if device is not None else model_device(model)
    tokenizer = tokenizer or _default_tokenizer(model)
    chunks = []
    with _eval_mode(model):
        for batch in progress_bar(list(batched(texts, batch_size)), progress, desc=desc, unit="batch"):
            chunks.append(model.encode_text(tokenizer(list(batch)).to(device)).float().cpu())  # (B, D)
    return _finish(chunks, normalize)


def _sample_batches(samples: Iterable[Sample], transform: Callable, batch_size: int, num_workers: int,
                    seen: list[tuple]) -> Iterator[torch.Tensor]:
    """(B, 3, S, S) batches; decoding and transforms run on `num_workers` threads (PIL frees the GIL).

    (key, label, captions) of each sample go to `seen`, not the image bytes (memory).
    """
    prepare = lambda sample: transform(read_image(sample))  # noqa: E731
    with ThreadPoolExecutor(num_workers) if num_workers > 0 else contextlib.nullcontext() as pool:
        for batch in batched(samples, batch_size):
            seen.extend((s.key, s.label, s.captions) for s in batch)
            yield torch.stack(list(pool.map(prepare, batch) if pool else map(prepare, batch)))


def extract_split(model, path: str, split: str = "test", *, batch_size: int = 64,
                  transform: Callable | None = None, device: torch.device | str | None = None,
                  normalize: bool = True, progress: bool | None = None, num_workers: int = 0) -> SplitFeatures:
    """Image features of every sample of an eval split, with labels or captions."""
    seen: list[tuple] = []
    samples = progress_bar(iter_samples(path, split), progress, desc=f"{split} images", unit="img")
    batches = _sample_batches(samples, transform or _default_transform(model), batch_size, num_workers, seen)
    try:
        feats = _encode_image_batches(model, batches, device, normalize)
    except ValueError as err:
        if seen or isinstance(err, InputError):  # e.g. a damaged shard: its own message names it
            raise
        raise InputError(f"eval set {path}", f"split {split!r} is empty (no samples)",
                         "add images to the split folder") from err
    keys, labels, captions = (list(column) for column in zip(*seen))
    if all(label is not None for label in labels):
        return SplitFeatures(feats, keys, labels=np.array(labels, dtype=np.int64))
    if all(c is not None for c in captions):
        return SplitFeatures(feats, keys, captions=captions)
    raise ValueError(f"eval set {path}/{split} mixes labelled samples and captioned samples")
