"""`make bench`: every benchmark that fits this machine, each against its anchor in the same run.

Runs the bench scripts one after another (never in parallel: they time each other's
cores), captures what each prints (its own table, project figure beside anchor), and
appends a dated section to bench/RESULTS.md with the machine and the exact commands.
`--quick` uses smaller sizes (a few minutes in all); the default sizes are the ones the
issue notes quote.
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

BENCHES = {  # name: (full arguments, quick arguments)
    "tokenizer": (["tokenizer_bench.py"], ["tokenizer_bench.py", "--n", "5000"]),
    "model step": (["model_step.py"], ["model_step.py", "--repeats", "3"]),
    "query list": (["queries_bench.py"], ["queries_bench.py", "--tokens", "1000000", "--workers", "1"]),
    "curation": (["curation_bench.py"], ["curation_bench.py", "--captions", "200000", "--big", "2"]),
    "crawl": (["crawl_bench.py", "--binding-repeats", "3"],
              ["crawl_bench.py", "--images", "600", "--repeats", "3", "--binding-urls", "120"]),
    "extract": (["extract_bench.py"], ["extract_bench.py", "--files", "4", "--pages", "500"]),
    "dedup": (["dedup_bench.py"], ["dedup_bench.py", "--quick"]),
    "ray stages": (["ray_stages_bench.py"], ["ray_stages_bench.py", "--webs", "1", "--crawl-urls", "200"]),
    "train step": (["train_bench.py"], ["train_bench.py", "--steps", "20", "--warmup", "5"]),
    "train end to end": (["train_e2e_bench.py", "--no-results"],
                         ["train_e2e_bench.py", "--steps", "60", "--skip", "10", "--per-shard", "256", "--no-results"]),
}


def machine() -> str:
    """CPU model, cores, memory: what the figures were measured on."""
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else ""
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{cpu}, {os.cpu_count()} cores, {mem:.0f} GiB, Python {platform.python_version()}, no GPU"


def run(name: str, args: list[str], timeout: int) -> tuple[str, float, int]:
    """(output, seconds, exit code) of one bench script."""
    start = time.time()
    try:
        done = subprocess.run([sys.executable, str(HERE / args[0]), *args[1:]], capture_output=True, text=True,
                              timeout=timeout, cwd=HERE.parent)
        out, code = done.stdout + (f"\n[stderr]\n{done.stderr[-2000:]}" if done.returncode else ""), done.returncode
    except subprocess.TimeoutExpired:
        out, code = f"timed out after {timeout} s", 124
    return out.strip(), time.time() - start, code


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller sizes, a few minutes in all")
    parser.add_argument("--only", nargs="+", choices=sorted(BENCHES), help="run these benchmarks only")
    parser.add_argument("--timeout", type=int, default=1200, help="seconds per benchmark")
    parser.add_argument("--results", default=str(HERE / "RESULTS.md"))
    args = parser.parse_args()
    stamp = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    sections = [f"\n## {stamp}{' (quick)' if args.quick else ''}\n\nMachine: {machine()}. "
                f"Load average at start: {os.getloadavg()[0]:.1f}.\n"]
    failed = 0
    for name, (full, quick) in BENCHES.items():
        if args.only and name not in args.only:
            continue
        command = ["python", f"bench/{(quick if args.quick else full)[0]}", *(quick if args.quick else full)[1:]]
        print(f"== {name}: {' '.join(command)}", flush=True)
        out, seconds, code = run(name, quick if args.quick else full, args.timeout)
        print(out, flush=True)
        failed += code != 0
        sections.append(f"### {name}\n\n`{' '.join(command)}` ({seconds:.0f} s{', FAILED' if code else ''})\n\n"
                        f"```\n{out}\n```\n")
    with open(args.results, "a") as f:
        f.write("\n".join(sections))
    print(f"appended to {args.results}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
