"""Training overhead: Ray Train vs a plain loop, and the shard loader vs what a step consumes.

CLIP (Radford et al. 2021, Section 2.5) trains data-parallel; this checks that the Ray Train
wiring (flows/train.py: TorchTrainer, report callbacks, MLflow on rank 0) adds little to a
step of the same model and batch run in a plain single-process loop (goal: at most 10%
more, median step time after warm-up), and that the data loader (tar over fsspec, JPEG
decode, crop, tokenise in DataLoader workers) produces samples faster than the step eats them.

    .venv/bin/python bench/train_bench.py [--steps 40] [--batch-size 32] [--preset tiny] [--image-size 64]
"""
from __future__ import annotations

import argparse
import io
import json
import os
import random
import statistics
import tarfile
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

from clip_core.train import TrainConfig, build_training
from clip_core.train.data import DataConfig, ShardLoader


def write_corpus(folder: Path, shards: int, per_shard: int, size: int = 96) -> str:
    """img2dataset-style shards of random-colour JPEGs with short captions."""
    rng = random.Random(0)
    folder.mkdir(parents=True, exist_ok=True)
    for s in range(shards):
        with tarfile.open(folder / f"{s:05d}.tar", "w") as tar:
            for i in range(per_shard):
                colour = tuple(rng.randrange(256) for _ in range(3))
                out = io.BytesIO()
                Image.new("RGB", (size, size), colour).save(out, format="JPEG")
                for ext, data in (("jpg", out.getvalue()), ("txt", f"a photo of colour {colour}".encode())):
                    info = tarfile.TarInfo(f"{s:05d}{i:05d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return str(folder)


class StepTimes:
    def __init__(self):
        self.rows = []

    def on_step_end(self, trainer):
        self.rows.append(trainer.metrics)


def summarise(rows: list[dict], warmup: int) -> dict:
    rows = rows[warmup:]
    return {"median_step_s": statistics.median(r["step_time"] for r in rows),
            "data_wait": statistics.mean(r["data_wait"] for r in rows), "steps": len(rows)}


def plain_loop(cfg: TrainConfig, warmup: int) -> dict:
    """The library's Trainer in this process, no Ray, no tracking."""
    times = StepTimes()
    trainer, loader = build_training(cfg, callbacks=[times])
    trainer.fit(loader, cfg.total_steps)
    return summarise(times.rows, warmup)


def ray_loop(cfg: TrainConfig, run_options: dict, warmup: int) -> dict:
    """flows/train.py with one worker: TorchTrainer, callbacks, MLflow (SQLite) on rank 0."""
    from flows.train import RunSettings, train

    run = RunSettings(**run_options)
    train(cfg, run)
    rows = [json.loads(line) for line in (Path(run.output) / "metrics.jsonl").read_text().splitlines()]
    return summarise([r for r in rows if "step_time" in r], warmup)


def loader_rate(cfg: TrainConfig, image_size: int, workers: int, batches: int = 30) -> float:
    """Samples/s of the shard loader alone (after its first batch)."""
    loader = ShardLoader(DataConfig(corpus=cfg.corpus, batch_size=cfg.batch_size, image_size=image_size,
                                    seed=cfg.seed, shuffle_buffer=cfg.shuffle_buffer, num_workers=workers))
    it = iter(loader)
    next(it)
    start = time.perf_counter()
    for _ in range(batches):
        next(it)
    return batches * cfg.batch_size / (time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--warmup", type=int, default=8, help="steps left out of the median")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--preset", default="tiny")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--threads", type=int, default=1, help="torch threads (Ray gives a 1-CPU worker 1)")
    args = p.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    torch.set_num_threads(args.threads)
    tmp = Path(tempfile.mkdtemp(prefix="train-bench-"))
    corpus = write_corpus(tmp / "corpus", 4, 256)
    cfg = TrainConfig(corpus=corpus, preset=args.preset, image_size=args.image_size, steps=args.steps,
                      batch_size=args.batch_size, lr=5e-4, warmup=5, precision="fp32", data_workers=1,
                      shuffle_buffer=256)
    run = dict(output=str(tmp / "ray"), workers=1, cpus_per_worker=float(args.threads),
               checkpoint_every=10 * args.steps, log_every=10)
    # plain before and after Ray: on a shared machine the load drifts; the ratio uses their mean
    before = plain_loop(cfg, args.warmup)
    ray = ray_loop(cfg, run, args.warmup)
    after = plain_loop(cfg, args.warmup)
    plain = {k: (before[k] + after[k]) / 2 for k in before}
    consumed = args.batch_size / plain["median_step_s"]
    rates = {w: loader_rate(cfg, args.image_size, w) for w in (1, 2)}
    load = os.getloadavg()[0]
    print(f"\n## train_bench ({args.preset} @ {args.image_size}px, batch {args.batch_size}, {args.threads} thread(s), "
          f"{os.cpu_count()} cores, load avg {load:.1f})\n")
    print("| loop | median step (s) | data wait | steps timed |\n|---|---|---|---|")
    for name, r in (("plain (before)", before), ("Ray Train, 1 worker", ray), ("plain (after)", after)):
        print(f"| {name} | {r['median_step_s']:.4f} | {r['data_wait']:.1%} | {r['steps']:.0f} |")
    ratio = ray["median_step_s"] / plain["median_step_s"]
    print(f"\nRay / plain step time: {ratio:.3f} ({ratio - 1:+.1%}; goal <= +10%)")
    print(f"training consumes {consumed:.0f} samples/s; loader alone: "
          + ", ".join(f"{rate:.0f} samples/s with {w} worker(s) ({rate / consumed:.1f}x)" for w, rate in rates.items()))


if __name__ == "__main__":
    main()
