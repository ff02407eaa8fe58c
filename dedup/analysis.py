"""The overlap analysis of CLIP Section 5 for a checkpoint: zero-shot per example, split by dedup matches.

For each eval set, the checkpoint's zero-shot top-1 correctness per test image is split into
Overlap (eval images the dedup stage matched to a training image) and Clean, and reported
by `dedup.overlap.overlap_report` (All / Clean / Overlap accuracy, the binomial test and
the Clopper-Pearson interval). Every input is checked before the model runs.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from clip_core.checks import check_out_folder, whole_number
from clip_core.errors import InputError, check
from dedup.overlap import OverlapStats, check_matches_file, overlap_from_matches


def open_classification_sets(eval_dirs: Sequence[str]) -> list:
    """The eval sets, each a classification set with distinct names (InputError otherwise)."""
    from clip_core.eval.datasets import load_eval_set
    check(len(eval_dirs) > 0, "--eval", "no eval sets given", "pass one or more classification eval set folders")
    sets = [load_eval_set(str(root)) for root in eval_dirs]
    for root, eval_set in zip(eval_dirs, sets):
        check(eval_set.kind == "classification", str(root), f"is a {eval_set.kind} set",
              "pass classification sets: classnames.txt and cls labels")
    names = [s.name for s in sets]
    if len(set(names)) != len(names):
        raise InputError("--eval", f"two eval sets share a name ({names})", "rename one folder")
    return sets


def zeroshot_correct(checkpoint: str, eval_dirs: Sequence[str], batch_size: int = 64) -> dict[str, np.ndarray]:
    """Top-1 correctness per test image, in index order, for each classification eval set."""
    from clip_core.weights import load_model
    from clip_core.eval.zeroshot import evaluate_zeroshot

    sets = open_classification_sets(eval_dirs)
    model, _ = load_model(checkpoint)
    return {s.name: evaluate_zeroshot(model, s, batch_size=batch_size, progress=False).correct for s in sets}


def run_overlap_analysis(checkpoint: str, eval_dirs: Sequence[str], matches_uri: str, out_dir: str,
                         batch_size: int = 64) -> list[OverlapStats]:
    """Write overlap.json, overlap.md and overlap.png for `checkpoint` under `out_dir`."""
    whole_number("--batch-size", batch_size)
    check_out_folder("--out", out_dir)
    check_matches_file(matches_uri)
    correct = zeroshot_correct(checkpoint, eval_dirs, batch_size)
    return overlap_from_matches(matches_uri, correct, out_dir)
