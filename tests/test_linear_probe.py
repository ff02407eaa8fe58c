"""Linear probe: separable data, planted label noise, the C search, and the split helper."""
import numpy as np
import pytest
import torch
from threadpoolctl import threadpool_limits

from clip_core.eval.linear_probe import (
    fit_probe, linear_probe, log_binary_search, probe_logits, sweep_C, validation_split,
)


@pytest.fixture(autouse=True)
def _one_blas_thread():
    """Tiny fits: BLAS threads only add contention on a shared CPU (10-100x slower here)."""
    with threadpool_limits(limits=1):
        yield


def blobs(n_per_class: int, n_classes: int = 3, dim: int = 6, seed: int = 0):
    """Well-separated Gaussian blobs: class c centred at 5 * e_c, unit-variance 0.3 noise."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(n_classes), n_per_class)
    centres = 5.0 * np.eye(dim)[:n_classes]
    return centres[labels] + 0.3 * rng.standard_normal((len(labels), dim)), labels


def test_separable_data_is_solved():
    train_x, train_y = blobs(20)
    test_x, test_y = blobs(10, seed=1)
    result = linear_probe(torch.from_numpy(train_x).float(), torch.from_numpy(train_y), test_x, test_y)
    assert result.metrics["acc1"] == 1.0 and result.metrics["mean_per_class_recall"] == 1.0
    assert result.metrics["acc5"] is None  # 3 classes
    assert 1e-6 <= result.C <= 1e6 and result.correct.all()


def test_planted_label_noise_in_test_gives_known_accuracy():
    train_x, train_y = blobs(20, n_classes=5)
    test_x, test_y = blobs(20, n_classes=5, seed=2)
    noisy = test_y.copy()
    flip = np.arange(0, 100, 10)  # exactly 10 of 100 labels moved to the next class
    noisy[flip] = (noisy[flip] + 1) % 5
    result = linear_probe(train_x, train_y, test_x, noisy, C=1.0)
    assert result.metrics["acc1"] == pytest.approx(0.9)
    assert result.metrics["acc5"] == 1.0
    assert (~result.correct).nonzero()[0].tolist() == flip.tolist()


def test_binary_search_reaches_eighth_decades():
    tried = []

    def score(e):
        tried.append(e)
        return -abs(e - 1.375)

    assert log_binary_search(score) == pytest.approx(1.375)
    assert {-6, -4, -2, 0, 2, 4, 6} <= {round(e, 6) for e in tried}
    assert len(tried) <= 7 + 3 * 4  # coarse grid + three candidates per refinement


def test_binary_search_stays_in_range_and_prefers_small_C():
    assert log_binary_search(lambda e: e) == 6.0
    assert log_binary_search(lambda e: 1.0) == -6.0


def test_sweep_avoids_a_prior_only_probe():
    # imbalanced classes: with C = 1e-6 only the (unpenalised) intercept is fit and the
    # probe predicts the majority class; the sweep must move to a C that separates them
    keep = np.r_[0:30, 30:36, 60:66]
    x, y = blobs(30, n_classes=3)
    vx, vy = blobs(30, n_classes=3, seed=3)
    C, scores = sweep_C(x[keep], y[keep], vx[keep], vy[keep])
    assert scores[-6.0] == pytest.approx(30 / 42) and scores[round(float(np.log10(C)), 6)] == 1.0


def test_validation_split_is_stratified_and_disjoint():
    labels = np.repeat(np.arange(4), 10)
    train, val = validation_split(labels, 0.2, seed=0)
    assert len(val) == 8 and not set(train) & set(val) and len(train) + len(val) == 40
    assert sorted(np.bincount(labels[val])) == [2, 2, 2, 2]
    with pytest.raises(ValueError, match="val_fraction"):
        validation_split(labels, 1.5)


def test_class_missing_from_train_gets_minus_inf():
    x, y = blobs(5, n_classes=2)
    probe = fit_probe(x, y, 1.0)
    logits = probe_logits(probe, x[:3], num_classes=4)
    assert logits.shape == (3, 4) and torch.isinf(logits[:, 2:]).all()


def test_bad_input():
    x, y = blobs(5, n_classes=2)
    with pytest.raises(ValueError, match="two classes"):
        linear_probe(x, np.zeros(len(x), dtype=int), x, y)
    with pytest.raises(ValueError, match="label 1 is outside"):
        linear_probe(x, y, x, y, num_classes=1, C=1.0)
    with pytest.raises(ValueError, match="non-empty"):
        linear_probe(x[:0], y[:0], x, y)
