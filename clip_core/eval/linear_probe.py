"""Linear-probe evaluation on frozen features (Radford et al. 2021, Section 3.2, Appendix A.3).

The paper's protocol: scikit-learn's L-BFGS logistic regression (max 1,000 iterations) on
frozen image features; the L2 strength swept over 1e-6..1e6 on a validation split with a
parametric binary search -- start at [1e-6, 1e-4, ..., 1e6], then repeatedly halve the
step around the best value until 8 steps per decade. Here the validation split is carved
from train (stratified), the sweep is over scikit-learn's C (= 1/strength, the same
log-symmetric range), and the probe is refit on train + validation at the best C before
the test split is scored.
"""
from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split
from threadpoolctl import threadpool_limits

from clip_core.eval.datasets import EvalSet, load_eval_set
from clip_core.eval.features import extract_split
from clip_core.eval.zeroshot import check_labels, classification_metrics

__all__ = ["LinearProbeResult", "fit_probe", "probe_logits", "validation_split", "log_binary_search", "sweep_C",
           "linear_probe", "evaluate_linear_probe"]

SMALL_PROBLEM = 1 << 20  # feature-matrix entries below which the probe fits single-threaded


@dataclass
class LinearProbeResult:
    """Test metrics, the chosen C, validation accuracy per log10(C), per-example correctness."""

    metrics: dict[str, float | None]
    C: float
    val_scores: dict[float, float] = field(default_factory=dict)
    correct: np.ndarray | None = None  # (N_test,) bool


def _blas_limit(features: np.ndarray):
    """One BLAS thread for small problems: there, threads only contend (10-100x slower on a busy CPU)."""
    small = features.size < SMALL_PROBLEM
    return threadpool_limits(limits=1, user_api="blas") if small else contextlib.nullcontext()


def fit_probe(features: np.ndarray, labels: np.ndarray, C: float, max_iter: int = 1000) -> LogisticRegression:
    """L2 logistic regression (L-BFGS) on features."""
    probe = LogisticRegression(C=C, solver="lbfgs", max_iter=max_iter)
    with warnings.catch_warnings(), _blas_limit(features):
        warnings.simplefilter("ignore", ConvergenceWarning)  # extreme C in the sweep may not converge
        return probe.fit(features, labels)


def probe_logits(probe: LogisticRegression, features: np.ndarray, num_classes: int) -> torch.Tensor:
    """(N, num_classes) log-probabilities; classes absent from training get -inf."""
    logits = torch.full((len(features), num_classes), float("-inf"), dtype=torch.float64)
    logits[:, torch.as_tensor(probe.classes_)] = torch.from_numpy(probe.predict_log_proba(features))
    return logits


def validation_split(labels: np.ndarray, val_fraction: float = 0.2,
                     seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(train, val) indices; stratified when every class has at least two examples."""
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    index = np.arange(len(labels))
    counts = np.bincount(labels)
    stratify = labels if counts[counts > 0].min() >= 2 else None
    try:
        train, val = train_test_split(index, test_size=val_fraction, random_state=seed, stratify=stratify)
    except ValueError:  # too few examples per class for the requested fraction
        train, val = train_test_split(index, test_size=val_fraction, random_state=seed)
    return np.sort(train), np.sort(val)


def _accuracy(probe: LogisticRegression, features: np.ndarray, labels: np.ndarray) -> float:
    return float(np.mean(probe.predict(features) == labels))


def log_binary_search(score: Callable[[float], float], lo: float = -6.0, hi: float = 6.0,
                      coarse_step: float = 2.0, steps_per_decade: int = 8) -> float:
    """The exponent maximising score: a coarse grid, then halve the step around the peak.

    Ties go to the smaller exponent (for C: the stronger regularisation).
    """
    best = max(np.arange(lo, hi + 1e-9, coarse_step), key=lambda e: (score(e), -e))
    step = coarse_step / 2
    while step >= 1.0 / steps_per_decade - 1e-9:
        candidates = [e for e in (best - step, best, best + step) if lo - 1e-9 <= e <= hi + 1e-9]
        best = max(candidates, key=lambda e: (score(e), -e))
        step /= 2
    return float(best)


def sweep_C(train_x: np.ndarray, train_y: np.ndarray, val_x: np.ndarray, val_y: np.ndarray, *,
            log10_range: tuple[float, float] = (-6.0, 6.0), steps_per_decade: int = 8,
            max_iter: int = 1000) -> tuple[float, dict[float, float]]:
    """Best C by validation accuracy, and the accuracy at every log10(C) tried."""
    scores: dict[float, float] = {}

    def score(e: float) -> float:
        e = round(float(e), 6)
        if e not in scores:
            scores[e] = _accuracy(fit_probe(train_x, train_y, 10.0 ** e, max_iter), val_x, val_y)
        return scores[e]

    best = log_binary_search(score, *log10_range, steps_per_decade=steps_per_decade)
    return 10.0 ** best, scores


def _as_numpy(x) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def linear_probe(train_features, train_labels, test_features, test_labels, *, num_classes: int | None = None,
                 val_fraction: float = 0.2, seed: int = 0, max_iter: int = 1000, C: float | None = None,
                 steps_per_decade: int = 8) -> LinearProbeResult:
    """Sweep C on a validation split of train, refit on all of train, score the test split."""
    train_x, test_x = _as_numpy(train_features).astype(np.float64), _as_numpy(test_features).astype(np.float64)
    train_y, test_y = _as_numpy(train_labels).astype(np.int64), _as_numpy(test_labels).astype(np.int64)
    if len(train_x) == 0 or len(test_x) == 0:
        raise ValueError("linear probe needs non-empty train and test features")
    if len(np.unique(train_y)) < 2:
        raise ValueError("linear probe needs at least two classes in the train split")
    num_classes = num_classes or int(max(train_y.max(), test_y.max())) + 1
    check_labels(train_y, num_classes)
    scores = {}
    if C is None:
        fit, val = validation_split(train_y, val_fraction, seed)
        C, scores = sweep_C(train_x[fit], train_y[fit], train_x[val], train_y[val],
                            steps_per_decade=steps_per_decade, max_iter=max_iter)
    probe = fit_probe(train_x, train_y, C, max_iter)
    result = classification_metrics(probe_logits(probe, test_x, num_classes), test_y)
    return LinearProbeResult(result.metrics, float(C), scores, result.correct)


def evaluate_linear_probe(model, eval_set: EvalSet | str, *, train_split: str = "train", batch_size: int = 64,
                          transform=None, device=None, progress: bool | None = None,
                          val_fraction: float = 0.2, seed: int = 0, max_iter: int = 1000,
                          num_workers: int = 0) -> LinearProbeResult:
    """Linear probe of a model's normalised image features on an eval set's train/test splits."""
    eval_set = load_eval_set(eval_set) if isinstance(eval_set, str) else eval_set
    if eval_set.kind != "classification":
        raise ValueError(f"eval set {eval_set.name} is a {eval_set.kind} set; a linear probe needs labels")
    if train_split not in eval_set.splits:
        raise ValueError(f"eval set {eval_set.name} has no {train_split!r} split for the linear probe "
                         f"(splits: {', '.join(eval_set.splits)})")
    kwargs = dict(batch_size=batch_size, transform=transform, device=device, progress=progress,
                  num_workers=num_workers)
    train = extract_split(model, eval_set.root, train_split, **kwargs)
    test = extract_split(model, eval_set.root, eval_set.split, **kwargs)
    return linear_probe(train.image_features, train.labels, test.image_features, test.labels,
                        num_classes=eval_set.num_classes or None, val_fraction=val_fraction, seed=seed,
                        max_iter=max_iter)
