"""A bare PyTorch training loop for CLIP: the anchor `clip-pipeline train` is timed against.

Written plainly, as a user would without this project's training code (no clip_core.train:
no Trainer, no ShardLoader, no callbacks, no Ray, no MLflow, no checkpoints): img2dataset's
WebDataset shards read with the `webdataset` package in DataLoader worker processes, a
random-resized crop written with PIL and numpy, the project's model (clip_core.model) and
tokenizer (the same network and token ids), CLIP's symmetric cross-entropy (Radford et al.
2021, Figure 3), AdamW with no decay on gains/biases/embeddings, linear warmup then cosine
decay, the temperature clipped at 100 (Section 2.5), autocast for bf16.

Prints one JSON object: wall seconds from the top of main() (after imports) to the end of the
last step, when the first step ended, and every step's times (`step_wall`: from one step's end
to the next, data wait included, the Trainer's field of the same name; `step_time`: from
asking for the batch to the end of the update, the Trainer's `step_time`).

    .venv/bin/python bench/bare_train_loop.py CORPUS --steps 400 --batch-size 64 --image-size 64
"""
from __future__ import annotations

import argparse
import glob
import io
import json
import math
import os
import random
import time

import numpy as np
import torch
import torch.nn.functional as F
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader

from clip_core.model import create_model
from clip_core.tokenizer import tokenize

MEAN = np.array([0.48145466, 0.4578275, 0.40821073], dtype=np.float32)[:, None, None]
STD = np.array([0.26862954, 0.26130258, 0.27577711], dtype=np.float32)[:, None, None]


def random_resized_crop(img: Image.Image, size: int, rng: random.Random,
                        scale=(0.9, 1.0), ratio=(3 / 4, 4 / 3)) -> Image.Image:
    """A random box of 90-100% of the area, aspect 3:4-4:3, resized bicubically to size x size."""
    width, height = img.size
    for _ in range(10):
        area = width * height * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
        w, h = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
        if 0 < w <= width and 0 < h <= height:
            left, top = rng.randint(0, width - w), rng.randint(0, height - h)
            return img.crop((left, top, left + w, top + h)).resize((size, size), Image.BICUBIC)
    return img.resize((size, size), Image.BICUBIC)


class Preprocess:
    """WebDataset sample -> (normalised image tensor (3, S, S), caption)."""

    def __init__(self, size: int):
        self.size, self.rng = size, random.Random()

    def __call__(self, sample: dict):
        img = Image.open(io.BytesIO(sample["jpg"])).convert("RGB")
        x = np.asarray(random_resized_crop(img, self.size, self.rng), dtype=np.float32).transpose(2, 0, 1) / 255
        return torch.from_numpy((x - MEAN) / STD), sample["txt"].decode("utf-8").strip()


class Collate:
    """A list of (image, caption) -> (images (B, 3, S, S), token ids (B, L))."""

    def __init__(self, context_length: int):
        self.context_length = context_length

    def __call__(self, pairs):
        images, captions = zip(*pairs)
        return torch.stack(images), tokenize(list(captions), self.context_length, truncate=True)


def make_loader(corpus: str, batch_size: int, image_size: int, context_length: int, workers: int,
                shuffle_buffer: int) -> DataLoader:
    """Shards split over the DataLoader workers, repeated without end, shuffled, decoded, batched."""
    urls = sorted(glob.glob(os.path.join(corpus, "*.tar")))
    dataset = (wds.WebDataset(urls, shardshuffle=False, empty_check=False).repeat()
               .shuffle(shuffle_buffer, initial=shuffle_buffer)
               .map(Preprocess(image_size))
               .batched(batch_size, collation_fn=Collate(context_length), partial=False))
    return DataLoader(dataset, batch_size=None, num_workers=workers)


def decay_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on weight matrices only (not gains, biases, embeddings or the temperature)."""
    decay, rest = [], []
    for name, p in model.named_parameters():
        skip = p.ndim < 2 or any(k in name for k in ("embedding", "logit_scale", "ln", "bn", "bias"))
        (rest if skip else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]


def lr_at(step: int, base: float, warmup: int, total: int) -> float:
    """Linear warmup to `base` over `warmup` steps, then cosine to 0 at `total`."""
    if step < warmup:
        return base * (step + 1) / warmup
    progress = min((step - warmup) / max(total - warmup, 1), 1.0)
    return 0.5 * (1 + math.cos(math.pi * progress)) * base


def clip_loss(image_features, text_features, scale) -> torch.Tensor:
    """Mean of the image->text and text->image cross-entropies, the diagonal as the labels."""
    logits = scale * image_features @ text_features.T
    labels = torch.arange(logits.shape[0])
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("corpus", help="folder of WebDataset .tar shards")
    p.add_argument("--preset", default="tiny")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--data-workers", type=int, default=2, help="DataLoader worker processes")
    p.add_argument("--threads", type=int, default=1, help="torch threads of the training process")
    p.add_argument("--shuffle-buffer", type=int, default=1000)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--weight-decay", type=float, default=0.2)
    p.add_argument("--betas", type=float, nargs=2, default=(0.9, 0.98))
    p.add_argument("--eps", type=float, default=1e-6)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    start = time.perf_counter()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    model = create_model(args.preset, vision_cfg={"image_size": args.image_size})
    optimizer = torch.optim.AdamW(decay_groups(model, args.weight_decay), lr=args.lr, betas=tuple(args.betas),
                                  eps=args.eps)
    loader = make_loader(args.corpus, args.batch_size, args.image_size, model.config.text.context_length,
                         args.data_workers, args.shuffle_buffer)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.precision == "bf16")
    batches = iter(loader)
    step_time, step_wall, losses, first_end, last_end = [], [], [], None, None
    model.train()
    for step in range(args.steps):
        t0 = time.perf_counter()
        images, tokens = next(batches)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, args.lr, args.warmup, args.steps)
        optimizer.zero_grad(set_to_none=True)
        with autocast:
            loss = clip_loss(*model(images, tokens))
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        losses.append(loss.item())
        end = time.perf_counter()
        step_time.append(end - t0)
        if last_end is not None:
            step_wall.append(end - last_end)
        first_end = first_end if first_end is not None else end - start
        last_end = end
    print(json.dumps({"wall_s": last_end - start, "first_step_end_s": first_end, "threads": torch.get_num_threads(),
                      "final_loss": losses[-1], "step_time": step_time, "step_wall": step_wall}))


if __name__ == "__main__":
    main()
