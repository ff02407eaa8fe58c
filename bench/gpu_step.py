"""The GPU path: CLIP training steps at bf16 on one GPU, samples/s and MFU, and GPU dedup search.

For each preset (default ViT-B-32 and ViT-B-16, CLIP Sec. 2.5): the library's training step
(clip_core.train: bf16 autocast, SDPA attention, the CLIP loss, fused AdamW, logit-scale
clamp), optionally under torch.compile,
  1. on device-resident random batches: the model's ceiling;
  2. fed by the shard loader from WebDataset shards of 256 px JPEGs (decode, random crop,
     tokenise in DataLoader workers): whether the loader keeps up (data wait);
  3. the whole `clip-pipeline train` path (Ray Train, one worker on the GPU, callbacks,
     MLflow, checkpoints uploaded in the background, export): samples/s and MFU from its
     metrics.jsonl after the warm-up steps, and the command's wall time.
MFU = samples/s x training FLOPs per sample / the device's dense bf16 peak. FLOPs per sample
are counted by torch's FlopCounterMode (forward + backward); the issue's figures (forward
14.78 GFLOPs for ViT-B/32, 41.09 for ViT-B/16, training about 3x) are printed beside them.
Then dedup's exact search (chunked torch matmul on the GPU) against FAISS on the CPU.

    .venv/bin/python bench/gpu_step.py [--presets ViT-B-32 ViT-B-16] [--batch 256] [--compile]
                                       [--loader-workers 12] [--steps 30]

Without CUDA it says so and stops; `--device cpu --presets tiny --batch 8` runs the harness
itself on a CPU (a smoke run, not a figure).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.train_bench import write_corpus  # noqa: E402
from clip_core.model import create_model  # noqa: E402
from clip_core.train import TrainConfig, build_training  # noqa: E402
from clip_core.train.optim import unwrap  # noqa: E402
from flows.tracking import flops_per_sample, peak_flops  # noqa: E402

PAPER_FORWARD_GFLOPS = {"ViT-B-32": 14.78, "ViT-B-16": 41.09}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_flops(preset: str) -> float:
    """Forward + backward FLOPs of one (image, text) pair, counted on the meta device."""
    with torch.device("meta"):
        meta = create_model(preset)
    return flops_per_sample(meta, meta.config.vision.image_size, meta.config.text.context_length)


def model_ceiling(cfg: TrainConfig, device: torch.device, steps: int, warmup: int) -> float:
    """Median seconds per step on one random batch kept on the device."""
    trainer, _ = build_training(cfg, device=device)
    clip = unwrap(trainer.model).config
    size, length = clip.vision.image_size, clip.text.context_length
    images = torch.randn(cfg.batch_size, 3, size, size, device=device)
    text = torch.randint(1, 49405, (cfg.batch_size, length), device=device)
    text[:, 0], text[:, -1] = 49406, 49407
    times = []
    for i in range(warmup + steps):
        sync(device)
        start = time.perf_counter()
        trainer.train_step((images, text))
        sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


class Rows:
    def __init__(self):
        self.rows = []

    def on_step_end(self, trainer):
        self.rows.append(dict(trainer.metrics))


def loader_fed(cfg: TrainConfig, device: torch.device, steps: int, warmup: int) -> tuple[float, float]:
    """(median step seconds, mean data wait) with batches from the shard loader."""
    rows = Rows()
    trainer, loader = build_training(cfg, device=device, callbacks=[rows])
    trainer.fit(loader, warmup + steps)
    timed = rows.rows[warmup:]
    return statistics.median(r["step_time"] for r in timed), statistics.mean(r["data_wait"] for r in timed)


def train_path(preset: str, corpus: str, args, device: torch.device, peak: float | None) -> tuple[float, float, float]:
    """(median samples/s, median MFU or nan, wall seconds) of `clip-pipeline train` on this device."""
    import json
    import subprocess

    out = Path(tempfile.mkdtemp(prefix="gpu-bench-train-"))
    cmd = [str(Path(sys.executable).with_name("clip-pipeline")), "train", corpus, str(out / "run"), "--preset", preset,
           "--batch-size", str(args.batch), "--steps", str(args.warmup + args.steps), "--precision", args.precision,
           "--workers", "1", "--data-workers", str(args.loader_workers), "--log-every", "10",
           "--checkpoint-every", "1000000", "--resume", "never",
           "--gpus-per-worker", "1" if device.type == "cuda" else "0"]
    if peak:
        cmd += ["--peak-tflops", str(peak / 1e12)]
    if args.compile is not None:
        cmd.append("--compile" if args.compile else "--no-compile")
    start = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    rows = [json.loads(line) for line in (out / "run" / "metrics.jsonl").read_text().splitlines()]
    timed = [r for r in rows if "samples_per_s" in r][args.warmup:]
    rate = statistics.median(r["samples_per_s"] for r in timed)
    mfu = statistics.median(r["mfu"] for r in timed) if all("mfu" in r for r in timed) else float("nan")
    return rate, mfu, wall


def dedup_search(device: str, n_eval: int = 1_000_000, n_queries: int = 200_000, dim: int = 128) -> str:
    """Queries/s of the torch GPU index against FAISS flat on the CPU, same vectors."""
    from dedup.index import FlatIndex

    rng = np.random.default_rng(0)
    base = rng.standard_normal((n_eval, dim), dtype=np.float32)
    base /= np.linalg.norm(base, axis=1, keepdims=True)
    queries = base[rng.integers(0, n_eval, n_queries)] + 0.01 * rng.standard_normal((n_queries, dim), dtype=np.float32)
    rates = {}
    for name, index, q in (("torch on " + device, FlatIndex(base, backend="torch", device=device), queries),
                           ("FAISS flat, CPU", FlatIndex(base, backend="faiss"), queries[:5000])):
        index.search(q[:1000], k=1)
        start = time.perf_counter()
        index.search(q, k=1)
        rates[name] = len(q) / (time.perf_counter() - start)
    first, second = rates.values()
    return (f"dedup search, {n_eval:,} eval vectors x {dim}-d, top-1: "
            + ", ".join(f"{k} {v:,.0f} queries/s" for k, v in rates.items()) + f" ({first / second:.0f}x)")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--presets", nargs="+", default=["ViT-B-32", "ViT-B-16"])
    p.add_argument("--batch", type=int, default=256, help="per GPU")
    p.add_argument("--precision", default="auto", choices=("auto", "bf16", "fp16", "fp32"))
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the model (default: on CUDA, as training does)")
    p.add_argument("--grad-checkpointing", action="store_true")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--loader-workers", type=int, default=12)
    p.add_argument("--peak-tflops", type=float, help="default: the device's known dense bf16 peak")
    p.add_argument("--device", default="cuda")
    p.add_argument("--no-search", action="store_true")
    args = p.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("no CUDA device here: the GPU figures need a GPU (see docs/scale.md); nothing measured")
        return 0
    device = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = True
    peak = peak_flops(args.peak_tflops, device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    tmp = Path(tempfile.mkdtemp(prefix="gpu-bench-"))
    corpus = write_corpus(tmp / "corpus", 8, max(64, args.batch * (args.steps + args.warmup) // 8 + 1), size=256)
    print(f"{name}; torch {torch.__version__}; {args.precision}, batch {args.batch}, compile {args.compile}, "
          f"median of {args.steps} steps after {args.warmup}; peak {peak / 1e12 if peak else float('nan'):.0f} TFLOP/s\n")
    print("| preset | GFLOPs/pair (counted; issue: 3 x fwd) | model only: samples/s | MFU "
          "| from shards: samples/s | data wait | clip-pipeline train: samples/s | MFU | wall s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for preset in args.presets:
        cfg = TrainConfig(corpus=corpus, preset=preset, batch_size=args.batch,
                          steps=args.warmup + args.steps, precision=args.precision, compile=args.compile,
                          grad_checkpointing=args.grad_checkpointing, data_workers=args.loader_workers,
                          shuffle_buffer=1000, warmup=5)
        flops = train_flops(preset)
        paper = PAPER_FORWARD_GFLOPS.get(preset)
        ceiling = args.batch / model_ceiling(cfg, device, args.steps, args.warmup)
        fed_step, wait = loader_fed(cfg, device, args.steps, args.warmup)
        mfu = f"{ceiling * flops / peak:.1%}" if peak else "n/a"
        counted = f"{flops / 1e9:.2f}" + (f" ({3 * paper:.1f})" if paper else "")
        path_rate, path_mfu, wall = train_path(preset, corpus, args, device, peak)
        print(f"| {preset} | {counted} | {ceiling:,.0f} | {mfu} | {args.batch / fed_step:,.0f} | {wait:.1%} "
              f"| {path_rate:,.0f} | {path_mfu:.1%} | {wall:.0f} |")
    if not args.no_search and device.type == "cuda":
        print("\n" + dedup_search(args.device))
    return 0


if __name__ == "__main__":
    sys.exit(main())
