"""Calibrated match thresholds: the highest recall that keeps precision at a target.

CLIP (Radford et al. 2021), Appendix C, chose each dataset's threshold "by hand inspection"
for high precision. Here the choice is measured instead: positives are an eval image and
its own moderate copy (`augment.copy_of`), negatives are the best match of that copy among
the *other* eval images, plus any held-out images that are not in the eval set. The
threshold (or, for an OR of several descriptors, the pair of thresholds) maximises recall
subject to precision >= the target on those pairs.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

MAX_GRID = 128  # candidate thresholds tried on the first descriptor of an OR pair


@dataclass(frozen=True)
class Calibration:
    thresholds: tuple  # one per descriptor; match if any score >= its threshold
    precision: float
    recall: float
    n_pos: int
    n_neg: int
    feasible: bool  # False: no threshold reaches the precision target; matches nothing

    def to_dict(self) -> dict:
        return {**asdict(self), "thresholds": [float(t) for t in self.thresholds]}


def precision_recall(pos: np.ndarray, neg: np.ndarray, thresholds) -> tuple[float, float]:
    """Precision and recall of "any score >= its threshold" on (P, m) and (N, m) scores."""
    pos, neg = np.atleast_2d(pos.T).T, np.atleast_2d(neg.T).T
    t = np.asarray(thresholds, np.float64)
    tp, fp = int((pos >= t).any(axis=1).sum()), int((neg >= t).any(axis=1).sum())
    return (tp / (tp + fp) if tp + fp else 1.0), (tp / len(pos) if len(pos) else 0.0)


def _sweep(pos: np.ndarray, neg: np.ndarray, precision: float, tp0: int = 0, fp0: int = 0):
    """Lowest threshold t with precision >= target when pairs already caught (tp0, fp0) count too.

    Returns (threshold, tp, fp) or None. Predictions are `score >= t`; ties move together.
    """
    scores = np.concatenate([pos, neg])
    is_pos = np.concatenate([np.ones(len(pos), bool), np.zeros(len(neg), bool)])
    order = np.argsort(-scores, kind="stable")
    scores, is_pos = scores[order], is_pos[order]
    tp, fp = tp0 + np.cumsum(is_pos), fp0 + np.cumsum(~is_pos)
    last_of_tie = np.r_[scores[1:] != scores[:-1], True]  # a threshold takes a whole tie group
    ok = last_of_tie & (tp >= precision * (tp + fp)) & (tp > 0)
    if not ok.any():
        return None
    i = np.flatnonzero(ok)[-1]  # lowest admissible threshold = most recall
    return float(scores[i]), int(tp[i]), int(fp[i])


def _infeasible(pos: np.ndarray, neg: np.ndarray) -> Calibration:
    top = np.concatenate([pos, neg]).max(axis=0) if len(pos) + len(neg) else np.zeros(pos.shape[1])
    above = tuple(float(np.nextafter(t, np.inf)) for t in top)
    return Calibration(above, 1.0, 0.0, len(pos), len(neg), False)


def calibrate(pos, neg, precision: float = 0.99) -> Calibration:
    """Thresholds maximising recall at precision >= target; pos/neg are (n,) or (n, m<=2) scores."""
    pos, neg = np.asarray(pos, np.float64), np.asarray(neg, np.float64)
    pos, neg = pos.reshape(len(pos), -1), neg.reshape(len(neg), -1)
    if pos.shape[1] != neg.shape[1]:
        raise ValueError(f"positives have {pos.shape[1]} score columns, negatives {neg.shape[1]}")
    if not 0 < precision <= 1:
        raise ValueError(f"precision target must be in (0, 1], got {precision}")
    if len(pos) == 0:
        raise ValueError("calibration needs at least one positive pair")
    if pos.shape[1] == 1:
        found = _sweep(pos[:, 0], neg[:, 0], precision)
        if found is None:
            return _infeasible(pos, neg)
        t, tp, fp = found
        return Calibration((t,), tp / (tp + fp), tp / len(pos), len(pos), len(neg), True)
    if pos.shape[1] == 2:
        return _calibrate_or(pos, neg, precision)
    raise ValueError("an OR of more than two descriptors is not supported")


def _grid(values: np.ndarray) -> np.ndarray:
    """Candidate thresholds for the first descriptor: its unique scores, or quantiles of them."""
    u = np.unique(values)
    if len(u) > MAX_GRID:
        u = np.unique(np.quantile(u, np.linspace(0, 1, MAX_GRID), method="nearest"))
    return np.r_[u, np.nextafter(u.max(), np.inf)]  # the last one: first descriptor alone off


def _calibrate_or(pos: np.ndarray, neg: np.ndarray, precision: float) -> Calibration:
    """Best (t_a, t_b) for "a >= t_a or b >= t_b": grid over t_a, exact sweep over t_b."""
    best = None
    for ta in _grid(np.concatenate([pos[:, 0], neg[:, 0]])):
        caught_p, caught_n = pos[:, 0] >= ta, neg[:, 0] >= ta
        tp0, fp0 = int(caught_p.sum()), int(caught_n.sum())
        found = _sweep(pos[~caught_p, 1], neg[~caught_n, 1], precision, tp0, fp0)
        if found is None:
            if tp0 and tp0 >= precision * (tp0 + fp0):  # a alone, b switched off
                found = (float(np.nextafter(max(pos[:, 1].max(), neg[:, 1].max(initial=-np.inf)), np.inf)), tp0, fp0)
            else:
                continue
        tb, tp, fp = found
        if best is None or (tp, -fp) > (best[2], -best[3]):
            best = (ta, tb, tp, fp)
    if best is None:
        return _infeasible(pos, neg)
    ta, tb, tp, fp = best
    return Calibration((float(ta), float(tb)), tp / (tp + fp), tp / len(pos), len(pos), len(neg), True)


def loo_negatives(top_scores: np.ndarray, top_ids: np.ndarray, source: np.ndarray):
    """(score, row) of each copy's best match among eval images other than its `source`, from top-2 results."""
    first_is_source = top_ids[:, 0] == source
    if top_scores.shape[1] < 2:  # a one-image eval set: no other image
        return np.full(len(source), -np.inf), source.copy()
    return (np.where(first_is_source, top_scores[:, 1], top_scores[:, 0]),
            np.where(first_is_source, top_ids[:, 1], top_ids[:, 0]))


def copy_scores(descriptors, ref, images, sources, device: str = "cpu"):
    """Positive and leave-one-out negative scores (n, m) of copies of the eval rows `sources`.

    An eval image at least as close to the source as the copy is (an eval-internal duplicate)
    is no false match: that negative becomes -inf. Also returns the (n,) internal-duplicate mask.
    """
    from dedup.descriptors import encode, pair_similarity
    codes = encode(descriptors, images)
    pos, neg, internal = [], [], np.zeros(len(sources), bool)
    for d in descriptors:
        pos.append(pair_similarity(d, ref.codes[d.name][sources], codes[d.name]))
        top, ids = ref.index(d, device).search(codes[d.name], k=2)
        score, other = loo_negatives(top, ids, sources)
        between = pair_similarity(d, ref.codes[d.name][sources], ref.codes[d.name][other])
        twin = (other != sources) & (between >= pos[-1])
        neg.append(np.where(twin, -np.inf, score))
        internal |= twin
    return np.stack(pos, 1), np.stack(neg, 1), internal


def top1_scores(descriptors, ref, images, device: str = "cpu") -> np.ndarray:
    """Best score (n, m) of each image against the eval index: negatives when none is a copy."""
    from dedup.descriptors import encode
    codes = encode(descriptors, images)
    return np.stack([ref.index(d, device).search(codes[d.name], k=1)[0][:, 0] for d in descriptors], 1)


def calibrate_reference(descriptors, ref, reservoir, precision: float, rng: np.random.Generator,
                        negatives=(), device: str = "cpu") -> Calibration:
    """Calibrate an eval reference on copies of its `reservoir` [(row, image)] and held-out negatives."""
    from dedup.augment import copy_of
    rows = np.array([row for row, _ in reservoir], np.int64)
    copies = [copy_of(img, rng) for _, img in reservoir]
    pos, neg, internal = copy_scores(descriptors, ref, copies, rows, device)
    if len(negatives):
        neg = np.concatenate([neg, top1_scores(descriptors, ref, list(negatives), device)])
    result = calibrate(pos, neg, precision)
    ref.thresholds = {d.name: t for d, t in zip(descriptors, result.thresholds)}
    ref.calibration = {**result.to_dict(), "precision_target": precision, "held_out_negatives": len(negatives),
                       "eval_internal_duplicates": int(internal.sum())}
    return result
