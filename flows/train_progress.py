"""Training progress a person can read: step of total, loss, samples/s, time left.

Ray Train's workers print through Ray's log forwarding (every line prefixed with its actor and
pid, mixed with Ray's own messages); `clip-pipeline train` turns that forwarding off unless
asked (`--ray-logs`) and prints its own lines instead. Rank 0 posts its progress, at log
intervals and without waiting, to a small `ProgressBoard` actor; a thread on the driver reads
the board about once a second and prints a line when the step moved:

    train: step 120/400  loss 3.214  812 samples/s  0:41 left

The time left is measured on the driver from the steps it has seen (so it includes the
callbacks, checkpoints and data waits the run really pays). Notes (the precision chosen, a
resume) come the same way and print once.
"""
from __future__ import annotations

import contextlib
import sys
import threading
import time
from typing import TextIO

import ray


@ray.remote(num_cpus=0)
class ProgressBoard:
    """The latest progress row of a run and its pending notes (rank 0 writes, the driver reads)."""

    def __init__(self):
        self.row, self.notes = None, []

    def update(self, row: dict) -> None:
        self.row = row

    def note(self, text: str) -> None:
        self.notes.append(text)

    def read(self) -> tuple[dict | None, list[str]]:
        notes, self.notes = self.notes, []
        return self.row, notes


class ProgressCallback:
    """Rank 0: post step, total, loss and samples/s to the board every `every` steps and at the end."""

    def __init__(self, board, total: int, every: int, world: int = 1):
        self.board, self.total, self.every, self.world = board, total, every, world

    def on_train_start(self, trainer) -> None:
        if trainer.step:
            self.board.note.remote(f"continuing from step {trainer.step}")

    def on_step_end(self, trainer) -> None:
        if trainer.step % self.every == 0 or trainer.step == self.total:
            m = trainer.metrics
            self.board.update.remote({"step": trainer.step, "total": self.total, "loss": float(m["loss"]),
                                      "samples_per_s": float(m.get("samples_per_s", 0.0)) * self.world})


def clock(seconds: float) -> str:
    """0:41, 12:05, 1:02:07."""
    seconds = int(round(max(seconds, 0)))
    h, rest = divmod(seconds, 3600)
    return f"{h}:{rest // 60:02d}:{rest % 60:02d}" if h else f"{rest // 60}:{rest % 60:02d}"


class ProgressPrinter:
    """Formats board rows as lines; the time left comes from the steps seen and when they were seen."""

    def __init__(self, stream: TextIO | None = None, clock_fn=time.monotonic):
        self.stream, self.clock = stream or sys.stdout, clock_fn
        self.first: tuple[float, int] | None = None
        self.last_step = None

    def line(self, row: dict, now: float) -> str:
        step, total = row["step"], row["total"]
        if self.first is None or step < self.first[1]:
            self.first = (now, step)
        t0, s0 = self.first
        left = ""
        if step > s0 and step < total:
            left = f"  {clock((now - t0) / (step - s0) * (total - step))} left"
        elif step >= total:
            left = "  done"
        return (f"train: step {step}/{total}  loss {row['loss']:.3f}  "
                f"{row['samples_per_s']:.0f} samples/s{left}")

    def show(self, row: dict | None, notes: list[str]) -> None:
        for text in notes:
            print(f"train: {text}", file=self.stream, flush=True)
        if row is not None and row["step"] != self.last_step:
            self.last_step = row["step"]
            print(self.line(row, self.clock()), file=self.stream, flush=True)


@contextlib.contextmanager
def watch_progress(board, stream: TextIO | None = None, every: float = 1.0):
    """Print the board's progress from a driver thread while the block runs (and once more at its end)."""
    printer, stop = ProgressPrinter(stream), threading.Event()

    def poll():
        with contextlib.suppress(Exception):  # the board is gone (Ray shut down): nothing more to show
            printer.show(*ray.get(board.read.remote(), timeout=10))

    def loop():
        while not stop.wait(every):
            poll()

    thread = threading.Thread(target=loop, name="train-progress", daemon=True)
    thread.start()
    try:
        yield printer
    finally:
        stop.set()
        thread.join(timeout=15)
        poll()
