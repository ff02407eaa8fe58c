"""Balancing: MetaCLIP's count_to_prob, the keep law (statistically and exactly), shard
independence, stable hashes, and the expected-size solver."""
import numpy as np
import pyarrow as pa
import pytest
from scipy import stats

from clip_core.curation.balance import (
    count_to_prob, count_to_prob_reference, draw_uniforms, expected_size, hash_strings, in_sample,
    keep_mask, keep_probability, row_keys, solve_t, splitmix64,
)


def _pairs(lists):
    """parents and query ids of per-row query lists."""
    parents = np.repeat(np.arange(len(lists)), [len(x) for x in lists])
    return parents, np.array([q for x in lists for q in x], np.int64)


def test_count_to_prob_matches_metaclip_reference():
    counts = np.random.default_rng(0).integers(0, 50_000, 1000).astype(np.uint64)
    counts[:5] = [0, 1, 20_000, 20_001, 40_000]
    for t in (1, 170, 20_000):
        np.testing.assert_allclose(count_to_prob(counts, t), count_to_prob_reference(counts, t))
    assert count_to_prob(counts[:5], 20_000).tolist() == [1.0, 1.0, 1.0, 20_000 / 20_001, 0.5]


def test_splitmix64_known_values_and_stable_string_hashes():
    assert int(splitmix64(0)) == 0xE220A8397B1DCDAF  # the first output of splitmix64 seeded 0
    hashes = hash_strings(pa.array(["", "a", "hello world", None]))
    assert [hex(h) for h in hashes] == ["0xa706dd2f4d197e6f", "0x3660084f17fd793a", "0x8137d876a3a944d8", "0xa706dd2f4d197e6f"]
    words = pa.array([f"w{i}" * (i % 7) for i in range(100)])
    np.testing.assert_array_equal(hash_strings(words.slice(30, 20)), hash_strings(words)[30:50])
    np.testing.assert_array_equal(hash_strings(pa.chunked_array([words.slice(0, 50), words.slice(50)])), hash_strings(words))
    assert len(np.unique(hash_strings(pa.array([str(i) for i in range(100_000)])))) == 100_000


def test_hash_strings_is_the_documented_polynomial():
    base, mask = 0xA0761D6478BD642F, (1 << 64) - 1

    def by_hand(text: str) -> int:
        data = text.encode()
        poly = sum((b + 1) * pow(base, i, 1 << 64) for i, b in enumerate(data)) & mask
        return int(splitmix64(np.uint64(poly) ^ splitmix64(np.uint64(len(data)))))

    texts = ["", "a", "caf\u00e9 \u732b", "x" * 300]
    assert hash_strings(pa.array(texts)).tolist() == [by_hand(t) for t in texts]


def test_row_keys_from_uid_or_url_and_caption():
    base = {"url": ["u1", "u2", "u1"], "caption": ["a", "a", "a"]}
    derived = row_keys(pa.table(base))
    assert derived[0] == derived[2] != derived[1]  # identical (url, caption) share a key
    ints = row_keys(pa.table({**base, "uid": [7, 8, 7]}))
    assert ints[0] == ints[2] != ints[1]
    strings = row_keys(pa.table({**base, "uid": ["x", "y", "z"]}))
    assert len(set(strings.tolist())) == 3
    nulls = row_keys(pa.table({**base, "uid": pa.array([None, 8, None], pa.int64())}))
    assert nulls[0] == derived[0] and nulls[1] == ints[1]


def test_uniforms_are_uniform_and_seeded():
    keys, ids = splitmix64(np.arange(50_000)), np.arange(50_000) % 13
    u = draw_uniforms(0, keys, ids)
    assert 0 <= u.min() and u.max() < 1
    assert stats.kstest(u, "uniform").pvalue > 1e-3
    assert np.array_equal(u, draw_uniforms(0, keys, ids))
    assert np.mean(u == draw_uniforms(1, keys, ids)) < 1e-3
    assert abs(np.corrcoef(u, draw_uniforms(0, keys, ids + 1))[0, 1]) < 0.03


def test_tail_queries_are_kept_deterministically():
    lists = [[0], [1, 2], [2], [0, 3]] * 50
    counts = np.bincount(np.concatenate(lists), minlength=4)
    parents, ids = _pairs(lists)
    probs = count_to_prob(counts, t=int(counts.max()))
    for seed in range(5):
        assert keep_mask(parents, ids, splitmix64(np.arange(len(lists))), probs, seed, len(lists)).all()


def test_head_query_keeps_about_t():
    n, t = 100_000, 1_000
    parents, ids = _pairs([[0]] * n)
    probs = count_to_prob(np.array([n]), t)
    kept = keep_mask(parents, ids, splitmix64(np.arange(n)), probs, 0, n).sum()
    assert abs(kept - t) < 5 * np.sqrt(n * (t / n) * (1 - t / n))  # Binomial(n, t/n), 5 sd


def test_caption_with_two_queries_is_kept_with_one_minus_product():
    n = 60_000
    lists = [[0, 1]] * n
    parents, ids = _pairs(lists)
    probs = np.array([0.3, 0.2])
    p = 1 - (1 - 0.3) * (1 - 0.2)
    kept = keep_mask(parents, ids, splitmix64(np.arange(n)), probs, 3, n)
    assert abs(kept.mean() - p) < 5 * np.sqrt(p * (1 - p) / n)
    np.testing.assert_allclose(keep_probability(parents, ids, probs, n)[:3], [p] * 3)
    assert keep_probability(*_pairs([[], [0]]), np.array([1.0]), 2).tolist() == [0.0, 1.0]


def test_draws_do_not_depend_on_sharding():
    rng = np.random.default_rng(1)
    lists = [sorted(set(rng.integers(0, 30, rng.integers(1, 4)).tolist())) for _ in range(3000)]
    keys = splitmix64(np.arange(3000) * 7)
    probs = rng.uniform(0.05, 1, 30)
    whole = keep_mask(*_pairs(lists), keys, probs, 11, len(lists))
    for n_shards in (2, 3, 7):
        bounds = np.linspace(0, len(lists), n_shards + 1).astype(int)
        parts = [keep_mask(*_pairs(lists[a:b]), keys[a:b], probs, 11, b - a) for a, b in zip(bounds[:-1], bounds[1:])]
        np.testing.assert_array_equal(np.concatenate(parts), whole)
    order = rng.permutation(len(lists))
    shuffled = keep_mask(*_pairs([lists[i] for i in order]), keys[order], probs, 11, len(lists))
    np.testing.assert_array_equal(shuffled, whole[order])


def test_solve_t_is_the_largest_t_within_the_target():
    rng = np.random.default_rng(2)
    lists = [sorted(set(rng.zipf(1.6, rng.integers(1, 4)).clip(max=200).tolist())) for _ in range(5000)]
    offsets = np.cumsum([0] + [len(x) for x in lists])
    ids = np.concatenate(lists)
    counts = np.bincount(ids, minlength=201).astype(np.uint64)
    sizes = [expected_size(offsets, ids, counts, t) for t in range(1, 400)]
    assert all(a <= b for a, b in zip(sizes, sizes[1:]))  # non-decreasing in t
    for target in (300, 1000, 2500):
        t = solve_t(counts, offsets, ids, target)
        assert expected_size(offsets, ids, counts, t) <= target < expected_size(offsets, ids, counts, t + 1)
    assert solve_t(counts, offsets, ids, 10**9) == counts.max()
    assert solve_t(counts, offsets, ids, 1) == 1


def test_sample_rate_scales_the_estimate():
    keys = splitmix64(np.arange(200_000))
    chosen = in_sample(keys, 0.1)
    assert abs(chosen.mean() - 0.1) < 0.005
    assert np.array_equal(chosen[:1000], in_sample(keys[:1000], 0.1))  # by key: shard-free
    assert in_sample(keys, 1.0).all()


@pytest.mark.parametrize("t", [1, 50])
def test_expected_size_equals_the_sum_of_keep_probabilities(t):
    lists = [[0], [0, 1], [1], [2]] * 25
    offsets = np.cumsum([0] + [len(x) for x in lists])
    counts = np.array([50, 50, 25], np.uint64)
    p = count_to_prob(counts, t)
    by_hand = 25 * (p[0] + (1 - (1 - p[0]) * (1 - p[1])) + p[1] + p[2])
    assert expected_size(offsets, np.concatenate(lists), counts, t) == pytest.approx(by_hand)
