"""The GPU benchmark's harness runs end to end on a CPU (tiny preset), and its MFU is the formula."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_step_harness_on_cpu():
    done = subprocess.run([sys.executable, "bench/gpu_step.py", "--device", "cpu", "--presets", "tiny", "--batch", "8",
                           "--steps", "2", "--warmup", "1", "--loader-workers", "0", "--peak-tflops", "0.5"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    row = next(line for line in done.stdout.splitlines() if line.startswith("| tiny |"))
    gflops, rate, mfu, fed, wait, path_rate, path_mfu, wall = re.match(
        r"\| tiny \| ([\d.]+) \| ([\d,]+) \| ([\d.]+)% \| ([\d,]+) \| ([\d.]+)% \| ([\d,]+) \| ([\d.]+)% \| (\d+) \|",
        row).groups()
    rate = float(rate.replace(",", ""))
    assert float(gflops) > 0 and rate > 0 and float(fed.replace(",", "")) > 0 and 0 <= float(wait) <= 100
    # the whole `clip-pipeline train` path ran, and its MFU is its own samples/s over the same peak
    path_rate = float(path_rate.replace(",", ""))
    assert path_rate > 0 and int(wall) > 0
    assert float(path_mfu) == pytest.approx(100 * path_rate * float(gflops) * 1e9 / 0.5e12, rel=0.1, abs=0.15)
    # MFU = samples/s x FLOPs per sample / peak (rate is rounded to a whole sample/s in the table)
    assert float(mfu) == pytest.approx(100 * rate * float(gflops) * 1e9 / 0.5e12, rel=0.1, abs=0.15)


def test_gpu_step_says_when_there_is_no_gpu():
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}  # hides a GPU where there is one
    done = subprocess.run([sys.executable, "bench/gpu_step.py"], cwd=REPO, capture_output=True, text=True, timeout=120,
                          env=env)
    assert done.returncode == 0 and "no CUDA device here" in done.stdout
