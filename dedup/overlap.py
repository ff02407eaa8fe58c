"""Data-overlap analysis of CLIP Section 5 and Appendix C.

For each eval set the duplicate detector splits the examples into Overlap (a training image
matched it) and Clean; the report gives N, overlap %, zero-shot accuracy on All, Clean and
Overlap, All - Clean (the paper's main metric), a one-tailed binomial test of the Overlap
accuracy with the Clean accuracy as the null (is the model better on what it may have seen?)
and a 99.5% Clopper-Pearson interval on the Overlap accuracy. Radford et al. (2021) found a
median overlap of 2.2% and at most +0.6% All - Clean (Birdsnap).
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass

import fsspec
import numpy as np
import pyarrow.parquet as pq
from scipy.stats import binomtest

from clip_core.data.parquet import atomic_open, write_json
from clip_core.errors import InputError

CONFIDENCE = 0.995


@dataclass(frozen=True)
class OverlapStats:
    eval_set: str
    n: int
    n_overlap: int
    overlap_pct: float
    acc_all: float
    acc_clean: float
    acc_overlap: float  # NaN when nothing overlaps
    all_minus_clean: float
    p_value: float  # one-tailed binomial, H1: overlap accuracy > clean accuracy; NaN without overlap
    ci_low: float
    ci_high: float


def _mean(x: np.ndarray) -> float:
    return float(x.mean()) if len(x) else math.nan


def overlap_stats(eval_set: str, correct, overlap_indexes: Iterable[int],
                  confidence: float = CONFIDENCE) -> OverlapStats:
    """Statistics of one eval set from per-example correctness and the overlapping indexes."""
    correct = np.asarray(correct, dtype=bool)
    if correct.ndim != 1:
        raise ValueError(f"{eval_set}: correctness must be a 1-D bool array, got shape {correct.shape}")
    idx = np.unique(np.asarray(list(overlap_indexes), dtype=np.int64))
    if len(idx) and (idx.min() < 0 or idx.max() >= len(correct)):
        raise ValueError(f"{eval_set}: overlap index out of range for {len(correct)} examples "
                         f"(matches from a different split or eval set?)")
    mask = np.zeros(len(correct), bool)
    mask[idx] = True
    acc_all, acc_clean, acc_over = _mean(correct), _mean(correct[~mask]), _mean(correct[mask])
    p, lo, hi = _binomial(int(correct[mask].sum()), int(mask.sum()), acc_clean, confidence)
    return OverlapStats(eval_set, len(correct), int(mask.sum()), 100.0 * _mean(mask) if len(mask) else math.nan,
                        acc_all, acc_clean, acc_over, acc_all - acc_clean, p, lo, hi)


def _binomial(k: int, n: int, p0: float, confidence: float) -> tuple[float, float, float]:
    """(one-tailed p-value of k/n > p0, Clopper-Pearson interval on k/n); NaNs when n == 0."""
    if n == 0:
        return math.nan, math.nan, math.nan
    p0 = min(max(p0, 0.0), 1.0) if not math.isnan(p0) else 0.5  # no clean examples: test against chance 0.5
    test = binomtest(k, n, p0, alternative="greater")
    ci = binomtest(k, n).proportion_ci(confidence_level=confidence, method="exact")
    return float(test.pvalue), float(ci.low), float(ci.high)


def overlap_table(correct_by_set: Mapping[str, np.ndarray], overlap_by_set: Mapping[str, Iterable[int]],
                  confidence: float = CONFIDENCE) -> list[OverlapStats]:
    """Stats for every eval set in `correct_by_set` (missing from overlaps: no overlap)."""
    unknown = sorted(set(overlap_by_set) - set(correct_by_set))
    if unknown:
        raise ValueError(f"overlaps given for eval sets without correctness: {unknown}")
    return [overlap_stats(name, correct, overlap_by_set.get(name, ()), confidence)
            for name, correct in correct_by_set.items()]


MATCH_COLUMNS = ("eval_set", "eval_index")
_MATCHES_FIX = "pass the matches.parquet that `clip-pipeline dedup` wrote"


def check_matches_file(matches_uri: str, storage_options: dict | None = None) -> None:
    """A Parquet file with eval_set and eval_index columns (InputError naming it otherwise)."""
    fs, path = fsspec.core.url_to_fs(str(matches_uri), **(storage_options or {}))
    if not fs.isfile(path):
        what = "is a folder" if fs.isdir(path) else "no such file"
        raise InputError(f"--matches {matches_uri}", what, _MATCHES_FIX)
    try:
        with fs.open(path, "rb") as f:
            names = pq.read_schema(f).names
    except Exception as err:  # noqa: BLE001 -- pyarrow raises several types for a file that is no Parquet
        raise InputError(f"--matches {matches_uri}", f"not a Parquet file ({err})", _MATCHES_FIX) from err
    missing = [c for c in MATCH_COLUMNS if c not in names]
    if missing:
        raise InputError(f"--matches {matches_uri}", f"no column(s) {missing} (columns: {names})", _MATCHES_FIX)


def read_overlaps(matches_uri: str, storage_options: dict | None = None) -> dict[str, set[int]]:
    """{eval set: overlapping eval indexes} from a dedup `matches.parquet`."""
    check_matches_file(matches_uri, storage_options)
    with fsspec.open(matches_uri, "rb", **(storage_options or {})) as f:
        table = pq.read_table(f, columns=list(MATCH_COLUMNS))
    out: dict[str, set[int]] = {}
    for name, index in zip(table["eval_set"].to_pylist(), table["eval_index"].to_pylist()):
        out.setdefault(name, set()).add(int(index))
    return out


def overlap_from_matches(matches_uri: str, correct_by_set: Mapping[str, np.ndarray], out_dir: str | None = None,
                         confidence: float = CONFIDENCE, storage_options: dict | None = None) -> list[OverlapStats]:
    """Overlap stats from a matches file; writes the report too when `out_dir` is given."""
    overlaps = {k: v for k, v in read_overlaps(matches_uri, storage_options).items() if k in correct_by_set}
    if out_dir is not None:
        return overlap_report(correct_by_set, overlaps, out_dir, confidence, storage_options)
    return overlap_table(correct_by_set, overlaps, confidence)


def _clean_json(value):
    """NaN -> None, so the JSON is standard."""
    return None if isinstance(value, float) and math.isnan(value) else value


def summary(stats: list[OverlapStats]) -> dict:
    """Median and mean overlap %, sets without overlap, largest All - Clean: the paper's summary."""
    pct = np.array([s.overlap_pct for s in stats if not math.isnan(s.overlap_pct)])
    delta = [s for s in stats if not math.isnan(s.all_minus_clean)]
    best = max(delta, key=lambda s: s.all_minus_clean, default=None)
    return {"n_sets": len(stats), "median_overlap_pct": float(np.median(pct)) if len(pct) else None,
            "mean_overlap_pct": float(pct.mean()) if len(pct) else None,
            "sets_without_overlap": sum(s.n_overlap == 0 for s in stats),
            "largest_gain": {"eval_set": best.eval_set, "all_minus_clean": best.all_minus_clean} if best else None}


def overlap_report(correct_by_set: Mapping[str, np.ndarray], overlap_by_set: Mapping[str, Iterable[int]],
                   out_dir: str, confidence: float = CONFIDENCE,
                   storage_options: dict | None = None) -> list[OverlapStats]:
    """Write overlap.json, overlap.md and overlap.png under `out_dir`; returns the stats."""
    from dedup.report import markdown_table, overlap_plot
    stats = overlap_table(correct_by_set, overlap_by_set, confidence)
    fs, root = fsspec.core.url_to_fs(out_dir, **(storage_options or {}))
    fs.makedirs(root, exist_ok=True)
    rows = [{k: _clean_json(v) for k, v in asdict(s).items()} for s in stats]
    doc = {"confidence": confidence, "test": "one-tailed binomial, H1: overlap acc > clean acc",
           "summary": summary(stats), "eval_sets": rows}
    # each file appears whole (written aside, renamed); overlap.json, the record, comes last
    with atomic_open(fs, f"{root}/overlap.png") as f:
        f.write(overlap_plot(stats, confidence))
    with atomic_open(fs, f"{root}/overlap.md") as f:
        f.write(markdown_table(stats, confidence).encode("utf-8"))
    write_json(fs, f"{root}/overlap.json", doc, allow_nan=False)
    return stats
