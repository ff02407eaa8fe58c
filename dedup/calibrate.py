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
MIN_POSITIVES = 200  # positive pairs a calibration draws at least, whatever the eval set's size


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
    """The threshold t of most recall with precision >= target when pairs already caught (tp0, fp0)
    count too; of the thresholds with that recall, the highest: the weakest positive it needs.

    Any lower threshold with the same recall only lets more negatives through: the lowest
    admissible one sat on the edge of the calibration negatives, and unseen photos crossed it
    (held-out real photos, bench/dedup_heldout.py: precision 0.59-0.94 at the lowest, 0.91-1.0
    midway in the gap, 0.97-1.0 here, recall 1.0 in all three).

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
    admissible = np.flatnonzero(ok)
    i = admissible[np.argmax(tp[admissible])]  # most recall; the first such: fewest false matches
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

    An eval image that every descriptor finds at least as close to the source as the copy is
    (an eval-internal duplicate) is no false match: that negative becomes -inf. One descriptor
    alone is not enough: a weak copy under pHash scores like an unrelated image, and dropping
    those hard negatives set pHash's threshold where chance matches pass. Also returns the (n,)
    internal-duplicate mask.
    """
    from dedup.descriptors import encode, pair_similarity
    codes = encode(descriptors, images)
    pos, neg, internal = [], [], np.ones(len(sources), bool)
    for d in descriptors:
        pos.append(pair_similarity(d, ref.codes[d.name][sources], codes[d.name]))
        top, ids = ref.index(d, device).search(codes[d.name], k=2)
        score, other = loo_negatives(top, ids, sources)
        between = pair_similarity(d, ref.codes[d.name][sources], ref.codes[d.name][other])
        internal &= (other != sources) & (between >= pos[-1])
        neg.append(score)
    neg = [np.where(internal, -np.inf, n) for n in neg]
    return np.stack(pos, 1), np.stack(neg, 1), internal


def top1_scores(descriptors, ref, images, device: str = "cpu") -> np.ndarray:
    """Best score (n, m) of each image against the eval index: negatives when none is a copy."""
    from dedup.descriptors import encode
    return top1_of_codes(descriptors, ref, encode(descriptors, images), device)


def top1_of_codes(descriptors, ref, codes: dict, device: str = "cpu") -> np.ndarray:
    """Best score (n, m) against the eval index of images already encoded (`codes` by descriptor)."""
    return np.stack([ref.index(d, device).search(codes[d.name], k=1)[0][:, 0] for d in descriptors], 1)


def calibration_copies(reservoir, rng: np.random.Generator, min_positives: int = MIN_POSITIVES):
    """(rows, copies): copies of the reservoir's images, several of each when it is small, so that
    at least `min_positives` positive pairs set the thresholds (16 eval images gave 16 pairs, and
    one image's size moved the thresholds)."""
    from dedup.augment import copy_of
    per_image = max(1, -(-min_positives // max(len(reservoir), 1)))
    rows = np.array([row for row, _ in reservoir for _ in range(per_image)], np.int64)
    copies = [copy_of(img, rng) for _, img in reservoir for _ in range(per_image)]
    return rows, copies


def calibrate_reference(descriptors, ref, reservoir, precision: float, rng: np.random.Generator,
                        negatives=(), device: str = "cpu", pool_scores: np.ndarray | None = None) -> Calibration:
    """Calibrate an eval reference on copies of its `reservoir` [(row, image)], held-out negatives
    (images of the set's train split) and `pool_scores`: the best score (n, m) against this
    reference of every image of the shared negative pool (`negative_pool`)."""
    rows, copies = calibration_copies(reservoir, rng)
    pos, neg, internal = copy_scores(descriptors, ref, copies, rows, device)
    parts = [neg]
    if len(negatives):
        parts.append(top1_scores(descriptors, ref, list(negatives), device))
    if pool_scores is not None and len(pool_scores):
        parts.append(pool_scores)
    neg = np.concatenate(parts)
    result = calibrate(pos, neg, precision)
    ref.thresholds = {d.name: t for d, t in zip(descriptors, result.thresholds)}
    ref.calibration = {**result.to_dict(), "precision_target": precision, "held_out_negatives": len(negatives),
                       "pool_negatives": 0 if pool_scores is None else len(pool_scores),
                       "eval_internal_duplicates": int(internal.sum())}
    return result
