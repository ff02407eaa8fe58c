"""The extract stage: Common Crawl WAT files -> candidate (url, caption) pairs.

CLIP's WIT (Radford et al. 2021, Sec. 2.2) came from a search engine no one else has;
open reproductions (LAION-400M, MetaCLIP) start from Common Crawl's WAT files, which list
every link of every crawled page. A WAT file is a gzipped WARC of `metadata` records whose
payload is a JSON envelope; for an HTML response the page's `<img>` tags are in

    Envelope.Payload-Metadata.HTTP-Response-Metadata.HTML-Metadata.Links
        [{"path": "IMG@/src", "url": "../a.jpg", "alt": "a red apple"}, ...]

beside `HTML-Metadata.Head.Base` (a `<base href>`) and the page URL in
`Envelope.WARC-Header-Metadata.WARC-Target-URI`. Each `IMG@/src` link with a non-empty alt
becomes a pair: the URL resolved to absolute http(s) (fragment dropped), the alt with
whitespace collapsed. Rules per link live in `extract_filters.py`.

Output, OUT being any fsspec URI: `OUT/part-NNNNN.parquet` (`url`, `caption`, `uid`,
`page_url`) and `OUT/extract_stats.json`, built in OUT/_extract_staging-<token>/ and swapped in
at the end (`clip_core.data.staging`): a failed run leaves the previous result whole.

Duplicates: a (url, caption) pair is kept once per run, across files too, first
occurrence in input order winning. The key is the first 64 bits of the pair's blake2b
digest, held in a Python set in the driver: about 80 bytes per unique pair (10M pairs
~ 0.8 GB), and a false "duplicate" with probability ~ n^2 / 2^65 (n = 10^8: ~3e-4).
Files are read in parallel (`clip_core.executors.LocalExecutor`, or any executor with an ordered
`map`, e.g. Ray's); the driver merges in input order, so the rows do not depend on the worker count.
The pool starts workers with the spawn method: a script that calls `extract` at top level
with workers > 1 needs an `if __name__ == "__main__":` guard.

Checked at the door, exit 2: every option, and every input being a gzip or plain WARC file
(its first bytes): a file that is empty, not gzip or not WARC is refused by name. Bad records
inside are counted, never fatal: a record that is not JSON or has a short payload is skipped and
the file read on; a truncated final gzip member ends the file after the records before it; a
page without links is counted and skipped. A file that yields no WAT metadata records (a WARC or
WET by mistake) or ends early is counted and named in the stats' `warnings`, printed by the CLI.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
import zlib
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import NamedTuple

import fsspec
import pyarrow as pa
from warcio.archiveiterator import ArchiveIterator
from warcio.exceptions import ArchiveLoadFailed
from warcio.statusandheaders import StatusAndHeadersParserException

from clip_core.checks import whole_number
from clip_core.data.parquet import as_uri, expand_uris, write_json, write_parquet
from clip_core.data.staging import StagedOutput
from clip_core.errors import InputError, check
from clip_core.executors import Executor, LocalExecutor, map_counting_nodes
from clip_core.extract.filters import (
    DROP_REASONS, BaseUrl, PairFilter, normalize_caption, page_base, parse_extensions,
    resolve_image_url, split_base)

IMG_PATH = "IMG@/src"  # the WAT link path of an <img src>


def _get(obj: object, *keys: str) -> object:
    """obj[k1][k2]... through dicts only; None when any step is missing."""
    for key in keys:
        obj = obj.get(key) if isinstance(obj, dict) else None
    return obj

ERROR_KINDS = ("bad_json", "bad_record", "truncated_record", "truncated_stream", "read")
SCHEMA = pa.schema([("url", pa.string()), ("caption", pa.string()),
                    ("uid", pa.string()), ("page_url", pa.string())])
STATS_NAME = "extract_stats.json"
WAT_FIX = "give Common Crawl WAT files: .warc.wat.gz, gzipped WARC metadata records"
DEFAULT_SHARD_ROWS = 1_000_000
_READ_ERRORS = (ArchiveLoadFailed, StatusAndHeadersParserException, EOFError, OSError, zlib.error)


@dataclass
class FileStats:
    """Counts for one WAT file (or, with uri "*", for the whole run)."""

    uri: str
    records: int = 0  # every WARC record, warcinfo included
    metadata_records: int = 0  # WARC-Type: metadata
    pages: int = 0  # envelopes of HTML responses (with HTML-Metadata)
    pages_without_links: int = 0
    links: int = 0  # entries of HTML-Metadata.Links, any tag
    img_links: int = 0  # entries with path IMG@/src
    pairs_kept: int = 0  # after the run-wide duplicate removal
    dropped: dict[str, int] = field(default_factory=lambda: dict.fromkeys(DROP_REASONS, 0))
    errors: dict[str, int] = field(default_factory=lambda: dict.fromkeys(ERROR_KINDS, 0))
    seconds: float = 0.0

    def add(self, other: FileStats) -> None:
        """Accumulate `other` into these counts."""
        for f in fields(self):
            mine, theirs = getattr(self, f.name), getattr(other, f.name)
            if isinstance(mine, dict):
                for k, v in theirs.items():
                    mine[k] = mine.get(k, 0) + v
            elif f.name != "uri":
                setattr(self, f.name, mine + theirs)


@dataclass
class ExtractStats:
    """What `extract` did: per-file counts, totals, the shards written and the speed."""

    files: list[FileStats]
    totals: FileStats
    rows: int
    shards: list[str]
    seconds: float
    filters: dict
    warnings: list[str] = field(default_factory=list)  # files that yielded nothing or ended early
    nodes: dict[str, int] = field(default_factory=dict)  # node (host name or Ray node id) -> files read there

    @property
    def pairs_per_s(self) -> float:
        """Pairs written per wall-clock second of the whole run."""
        return self.rows / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict:
        """Plain JSON values, the content of `extract_stats.json`."""
        d = asdict(self)
        d["pairs_per_s"] = round(self.pairs_per_s, 1)
        for f in d["files"]:
            f["pairs_per_s"] = round(f["pairs_kept"] / f["seconds"], 1) if f["seconds"] else 0.0
        return d

    @classmethod
    def from_dict(cls, d: dict) -> ExtractStats:
        """The stats of extract_stats.json's content (`to_dict`'s inverse; pairs_per_s is derived)."""
        files = [FileStats(**{k: v for k, v in f.items() if k != "pairs_per_s"}) for f in d["files"]]
        fixed = {k: v for k, v in d.items() if k not in ("files", "totals", "pairs_per_s")}
        return cls(files=files, totals=FileStats(**d["totals"]), **fixed)

    @classmethod
    def read(cls, uri: str, storage_options: dict | None = None) -> ExtractStats:
        """The stats of a finished extract: OUT/extract_stats.json, `uri` being OUT."""
        with fsspec.open(f"{uri.rstrip('/')}/{STATS_NAME}", "r", **(storage_options or {})) as f:
            return cls.from_dict(json.load(f))


def pair_uid(url: str, caption: str) -> tuple[str, int]:
    """(uid, dedup key): 128-bit blake2b hex of url NUL caption, and its first 64 bits."""
    digest = hashlib.blake2b(f"{url}\x00{caption}".encode(), digest_size=16).digest()
    return digest.hex(), int.from_bytes(digest[:8], "big")


class _WatIterator(ArchiveIterator):
    """warcio's iterator, remembering whether the last gzip member ended cleanly."""

    clean_end: bool | None = None

    def close(self):
        if self.reader is not None:  # close() may run twice; judge the first time
            decomp = self.reader.decompressor
            self.clean_end = decomp is None or (decomp.eof and not decomp.unused_data)
        super().close()


def _parse_payload(record, payload: bytes, stats: FileStats) -> dict | None:
    """The record's JSON envelope; None (and an error counted) when short or not JSON."""
    declared = record.rec_headers.get_header("Content-Length") or ""
    if not declared.isdigit() or len(payload) < int(declared):
        stats.errors["truncated_record"] += 1
        return None
    try:
        doc = json.loads(payload)
    except ValueError:
        doc = None
    if not isinstance(doc, dict):
        stats.errors["bad_json"] += 1
        return None
    return doc


def _is_json(record) -> bool:
    """True unless the record declares a content type other than JSON."""
    ctype = record.rec_headers.get_header("Content-Type") or "application/json"
    return "json" in ctype.lower()


def _iter_envelopes(stream, stats: FileStats) -> Iterator[tuple[dict, str]]:
    """(JSON document, record WARC-Target-URI) of each JSON metadata record."""
    records = _WatIterator(stream)
    it = iter(records)
    while True:
        try:
            record = next(it, None)
            if record is None:
                break
            stats.records += 1
            if record.rec_type != "metadata":
                continue
            stats.metadata_records += 1
            if not _is_json(record):
                continue
            payload = record.raw_stream.read()
        except _READ_ERRORS:
            stats.errors["read"] += 1
            return
        doc = _parse_payload(record, payload, stats)
        if doc is not None:
            yield doc, record.rec_headers.get_header("WARC-Target-URI") or ""
    if records.clean_end is False:
        stats.errors["truncated_stream"] += 1


class _Page(NamedTuple):
    url: str  # the page, as crawled
    base: BaseUrl  # what relative links resolve against
    links: list  # HTML-Metadata.Links


def _page_of(doc: dict, target_uri: str, stats: FileStats) -> _Page | None:
    """(page URL, base URL, links) of an HTML-response envelope; None for other records."""
    envelope = _get(doc, "Envelope")
    html = _get(envelope, "Payload-Metadata", "HTTP-Response-Metadata", "HTML-Metadata")
    if not isinstance(html, dict):
        return None
    stats.pages += 1
    page_url = _get(envelope, "WARC-Header-Metadata", "WARC-Target-URI")
    page_url = page_url if isinstance(page_url, str) and page_url else target_uri
    links = html.get("Links", [])
    if not isinstance(links, list):
        stats.errors["bad_record"] += 1
        links = []
    if not links:
        stats.pages_without_links += 1
    return _Page(page_url, split_base(page_base(page_url, _get(html, "Head", "Base"))), links)


def _judge_link(link: dict, page: _Page, pair_filter: PairFilter,
                rows: dict[int, tuple]) -> str | None:
    """Add the link's pair to `rows`; return the drop reason instead when there is one."""
    caption = normalize_caption(link.get("alt"))
    if not caption:
        return "empty_alt"
    url, reason = resolve_image_url(link.get("url"), page.base)
    reason = reason or pair_filter.reason(url, caption)
    if reason:
        return reason
    uid, key = pair_uid(url, caption)
    if key in rows:
        return "duplicate"
    rows[key] = (url, caption, uid, page.url)
    return None


def _take_links(page: _Page, pair_filter: PairFilter,
                rows: dict[int, tuple], stats: FileStats) -> None:
    """Judge every IMG@/src link of a page, counting links and drop reasons."""
    for link in page.links:
        stats.links += 1
        if not isinstance(link, dict) or link.get("path") != IMG_PATH:
            continue
        stats.img_links += 1
        reason = _judge_link(link, page, pair_filter, rows)
        if reason:
            stats.dropped[reason] += 1


def _rows_table(rows: dict[int, tuple]) -> pa.Table:
    """SCHEMA's columns plus `key` (uint64 dedup key), in insertion order."""
    cols = list(zip(*rows.values())) if rows else [()] * len(SCHEMA)
    arrays = [pa.array(c, type=f.type) for c, f in zip(cols, SCHEMA)]
    arrays.append(pa.array(list(rows), type=pa.uint64()))
    return pa.Table.from_arrays(arrays, names=SCHEMA.names + ["key"])


def extract_file(uri: str, pair_filter: PairFilter | None = None,
                 storage_options: dict | None = None) -> tuple[pa.Table, FileStats]:
    """Pairs of one WAT file (unique within it, with a `key` column) and its stats."""
    pair_filter = pair_filter or PairFilter()
    stats, rows, start = FileStats(uri=uri), {}, time.perf_counter()
    with fsspec.open(uri, "rb", **(storage_options or {})) as stream:
        for doc, target_uri in _iter_envelopes(stream, stats):
            page = _page_of(doc, target_uri, stats)
            if page is not None:
                _take_links(page, pair_filter, rows, stats)
    stats.pairs_kept = len(rows)
    stats.seconds = time.perf_counter() - start
    return _rows_table(rows), stats


def _extract_task(task: tuple[str, PairFilter, dict | None]) -> tuple[pa.Table, FileStats]:
    """`extract_file` on one (uri, filter, storage options) tuple: what workers run."""
    return extract_file(*task)


def _executor_for(executor: Executor | None, workers: int | None, n_files: int):
    """The caller's executor, or a local one of `workers` processes (default: all cores), no more than files."""
    if executor is not None:
        return contextlib.nullcontext(executor)
    return LocalExecutor(min(workers or os.cpu_count() or 1, max(n_files, 1)))


class _ShardWriter:
    """Cuts a stream of tables into `part-NNNNN.parquet` files of `shard_rows` rows."""

    def __init__(self, fs, root: str, shard_rows: int):
        self.fs, self.root, self.shard_rows = fs, root, shard_rows
        self.pending: list[pa.Table] = []
        self.buffered = 0
        self.paths: list[str] = []

    def add(self, table: pa.Table) -> None:
        """Buffer rows; write every full shard."""
        self.pending.append(table)
        self.buffered += table.num_rows
        while self.buffered >= self.shard_rows:
            merged = pa.concat_tables(self.pending)
            self._write(merged.slice(0, self.shard_rows))
            rest = merged.slice(self.shard_rows)
            self.pending, self.buffered = [rest], rest.num_rows

    def close(self) -> list[str]:
        """Write the remainder (an empty shard if the run had no rows); the part names."""
        if self.buffered or not self.paths:
            self._write(pa.concat_tables(self.pending) if self.pending else SCHEMA.empty_table())
        return self.paths

    def _write(self, table: pa.Table) -> None:
        name = f"part-{len(self.paths):05d}.parquet"  # in the staging folder: swapped in whole at the end
        write_parquet(self.fs, f"{self.root}/{name}", table.combine_chunks())
        self.paths.append(name)


def _drop_seen(table: pa.Table, seen: set[int]) -> pa.Table:
    """Rows whose key is not in `seen` (keys are unique within a table); updates `seen`."""
    keys = table.column("key").to_pylist()
    mask = pa.array([k not in seen for k in keys], type=pa.bool_())
    seen.update(keys)
    return table.filter(mask).drop_columns(["key"])


def extract(wat_uris: Sequence[str], out_uri: str, *, workers: int | None = None,
            executor: Executor | None = None, min_caption_len: int | None = None,
            max_caption_len: int | None = None, languages: Iterable[str] | None = None,
            image_extensions: Iterable[str] | None = None, language_detector=None,
            shard_rows: int = DEFAULT_SHARD_ROWS,
            storage_options: dict | None = None) -> ExtractStats:
    """Candidate pairs of WAT files -> OUT/part-NNNNN.parquet and OUT/extract_stats.json."""
    check_extract_options(workers, shard_rows)
    pair_filter = PairFilter(min_caption_len, max_caption_len,
                             frozenset(languages) if languages is not None else None,
                             parse_extensions(image_extensions), language_detector)
    output = StagedOutput(out_uri, "extract", STATS_NAME, listed_key="shards", storage_options=storage_options)
    output.check()
    wat_uris = [wat_uris] if isinstance(wat_uris, str) else list(wat_uris)  # one path, not its letters
    check(bool(wat_uris), "WAT", "no WAT file given", WAT_FIX)
    uris = expand_uris(wat_uris, storage_options, what="WAT file")
    for uri in uris:
        check_wat(uri, storage_options)
    start, seen, files = time.perf_counter(), set(), []
    tasks = [(uri, pair_filter, storage_options) for uri in uris]
    with output:
        writer = _ShardWriter(output.fs, output.path, shard_rows)
        nodes = Counter()
        with _executor_for(executor, workers, len(uris)) as ex:
            for table, stats in map_counting_nodes(ex, _extract_task, tasks, nodes):
                kept = _drop_seen(table, seen)
                stats.dropped["duplicate"] += table.num_rows - kept.num_rows
                stats.pairs_kept = kept.num_rows
                writer.add(kept)
                files.append(stats)
        shards = [as_uri(output.fs, f"{output.out}/{name}") for name in writer.close()]  # where they end up
        result = _finish(output.fs, output.path, files, shards, time.perf_counter() - start, pair_filter,
                         dict(nodes))
        output.commit()
    return result


def check_extract_options(workers: int | None, shard_rows: int) -> None:
    """InputError for a run option extract cannot honour (PairFilter checks its own)."""
    if workers is not None:
        whole_number("--workers", workers, fix="parallel files; leave it out for all cores")
    whole_number("--shard-rows", shard_rows, fix="rows per part file")


def check_wat(uri: str, storage_options: dict | None = None) -> None:
    """InputError unless uri is a file that opens as a WARC: gzip whose first member starts with
    "WARC/" (or holds nothing), or plain "WARC/". One read of its first 64 KiB."""
    fs, path = fsspec.core.url_to_fs(uri, **(storage_options or {}))
    check(fs.exists(path), uri, "does not exist", WAT_FIX)
    check(not fs.isdir(path), uri, "is a folder", "give WAT files, or a glob such as 'wat/*.warc.wat.gz'")
    with fs.open(path, "rb") as f:
        head = f.read(1 << 16)
    check(bool(head), uri, "is empty (0 bytes), not a WAT file", WAT_FIX)
    if head[:2] != b"\x1f\x8b":
        check(head.startswith(b"WARC/"), uri, "is neither gzip nor WARC, not a WAT file", WAT_FIX)
        return
    inflate = zlib.decompressobj(16 + zlib.MAX_WBITS)
    try:
        text = inflate.decompress(head, 64)
    except zlib.error as err:
        raise InputError(uri, f"is not valid gzip ({err}), not a WAT file", WAT_FIX) from None
    check(text.startswith(b"WARC/") or (not text and inflate.eof), uri,
          "is gzip but holds no WARC records, not a WAT file", WAT_FIX)


def _warnings(files: list[FileStats]) -> list[str]:
    """One line per file that yielded nothing to extract from or ended early."""
    out = []
    for f in files:
        if not f.records:
            out.append(f"{f.uri}: holds no WARC records")
        elif not f.metadata_records:
            out.append(f"{f.uri}: holds no WAT metadata records (a WARC or WET file instead of a WAT?)")
        if f.errors["read"] or f.errors["truncated_stream"]:
            out.append(f"{f.uri}: ended early after {f.records} records (truncated or corrupt); the rest is lost")
    return out


def _finish(fs, root: str, files: list[FileStats], shards: list[str], seconds: float,
            pair_filter: PairFilter, nodes: dict[str, int]) -> ExtractStats:
    """Sum the per-file stats and write `extract_stats.json` under root."""
    totals = FileStats(uri="*")
    for stats in files:
        totals.add(stats)
    result = ExtractStats(files=files, totals=totals, rows=totals.pairs_kept, shards=shards,
                          seconds=seconds, filters=pair_filter.describe(), warnings=_warnings(files),
                          nodes=nodes)
    write_json(fs, f"{root}/{STATS_NAME}", result.to_dict())
    return result
