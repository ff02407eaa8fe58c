"""The overlap analysis of CLIP Section 5 for a checkpoint: zero-shot per example, split by dedup matches.

For each eval set, the checkpoint's zero-shot top-1 correctness per test image is split into
Overlap (eval images the dedup stage matched to a training image) and Clean, and reported
by `dedup.overlap.overlap_report` (All / Clean / Overlap accuracy, the binomial test and
the Clopper-Pearson interval).
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from dedup.overlap import OverlapStats, overlap_from_matches


def zeroshot_correct(checkpoint: str, eval_dirs: Sequence[str], batch_size: int = 64) -> dict[str, np.ndarray]:
    """Top-1 correctness per test image, in index order, for each classification eval set."""
    from clip_core.eval.datasets import load_eval_set
    from clip_core.eval.run import load_model
    from clip_core.eval.zeroshot import evaluate_zeroshot

    model, _ = load_model(checkpoint)
    correct = {}
    for root in eval_dirs:
        eval_set = load_eval_set(root)
        if eval_set.kind != "classification":
            raise ValueError(f"{root} is a {eval_set.kind} set; the overlap analysis needs classification sets")
        correct[eval_set.name] = evaluate_zeroshot(model, eval_set, batch_size=batch_size, progress=False).correct
    return correct


def run_overlap_analysis(checkpoint: str, eval_dirs: Sequence[str], matches_uri: str, out_dir: str,
                         batch_size: int = 64) -> list[OverlapStats]:
    """Write overlap.json, overlap.md and overlap.png for `checkpoint` under `out_dir`."""
    correct = zeroshot_correct(checkpoint, eval_dirs, batch_size)
    return overlap_from_matches(matches_uri, correct, out_dir)
