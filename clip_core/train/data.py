"""WebDataset shards streamed for contrastive training, with an exact resume position.

CLIP (Radford et al. 2021), Section 2.2 trains on image-text pairs from the web; here they
come as img2dataset's shards (`NNNNN.tar` with KEY.jpg, KEY.txt, KEY.json) from any fsspec
URI, read with tarfile, decoded and cropped in DataLoader worker processes.

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
"""
from __future__ import annotations

import math
import posixpath
import random
import tarfile
import warnings
import zlib
from dataclasses import dataclass
from typing import Iterator

import fsspec
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from clip_core.tokenizer import tokenize
from clip_core.transforms import ImageDecodeError, image_transform, load_image

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
TEXT_EXT = "txt"
MAX_CONSECUTIVE_SKIPS = 10_000


class CorpusError(ValueError):
    """The corpus cannot be trained on (no shards, no images, changed since a checkpoint)."""


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
    exclude: frozenset = frozenset()  # sample keys left out (dedup's matches: near-copies of eval images)


def load_excluded_keys(uri: str | None) -> frozenset:
    """Keys to leave out: a Parquet file with a `key` column (dedup's matches.parquet) or a text file, one a line."""
    if not uri:
        return frozenset()
    if uri.endswith(".parquet"):
        import pyarrow.parquet as pq

        with fsspec.open(uri, "rb") as f:
            table = pq.read_table(f)
        if "key" not in table.column_names:
            raise ValueError(f"{uri} has no 'key' column; columns present: {table.column_names}")
        return frozenset(table.column("key").to_pylist())
    with fsspec.open(uri, "r") as f:
        return frozenset(line.strip() for line in f if line.strip())


def list_shards(uri: str, storage_options: dict | None = None) -> list[str]:
    """The `.tar` shards of a folder, glob or single file, sorted, as full URIs."""
    fs, path = fsspec.core.url_to_fs(uri, **(storage_options or {}))
    if any(c in path for c in "*?["):
        paths = fs.glob(path)
    elif path.endswith(".tar"):
        paths = [path] if fs.isfile(path) else []
    elif fs.isdir(path):
        paths = fs.glob(posixpath.join(path, "*.tar"))
    else:
        raise FileNotFoundError(f"corpus {uri} does not exist")
    paths = sorted(p for p in paths if p.endswith(".tar"))
    if not paths:
        raise CorpusError(f"no .tar shards in {uri}")
    return [fs.unstrip_protocol(p) for p in paths]


def iter_samples(url: str) -> Iterator[tuple[str, dict]]:
    """(key, {ext: bytes}) of one shard in order; members grouped by the name before the first dot."""
    key, sample = None, {}
    with fsspec.open(url, "rb") as f, tarfile.open(fileobj=f, mode="r|*") as tar:
        for member in tar:
            folder, base = posixpath.split(member.name)
            if not member.isfile() or base.startswith("."):
                continue
            stem, _, ext = base.partition(".")
            name = posixpath.join(folder, stem)
            if name != key and sample:
                yield key, sample
                sample = {}
            key = name
            sample[ext.lower()] = tar.extractfile(member).read()
    if sample:
        yield key, sample


def check_corpus(uri: str, max_shards: int = 8) -> list[str]:
    """The shards of `uri`; raise CorpusError when the first shards hold no image."""
    urls = list_shards(uri)
    for url in urls[:max_shards]:
        for _, sample in iter_samples(url):
            if any(ext in sample for ext in IMAGE_EXTS):
                return urls
    raise CorpusError(f"no images ({'/'.join(IMAGE_EXTS)}) in the first {min(len(urls), max_shards)} shards of {uri}")


def _read_unit(url: str, m: int, slices: int, skip: int = 0) -> Iterator[tuple[int, str, dict]]:
    """(index, key, sample) of slice m of a shard, from index `skip`; a truncated tar just ends."""
    try:
        for j, (key, sample) in enumerate(iter_samples(url)):
            if j % slices == m and j // slices >= skip:
                yield j // slices, key, sample
    except (tarfile.TarError, EOFError) as e:  # deterministic: a resume stops at the same place
        warnings.warn(f"shard {url} is truncated or corrupt ({e}); skipping its rest")


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

    def _read(self, pos: int, skip: int = 0):
        shard, m, slices = self.unit_at(pos)
        return _read_unit(self.urls[shard], m, slices, skip)

    def _restore(self, refs: list) -> list:
        """Buffer entries (ref, key, sample) re-read for references [(pos, index), ...]."""
        found = {}
        for pos in dict.fromkeys(p for p, _ in refs):
            wanted = {i for p, i in refs if p == pos}
            found.update({(pos, i): (key, s) for i, key, s in self._read(pos) if i in wanted})
        missing = [tuple(r) for r in refs if tuple(r) not in found]
        if missing:
            raise CorpusError(f"samples {missing[:3]} of the checkpoint's data position are gone: corpus changed?")
        return [((p, i), *found[(p, i)]) for p, i in refs]

    def raw(self) -> Iterator[tuple]:
        """(ref, key, sample) in shuffled order, forever; the buffer never mixes epochs."""
        empty_units = 0
        while True:
            if self.pos % self.per_epoch == 0 and self.offset == 0:
                while self.buffer:  # epoch boundary: drain, so every epoch holds each sample once
                    yield self._pop()
            skip, seen = self.offset, False
            for idx, key, sample in self._read(self.pos, skip):
                seen, self.offset = True, idx + 1
                self.buffer.append(((self.pos, idx), key, sample))
                if len(self.buffer) >= self.cfg.shuffle_buffer:
                    yield self._pop()
            empty_units = 0 if seen or skip else empty_units + 1
            if empty_units >= self.per_epoch:
                raise CorpusError(f"stream {self.stream} read a whole epoch of empty shards")
            self.pos, self.offset = self.pos + 1, 0

    def _pop(self) -> tuple:
        j = self.rng.randrange(len(self.buffer))
        self.buffer[j], self.buffer[-1] = self.buffer[-1], self.buffer[j]
        return self.buffer.pop()

    def samples(self) -> Iterator[tuple[str, torch.Tensor, str]]:
        """(key, image (3, S, S), caption), skipping and counting undecodable samples."""
        consecutive = 0
        for (pos, idx), key, sample in self.raw():
            if key in self.cfg.exclude:
                self.excluded += 1
                continue
            item = self._decode(key, sample, _seed(self.cfg.seed, self.stream, pos, idx))
            if item is None:
                self.skipped, consecutive = self.skipped + 1, consecutive + 1
                if consecutive >= MAX_CONSECUTIVE_SKIPS:
                    raise CorpusError(f"{consecutive} undecodable samples in a row in {self.cfg.corpus}")
                continue
            self.good, consecutive = self.good + 1, 0
            yield item

    def _decode(self, key: str, sample: dict, seed: int):
        ext = next((e for e in IMAGE_EXTS if e in sample), None)
        if ext is None or TEXT_EXT not in sample:
            return None
        try:
            image = load_image(sample[ext], name=key)
            caption = sample[TEXT_EXT].decode("utf-8").strip()
        except (ImageDecodeError, UnicodeDecodeError):
            return None
        crop = image_transform(self.cfg.image_size, train=True, generator=seed)
        return key, crop(image), caption

    def state(self) -> dict:
        """The position after the last sample taken."""
        return {"stream": self.stream, "pos": self.pos, "offset": self.offset, "epoch": self.pos // self.per_epoch,
                "buffer": [ref for ref, _, _ in self.buffer], "rng": self.rng.getstate(),
                "good": self.good, "skipped": self.skipped, "excluded": self.excluded}


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

    def stats(self) -> dict:
        """Samples decoded and skipped, and the lowest epoch, over this rank's streams."""
        states = self.states.values()
        return {"good": sum(s["good"] for s in states), "skipped": sum(s["skipped"] for s in states),
                "excluded": sum(s.get("excluded", 0) for s in states),
                "epoch": min((s["epoch"] for s in states), default=0)}
