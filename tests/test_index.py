"""dedup/index.py: FAISS, torch and IVF search equal the numpy brute force."""
import numpy as np
import pytest
import torch

from dedup.index import BinaryIndex, FlatIndex, brute_force_hamming, brute_force_search, build_index


def _unit(rng, n, d):
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.fixture
def vectors():
    rng = np.random.default_rng(0)
    return _unit(rng, 300, 32), _unit(rng, 97, 32)  # database, queries


@pytest.mark.parametrize("backend", ["faiss", "torch", "numpy"])
@pytest.mark.parametrize("chunk_size", [7, 10_000])
def test_flat_search_equals_brute_force(vectors, backend, chunk_size):
    database, queries = vectors
    want_scores, want_ids = brute_force_search(queries, database, k=5)
    scores, ids = FlatIndex(database, backend=backend).search(queries, k=5, chunk_size=chunk_size)
    np.testing.assert_array_equal(ids, want_ids)
    np.testing.assert_allclose(scores, want_scores, atol=1e-5)


def test_brute_force_is_the_definition(vectors):
    database, queries = vectors
    scores, ids = brute_force_search(queries[:3], database, k=2)
    for q, row_ids, row_scores in zip(queries[:3], ids, scores):
        dots = [float(q @ x) for x in database]
        assert row_ids[0] == int(np.argmax(dots))
        assert row_scores[0] == pytest.approx(max(dots), abs=1e-6)


def test_ivf_with_every_list_probed_is_exact(vectors):
    database, queries = vectors
    index = FlatIndex(database, kind="ivf", nlist=4, nprobe=4)
    scores, ids = index.search(queries, k=3)
    want_scores, want_ids = brute_force_search(queries, database, k=3)
    np.testing.assert_array_equal(ids, want_ids)
    np.testing.assert_allclose(scores, want_scores, atol=1e-5)


@pytest.mark.parametrize("chunk_size", [5, 65536])
def test_binary_hamming_equals_numpy_popcount(chunk_size):
    rng = np.random.default_rng(1)
    database = rng.integers(0, 256, (200, 8), dtype=np.uint8)
    near = database[:10].copy()
    near[:, 3] ^= np.uint8(16)  # one bit flipped
    queries = np.concatenate([near, rng.integers(0, 256, (40, 8), dtype=np.uint8)])
    dist, ids = BinaryIndex(database).hamming(queries, k=4, chunk_size=chunk_size)
    want_dist, _ = brute_force_hamming(queries, database, k=4)
    np.testing.assert_array_equal(dist, want_dist)  # ids may differ among ties; their distances may not
    popcount = np.unpackbits(queries[:, None, :] ^ database[ids], axis=2).sum(axis=2)
    np.testing.assert_array_equal(popcount, dist)
    assert (ids[:10, 0] == np.arange(10)).all() and (dist[:10, 0] == 1).all()


def test_binary_similarity_scale():
    codes = np.array([[0] * 8, [255] * 8], dtype=np.uint8)
    sims, ids = BinaryIndex(codes).search(codes, k=2)
    np.testing.assert_allclose(sims, [[1.0, 0.0], [1.0, 0.0]])
    np.testing.assert_array_equal(ids, [[0, 1], [1, 0]])


def test_dimension_mismatch_is_a_clear_error(vectors):
    database, queries = vectors
    with pytest.raises(ValueError, match="dimension mismatch"):
        FlatIndex(database).search(queries[:, :16])
    with pytest.raises(ValueError, match="dimension mismatch"):
        BinaryIndex(np.zeros((3, 8), np.uint8)).search(np.zeros((2, 32), np.uint8))
    with pytest.raises(ValueError, match="uint8"):
        BinaryIndex(np.zeros((3, 8), np.float32))


def test_empty_queries_and_k_above_size(vectors):
    database, _ = vectors
    scores, ids = FlatIndex(database).search(np.zeros((0, 32), np.float32), k=3)
    assert scores.shape == ids.shape == (0, 3)
    scores, ids = FlatIndex(database[:2]).search(database[:1], k=5)
    assert ids.shape == (1, 2) and ids[0, 0] == 0


def test_build_index_picks_the_kind():
    assert isinstance(build_index(np.zeros((2, 8), np.uint8), binary=True), BinaryIndex)
    assert build_index(np.eye(4, dtype=np.float32), binary=False).backend == "faiss"


@pytest.mark.gpu
def test_torch_gpu_search_equals_brute_force(vectors):
    database, queries = vectors
    index = FlatIndex(database, backend="torch", device="cuda")
    scores, ids = index.search(queries, k=5, chunk_size=16)
    want_scores, want_ids = brute_force_search(queries, database, k=5)
    np.testing.assert_array_equal(ids, want_ids)
    np.testing.assert_allclose(scores, want_scores, atol=1e-4)
    assert torch.cuda.is_available()
