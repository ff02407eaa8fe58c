"""Duplicates inside the corpus: exact copies (same bytes) and near copies (close pHash), one kept.

Web crawls repeat themselves: the same image under many URLs, and re-encoded or resized
copies of it. `dedup --within` keeps one image of each group, shard by shard in bounded memory:

1. map (per corpus shard, with the eval matching): each checked image's content hash
   (BLAKE2b, 128 bits) and 256-bit pHash go to part files, split into `buckets` by hash:
   `exact/bNNN/` by content hash, `near/bNNN/` once per pHash band (16 bands of 16 bits).
   Two codes at most 15 bits apart agree on at least one band (pigeonhole), so every pair
   within `near_bits` <= 15 shares a bucket.
2. reduce (per bucket, on the same executor): group equal hashes; in a band's group, link each
   code to the first code it is within `near_bits` of (leader clustering, no all-pairs matrix).
   A bucket task holds one bucket's rows: 1/buckets of the corpus per band.
3. the driver joins the links with union-find (memory: the duplicates, not the corpus) and
   keeps the smallest key of each group, whatever the shard order, threads or executor.
"""
from __future__ import annotations

import hashlib
import io
import posixpath
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from clip_core.data.parquet import write_parquet
from clip_core.data.webdataset import image_field, iter_shard

BANDS = 16  # 256-bit pHash in 16 bands of 16 bits
BAND_BYTES = 32 // BANDS
# Near copies: at most this many of 256 bits differ (pHash256 similarity >= 0.953). Held-out real
# photos (dedup.heldout): rescale + JPEG 30 copies 0-6 bits from their source, colour shift +
# resize 0-10; the closest two distinct distractors 20 (noise, faces), distinct photos 98+.
# Crops (100+) and rotations (42+) move a pHash too far: not found by --within.
NEAR_BITS = 12
MAX_NEAR_BITS = BANDS - 1  # beyond it a pair may share no band and would be missed
BUCKETS = 16
_SCHEMA = pa.schema([("key", pa.string()), ("shard", pa.string()), ("band", pa.int8()), ("value", pa.binary()),
                     ("code", pa.binary())])


@dataclass(frozen=True)
class WithinStats:
    """dedup_stats.json's `within`: images removed as exact or near copies of a kept one."""

    near_bits: int
    buckets: int
    checked: int  # images hashed (those not already removed for an eval match)
    groups: int  # groups of two or more images
    exact_removed: int
    near_removed: int

    def to_dict(self) -> dict:
        return asdict(self)


def content_hash(blob: bytes) -> bytes:
    return hashlib.blake2b(blob, digest_size=16).digest()


def _bucket(values: Sequence[bytes], band: int, buckets: int) -> np.ndarray:
    return np.array([int.from_bytes(hashlib.blake2b(bytes([band + 1]) + v, digest_size=4).digest(), "little")
                     % buckets for v in values], np.int64)


def write_shard_codes(work_uri: str, shard: str, keys: Sequence[str], hashes: Sequence[bytes], codes: np.ndarray,
                      buckets: int = BUCKETS, storage_options: dict | None = None) -> None:
    """One shard's rows into the bucket folders of `work_uri` (a file per bucket and kind)."""
    codes = np.ascontiguousarray(codes, np.uint8)
    code_bytes = [c.tobytes() for c in codes]
    rows = {"exact": [(k, -1, h, b"") for k, h in zip(keys, hashes)],
            "near": [(k, band, c[BAND_BYTES * band:BAND_BYTES * (band + 1)], c) for band in range(BANDS)
                     for k, c in zip(keys, code_bytes)]}
    fs, root = fsspec.core.url_to_fs(work_uri, **(storage_options or {}))
    name = posixpath.basename(shard).rsplit(".", 1)[0]
    for kind, items in rows.items():
        if not items:
            continue
        bucket = np.concatenate([_bucket([v for _, b, v, _ in items if b == band], band, buckets)
                                 for band in sorted({b for _, b, _, _ in items})])
        table = pa.table({"key": [k for k, *_ in items], "shard": [name] * len(items),
                          "band": pa.array([b for _, b, _, _ in items], pa.int8()),
                          "value": pa.array([v for _, _, v, _ in items], pa.binary()),
                          "code": pa.array([c for *_, c in items], pa.binary())}, schema=_SCHEMA)
        order = np.argsort(bucket, kind="stable")
        table, bucket = table.take(pa.array(order)), bucket[order]
        for b in np.unique(bucket):
            lo, hi = np.searchsorted(bucket, b), np.searchsorted(bucket, b, side="right")
            folder = posixpath.join(root, kind, f"b{int(b):03d}")
            fs.makedirs(folder, exist_ok=True)
            write_parquet(fs, posixpath.join(folder, f"{name}.parquet"), table.slice(lo, hi - lo))


def _read_bucket(work_uri: str, kind: str, bucket: int, storage_options: dict | None) -> pa.Table:
    fs, root = fsspec.core.url_to_fs(work_uri, **(storage_options or {}))
    folder = posixpath.join(root, kind, f"b{bucket:03d}")
    if not fs.exists(folder):
        return _SCHEMA.empty_table()
    parts = []
    for path in sorted(fs.ls(folder, detail=False)):
        with fs.open(path, "rb") as f:
            parts.append(pq.read_table(f, schema=_SCHEMA))
    return pa.concat_tables(parts) if parts else _SCHEMA.empty_table()


def _popcount(x: np.ndarray) -> np.ndarray:
    return np.unpackbits(x, axis=-1).sum(axis=-1)


def bucket_links(work_uri: str, bucket: int, near_bits: int = NEAR_BITS,
                 storage_options: dict | None = None) -> list[tuple[str, str, str]]:
    """(key, linked key, "exact" | "near") of one bucket: each image linked to an earlier one it copies.

    Keys are taken in sorted order, so the links (and the groups they make) do not depend on how
    the shards were mapped."""
    links = []
    exact = _read_bucket(work_uri, "exact", bucket, storage_options).sort_by("key")
    first: dict[bytes, str] = {}
    for key, value in zip(exact["key"].to_pylist(), exact["value"].to_pylist()):
        if value in first:
            links.append((key, first[value], "exact"))
        else:
            first[value] = key
    near = _read_bucket(work_uri, "near", bucket, storage_options).sort_by([("band", "ascending"), ("value", "ascending"),
                                                                            ("key", "ascending")])
    band, value, keys = near["band"].to_numpy(), near["value"].to_pylist(), near["key"].to_pylist()
    codes = np.frombuffer(b"".join(near["code"].to_pylist()), np.uint8).reshape(-1, 32) if len(keys) else None
    start = 0
    while start < len(keys):
        end = start + 1
        while end < len(keys) and band[end] == band[start] and value[end] == value[start]:
            end += 1
        links += _leaders(keys[start:end], codes[start:end], near_bits)
        start = end
    return links


def _leaders(keys: list[str], codes: np.ndarray, near_bits: int) -> list[tuple[str, str, str]]:
    """Leader clustering of one band group: a code within near_bits of a leader links to it."""
    out, leaders = [], []
    for i in range(len(keys)):
        if leaders:
            dist = _popcount(np.bitwise_xor(codes[leaders], codes[i]))
            j = int(np.argmin(dist))
            if dist[j] <= near_bits:
                out.append((keys[i], keys[leaders[j]], "near"))
                continue
        leaders.append(i)
    return out


def groups(links: Sequence[tuple[str, str, str]]) -> dict[str, tuple[str, str]]:
    """{removed key: (kept key, "exact" | "near")}: union-find over the links, the smallest key kept.
    A removed image is "exact" when its bytes equal another's in its group, else "near"."""
    parent: dict[str, str] = {}

    def find(x: str) -> str:
        parent.setdefault(x, x)
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    exact = set()
    for a, b, kind in links:
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
        if kind == "exact":
            exact.add(a)
    return {k: (find(k), "exact" if k in exact else "near") for k in parent if find(k) != k}


def write_within(out_uri: str, results: Sequence, removed: dict, near_bits: int, buckets: int,
                 sheet_size: int, storage_options: dict | None = None) -> dict:
    """--within's outputs (results: dedup's ShardResults): kept_keys.parquet without the copies,
    within_duplicates.parquet, its sheet, and the stats."""
    fs, root = fsspec.core.url_to_fs(out_uri, **(storage_options or {}))
    shard_of = {k: posixpath.basename(r.shard) for r in results for k in r.kept}
    shard_uri = {k: r.shard for r in results for k in r.kept}
    kept = [k for r in results for k in r.kept if k not in removed]
    write_parquet(fs, posixpath.join(root, "kept_keys.parquet"),
                  pa.table({"key": kept, "shard": [shard_of[k] for k in kept]}))
    rows = sorted(removed.items())
    write_parquet(fs, posixpath.join(root, "within_duplicates.parquet"),
                  pa.table({"key": [k for k, _ in rows], "kept_key": [g for _, (g, _) in rows],
                            "kind": [kind for _, (_, kind) in rows], "shard": [shard_of[k] for k, _ in rows]}))
    if sheet_size and rows:
        from dedup.report import write_within_sheet
        shown = rows[:sheet_size]
        wanted: dict = {}
        for key, (kept_key, _) in shown:
            for k in (key, kept_key):
                wanted.setdefault(shard_uri[k], set()).add(k)
        write_within_sheet(out_uri, shown, _shard_images(wanted, storage_options), storage_options)
    stats = WithinStats(near_bits=near_bits, buckets=buckets, checked=len(shard_of),
                        groups=len({g for _, (g, _) in rows}),
                        exact_removed=sum(kind == "exact" for _, (_, kind) in rows),
                        near_removed=sum(kind == "near" for _, (_, kind) in rows))
    return {"kept": len(kept), "within": stats.to_dict()}


def _shard_images(keys_by_shard: dict, storage_options: dict | None) -> dict:
    """{key: image} of the keys wanted per shard URI, read in one pass over each of those shards."""
    from PIL import Image

    images = {}
    for shard_uri, keys in keys_by_shard.items():
        fs, path = fsspec.core.url_to_fs(shard_uri, **(storage_options or {}))
        for sample in iter_shard(fs, path, decode=False, damaged=[]):
            key, field = sample["__key__"], image_field(sample)
            if key in keys and field:
                blob = sample[field]
                images[key] = Image.open(io.BytesIO(blob))
                images[key].load()
    return images
