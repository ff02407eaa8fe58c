"""Small WebDataset helpers: write and read tar shards of `KEY.ext` members.

Shards are named `000000.tar`, `000001.tar`, ... as CLIP_benchmark and img2dataset lay them
out. Writes are atomic (`clip_core.data.parquet.atomic_open`): a shard is written under a
temporary name and renamed when done, so a reader never sees half a shard. Values encode by
type: bytes as-is, str as UTF-8, int as ASCII digits (`cls`), dict/list as JSON.

Reading checks that a shard is whole: tarfile ends a stream quietly at a missing or cut
header, so a shard cut at a member boundary would read as a shorter, valid one. `iter_shard`
requires the end-of-archive block (as GNU tar does) and reports a cut or corrupt shard as
`DamagedShardError`, after yielding the complete samples before the damage.
"""
from __future__ import annotations

import io
import json
import lzma
import posixpath
import tarfile
import zlib
from collections.abc import Iterable, Iterator

import fsspec

from clip_core.data.parquet import atomic_open
from clip_core.errors import InputError, check

SHARDS_FIX = "pass a folder of WebDataset .tar shards"
# what a cut or corrupt compressed or plain tar raises while it is streamed
_READ_ERRORS = (tarfile.TarError, EOFError, zlib.error, lzma.LZMAError)


def encode_value(value) -> bytes:
    """The bytes stored for one sample field."""
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode("utf-8")
    if isinstance(value, (bool, float)):
        raise TypeError(f"no WebDataset encoding for {type(value).__name__}")
    if isinstance(value, int):
        return str(value).encode("ascii")
    if isinstance(value, (dict, list, tuple)):
        return json.dumps(value, ensure_ascii=False).encode("utf-8")
    raise TypeError(f"no WebDataset encoding for {type(value).__name__}")


def decode_value(ext: str, data: bytes):
    """Decode a field by extension: cls -> int, txt -> str, json -> object, else bytes."""
    if ext == "cls":
        return int(data.decode("ascii").strip())
    if ext == "txt":
        return data.decode("utf-8")
    if ext == "json":
        return json.loads(data.decode("utf-8"))
    return data


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644  # fixed mtime: byte-identical reruns
    tar.addfile(info, io.BytesIO(data))


def write_shard(fs, path: str, samples: Iterable[dict]) -> int:
    """Write samples ({"__key__": str, ext: value, ...}) to one tar; returns the count."""
    n = 0
    with atomic_open(fs, path) as f, tarfile.open(fileobj=f, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for sample in samples:
            key = sample["__key__"]
            for ext, value in sample.items():
                if ext != "__key__":
                    _add_member(tar, f"{key}.{ext}", encode_value(value))
            n += 1
    return n


def write_shards(uri: str, samples: Iterable[dict], maxcount: int = 1000,
                 storage_options: dict | None = None) -> list[str]:
    """Write samples into `uri/000000.tar`, ... with at most `maxcount` per shard."""
    fs, root = fsspec.core.url_to_fs(uri, **(storage_options or {}))
    fs.makedirs(root, exist_ok=True)
    paths, batch = [], []
    for sample in samples:
        batch.append(sample)
        if len(batch) == maxcount:
            paths.append(_flush(fs, root, len(paths), batch))
            batch = []
    if batch or not paths:
        paths.append(_flush(fs, root, len(paths), batch))
    return paths


def _flush(fs, root: str, index: int, batch: list[dict]) -> str:
    path = posixpath.join(root, f"{index:06d}.tar")
    write_shard(fs, path, batch)
    return path


IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "ppm")  # a sample's image field, in order of preference


def image_field(sample: dict) -> str | None:
    """The field of a sample that holds its image (extension matched case-blind), or None."""
    fields = {k.lower(): k for k in sample if k != "__key__"}
    return next((fields[ext] for ext in IMAGE_EXTS if ext in fields), None)


def list_shards(uri: str, storage_options: dict | None = None, *, where: str | None = None,
                fix: str = SHARDS_FIX) -> list[str]:
    """The `*.tar` shards under `uri` (a folder, a glob or one .tar file), sorted, as full URIs.

    With `where` (how messages name the folder, e.g. "corpus URI"), a folder that is missing, is a
    file or holds no shard is an InputError naming it, with `fix`; without, an empty folder is []."""
    fs, root = fsspec.core.url_to_fs(uri, **(storage_options or {}))
    if any(c in root for c in "*?["):
        names = sorted(p for p in fs.glob(root) if p.endswith(".tar"))
        check(where is None or bool(names), where, "the glob matches no .tar shard", fix)
        return [fs.unstrip_protocol(p) for p in names]
    if root.endswith(".tar") and fs.isfile(root):
        return [fs.unstrip_protocol(root)]
    if where is not None:
        check(not fs.isfile(root), where, "is a file, not a folder", fix)
        check(fs.isdir(root), where, "no such folder", fix)
    names = sorted(p for p in fs.ls(root, detail=False) if p.endswith(".tar"))
    check(where is None or bool(names), where, "no .tar shards (empty corpus, or not a WebDataset folder?)", fix)
    return [fs.unstrip_protocol(p) for p in names]


def _split_name(name: str) -> tuple[str, str]:
    """`dir/KEY.ext.more` -> (`dir/KEY`, `ext.more`), WebDataset's split at the first dot."""
    folder, base = posixpath.split(name)
    stem, _, ext = base.partition(".")
    return posixpath.join(folder, stem), ext


class DamagedShardError(InputError):
    """A shard that ends early ("truncated") or holds a bad header ("corrupt")."""

    def __init__(self, path: str, samples_read: int, reason: str, detail: str, lost_key: str | None = None):
        self.path, self.samples_read, self.reason, self.detail = path, samples_read, reason, detail
        self.lost_key = lost_key  # the sample being read when the damage was found (dropped: it may lack fields)
        super().__init__(path, f"shard is {reason} after {samples_read} complete samples ({detail})",
                         "the file is incomplete or damaged: write or download it again")

    def __reduce__(self):  # crosses a process (DataLoader worker, Ray task) with its own fields
        return type(self), (self.path, self.samples_read, self.reason, self.detail, self.lost_key)


class _Header(tarfile.TarInfo):
    """A TarInfo that notes on the archive why reading stopped (tarfile ends silently on a cut header)."""

    @classmethod
    def fromtarfile(cls, tar):
        try:
            return super().fromtarfile(tar)
        except tarfile.HeaderError as err:
            tar.last_header_error = err
            raise


class _Cut(tarfile.ReadError):
    """The data ends where a header should be."""


def _members(fs, path: str) -> Iterator[tuple[tarfile.TarFile, tarfile.TarInfo]]:
    """(archive, member) of a streamed tar; tarfile.ReadError unless it ends with an end-of-archive block."""
    with fs.open(path, "rb") as f, tarfile.open(fileobj=f, mode="r|*", tarinfo=_Header) as tar:
        for member in tar:
            yield tar, member
        end = getattr(tar, "last_header_error", None)
        if isinstance(end, tarfile.EOFHeaderError):  # a zero block ends a whole tar
            return
        cut = end is None or isinstance(end, (tarfile.EmptyHeaderError, tarfile.TruncatedHeaderError))
        raise (_Cut if cut else tarfile.ReadError)(f"no end-of-archive block at byte {tar.offset}: "
                                                   f"{end or 'end of data'}")


def _reason(err: Exception) -> str:
    """truncated (the data ends early) or corrupt (bytes that are no tar or compressed stream)."""
    text = str(err).lower()
    cut = isinstance(err, (_Cut, EOFError)) or any(c in text for c in ("unexpected end", "empty file", "truncated"))
    return "truncated" if cut else "corrupt"


def iter_shard(fs, path: str, decode: bool = True, damaged: list | None = None) -> Iterator[dict]:
    """Samples of one shard in order, members grouped by key (the name before the first dot).

    Plain or compressed (.tar.gz, ...) tars, read as a stream. A truncated or corrupt shard
    yields its complete samples, then raises DamagedShardError; or, when a list is passed
    as `damaged`, appends the error there and ends (so a batching caller keeps its last batch).
    """
    sample, n = {}, 0
    try:
        for tar, member in _members(fs, path):
            key, ext = _split_name(member.name)
            if not member.isfile() or not ext:
                continue
            if sample and sample["__key__"] != key:
                yield sample
                sample, n = {}, n + 1
            sample.setdefault("__key__", key)  # before reading: a cut inside this member loses this sample
            data = tar.extractfile(member).read()
            sample[ext] = decode_value(ext, data) if decode else data
    except _READ_ERRORS as err:
        error = DamagedShardError(path, n, _reason(err), str(err) or type(err).__name__, sample.get("__key__"))
        if damaged is None:
            raise error from err
        damaged.append(error)
        return
    if sample:
        yield sample


def read_samples(uri: str, decode: bool = True, storage_options: dict | None = None,
                 damaged: list | None = None) -> Iterator[dict]:
    """All samples of all shards under `uri`, in shard then member order (`damaged`: see iter_shard)."""
    for shard in list_shards(uri, storage_options):
        fs, path = fsspec.core.url_to_fs(shard, **(storage_options or {}))
        yield from iter_shard(fs, path, decode, damaged)
