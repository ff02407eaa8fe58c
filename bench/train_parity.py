"""Does training on Ray learn as well as a plain loop? Zero-shot accuracy, same data, batch, steps.

Not a speed benchmark: the quality check of issue 6 at a size the tests cannot afford. A
synthetic web is generated and every pair rendered straight into WebDataset shards (no
crawl: both runs must see exactly the same samples); then, for each seed, the tiny preset
is trained twice with the same global batch and steps: by the library's Trainer in this
process (the plain loop) and by flows/train.py on a local Ray cluster with 2 workers (DDP,
gather with gradients, local loss). Each model is scored zero-shot on the web's eval sets;
the seed-to-seed spread of the plain loop is the noise the difference is read against.

    .venv/bin/python bench/train_parity.py [--pairs 3000] [--steps 300] [--batch-size 64] [--seeds 0 1 2]
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq
import torch

from synthweb.generator import generate_web
from synthweb.app import SyntheticWeb
from clip_core.data.webdataset import write_shards
from clip_core.eval.zeroshot import evaluate_zeroshot
from clip_core.train import TrainConfig, build_training
from clip_core.train.optim import unwrap
from clip_core.weights import load_checkpoint

SETS = ("colors", "shapes", "counts", "digits", "words")


def build_corpus(root: Path, pairs: int) -> tuple[str, dict[str, str]]:
    """(shards folder, {eval set: folder}) of a synthetic web; every pair with a caption rendered."""
    web = str(root / "web")
    generate_web(web, n_pairs=pairs, seed=0, image_size=64)
    site, table = SyntheticWeb.from_root(web), pq.read_table(f"{web}/pairs.parquet").to_pylist()
    samples = ({"__key__": f"{row['uid']:09d}", "jpg": site.image(row["uid"])[0], "txt": row["caption"]}
               for row in table if row["caption"])
    write_shards(str(root / "shards"), samples, maxcount=500)
    return str(root / "shards"), {name: f"{web}/eval/{name}" for name in SETS}


def accuracy(model, sets: dict[str, str]) -> dict[str, float]:
    return {name: evaluate_zeroshot(model, path, progress=False).metrics["acc1"] for name, path in sets.items()}


def run_pair(cfg: TrainConfig, output: str, sets: dict[str, str]) -> tuple[dict, dict]:
    """(plain, Ray) zero-shot accuracies of one seed: one process, then 2 Ray workers."""
    from flows.train import RunSettings, train

    trainer, loader = build_training(cfg)
    trainer.fit(loader, cfg.total_steps)
    plain = accuracy(unwrap(trainer.model), sets)
    run = RunSettings(output=output, workers=2, cpus_per_worker=1.0, checkpoint_every=cfg.total_steps, log_every=50)
    ray = accuracy(load_checkpoint(train(cfg, run).model), sets)
    return plain, ray


def mean_sd(values: list[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.1%} ± {sd:.1%}"


def report(rows: list[tuple[int, dict, dict]]) -> str:
    lines = ["| eval set | " + " | ".join(f"seed {s} plain / Ray" for s, _, _ in rows)
             + " | plain mean ± sd | Ray mean ± sd | Ray - plain |", "|---" * (len(rows) + 4) + "|"]
    for name in SETS:
        plain, ray = [p[name] for _, p, _ in rows], [r[name] for _, _, r in rows]
        cells = " | ".join(f"{p:.1%} / {r:.1%}" for p, r in zip(plain, ray))
        diff = statistics.mean(ray) - statistics.mean(plain)
        lines.append(f"| {name} | {cells} | {mean_sd(plain)} | {mean_sd(ray)} | {diff:+.1%} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pairs", type=int, default=3000)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=64, help="global: 2 x half on Ray, whole in the plain loop")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = p.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    torch.set_num_threads(1)
    root, start = Path(tempfile.mkdtemp(prefix="train-parity-")), time.time()
    corpus, sets = build_corpus(root, args.pairs)
    rows = []
    for seed in args.seeds:
        cfg = TrainConfig(corpus=corpus, preset="tiny", steps=args.steps, batch_size=args.batch_size, lr=1e-3,
                          warmup=20, precision="fp32", data_workers=1, shuffle_buffer=500, seed=seed)
        rows.append((seed, *run_pair(cfg, str(root / f"seed{seed}"), sets)))
        print(f"seed {seed}: plain {rows[-1][1]}; Ray {rows[-1][2]}", flush=True)
    print(f"\n## train_parity (tiny, {args.pairs} pairs, {args.steps} steps, global batch {args.batch_size}, "
          f"Ray 2 workers; {time.time() - start:.0f} s)\n\nzero-shot top-1 on the synthetic web's eval sets\n")
    print(report(rows))


if __name__ == "__main__":
    main()
