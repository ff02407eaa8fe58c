"""Balancing: at most about t pairs per query (CLIP Sec. 2.2 caps WIT at 20,000 pairs per query;
MetaCLIP Sec. 3.3, `metaclip/balancing.py` and `count_to_prob` in `metaclip/curation/curate.py`).

With count_q the global number of captions matching query q, its entry probability is
p_q = min(1, t / count_q). A caption is kept when any of its queries is drawn, each
independently with probability p_q, so P(keep) = 1 - prod_q (1 - p_q): MetaCLIP's rule. The
uniform for (caption, query) comes from splitmix64 of (seed, uid, query id) alone, so the draw
does not depend on sharding, order or worker count; a query with count <= t has p = 1 and
every caption matching it is kept. A head query ends near t (plus captions kept through their
other queries).

uid: the `uid` column when there is one (integers as they are, strings hashed); otherwise a
hash of url and caption (`row_keys`). Identical (url, caption) rows therefore share their draws.

Expected size for `--target-size`: E(t) = sum over matched captions of 1 - prod_q (1 - p_q(t)).
It needs each caption's query list, so pass 1 keeps the lists of a uniform sample of captions
(chosen by a hash of the uid at a rate r sized for about a million captions; r = 1, exact, for
smaller corpora) and E(t) is estimated as (1/r) * the sample's sum. E is non-decreasing in t,
so `solve_t` bisects on the integer t. Pass 2 sums the exact keep probabilities as it samples.
"""
from __future__ import annotations

import numpy as np
import pyarrow as pa

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_BASE = np.uint64(0xA0761D6478BD642F)  # odd multiplier for the string polynomial (wyhash prime)
_SAMPLE_SALT = np.uint64(0x5A17E5A17E5A17E5)


def splitmix64(x: np.ndarray | int) -> np.ndarray:
    """The splitmix64 finaliser on uint64 (wrapping arithmetic), elementwise."""
    with np.errstate(over="ignore"):  # scalars warn on the wrap-around that is the point
        z = np.asarray(x, dtype=np.uint64) + _GOLDEN
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def hash_strings(arr: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """A stable uint64 per string (UTF-8 bytes; NULL hashes as ""): polynomial + splitmix64."""
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    if pa.types.is_large_string(arr.type) or pa.types.is_large_binary(arr.type):
        arr = arr.cast(pa.string() if pa.types.is_large_string(arr.type) else pa.binary())
    arr = arr.fill_null("" if pa.types.is_string(arr.type) else b"")
    offsets = np.frombuffer(arr.buffers()[1], np.int32, len(arr) + 1, arr.offset * 4).astype(np.int64)
    data = np.frombuffer(arr.buffers()[2] or b"", np.uint8)[offsets[0]: offsets[-1]]
    offsets, lengths = offsets - offsets[0], np.diff(offsets)
    powers = np.ones(int(lengths.max(initial=0)) + 1, np.uint64)
    powers[1:] = np.cumprod(np.full(len(powers) - 1, _BASE))
    position = np.arange(len(data)) - np.repeat(offsets[:-1], lengths)
    sums = np.zeros(len(data) + 1, np.uint64)
    np.cumsum((data + np.uint64(1)) * powers[position], out=sums[1:])
    return splitmix64((sums[offsets[1:]] - sums[offsets[:-1]]) ^ splitmix64(lengths.astype(np.uint64)))


def row_keys(table: pa.Table | pa.RecordBatch) -> np.ndarray:
    """One uint64 per row: from `uid`, or (no uid / NULL uid) from url and caption."""
    derived = None
    if "uid" not in table.column_names or table.column("uid").null_count:
        url = table.column("url") if "url" in table.column_names else pa.nulls(len(table), pa.string())
        derived = splitmix64(hash_strings(url) * _BASE + hash_strings(table.column("caption")))
    if "uid" not in table.column_names:
        return derived
    uid = table.column("uid")
    if pa.types.is_integer(uid.type):
        keys = splitmix64(np.asarray(uid.fill_null(0)).astype(np.int64).view(np.uint64))
    else:
        keys = hash_strings(uid.cast(pa.string()) if not pa.types.is_binary(uid.type) else uid)
    if derived is not None:
        keys = np.where(np.asarray(uid.is_null()), derived, keys)
    return keys


def count_to_prob_reference(entry_count: np.ndarray, t: float) -> np.ndarray:
    """MetaCLIP's few lines: counts below t are raised to t, then p = t / count."""
    counts = np.array(entry_count, dtype=np.float64)
    counts[counts < t] = t
    return t / counts


def count_to_prob(counts: np.ndarray, t: float) -> np.ndarray:
    """p_q = min(1, t / count_q) for every query (1 for unmatched queries)."""
    return np.minimum(1.0, t / np.maximum(np.asarray(counts, dtype=np.float64), 1.0))


def draw_uniforms(seed: int, keys: np.ndarray, query_ids: np.ndarray) -> np.ndarray:
    """A uniform in [0, 1) per (seed, row key, query id), stable across machines."""
    return _uniforms(_salted(seed, keys), query_ids)


def _salted(seed: int, keys: np.ndarray) -> np.ndarray:
    return splitmix64(np.asarray(keys, np.uint64) ^ splitmix64(seed & 0xFFFFFFFFFFFFFFFF))


def _uniforms(salted: np.ndarray, query_ids: np.ndarray) -> np.ndarray:
    bits = splitmix64(salted + np.asarray(query_ids).astype(np.uint64) * _GOLDEN)
    return (bits >> np.uint64(11)) * 2.0**-53


def keep_mask(parents: np.ndarray, query_ids: np.ndarray, keys: np.ndarray, probs: np.ndarray, seed: int,
              n: int) -> np.ndarray:
    """Rows kept: any (row, query) pair with uniform < p_query. parents[i] is pair i's row."""
    drawn = _uniforms(_salted(seed, keys)[parents], query_ids) < probs[query_ids]
    return np.bincount(parents[drawn], minlength=n) > 0


def keep_probability(parents: np.ndarray, query_ids: np.ndarray, probs: np.ndarray, n: int) -> np.ndarray:
    """1 - prod_q (1 - p_q) per row (0 for a row with no queries)."""
    with np.errstate(divide="ignore"):
        log_none = np.bincount(parents, weights=np.log1p(-probs[query_ids]), minlength=n)
    return -np.expm1(log_none)


def in_sample(keys: np.ndarray, rate: float) -> np.ndarray:
    """Rows in the uniform sample kept for the expected-size estimate (by key, so shard-free)."""
    return (splitmix64(np.asarray(keys, np.uint64) ^ _SAMPLE_SALT) >> np.uint64(11)) * 2.0**-53 < rate


def expected_size(offsets: np.ndarray, query_ids: np.ndarray, counts: np.ndarray, t: float, rate: float = 1.0) -> float:
    """E(kept) at t from sampled query lists (offsets into query_ids), scaled by 1 / rate."""
    n = len(offsets) - 1
    parents = np.repeat(np.arange(n), np.diff(offsets))
    return float(keep_probability(parents, query_ids, count_to_prob(counts, t), n).sum() / rate)


def solve_t(counts: np.ndarray, offsets: np.ndarray, query_ids: np.ndarray, target_size: float,
            rate: float = 1.0) -> int:
    """The largest integer t with E(kept at t) <= target_size (1 if none; max count if all fit)."""
    n = len(offsets) - 1
    parents = np.repeat(np.arange(n), np.diff(offsets))

    def size(t: int) -> float:
        return float(keep_probability(parents, query_ids, count_to_prob(counts, t), n).sum() / rate)

    lo, hi = 1, max(1, int(np.max(counts, initial=1)))
    if size(hi) <= target_size:
        return hi
    if size(lo) > target_size:
        return lo
    while lo < hi:  # invariant: size(lo) <= target < size(hi + 1)
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if size(mid) <= target_size else (lo, mid - 1)
    return lo
