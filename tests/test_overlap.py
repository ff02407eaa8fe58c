"""dedup/overlap.py: CLIP Section 5 overlap statistics against scipy on known numbers."""
import json
import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from scipy.stats import binomtest

from dedup.near_dup import MATCH_SCHEMA
from dedup.overlap import overlap_from_matches, overlap_report, overlap_stats, read_overlaps


def _known():
    """100 examples: 10 overlap (9 correct), 90 clean (60 correct)."""
    correct = np.zeros(100, bool)
    overlap = np.arange(0, 100, 10)  # 0, 10, ..., 90
    correct[overlap[:9]] = True
    clean = np.setdiff1d(np.arange(100), overlap)
    correct[clean[:60]] = True
    return correct, overlap


def test_stats_on_known_numbers_match_scipy():
    correct, overlap = _known()
    s = overlap_stats("toy", correct, overlap)
    assert (s.n, s.n_overlap, s.overlap_pct) == (100, 10, 10.0)
    assert s.acc_all == pytest.approx(0.69)
    assert s.acc_clean == pytest.approx(60 / 90)
    assert s.acc_overlap == pytest.approx(0.9)
    assert s.all_minus_clean == pytest.approx(0.69 - 60 / 90)
    assert s.p_value == pytest.approx(binomtest(9, 10, 60 / 90, alternative="greater").pvalue)
    ci = binomtest(9, 10).proportion_ci(confidence_level=0.995, method="exact")
    assert (s.ci_low, s.ci_high) == pytest.approx((ci.low, ci.high))


def test_p_value_is_the_upper_binomial_tail():
    correct, overlap = _known()
    s = overlap_stats("toy", correct, overlap)
    p0 = 60 / 90
    tail = sum(math.comb(10, k) * p0 ** k * (1 - p0) ** (10 - k) for k in (9, 10))
    assert s.p_value == pytest.approx(tail)


def test_duplicate_indexes_count_once_and_no_overlap_gives_nans():
    correct, overlap = _known()
    assert overlap_stats("toy", correct, list(overlap) * 3).n_overlap == 10
    s = overlap_stats("none", correct, [])
    assert s.n_overlap == 0 and s.all_minus_clean == 0.0
    assert math.isnan(s.acc_overlap) and math.isnan(s.p_value) and math.isnan(s.ci_low)


def test_out_of_range_overlap_index_is_an_error():
    with pytest.raises(ValueError, match="out of range"):
        overlap_stats("toy", np.ones(5, bool), [7])


def test_report_files(tmp_path):
    correct, overlap = _known()
    stats = overlap_report({"toy": correct, "clean": correct}, {"toy": overlap}, str(tmp_path))
    assert [s.eval_set for s in stats] == ["toy", "clean"]
    doc = json.loads((tmp_path / "overlap.json").read_text())  # standard JSON: NaN written as null
    assert doc["eval_sets"][1]["p_value"] is None
    assert doc["summary"]["sets_without_overlap"] == 1
    table = (tmp_path / "overlap.md").read_text()
    assert "| toy | 100 | 10 | 10.0 | 69.0 | 66.7 | 90.0 | +2.33 |" in table
    assert (tmp_path / "overlap.png").read_bytes()[:4] == b"\x89PNG"


def test_overlap_from_matches(tmp_path):
    correct, overlap = _known()
    rows = [{"key": f"k{i}", "eval_set": "toy", "eval_index": int(i), "similarity": 0.9, "descriptor": "phash"}
            for i in overlap] + [{"key": "x", "eval_set": "other", "eval_index": 3, "similarity": 1.0,
                                  "descriptor": "phash"}]
    pq.write_table(pa.Table.from_pylist(rows, schema=MATCH_SCHEMA), tmp_path / "matches.parquet")
    assert read_overlaps(str(tmp_path / "matches.parquet"))["toy"] == set(overlap.tolist())
    stats = overlap_from_matches(str(tmp_path / "matches.parquet"), {"toy": correct}, str(tmp_path / "report"))
    assert stats[0].n_overlap == 10
    assert (tmp_path / "report" / "overlap.md").exists()
