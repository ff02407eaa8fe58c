"""WebDataset shards streamed for contrastive training, with an exact resume position.

CLIP (Radford et al. 2021), Section 2.2 trains on image-text pairs from the web; here they
come as img2dataset's shards (`NNNNN.tar` with KEY.jpg, KEY.txt, KEY.json) from any fsspec
URI, read by clip_core.data.webdataset (the reader, and the sample key, that dedup and
evaluation use too, so the keys `--exclude` names are the keys read here), decoded and cropped
in DataLoader worker processes.

Position. Streams: one per (rank, DataLoader worker), S in all. Units: the shards, each cut
into M interleaved slices when there are fewer shards than streams. Epoch e permutes the
units with a seed of (seed, e) and stream s reads units perm[s::S]; epochs follow each other
without end (training stops at a step count), or, resampled, each position draws a unit at
random. A seeded shuffle buffer mixes samples within an epoch (it is drained at the epoch's
end) and is recorded as references (position, index), so a stream's state is (position,
offset in the unit, buffer references, RNG state) and a restore re-reads only the units
those references name. Workers yield whole batches
with their stream's state; the loader keeps the state of the last batch it consumed from
each stream, and batch b comes from stream b mod N, so a resume rotates the workers to
start where the run stopped. Crops are seeded per sample, so a resume is exact.

Nothing is dropped uncounted: excluded keys, samples without image or caption, undecodable
ones and the samples a truncated tar lost (from img2dataset's listing beside it when there
is one, else the sample being read) are counted by reason (`DataStats`). Nothing loops
unbounded: a stream that reads a whole epoch's share of units without one usable sample
stops with an error naming the cause (for instance an --exclude file that excludes everything).
"""
from __future__ import annotations

import dataclasses
import math
import posixpath
import random
import warnings
import zlib
from dataclasses import dataclass, field
from typing import Callable, Iterator

import fsspec
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from clip_core.data.webdataset import IMAGE_EXTS, DamagedShardError, image_field, iter_shard
from clip_core.data.webdataset import list_shards as shard_files
from clip_core.errors import InputError
from clip_core.tokenizer import tokenize
from clip_core.transforms import ImageDecodeError, image_transform, load_image

TEXT_EXT = "txt"
MAX_CONSECUTIVE_SKIPS = 10_000
SKIP_REASONS = ("incomplete", "undecodable", "truncated")  # no image or caption; bytes that do not decode; lost tar
EXCLUDE_FIX = "--exclude takes the samples to leave out (dedup's matches.parquet), not the ones to keep"


class CorpusError(InputError):
    """The corpus cannot be trained on (no shards, no images, all excluded, changed since a checkpoint)."""


@dataclass(frozen=True)
class DataConfig:
    corpus: str
    batch_size: int  # per rank
    image_size: int
    context_length: int = 77
    seed: int = 0
    shuffle_buffer: int = 1000
    resampled: bool = False
    num_workers: int = 2  # DataLoader processes per rank
    rank: int = 0
    world_size: int = 1
    pin_memory: bool = False
    normalize: bool = True  # False: uint8 images, normalised on the device (clip_core.train.loop.NormalizeImages)
    exclude: frozenset = frozenset()  # sample keys left out (dedup's matches: near-copies of eval images)
    exclude_source: str | None = None  # the file `exclude` came from, for messages


@dataclass(frozen=True)
class DataStats:
    """Samples a rank's streams decoded, skipped (by reason) and excluded, and the lowest epoch reached."""

    good: int = 0
    skipped: int = 0
    skip_reasons: dict = field(default_factory=lambda: dict.fromkeys(SKIP_REASONS, 0))
    excluded: int = 0
    epoch: int = 0

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def load_excluded_keys(uri: str | None) -> frozenset:
    """Keys to leave out: a Parquet file with a `key` column (dedup's matches.parquet) or a text file, one a line."""
    if not uri:
        return frozenset()
    fs, path = fsspec.core.url_to_fs(uri)
    if not fs.isfile(path):
        raise InputError(uri, "--exclude file does not exist", "give dedup's matches.parquet, or drop --exclude")
    if posixpath.basename(path) == "kept_keys.parquet":
        raise InputError(uri, "is dedup's list of the samples to KEEP: excluding it would leave out every kept sample",
                         EXCLUDE_FIX)
    if not uri.endswith(".parquet"):
        with fsspec.open(uri, "r") as f:
            return frozenset(line.strip() for line in f if line.strip())
    import pyarrow.parquet as pq

    with fsspec.open(uri, "rb") as f:
        try:
            table = pq.read_table(f)
        except Exception as e:  # Arrow's errors do not name the file
            raise InputError(uri, f"not a readable Parquet file ({type(e).__name__}: {e})", EXCLUDE_FIX) from e
    columns = set(table.column_names)
    if "key" not in columns:
        raise InputError(uri, f"has no 'key' column; columns present: {table.column_names}", EXCLUDE_FIX)
    if columns == {"key", "shard"}:  # the shape of dedup's kept_keys.parquet, renamed
        raise InputError(uri, "has the columns of dedup's kept_keys.parquet (key, shard): a list of samples to keep",
                         EXCLUDE_FIX)
    return frozenset(table.column("key").to_pylist())


def list_shards(uri: str, storage_options: dict | None = None) -> list[str]:
    """The `.tar` shards of a corpus folder, glob or single file, sorted, as full URIs; CorpusError if none."""
    fs, path = fsspec.core.url_to_fs(uri, **(storage_options or {}))
    if not (any(c in path for c in "*?[") or fs.exists(path)):
        raise CorpusError(uri, "corpus does not exist", "give the folder of .tar shards that `clip-pipeline crawl` wrote")
    urls = shard_files(uri, storage_options)
    if not urls:
        raise CorpusError(uri, "no .tar shards in the corpus", "give the folder that `clip-pipeline crawl` wrote")
    return urls


def iter_samples(url: str) -> Iterator[tuple[str, dict]]:
    """(key, {ext: bytes}) of one shard in order (clip_core.data.webdataset); extensions lower-cased.

    A truncated or corrupt shard yields its complete samples, then raises DamagedShardError.
    """
    fs, path = fsspec.core.url_to_fs(url)
    for sample in iter_shard(fs, path, decode=False):
        key = sample.pop("__key__")
        yield key, {ext.lower(): data for ext, data in sample.items()}


def check_corpus(uri: str, max_shards: int = 8, exclude: frozenset = frozenset(),
                 exclude_source: str | None = None) -> list[str]:
    """The shards of `uri`; raise CorpusError when the first shards hold no image that `exclude` leaves in.

    Reading stops at the first usable image; only a bad corpus or exclusion reads all `max_shards`.
    """
    urls = list_shards(uri)
    excluded = 0
    for url in urls[:max_shards]:
        try:
            for key, sample in iter_samples(url):
                if image_field(sample):
                    if key not in exclude:
                        return urls
                    excluded += 1
        except DamagedShardError:
            continue  # training counts what a damaged shard lost; the next shard may be whole
    checked = f"the first {min(len(urls), max_shards)} of {len(urls)} shards"
    if excluded:
        raise InputError(exclude_source or "--exclude", f"excludes every one of the {excluded} images in {checked} "
                         f"of {uri}: it would exclude every sample", EXCLUDE_FIX)
    raise CorpusError(uri, f"no images ({'/'.join(IMAGE_EXTS)}) in {checked}", "check that the crawl succeeded")


def listed_samples(url: str) -> int | None:
    """How many samples img2dataset's parquet beside a shard says it wrote (status success), or None."""
    import pyarrow.parquet as pq

    sidecar = url[: -len(".tar")] + ".parquet"
    try:
        with fsspec.open(sidecar, "rb") as f:
            listing = pq.ParquetFile(f)
            if "status" not in listing.schema_arrow.names:
                return listing.metadata.num_rows
            return sum(s == "success" for s in listing.read(columns=["status"]).column("status").to_pylist())
    except Exception:  # no listing (or an unreadable one): the loss is counted from the tar alone
        return None


def _lost(url: str, read: int, m: int, slices: int) -> int:
    """Samples of slice m that a shard truncated after `read` whole samples lost (at least the one being read)."""
    total = listed_samples(url)
    total = total if total is not None and total > read else read + 1
    first = read + (m - read) % slices
    return len(range(first, total, slices))


def _read_unit(url: str, m: int, slices: int, skip: int = 0,
               on_lost: Callable[[int], None] = lambda n: None) -> Iterator[tuple[int, str, dict]]:
    """(index, key, sample) of slice m of a shard, from index `skip`; a truncated tar ends, its loss reported."""
    try:
        for j, (key, sample) in enumerate(iter_samples(url)):
            if j % slices == m and j // slices >= skip:
                yield j // slices, key, sample
    except DamagedShardError as e:  # deterministic: a resume stops at the same place
        lost = _lost(url, e.samples_read, m, slices)
        on_lost(lost)
        warnings.warn(f"shard {url} is truncated or corrupt ({e.reason} after {e.samples_read} complete samples: "
                      f"{e.detail}); {lost} samples of it lost (counted as skipped: truncated)")


def _seed(*parts) -> int:
    return zlib.crc32("/".join(map(str, parts)).encode())


class _Stream:
    """One stream: its units in order, through a seeded shuffle buffer, decoded and cropped."""

    def __init__(self, cfg: DataConfig, urls: list[str], stream: int, n_streams: int, state: dict | None = None):
        self.cfg, self.urls, self.stream, self.n_streams = cfg, urls, stream, n_streams
        slices = max(1, math.ceil(n_streams / len(urls)))
        self.units = [(s, m, slices) for s in range(len(urls)) for m in range(slices)]
        self.per_epoch = len(range(stream, len(self.units), n_streams))
        self.rng = random.Random(f"{cfg.seed}/shuffle/{stream}")
        state = state or {}
        self.pos, self.offset = state.get("pos", 0), state.get("offset", 0)
        self.good, self.skipped = state.get("good", 0), state.get("skipped", 0)
        self.excluded = state.get("excluded", 0)
        self.reasons = {r: state.get("skip_reasons", {}).get(r, 0) for r in SKIP_REASONS}
        self._mark = (self.pos, self.excluded, self.skipped)  # the first unit read since the last usable sample
        if "rng" in state:
            self.rng.setstate(_tuples(state["rng"]))
        self._perm: tuple[int, list[int]] | None = None
        self.buffer = self._restore(state.get("buffer", []))

    def unit_at(self, pos: int) -> tuple[int, int, int]:
        """The (shard, slice, slices) read at position `pos` of this stream."""
        if self.cfg.resampled:
            return self.units[random.Random(f"{self.cfg.seed}/resample/{self.stream}/{pos}").randrange(len(self.units))]
        epoch, i = divmod(pos, self.per_epoch)
        if self._perm is None or self._perm[0] != epoch:
            order = list(range(len(self.units)))
            random.Random(f"{self.cfg.seed}/epoch/{epoch}").shuffle(order)
            self._perm = (epoch, order)
        return self.units[self._perm[1][self.stream + i * self.n_streams]]

    def _read(self, pos: int, skip: int = 0, count: bool = True):
        shard, m, slices = self.unit_at(pos)
        return _read_unit(self.urls[shard], m, slices, skip, self._count_truncated if count else lambda n: None)

    def _count_truncated(self, lost: int) -> None:
        self.skipped += lost
        self.reasons["truncated"] += lost

    def _restore(self, refs: list) -> list:
        """Buffer entries (ref, key, sample) re-read for references [(pos, index), ...]."""
        found = {}
        for pos in dict.fromkeys(p for p, _ in refs):
            wanted = {i for p, i in refs if p == pos}
            found.update({(pos, i): (key, s) for i, key, s in self._read(pos, count=False) if i in wanted})
        missing = [tuple(r) for r in refs if tuple(r) not in found]
        if missing:
            raise CorpusError(self.cfg.corpus, f"samples {missing[:3]} of the checkpoint's data position are gone",
                              "the corpus changed since the checkpoint: train with --resume never or a new OUT")
        return [((p, i), *found[(p, i)]) for p, i in refs]

    def raw(self) -> Iterator[tuple]:
        """(ref, key, sample) in shuffled order, forever; the buffer never mixes epochs."""
        empty_units = 0
        while True:
            if self.pos % self.per_epoch == 0 and self.offset == 0:
                while self.buffer:  # epoch boundary: drain, so every epoch holds each sample once
                    yield self._pop()
                self._check_progress()  # every sample read so far has been offered
            skip, seen = self.offset, False
            for idx, key, sample in self._read(self.pos, skip):
                seen, self.offset = True, idx + 1
                self.buffer.append(((self.pos, idx), key, sample))
                if len(self.buffer) >= self.cfg.shuffle_buffer:
                    yield self._pop()
            empty_units = 0 if seen or skip else empty_units + 1
            if empty_units >= self.per_epoch:
                raise CorpusError(self.cfg.corpus, f"stream {self.stream} read a whole epoch of empty shards",
                                  "check the crawl's shards")
            self.pos, self.offset = self.pos + 1, 0

    def _pop(self) -> tuple:
        j = self.rng.randrange(len(self.buffer))
        self.buffer[j], self.buffer[-1] = self.buffer[-1], self.buffer[j]
        return self.buffer.pop()

    def samples(self) -> Iterator[tuple[str, torch.Tensor, str]]:
        """(key, image (3, S, S), caption), skipping and counting excluded and unusable samples."""
        consecutive = 0
        for (pos, idx), key, sample in self.raw():
            if key in self.cfg.exclude:
                self.excluded += 1
                continue
            item, reason = self._decode(key, sample, _seed(self.cfg.seed, self.stream, pos, idx))
            if item is None:
                self.skipped, consecutive = self.skipped + 1, consecutive + 1
                self.reasons[reason] += 1
                if consecutive >= MAX_CONSECUTIVE_SKIPS:
                    raise CorpusError(self.cfg.corpus, f"{consecutive} unusable samples in a row "
                                      f"({self.reasons})", "check the crawl's shards")
                continue
            self.good, consecutive = self.good + 1, 0
            self._mark = (self.pos + 1, self.excluded, self.skipped)
            yield item

    def _check_progress(self) -> None:
        """Stop, naming the cause, when a whole epoch's share of units in a row gave no usable sample.

        Called at an epoch boundary with the buffer drained, so every sample read has been offered.
        Without it, a stream whose every sample is excluded or unusable would read forever.
        """
        pos, excluded, skipped = self._mark
        if self.pos - pos < self.per_epoch:
            return
        excluded, skipped = self.excluded - excluded, self.skipped - skipped
        counts = f"{excluded} excluded, {skipped} unusable (reasons so far: {self.reasons})"
        where = f"stream {self.stream} read {self.pos - pos} shard(s) of {self.cfg.corpus}, a whole epoch's share"
        if excluded:
            raise CorpusError(self.cfg.exclude_source or "--exclude", f"excluded every sample: {where}, and found no "
                              f"sample to train on: {counts}", EXCLUDE_FIX)
        raise CorpusError(self.cfg.corpus, f"{where}, and found no usable sample: {counts}", "check the crawl's shards")

    def _decode(self, key: str, sample: dict, seed: int) -> tuple[tuple | None, str | None]:
        """((key, image, caption), None), or (None, the reason it is skipped)."""
        ext = image_field(sample)
        if ext is None or TEXT_EXT not in sample:
            return None, "incomplete"
        try:
            image = load_image(sample[ext], name=key)
            caption = sample[TEXT_EXT].decode("utf-8").strip()
        except (ImageDecodeError, UnicodeDecodeError):
            return None, "undecodable"
        crop = image_transform(self.cfg.image_size, train=True, generator=seed, normalize=self.cfg.normalize)
        return (key, crop(image), caption), None

    def state(self) -> dict:
        """The position after the last sample taken."""
        return {"stream": self.stream, "pos": self.pos, "offset": self.offset, "epoch": self.pos // self.per_epoch,
                "buffer": [ref for ref, _, _ in self.buffer], "rng": self.rng.getstate(),
                "good": self.good, "skipped": self.skipped, "excluded": self.excluded,
                "skip_reasons": dict(self.reasons)}


def _tuples(x):
    return tuple(_tuples(v) for v in x) if isinstance(x, (list, tuple)) else x


class _StreamDataset(IterableDataset):
    """Whole batches of one stream per DataLoader worker, each with the stream's state."""

    def __init__(self, cfg: DataConfig, urls: list[str], states: dict, rotation: int):
        self.cfg, self.urls, self.states, self.rotation = cfg, urls, states, rotation

    def __iter__(self):
        info = get_worker_info()
        local = max(self.cfg.num_workers, 1)
        stream_id = self.cfg.rank * local + ((info.id if info else 0) + self.rotation) % local
        stream = _Stream(self.cfg, self.urls, stream_id, local * self.cfg.world_size, self.states.get(stream_id))
        samples = stream.samples()
        while True:
            keys, images, texts = zip(*(next(samples) for _ in range(self.cfg.batch_size)))
            tokens = tokenize(list(texts), self.cfg.context_length, truncate=True)
            yield torch.stack(images), tokens, list(keys), stream.state()


class ShardLoader:
    """Iterable of (images (B, 3, S, S), tokens (B, L)) for one rank, with state_dict/load_state_dict."""

    def __init__(self, cfg: DataConfig, urls: list[str] | None = None):
        self.cfg = cfg
        self.urls = urls or list_shards(cfg.corpus)
        self.batches, self.states, self.last_keys = 0, {}, []

    def layout(self) -> dict:
        """What a saved position is only valid for."""
        c = self.cfg
        return {"shards": len(self.urls), "streams": max(c.num_workers, 1) * c.world_size, "rank": c.rank,
                "seed": c.seed, "resampled": c.resampled, "batch_size": c.batch_size,
                "shuffle_buffer": c.shuffle_buffer}

    def __iter__(self):
        local = max(self.cfg.num_workers, 1)
        tokenize([""])  # load the BPE once here; forked workers inherit it
        dataset = _StreamDataset(self.cfg, self.urls, dict(self.states), self.batches % local)
        # spawn, not fork: a Ray worker is multi-threaded (gRPC, gloo), and forking it is unsafe
        context = "spawn" if self.cfg.num_workers > 0 else None
        loader = DataLoader(dataset, batch_size=None, num_workers=self.cfg.num_workers, pin_memory=self.cfg.pin_memory,
                            multiprocessing_context=context)
        for images, tokens, keys, state in loader:
            self.states[state["stream"]] = state
            self.batches += 1
            self.last_keys = keys
            yield images, tokens

    def state_dict(self) -> dict:
        return {"batches": self.batches, "streams": dict(self.states), "layout": self.layout()}

    def load_state_dict(self, state: dict) -> None:
        """Continue from a saved position; raises ValueError if the layout differs."""
        if state["layout"] != self.layout():
            raise ValueError(f"data position saved for {state['layout']}, this loader is {self.layout()}")
        self.batches, self.states = state["batches"], dict(state["streams"])

    def stats(self) -> DataStats:
        """Samples decoded, skipped (by reason) and excluded, and the lowest epoch, over this rank's streams."""
        states = self.states.values()
        reasons = {r: sum(s.get("skip_reasons", {}).get(r, 0) for s in states) for r in SKIP_REASONS}
        return DataStats(good=sum(s["good"] for s in states), skipped=sum(s["skipped"] for s in states),
                         skip_reasons=reasons, excluded=sum(s.get("excluded", 0) for s in states),
                         epoch=min((s["epoch"] for s in states), default=0))
