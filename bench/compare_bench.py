"""`clip-pipeline compare` against the same variants run by hand (issue 20, item 3).

Both on one built corpus (the demo's, `--storage`), timed from process start to exit:

  compare  `clip-pipeline compare --storage WORK/compare --vary NAME=V1,V2 --steps N`, the corpus
           linked into WORK/compare (so nothing is rebuilt and runs/demo's MLflow store is left
           alone): one process, one local Ray cluster for every variant, each variant trained,
           evaluated zero-shot and by retrieval into its training run.
  by hand  for each value, `clip-pipeline train` with the same recipe (tiny-rn, 32 px, 32 tokens,
           lr 2e-3, warmup 30, 2 workers of 0.5 CPU, 1 data worker, a checkpoint every 50
           steps, the dedup matches excluded) and then `clip-pipeline evaluate MODEL EVALS
           --task zeroshot --task retrieval --mlflow-uri` into the training's store: two
           commands a variant, each starting its own Python (and train its own Ray).

Prints the seconds of each and the ratio, and the zero-shot top-1 per eval set of both, which
should agree (same seed, same recipe).

    .venv/bin/python bench/compare_bench.py [--storage runs/demo] [--vary batch_size=64,256] [--steps 260]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BIN = Path(sys.executable).parent
RECIPE = ["--preset", "tiny-rn", "--image-size", "32", "--context-length", "32", "--lr", "2e-3", "--warmup", "30",
          "--workers", "2", "--cpus-per-worker", "0.5", "--data-workers", "1", "--checkpoint-every", "50",
          "--max-failures", "2", "--seed", "0"]
EVALS = ("shapes", "colors", "counts", "digits", "words", "retrieval")


def timed(cmd: list[str], env: dict) -> float:
    start = time.perf_counter()
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if out.returncode:
        sys.exit(f"{' '.join(cmd)} failed ({out.returncode}):\n{out.stdout[-2000:]}\n{out.stderr[-4000:]}")
    return time.perf_counter() - start


def top1(folder: Path) -> dict[str, float]:
    return {p.name.split("_", 1)[0]: json.loads(p.read_text())["metrics"]["acc1"]
            for p in folder.glob("*zeroshot_classification.json")}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--storage", default="runs/demo", help="a built demo corpus (make demo)")
    parser.add_argument("--vary", default="batch_size=64,256")
    parser.add_argument("--steps", type=int, default=260)
    args = parser.parse_args()
    storage = Path(args.storage).resolve()
    name, values = args.vary.split("=")
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    work = Path(tempfile.mkdtemp(prefix="compare-bench-"))
    (work / "compare").mkdir()
    for part in ("web", "shards", "dedup"):
        (work / "compare" / part).symlink_to(storage / part)
    env["PREFECT_HOME"] = str(work / "prefect")
    together = timed([str(BIN / "clip-pipeline"), "compare", "--storage", str(work / "compare"), "--vary",
                      args.vary, "--steps", str(args.steps)], env)
    by_hand, results = 0.0, {}
    for value in values.split(","):
        out = work / "hand" / f"{name}-{value}"
        by_hand += timed([str(BIN / "clip-pipeline"), "train", str(storage / "shards"), str(out), *RECIPE,
                          "--steps", str(args.steps), f"--{name.replace('_', '-')}", value,
                          "--exclude", str(storage / "dedup" / "matches.parquet")], env)
        by_hand += timed([str(BIN / "clip-pipeline"), "evaluate", str(out / "model"),
                          *(str(storage / "web" / "eval" / e) for e in EVALS), "--task", "zeroshot", "--task",
                          "retrieval", "--out", str(out / "eval"), "--mlflow-uri", f"sqlite:///{out / 'mlflow.db'}"],
                         env)
        results[value] = (top1(work / "compare" / "compare" / f"{name}-{value}" / "eval"), top1(out / "eval"))
    print(f"compare {together:.1f} s, by hand {by_hand:.1f} s: {together / by_hand:.3f}x "
          f"({args.vary}, {args.steps} steps, corpus {storage})")
    for value, (ours, theirs) in results.items():
        print(f"  {name}={value}: " + ", ".join(f"{s} {ours.get(s, float('nan')):.0%} / {theirs.get(s, float('nan')):.0%}"
                                             for s in sorted(ours)) + "  (compare / by hand)")
    print(f"outputs under {work}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
