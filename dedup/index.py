"""Nearest-neighbour search of corpus descriptors against an eval-set index.

CLIP (Radford et al. 2021), Appendix C: every training image is compared against every
eval image. The eval side is small and held in memory; the corpus streams through in
chunks, so memory is bounded by chunk_size x index size. Float descriptors use exact inner
product (FAISS IndexFlatIP; IVF when the index is very large); on a CUDA device the same FAISS
index copied to the GPU where the installed faiss is a GPU build (`pip install .[gpu]`), else a
chunked torch matmul + top-k (`search_backend` decides). Hashes use FAISS IndexBinaryFlat
(Hamming) on the CPU. `brute_force_*` are the numpy oracles the fast paths are tested against.
"""
from __future__ import annotations

import faiss
import numpy as np
import torch

IVF_ABOVE = 1_000_000  # "auto" switches from exact flat search to IVF above this many vectors


def _as_float(x: np.ndarray, name: str) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"{name} must be a 2-D (N, dim) array, got shape {x.shape}")
    return x


def _as_codes(x: np.ndarray, name: str) -> np.ndarray:
    x = np.ascontiguousarray(x)
    if x.dtype != np.uint8 or x.ndim != 2:
        raise ValueError(f"{name} must be (N, nbytes) uint8 packed bits, got {x.dtype} {x.shape}")
    return x


def _check_dims(queries: np.ndarray, dim: int, what: str) -> None:
    if queries.shape[1] != dim:
        raise ValueError(f"dimension mismatch: queries have {what} {queries.shape[1]}, the index has {dim} "
                         f"(were both sides encoded with the same descriptor?)")


def faiss_gpus() -> int:
    """GPUs the installed faiss can search on: always 0 for faiss-cpu (it has no StandardGpuResources)."""
    return faiss.get_num_gpus() if hasattr(faiss, "StandardGpuResources") else 0


def search_backend(device: str, faiss_gpus: int) -> str:
    """The float search backend for `device`: faiss on CPU; on CUDA faiss-gpu where faiss sees a GPU, else torch."""
    if not str(device).startswith("cuda"):
        return "faiss"
    return "faiss-gpu" if faiss_gpus > 0 else "torch"  # both exact: the same ids and scores as the CPU search


def brute_force_search(queries: np.ndarray, database: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k inner product in numpy: (scores (Q, k), ids (Q, k)), best first."""
    scores = queries.astype(np.float32) @ database.astype(np.float32).T  # (Q, N)
    ids = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, ids, axis=1), ids


def brute_force_hamming(queries: np.ndarray, database: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k Hamming distance in numpy popcount: (distances (Q, k), ids (Q, k)), nearest first."""
    xor = queries[:, None, :] ^ database[None, :, :]  # (Q, N, nbytes)
    dist = np.unpackbits(xor, axis=2).sum(axis=2).astype(np.int32)  # (Q, N)
    ids = np.argsort(dist, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(dist, ids, axis=1), ids


class FlatIndex:
    """Inner-product search over L2-normalised float vectors (FAISS on CPU or GPU, torch or numpy)."""

    def __init__(self, vectors: np.ndarray, backend: str = "faiss", device: str = "cpu",
                 kind: str = "auto", nlist: int | None = None, nprobe: int = 16):
        self.vectors = _as_float(vectors, "index vectors")
        self.dim, self.backend, self.device = self.vectors.shape[1], backend, device
        if backend == "faiss":
            self.faiss = self._build_faiss(kind, nlist, nprobe)
        elif backend == "faiss-gpu":
            self.faiss = self._to_gpu(self._build_faiss(kind, nlist, nprobe), device)
        elif backend == "torch":
            self.tensor = torch.from_numpy(self.vectors).to(device)
        elif backend != "numpy":
            raise ValueError(f"unknown search backend {backend!r}; use faiss, faiss-gpu, torch or numpy")

    def _to_gpu(self, index, device: str):
        """The CPU index copied to CUDA device `device` (cuda = cuda:0, the first GPU this process sees)."""
        if faiss_gpus() == 0:
            raise ValueError("backend faiss-gpu needs a faiss build with GPU support and a visible GPU; "
                             "install it with `make setup-gpu` (pip install .[gpu]), or use backend torch")
        self.gpu_resources = faiss.StandardGpuResources()  # kept: the GPU index lives as long as its resources
        return faiss.index_cpu_to_gpu(self.gpu_resources, torch.device(device).index or 0, index)

    def _build_faiss(self, kind: str, nlist: int | None, nprobe: int):
        n = len(self.vectors)
        if kind == "flat" or (kind == "auto" and n <= IVF_ABOVE):
            index = faiss.IndexFlatIP(self.dim)
        elif kind in ("ivf", "auto"):
            nlist = nlist or max(1, min(n // 39, int(4 * np.sqrt(n))))  # FAISS wants >= 39 points per list
            index = faiss.IndexIVFFlat(faiss.IndexFlatIP(self.dim), self.dim, nlist, faiss.METRIC_INNER_PRODUCT)
            index.train(self.vectors)
            index.nprobe = min(nprobe, nlist)
        else:
            raise ValueError(f"unknown index kind {kind!r}; use auto, flat or ivf")
        index.add(self.vectors)
        return index

    def __len__(self) -> int:
        return len(self.vectors)

    def search(self, queries: np.ndarray, k: int = 1, chunk_size: int = 16384) -> tuple[np.ndarray, np.ndarray]:
        """Top-k (scores, ids) of each query, best first, `chunk_size` queries at a time."""
        queries = _as_float(queries, "queries")
        _check_dims(queries, self.dim, "dim")
        k = min(k, len(self))
        if len(queries) == 0 or k == 0:
            return np.zeros((len(queries), k), np.float32), np.zeros((len(queries), k), np.int64)
        parts = [self._search(queries[i:i + chunk_size], k) for i in range(0, len(queries), chunk_size)]
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])

    def _search(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        if self.backend in ("faiss", "faiss-gpu"):
            scores, ids = self.faiss.search(q, k)
            missing = ids < 0  # IVF: fewer than k vectors in the probed lists
            if missing.any():
                scores[missing], ids[missing] = -np.inf, 0
            return scores, ids
        if self.backend == "numpy":
            return brute_force_search(q, self.vectors, k)
        with torch.no_grad():
            scores = torch.from_numpy(q).to(self.device) @ self.tensor.T  # (chunk, N)
            top = scores.topk(k, dim=1)
        return top.values.cpu().numpy(), top.indices.cpu().numpy()


class BinaryIndex:
    """Hamming search over packed bit codes (FAISS IndexBinaryFlat, or numpy)."""

    def __init__(self, codes: np.ndarray, backend: str = "faiss"):
        self.codes = _as_codes(codes, "index codes")
        self.nbits, self.backend = self.codes.shape[1] * 8, backend
        if backend == "faiss":
            self.faiss = faiss.IndexBinaryFlat(self.nbits)
            self.faiss.add(self.codes)
        elif backend != "numpy":
            raise ValueError(f"unknown binary backend {backend!r}; use faiss or numpy")

    def __len__(self) -> int:
        return len(self.codes)

    def hamming(self, codes: np.ndarray, k: int = 1, chunk_size: int = 65536) -> tuple[np.ndarray, np.ndarray]:
        """Top-k (Hamming distances, ids) of each query code, nearest first."""
        codes = _as_codes(codes, "query codes")
        _check_dims(codes, self.codes.shape[1], "bytes per code")
        k = min(k, len(self))
        if len(codes) == 0 or k == 0:
            return np.zeros((len(codes), k), np.int32), np.zeros((len(codes), k), np.int64)
        parts = [self._hamming(codes[i:i + chunk_size], k) for i in range(0, len(codes), chunk_size)]
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])

    def _hamming(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        if self.backend == "faiss":
            return self.faiss.search(q, k)
        return brute_force_hamming(q, self.codes, k)

    def search(self, codes: np.ndarray, k: int = 1, chunk_size: int = 65536) -> tuple[np.ndarray, np.ndarray]:
        """Top-k (similarity = 1 - Hamming / nbits, ids), best first."""
        dist, ids = self.hamming(codes, k, chunk_size)
        return 1.0 - dist.astype(np.float32) / self.nbits, ids


def build_index(codes: np.ndarray, binary: bool, device: str = "cpu", **kwargs):
    """The index for one descriptor: binary codes -> BinaryIndex; floats -> FlatIndex (`search_backend`'s)."""
    if binary:
        return BinaryIndex(codes)
    backend = kwargs.pop("backend", None) or search_backend(device, faiss_gpus())
    return FlatIndex(codes, backend=backend, device=device, **kwargs)
