"""`clip-pipeline train` end to end against a bare PyTorch loop (issue 18, item 3a).

Both run as subprocesses on the same corpus (img2dataset-style WebDataset shards of small
JPEGs with captions), one run each, timed from process start to exit:

  train  `clip-pipeline train CORPUS OUT --preset P --image-size S --steps N --batch-size B
         --precision X` and the command's defaults otherwise (the laptop defaults): a local
         Ray cluster on 127.0.0.1, 1 Ray Train worker with 1 CPU (Ray sets OMP_NUM_THREADS=1
         in it, so 1 torch thread), 2 DataLoader processes (spawned), shuffle buffer 1000, a
         checkpoint every 500 steps (no time-based ones) and at the end, MLflow in
         OUT/mlflow.db (SQLite) with a row every 10 steps, metrics.jsonl every step, the model
         exported to OUT/model and registered in MLflow. OUT/model/model.safetensors is checked.
  bare   bench/bare_train_loop.py: the same model, loss, AdamW settings, warmup-cosine
         schedule, precision, shards, crop size, batch, steps, DataLoader processes and torch
         threads, written plainly (webdataset + PIL, no clip_core.train, no Ray, no MLflow,
         no checkpoint, no export).

Per step: `step_wall`, the time from one step's end to the next (data wait and the previous
step's callbacks included), from train's OUT/metrics.jsonl and the bare loop's own output;
median and mean after `--skip` warm-up steps. Goals: wall time at most 1.25x the bare loop's,
per-step time with callbacks at most 1.10x. The train run's own time line (from the
timestamps MLflow stored: run opened, step 1 and last step logged, run closed) splits its
overhead into start-up, time to the first step, training and the end (final checkpoint,
export, MLflow).

    .venv/bin/python bench/train_e2e_bench.py [--steps 400] [--precision fp32] [--no-results]
"""
from __future__ import annotations

import argparse
import json
import os
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

from run_all import machine  # noqa: E402
from train_bench import write_corpus  # noqa: E402

from clip_core.train.config import TrainConfig  # noqa: E402

DATA_WORKERS = TrainConfig.data_workers  # the command's default DataLoader processes per worker
# RunSettings.cpus_per_worker 1.0: Ray sets OMP_NUM_THREADS to the floor of the worker's CPUs when unset,
# so torch.get_num_threads() is 1 in the Ray Train worker (checked with a TorchTrainer on 2026-12-01)
RAY_WORKER_THREADS = 1


def load() -> str:
    one, five, _ = os.getloadavg()
    return f"{one:.2f}/{five:.2f}"


def timed(command: list[str], log: Path, env: dict | None = None) -> dict:
    """Run `command` to its end: wall seconds from start to exit, epoch start and end, stdout, load averages."""
    loads = [load()]
    start_epoch, start = time.time(), time.perf_counter()
    with open(log, "w") as err:
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=err, text=True, cwd=ROOT, env=env)
        out, _ = proc.communicate()
    wall = time.perf_counter() - start
    loads.append(load())
    if proc.returncode:
        raise SystemExit(f"{' '.join(command)} exited {proc.returncode}:\n{log.read_text()[-3000:]}")
    return {"wall_s": wall, "start_epoch": start_epoch, "end_epoch": start_epoch + wall, "stdout": out,
            "load": " -> ".join(loads)}


def run_bare(corpus: str, args, cfg: TrainConfig, tmp: Path) -> dict:
    command = [sys.executable, str(HERE / "bare_train_loop.py"), corpus, "--preset", args.preset,
               "--image-size", str(args.image_size), "--steps", str(args.steps), "--batch-size", str(args.batch_size),
               "--precision", args.precision, "--data-workers", str(DATA_WORKERS),
               "--threads", str(RAY_WORKER_THREADS), "--shuffle-buffer", str(cfg.shuffle_buffer), "--lr", str(cfg.lr),
               "--warmup", str(cfg.warmup), "--weight-decay", str(cfg.weight_decay),
               "--betas", *map(str, cfg.betas), "--eps", str(cfg.eps), "--seed", str(cfg.seed)]
    r = timed(command, tmp / "bare.log")
    report = json.loads(r["stdout"].strip().splitlines()[-1])
    return {**r, "step_wall": report["step_wall"], "step_time": report["step_time"],
            "inside_s": report["wall_s"], "first_step_s": report["first_step_end_s"], "threads": report["threads"]}


def mlflow_times(db: Path) -> dict:
    """Epoch seconds the run was opened and closed, and when the first and last steps were logged (SQLite store)."""
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as con:
        run_uuid, start, end = con.execute("SELECT run_uuid, start_time, end_time FROM runs "
                                           "ORDER BY start_time DESC LIMIT 1").fetchone()
        steps = con.execute("SELECT step, MIN(timestamp) FROM metrics WHERE run_uuid = ? AND key = 'loss' "
                            "GROUP BY step ORDER BY step", (run_uuid,)).fetchall()
    return {"opened": start / 1000, "closed": end / 1000 if end else None,
            "first_step": steps[0][1] / 1000 if steps else None, "first_logged": steps[0][0] if steps else None,
            "last_step": steps[-1][1] / 1000 if steps else None, "last_logged": steps[-1][0] if steps else None}


def run_train(corpus: str, args, tmp: Path) -> dict:
    out = tmp / "train-out"
    command = [str(ROOT / ".venv" / "bin" / "clip-pipeline"), "train", corpus, str(out), "--preset", args.preset,
               "--image-size", str(args.image_size), "--steps", str(args.steps), "--batch-size", str(args.batch_size),
               "--precision", args.precision]
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}  # Ray sets it from the worker's CPUs
    r = timed(command, tmp / "train.log", env)
    model = out / "model" / "model.safetensors"
    if not model.is_file():
        raise SystemExit(f"train exited 0 but {model} is missing")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    rows = sorted((row for row in rows if "step_time" in row), key=lambda row: row["step"])
    # step_wall: one step's end to the next, callbacks included (from step 2); without it, step_time (no callbacks)
    field = "step_wall" if any("step_wall" in row for row in rows) else "step_time"
    walls = [row[field] for row in rows[1:]]
    return {**r, "field": field, "step_wall": walls, "step_time": [row["step_time"] for row in rows],
            "mlflow": mlflow_times(out / "mlflow.db")}


def per_step(r: dict, skip: int, key: str = "step_wall") -> dict:
    """Median and mean from step skip + 1 on (step_wall lists start at step 2, step_time at step 1)."""
    values = r[key][skip - 1 if key == "step_wall" else skip:]
    return {"median": statistics.median(values), "mean": statistics.mean(values), "n": len(values)}


def table(args, bare: dict, train: dict) -> str:
    b, t = per_step(bare, args.skip), per_step(train, args.skip)
    bt, tt = per_step(bare, args.skip, "step_time"), per_step(train, args.skip, "step_time")
    lines = [
        f"{args.steps} steps, batch {args.batch_size}, {args.preset} @ {args.image_size} px, {args.precision}, "
        f"{DATA_WORKERS} DataLoader processes, {RAY_WORKER_THREADS} torch thread(s) "
        f"(Ray's 1-CPU worker; bare loop {bare['threads']}); "
        f"per step from step {args.skip + 1} ({b['n']} timed); train's per-step field: {train['field']}",
        f"{'variant':8} {'wall s':>8} {'load 1m/5m (start -> end)':>28} {'step_wall med':>14} {'mean':>8} "
        f"{'step_time med':>14} {'mean':>8}",
    ]
    for name, r, w, s in (("bare", bare, b, bt), ("train", train, t, tt)):
        lines.append(f"{name:8} {r['wall_s']:8.1f} {r['load']:>28} {w['median']:14.4f} {w['mean']:8.4f} "
                     f"{s['median']:14.4f} {s['mean']:8.4f}")
    lines.append(f"{'ratio':8} {train['wall_s'] / bare['wall_s']:8.3f} {'(goal <= 1.25)':>28} "
                 f"{t['median'] / b['median']:14.3f} {t['mean'] / b['mean']:8.3f} "
                 f"{tt['median'] / bt['median']:14.3f} {tt['mean'] / bt['mean']:8.3f}   (step_wall goal <= 1.10)")
    return "\n".join(lines + time_lines(args, bare, train))


def time_lines(args, bare: dict, train: dict) -> list[str]:
    """Where each run's wall time went: train's from MLflow's timestamps, bare's from its own clock."""
    m, start, lines = train["mlflow"], train["start_epoch"], []
    row = "  {:<78}{:7.1f}".format
    if m["first_step"] and m["last_step"] and m["closed"]:
        first, last = m["first_logged"], m["last_logged"]
        lines += ["train's time line (s; from MLflow's timestamps of the run and of the loss rows):",
                  row("process start: imports, input checks, ray.init, MLflow run opened", m["opened"] - start),
                  row(f"TorchTrainer, worker, dist init, model, DataLoader spawn, step {first} logged",
                      m["first_step"] - m["opened"]),
                  row(f"steps {first}->{last} logged (their step_wall sum {sum(train['step_wall'][first - 1:last - 1]):.1f})",
                      m["last_step"] - m["first_step"]),
                  row("final checkpoint, workers end, export, MLflow artifacts, registry, run closed",
                      m["closed"] - m["last_step"]),
                  row("run closed to process exit (Ray shutdown)", train["end_epoch"] - m["closed"])]
    lines += ["bare's time line (s; from its own clock):",
              row("imports, and interpreter exit", bare["wall_s"] - bare["inside_s"]),
              row("model, optimizer, DataLoader (fork), step 1 ended", bare["first_step_s"]),
              row(f"steps 1->{args.steps} (step_wall sum {sum(bare['step_wall']):.1f})",
                  bare["inside_s"] - bare["first_step_s"])]
    return lines


def append_results(path: Path, command: str, text: str, load_at_start: str) -> None:
    date = subprocess.run(["date"], capture_output=True, text=True).stdout.strip()
    with open(path, "a") as f:
        f.write(f"\n## {date}: `clip-pipeline train` end to end vs a bare PyTorch loop (issue 18, item 3a)\n\n"
                f"Machine: {machine()}. Load average (1 min/5 min) at start: {load_at_start}.\n\n"
                f"### train end to end\n\n`{command}`\n\n```\n{text}\n```\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--preset", default="tiny")
    p.add_argument("--image-size", type=int, default=64, help="the model's resolution (the crop size)")
    p.add_argument("--source-size", type=int, default=96, help="the JPEGs' size in the shards")
    p.add_argument("--shards", type=int, default=8)
    p.add_argument("--per-shard", type=int, default=512)
    p.add_argument("--skip", type=int, default=20, help="warm-up steps left out of the per-step figures")
    p.add_argument("--results", default=str(HERE / "RESULTS.md"))
    p.add_argument("--no-results", action="store_true", help="print only (bench/run_all.py records the output)")
    args = p.parse_args()
    if args.skip < 1 or args.skip >= args.steps:
        p.error("--skip must be in [1, steps)")
    load_at_start = load()
    cfg = TrainConfig()
    with tempfile.TemporaryDirectory(prefix="train-e2e-") as folder:
        tmp = Path(folder)
        made = time.perf_counter()
        corpus = write_corpus(tmp / "corpus", args.shards, args.per_shard, args.source_size)
        print(f"corpus: {args.shards} shards x {args.per_shard} JPEGs of {args.source_size} px "
              f"({time.perf_counter() - made:.1f} s to write, not timed); {os.cpu_count()} cores", flush=True)
        bare = run_bare(corpus, args, cfg, tmp)
        train = run_train(corpus, args, tmp)
    text = table(args, bare, train)
    print(text)
    if not args.no_results:
        command = f".venv/bin/python bench/train_e2e_bench.py {' '.join(sys.argv[1:])}".strip()
        append_results(Path(args.results), command, text, load_at_start)
        print(f"appended to {args.results}")


if __name__ == "__main__":
    main()
