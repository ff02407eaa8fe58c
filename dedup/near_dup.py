"""The dedup stage: drop corpus pairs whose image near-duplicates an evaluation image.

CLIP (Radford et al. 2021), Section 5 and Appendix C: a duplicate detector runs over every
eval set, and matches feed both the removal of training pairs and the overlap analysis.
The stage is a global reduce plus a per-shard map (DESIGN.md, Scale):
`build_references` encodes each eval split once and calibrates its thresholds (highest
recall at the precision target, `calibrate.py`); `dedup_shard` streams one corpus shard
against those references; `dedup` runs both and writes `matches.parquet`,
`kept_keys.parquet`, `dedup_stats.json` and `contact_sheet.png`.

`dedup` returns the stats as a `DedupStats` (per eval set an `EvalSetStats`), and
`DedupStats.read(OUT)` loads them back from a finished run. Every corpus sample that is not
checked is counted with its reason (no image, undecodable, truncated or corrupt shard).
Outputs are built in OUT/_dedup_staging-<token>/ and swapped in at the end, `dedup_stats.json`
last (clip_core.data.staging): a failed run leaves the previous complete result in place, and
a rerun removes only the files the previous stats list.
"""
from __future__ import annotations

import functools
import heapq
import json
import posixpath
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from clip_core.data.parquet import write_json, write_parquet
from clip_core.data.staging import StagedOutput
from clip_core.data.webdataset import DamagedShardError, image_field, iter_shard, list_shards
from clip_core.errors import InputError, check
from clip_core.eval.features import batched
from clip_core.executors import Executor, LocalExecutor, map_counting_nodes
from dedup.calibrate import calibrate_reference, top1_of_codes
from dedup.checks import CORPUS_FIX, check_dedup_options
from dedup.descriptors import PHashDescriptor, decode_all, descriptors_on, encode, make_descriptors
from dedup.index import build_index
from dedup.within import (BUCKETS, MAX_NEAR_BITS, NEAR_BITS, bucket_links, content_hash, groups, write_shard_codes,
                          write_within)

POOL_NEGATIVES = 1000  # shared calibration negatives (augment.negative_pool): other real photos, scenes
_PHASH256 = PHashDescriptor(hash_size=16, name="phash256")  # --within's code when the descriptors lack it
MAX_LISTED = 1000  # unreadable samples listed in dedup_stats.json; unreadable.txt has them all
STATS_NAME = "dedup_stats.json"  # written last: its presence marks a complete result
OUTPUT_NAMES = ("matches.parquet", "kept_keys.parquet", "unreadable.txt", "contact_sheet.png", "near_misses.png",
                "within_duplicates.parquet", "within_sheet.png")
NO_IMAGE = "sample has no image"
MATCH_SCHEMA = pa.schema([("key", pa.string()), ("eval_set", pa.string()), ("eval_index", pa.int64()),
                          ("similarity", pa.float32()), ("descriptor", pa.string())])


@dataclass(frozen=True)
class EvalSetStats:
    """One eval split's overlap with the corpus: its matches and the thresholds they were found with."""

    root: str
    split: str
    n: int  # readable images of the split
    eval_unreadable: list[str]  # the split's images that did not decode
    matches: int  # (corpus image, eval image, descriptor) rows at or above the threshold
    matched_corpus_images: int
    overlap: int  # eval images with at least one corpus near-duplicate
    overlap_pct: float  # 100 * overlap / n (CLIP Sec. 5's overlap)
    thresholds: dict[str, float]  # descriptor name -> the similarity a match needs
    calibration: dict  # how the thresholds were chosen (precision, recall, ...), or {"manual": True}


@dataclass(frozen=True)
class DedupStats:
    """What dedup did: corpus images checked, removed and kept, unreadable by reason, overlap per eval set."""

    corpus: str
    descriptor: str
    descriptors: list[str]
    precision_target: float
    splits: list[str]
    k: int
    seed: int
    corpus_shards: int
    corpus_images: int  # samples read, whether or not their image decoded
    unreadable: int  # samples not checked: sum of `dropped`
    dropped: dict[str, int]  # samples not checked, by reason: no_image, undecodable, truncated, corrupt
    damaged_shards: list[dict]  # truncated or corrupt shards: shard, reason, samples_read, samples_lost, ...
    unreadable_samples: list[dict]  # key and error of the first MAX_LISTED samples not checked
    removed: int  # corpus images that near-duplicate an eval image
    kept: int  # corpus images checked and kept (kept_keys.parquet)
    eval_sets: dict[str, EvalSetStats]
    seconds: float = 0.0
    outputs: list[str] = field(default_factory=list)  # the files of OUT this run wrote, the stats last
    nodes: dict[str, int] = field(default_factory=dict)  # node (host name or Ray node id) -> shards checked there
    pool_negatives: int = 0  # shared calibration negatives (other real photos, scenes) per eval set
    within: dict = field(default_factory=dict)  # --within: WithinStats (copies inside the corpus); {} without

    @property
    def overlap_pct(self) -> dict[str, float]:
        """Per eval set, the percentage of its images that have a near-duplicate in the corpus."""
        return {name: s.overlap_pct for name, s in self.eval_sets.items()}

    def to_dict(self) -> dict:
        """dedup_stats.json's content."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> DedupStats:
        """The stats of dedup_stats.json's content (`to_dict`'s inverse)."""
        return cls(**{**d, "eval_sets": {name: EvalSetStats(**s) for name, s in d["eval_sets"].items()}})

    @classmethod
    def read(cls, uri: str, storage_options: dict | None = None) -> DedupStats:
        """The stats of a finished dedup: OUT/dedup_stats.json, `uri` being OUT."""
        with fsspec.open(f"{uri.rstrip('/')}/{STATS_NAME}", "r", **(storage_options or {})) as f:
            return cls.from_dict(json.load(f))


@dataclass
class EvalReference:
    """One eval split: descriptors of its images, calibrated thresholds, lazily built indexes."""

    name: str
    root: str
    split: str
    eval_index: np.ndarray  # (n,) the sample index in the split of each descriptor row
    codes: dict  # descriptor name -> (n, dim) codes
    thresholds: dict = field(default_factory=dict)
    calibration: dict = field(default_factory=dict)
    unreadable: list = field(default_factory=list)
    _search: dict = field(default_factory=dict, repr=False, compare=False)  # (descriptor name, device) -> index

    @property
    def n(self) -> int:
        return len(self.eval_index)

    def index(self, descriptor, device: str = "cpu"):
        """The search index of one descriptor on `device`, built on first use there."""
        key = (descriptor.name, str(device))
        if key not in self._search:
            self._search[key] = build_index(self.codes[descriptor.name], descriptor.binary, device)
        return self._search[key]

    def __getstate__(self):  # FAISS indexes do not pickle; a worker rebuilds them
        return {**self.__dict__, "_search": {}}


def encode_split(descriptors, root: str, split: str, batch_size: int = 128, keep: int = 0, rng=None):
    """(codes, eval_index, unreadable, reservoir) of a split; the reservoir holds `keep` (row, image)."""
    from clip_core.eval.datasets import iter_samples
    parts, eval_index, unreadable, reservoir = [], [], [], []
    for batch in batched(iter_samples(root, split), batch_size):
        images, ok, errors = decode_all([s.image_bytes for s in batch], [f"{s.key}.{s.ext}" for s in batch])
        unreadable += errors
        parts.append(encode(descriptors, images))
        for i, img in zip(ok, images):
            row = len(eval_index)
            eval_index.append(batch[i].index)
            j = row if row < keep else int(rng.integers(row + 1))  # reservoir sampling (algorithm R)
            if j < keep:
                reservoir[j:j + 1] = [(row, img)]
    codes = {d.name: np.concatenate([p[d.name] for p in parts]) for d in descriptors} if parts else {}
    return codes, np.asarray(eval_index, np.int64), unreadable, reservoir


def held_out_images(root: str, split: str, n: int) -> list:
    """Up to `n` images of the train split when deduping the test split: distinct non-copies."""
    from clip_core.eval.datasets import iter_samples, list_splits
    if split != "test" or n <= 0 or "train" not in list_splits(root):
        return []
    samples = [s for _, s in zip(range(n), iter_samples(root, "train"))]
    return decode_all([s.image_bytes for s in samples], [s.key for s in samples])[0]


def encoded_pool(descriptors, n: int, seed: int) -> dict | None:
    """Codes of the shared calibration negatives (`augment.negative_pool`), encoded once for every set."""
    from dedup.augment import negative_pool
    return encode(descriptors, negative_pool(n, seed)) if n > 0 else None


def build_references(eval_dirs: Sequence[str], descriptors, *, splits: Sequence[str] = ("test",),
                     precision: float = 0.99, calibration_samples: int = 500, thresholds: dict | None = None,
                     batch_size: int = 128, device: str = "cpu", seed: int = 0,
                     pool_negatives: int = POOL_NEGATIVES) -> list[EvalReference]:
    """Encode and calibrate every (eval set, split); a non-test split is named `name/split`.

    Calibration negatives: each copy's best other eval image, up to `calibration_samples` images of
    the set's train split, and `pool_negatives` images of other real photographs and procedural
    scenes shared by every set (a small eval set alone gave too few to hold a threshold)."""
    opened = open_eval_splits(eval_dirs, splits)  # every set checked before any is encoded
    if thresholds:
        _manual(descriptors, thresholds)
    rng, refs = np.random.default_rng(seed), []
    pool = None if thresholds else encoded_pool(descriptors, pool_negatives, seed)
    for name, eval_set, split in opened:
        codes, eval_index, unreadable, reservoir = encode_split(descriptors, eval_set.root, split, batch_size,
                                                                calibration_samples, rng)
        if not len(eval_index):
            raise InputError(f"eval set {eval_set.root}", f"split {split!r}: no readable images",
                             "check its images decode")
        ref = EvalReference(name, eval_set.root, split, eval_index, codes, unreadable=unreadable)
        if thresholds:
            ref.thresholds, ref.calibration = _manual(descriptors, thresholds), {"manual": True}
        else:
            negatives = held_out_images(eval_set.root, split, calibration_samples)
            pool_scores = top1_of_codes(descriptors, ref, pool, device) if pool is not None else None
            calibrate_reference(descriptors, ref, reservoir, precision, rng, negatives, device, pool_scores)
        refs.append(ref)
    return refs


def open_eval_splits(eval_dirs: Sequence[str], splits: Sequence[str]) -> list[tuple[str, object, str]]:
    """(reference name, EvalSet, split) of every eval folder and split; InputError on the first bad one."""
    from clip_core.eval.datasets import load_eval_set
    opened = []
    for root in eval_dirs:
        for split in splits:
            eval_set = load_eval_set(str(root), split)  # a clear error without classnames.txt, split, etc.
            name = eval_set.name if split == "test" else f"{eval_set.name}/{split}"
            if any(n == name for n, _, _ in opened):
                raise InputError("--eval", f"two eval folders are both named {name!r}", "rename one")
            opened.append((name, eval_set, split))
    return opened


def _manual(descriptors, thresholds: dict) -> dict:
    missing = [d.name for d in descriptors if d.name not in thresholds]
    unused = sorted(set(thresholds) - {d.name for d in descriptors})
    if unused:  # a typo, or a descriptor not in --descriptor
        raise InputError("--threshold", f"no descriptor {unused} in use (descriptors: {[d.name for d in descriptors]})",
                         "name only descriptors of --descriptor")
    if missing:
        raise InputError("--threshold", f"manual thresholds lack descriptors {missing}; given {sorted(thresholds)}",
                         "pass NAME=VALUE for each descriptor, or none to calibrate")
    return {d.name: float(thresholds[d.name]) for d in descriptors}


def iter_shard_images(fs, path: str, damaged: list | None = None) -> Iterator[tuple[str, bytes | None]]:
    """(key, image bytes or None when the sample has no image) of one WebDataset shard.

    A truncated or corrupt shard raises DamagedShardError after its complete samples, or with a
    list as `damaged`, appends the error there and ends (clip_core.data.webdataset.iter_shard)."""
    for sample in iter_shard(fs, path, decode=False, damaged=damaged):
        field = image_field(sample)
        image = sample[field] if field else None
        yield sample["__key__"], image


@dataclass
class ShardResult:
    """What one shard contributes: match rows, kept keys, unreadable samples, sheet candidates."""

    shard: str
    matches: list = field(default_factory=list)  # dicts with MATCH_SCHEMA's columns
    kept: list = field(default_factory=list)
    n_images: int = 0
    unreadable: list = field(default_factory=list)  # (key, error)
    closest: list = field(default_factory=list)  # heaps of (margin, key, (set, index, sim, descriptor), bytes)
    near_misses: list = field(default_factory=list)
    damaged: dict | None = None  # a truncated or corrupt shard: reason, samples read and lost


def expected_samples(fs, shard_path: str) -> int | None:
    """Samples img2dataset stored in a shard, from the `NNNNN.parquet` beside it (None without one)."""
    manifest = shard_path[: -len(".tar")] + ".parquet"
    try:
        if not fs.isfile(manifest):
            return None
        with fs.open(manifest, "rb") as f:
            status = pq.read_table(f, columns=["status"])["status"].to_pylist()
    except Exception:  # noqa: BLE001 -- no usable manifest: the loss stays unknown, and is reported so
        return None
    return sum(s == "success" for s in status)


def damage_record(fs, shard_uri: str, path: str, err: DamagedShardError, samples_read: int) -> dict:
    """What a damaged shard cost: reason, samples read, samples lost (exact with a manifest, else None)."""
    expected = expected_samples(fs, path)
    lost = max(expected - samples_read, 0) if expected is not None else None
    return {"shard": posixpath.basename(shard_uri), "reason": err.reason, "samples_read": samples_read,
            "samples_lost": lost, "first_lost": err.lost_key, "error": err.detail}


def _offer(heap: list, items, size: int) -> None:
    """Keep the `size` items with the largest (margin, key)."""
    for item in items:
        (heapq.heappush if len(heap) < size else heapq.heappushpop)(heap, item)


def _sheet_candidates(result, keys, blobs, sims, rows, threshold, size) -> None:
    """Offer the batch's best matches and best near misses (top-1 only) to the contact sheets."""
    margin = sims - threshold
    for heap, mask in ((result.closest, margin >= 0), (result.near_misses, margin < 0)):
        idx = np.flatnonzero(mask)
        idx = idx[np.argsort(-margin[idx], kind="stable")[:size]]
        _offer(heap, [(float(margin[i]), keys[i], rows[i], blobs[i]) for i in idx], size)


def _match_batch(result: ShardResult, keys, blobs, codes, refs, descriptors, k, device, sheet_size) -> set:
    """Append this batch's match rows; returns the matched keys."""
    matched = set()
    for ref in refs:
        for d in descriptors:
            sims, ids = ref.index(d, device).search(codes[d.name], k=k)  # (B, k), best first
            eval_index, t = ref.eval_index[ids], ref.thresholds[d.name]
            for i, j in zip(*np.nonzero(sims >= t)):
                result.matches.append({"key": keys[i], "eval_set": ref.name, "eval_index": int(eval_index[i, j]),
                                       "similarity": float(sims[i, j]), "descriptor": d.name})
                matched.add(keys[i])
            if sheet_size:  # rows as tuples (eval set, eval index, similarity, descriptor): heap-comparable
                rows = [(ref.name, int(eval_index[i, 0]), float(sims[i, 0]), d.name) for i in range(len(keys))]
                _sheet_candidates(result, keys, blobs, sims[:, 0], rows, t, sheet_size)
    return matched


def dedup_shard(shard_uri: str, refs: Sequence[EvalReference], descriptors, *, batch_size: int = 128, k: int = 1,
                device: str = "cpu", sheet_size: int = 12, storage_options: dict | None = None,
                within_uri: str | None = None, buckets: int = BUCKETS) -> ShardResult:
    """Match every image of one corpus shard against the eval references (the per-shard map).

    Encoding and search run on `device`: the descriptors' models move there once per call (a
    copy where they were built elsewhere, e.g. on a CPU driver for a GPU task)."""
    descriptors = descriptors_on(descriptors, device)
    fs, path = fsspec.core.url_to_fs(shard_uri, **(storage_options or {}))
    result, damaged = ShardResult(shard_uri), []
    within = {"keys": [], "hashes": [], "codes": []}
    for batch in batched(iter_shard_images(fs, path, damaged), batch_size):  # a damaged shard ends early
        result.n_images += len(batch)
        result.unreadable += [(key, NO_IMAGE) for key, blob in batch if blob is None]
        readable = [(key, blob) for key, blob in batch if blob is not None]
        images, ok, errors = decode_all([b for _, b in readable], [key for key, _ in readable])
        bad = sorted(set(range(len(readable))) - set(ok))
        result.unreadable += [(readable[i][0], e) for i, e in zip(bad, errors)]
        keys, blobs = [readable[i][0] for i in ok], [readable[i][1] for i in ok]
        codes = encode(descriptors, images) if keys else {}
        matched = _match_batch(result, keys, blobs, codes, refs, descriptors, k, device, sheet_size) if keys else set()
        kept = [i for i, key in enumerate(keys) if key not in matched]
        result.kept += [keys[i] for i in kept]
        if within_uri is not None and kept:  # what --within compares: the images kept so far
            within["keys"] += [keys[i] for i in kept]
            within["hashes"] += [content_hash(blobs[i]) for i in kept]
            within["codes"].append(codes["phash256"][kept] if "phash256" in codes
                                   else _PHASH256.encode([images[i] for i in kept]))
    if damaged:
        result.damaged = damage_record(fs, shard_uri, path, damaged[0], result.n_images)
    if within_uri is not None:
        codes = np.concatenate(within["codes"]) if within["codes"] else np.zeros((0, 32), np.uint8)
        write_shard_codes(within_uri, shard_uri, within["keys"], within["hashes"], codes, buckets, storage_options)
    return result


def dedup(corpus_uri: str, out_uri: str, eval_dirs: Sequence[str], *, descriptor: str = "default",
          precision: float = 0.99, detector_path: str | None = None, splits: Sequence[str] = ("test",),
          thresholds: dict | None = None, calibration_samples: int = 500, batch_size: int = 128, k: int = 1,
          device: str = "cpu", seed: int = 0, sheet_size: int = 12, storage_options: dict | None = None,
          executor: Executor | None = None, shard_device: str | None = None,
          pool_negatives: int = POOL_NEGATIVES, within: bool = False, near_bits: int = NEAR_BITS,
          buckets: int = BUCKETS) -> DedupStats:
    """Find corpus images that duplicate eval images; write matches, kept keys, stats and a contact sheet.

    The shards are mapped by `executor` (default: one after another in this process). `device`
    encodes and calibrates the eval sets here; `shard_device` (default `device`) encodes and
    searches in the shard tasks, so a CPU driver can map its shards onto a cluster's GPUs."""
    shard_device = device if shard_device is None else shard_device
    t0 = time.time()
    eval_dirs = [eval_dirs] if isinstance(eval_dirs, str) else [str(d) for d in eval_dirs]  # one folder, or many
    splits = (splits,) if isinstance(splits, str) else tuple(splits)
    check_dedup_options(eval_dirs, out_uri, precision=precision, thresholds=thresholds,
                        calibration_samples=calibration_samples, batch_size=batch_size, k=k, device=device,
                        shard_device=shard_device, sheet_size=sheet_size, splits=splits)
    check(pool_negatives >= 0, "--pool-negatives", f"must be >= 0, got {pool_negatives}",
          "0 calibrates on the eval set's own negatives only")
    if within:
        check(0 <= near_bits <= MAX_NEAR_BITS, "--near-bits", f"must be 0..{MAX_NEAR_BITS}, got {near_bits}",
              f"pHash bands of 16 bits find every pair at most {MAX_NEAR_BITS} bits apart")
        check(1 <= buckets <= 4096, "--buckets", f"must be 1..4096, got {buckets}",
              "about one bucket per 10M corpus images keeps a bucket task's memory small")
    output = StagedOutput(out_uri, "dedup", STATS_NAME, listed_key="outputs", outputs=OUTPUT_NAMES, parts=None,
                          storage_options=storage_options)
    output.check()
    shards = list_shards(str(corpus_uri), storage_options, where=f"corpus {corpus_uri}", fix=CORPUS_FIX)
    open_eval_splits(eval_dirs, splits)
    descriptors = make_descriptors(descriptor, detector_path, device)
    refs = build_references(eval_dirs, descriptors, splits=splits, precision=precision, thresholds=thresholds,
                            calibration_samples=calibration_samples, batch_size=batch_size, device=device, seed=seed,
                            pool_negatives=pool_negatives)
    config = {"corpus": str(corpus_uri), "descriptor": descriptor, "descriptors": [d.name for d in descriptors],
              "precision_target": precision, "splits": list(splits), "k": k, "seed": seed,
              "pool_negatives": pool_negatives}
    nodes, executor = Counter(), executor or LocalExecutor(1)
    with output:
        within_uri = posixpath.join(output.uri, "_within") if within else None  # bucket files, swept at commit
        per_shard = functools.partial(dedup_shard, refs=refs, descriptors=descriptors, batch_size=batch_size, k=k,
                                      device=shard_device, sheet_size=sheet_size, storage_options=storage_options,
                                      within_uri=within_uri, buckets=buckets)
        results = list(map_counting_nodes(executor, per_shard, shards, nodes))
        counts = write_outputs(output.uri, results, refs, config, sheet_size, storage_options)
        if within:
            links = functools.partial(bucket_links, within_uri, near_bits=near_bits, storage_options=storage_options)
            removed = groups([link for part in executor.map(links, range(buckets)) for link in part])
            counts |= write_within(output.uri, results, removed, near_bits, buckets, sheet_size, storage_options)
        written = [n for n in OUTPUT_NAMES if output.fs.exists(posixpath.join(output.path, n))]
        stats = DedupStats(**counts, seconds=round(time.time() - t0, 2), outputs=written + [STATS_NAME],
                           nodes=dict(nodes))
        write_json(output.fs, posixpath.join(output.path, STATS_NAME), stats.to_dict())
        output.commit()  # the stats file last: its presence marks a complete result
    return stats


def _per_set(refs, matches: list[dict]) -> dict[str, EvalSetStats]:
    out = {}
    for ref in refs:
        rows = [m for m in matches if m["eval_set"] == ref.name]
        overlap = {m["eval_index"] for m in rows}
        out[ref.name] = EvalSetStats(
            root=ref.root, split=ref.split, n=ref.n, eval_unreadable=ref.unreadable, matches=len(rows),
            matched_corpus_images=len({m["key"] for m in rows}), overlap=len(overlap),
            overlap_pct=100.0 * len(overlap) / ref.n, thresholds=ref.thresholds, calibration=ref.calibration)
    return out


def _dropped(results: Sequence[ShardResult]) -> dict:
    """Samples not checked, by reason; a damaged shard without a manifest counts its known loss (>= 0)."""
    out = {"no_image": 0, "undecodable": 0, "truncated": 0, "corrupt": 0}
    for r in results:
        for _, error in r.unreadable:
            out["no_image" if error == NO_IMAGE else "undecodable"] += 1
        if r.damaged:
            d = r.damaged
            out[d["reason"]] += d["samples_lost"] if d["samples_lost"] is not None else int(d["first_lost"] is not None)
    return out


def write_outputs(out_uri: str, results: Sequence[ShardResult], refs, config: dict, sheet_size: int = 12,
                  storage_options: dict | None = None) -> dict:
    """The reduce: matches.parquet, kept_keys.parquet, contact sheets; DedupStats' fields bar seconds, outputs."""
    fs, root = fsspec.core.url_to_fs(out_uri, **(storage_options or {}))
    fs.makedirs(root, exist_ok=True)
    matches = sorted((m for r in results for m in r.matches), key=lambda m: (m["key"], m["eval_set"], m["descriptor"]))
    write_parquet(fs, posixpath.join(root, "matches.parquet"), pa.Table.from_pylist(matches, schema=MATCH_SCHEMA))
    kept = pa.table({"key": [k for r in results for k in r.kept],
                     "shard": [posixpath.basename(r.shard) for r in results for _ in r.kept]})
    write_parquet(fs, posixpath.join(root, "kept_keys.parquet"), kept)
    unreadable = [{"key": key, "error": err} for r in results for key, err in r.unreadable]
    damaged = [r.damaged for r in results if r.damaged]
    with fsspec.open(posixpath.join(out_uri, "unreadable.txt"), "w", **(storage_options or {})) as f:
        f.writelines(f"{u['key']}\t{u['error']}\n" for u in unreadable)
        f.writelines(f"{d['shard']}\t{d['reason']} shard: {d['samples_read']} samples read, "
                     f"{d['samples_lost'] if d['samples_lost'] is not None else 'unknown'} lost: {d['error']}\n"
                     for d in damaged)
    n_images = sum(r.n_images for r in results)
    if sheet_size:
        from dedup.report import write_contact_sheets
        write_contact_sheets(out_uri, results, refs, sheet_size, storage_options)
    dropped = _dropped(results)
    return {**config, "corpus_shards": len(results), "corpus_images": n_images, "unreadable": sum(dropped.values()),
            "dropped": dropped, "damaged_shards": damaged,
            "unreadable_samples": unreadable[:MAX_LISTED], "removed": len({m["key"] for m in matches}),
            "kept": kept.num_rows,
            "eval_sets": _per_set(refs, matches)}
