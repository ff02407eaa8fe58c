r"""Substring matching of captions against the query list (CLIP Sec. 2.2, WIT; MetaCLIP Sec. 3.2).

Semantics are MetaCLIP's (`metaclip/substr_matching.py`): the caption is padded with a space on
each side, each of , . ; : ? ! ` is wrapped in spaces, tab, newline and carriage return become
spaces, and query q matches when " q " is a substring. Case-sensitive unless asked otherwise
(then caption and queries are lower-cased with `str.lower`). `query_ids` are row indices into
the query list, sorted and unique per caption. Rejected and counted in `QueryMatcher.rejected`:
empty or whitespace-only queries, repeats (a query matches under its first row only), and
queries holding a tab/newline/CR (a spaced caption has none, so they could never match).

The fast path is not Aho-Corasick: pyahocorasick scans a trie node's children one by one, and
with 226k keys that all begin with a space it matched 138k captions per CPU-second, one automaton
pass over a batch joined by newlines 105k, this path 400k (bench/curation_bench.py; ~5x on the
longer WordNet glosses). Because every key is " q ", a match is exactly a run of
space-delimited tokens of the spaced caption: the bytes between the m-th and the (m+k+1)-th
space equal q, where q has k inner spaces. So for a batch of captions, in numpy:
  1. Arrow wraps the punctuation and joins each caption as " caption \n"; numpy maps tab,
     newline and CR inside captions to spaces. No key holds "\n", so no range crosses rows;
  2. prefix sums of a polynomial hash mod 2^64 give the hash of any byte range in O(1);
  3. level k looks the ranges S[m]+1 .. S[m+k+1] up in one open-addressing table holding every
     query and every token prefix of a multi-token query; only ranges whose k tokens are such a
     prefix go on to level k+1, so long titles cost nothing where they do not start;
  4. every hash hit is compared with the query's bytes (8 at a time): collisions never match.
`reference_match` is the oracle: a short loop over the queries with Python's `in`.
"""
from __future__ import annotations

import hashlib
from collections.abc import Sequence

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from clip_core.data.parquet import check_column, check_exists, parquet_errors
from clip_core.errors import check

SPACED_PUNCTUATION = ",.;:?!`"
SPACED_WHITESPACE = "\t\n\r"
DEFAULT_MAX_CHARS = 4096
QUERIES_FIX = "give the query list `clip-pipeline queries` writes: a string column query, one query a row"
CHUNK_BYTES = 1 << 19  # raw caption bytes per numpy pass: keeps the working set in cache
_BASES = (0x9E3779B97F4A7C15, 0xD6E8FEB86659FD93, 0xC2B2AE3D27D4EB4F)  # odd: invertible mod 2^64
_MIX = np.uint64(0xBF58476D1CE4E5B9)
_EMPTY_SHIFT = np.uint64(0x9E3779B97F4A7C15)
_TO_SPACE = np.arange(256, dtype=np.uint8)
_TO_SPACE[[9, 10, 13]] = 32  # tab, newline, carriage return -> space
_TO_SPACE.setflags(write=False)


def spacing(text: str) -> str:
    """MetaCLIP's caption spacing: pad, wrap , . ; : ? ! ` in spaces, tab/newline/CR to space."""
    text = f" {text} "
    for punct in SPACED_PUNCTUATION:
        text = text.replace(punct, f" {punct} ")
    for char in SPACED_WHITESPACE:
        text = text.replace(char, " ")
    return text


def reference_match(caption: str | None, queries: Sequence[str | None], case_sensitive: bool = True) -> list[int]:
    """The test oracle: ids of queries q with " q " in spacing(caption), first of duplicates."""
    return reference_match_many([caption], queries, case_sensitive)[0]


def reference_match_many(captions: Sequence[str | None], queries: Sequence[str | None],
                         case_sensitive: bool = True) -> list[list[int]]:
    """reference_match for many captions, preparing the query keys once."""
    fold = (lambda s: s) if case_sensitive else str.lower
    first: dict[str, int] = {}
    for i, query in enumerate(queries):
        if query is not None and query.strip():
            first.setdefault(fold(query), i)
    keys = sorted((i, f" {query} ") for query, i in first.items())
    spaced = (spacing(fold(caption or "")) for caption in captions)
    return [[i for i, key in keys if key in text] for text in spaced]


def load_query_list(uri: str) -> tuple[list[str | None], str]:
    """The `query` column of a query-list Parquet and a digest of its content; InputError if unusable."""
    check_exists(uri, QUERIES_FIX)
    with parquet_errors(uri, QUERIES_FIX), fsspec.open(uri, "rb") as f:
        schema = pq.read_schema(f)
        check_column(uri, schema, "query", "string", QUERIES_FIX)
        queries = pq.read_table(f, columns=["query"]).column("query").to_pylist()
    check(bool(queries), uri, "is empty: nothing could ever match", QUERIES_FIX)
    check(any(_usable(q) for q in queries), uri, f"has no usable query: all {len(queries)} are blank or hold "
          "a tab or newline, so nothing could ever match", QUERIES_FIX)
    digest = hashlib.sha256("\n".join(q or "" for q in queries).encode("utf-8", "replace")).hexdigest()
    return queries, digest


def _usable(query: str | None) -> bool:
    """A query QueryMatcher keeps (first of duplicates aside): non-blank, no tab/newline/CR."""
    return query is not None and bool(query.strip()) and not any(c in query for c in SPACED_WHITESPACE)


def clean_captions(column: pa.Array | pa.ChunkedArray,
                   max_chars: int = DEFAULT_MAX_CHARS) -> tuple[pa.StringArray, dict[str, int]]:
    """Valid UTF-8 strings capped at max_chars; NULL -> "", bad bytes -> U+FFFD; counts by reason."""
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if pa.types.is_dictionary(arr.type):
        arr = arr.dictionary_decode()
    if pa.types.is_large_string(arr.type) or pa.types.is_large_binary(arr.type):
        arr = arr.cast(pa.string() if pa.types.is_large_string(arr.type) else pa.binary())
    counts = {"null_caption": arr.null_count, "empty_caption": 0, "invalid_utf8": 0, "truncated": 0}
    if pa.types.is_binary(arr.type):
        arr, counts["invalid_utf8"] = _decode_replacing(arr)
    elif pa.types.is_string(arr.type):
        try:
            arr.validate(full=True)
        except pa.ArrowInvalid:
            arr, counts["invalid_utf8"] = _decode_replacing(arr.view(pa.binary()))
    else:
        raise TypeError(f"caption column must be string or binary, got {arr.type}")
    arr = arr.fill_null("")
    blank = pc.equal(pc.utf8_length(pc.utf8_trim_whitespace(arr)), 0)
    counts["empty_caption"] = _count(blank) - counts["null_caption"]
    counts["truncated"] = _count(pc.greater(pc.utf8_length(arr), max_chars))
    if counts["truncated"]:
        arr = pc.utf8_slice_codeunits(arr, 0, max_chars)
    return arr, counts


def _decode_replacing(arr: pa.BinaryArray) -> tuple[pa.StringArray, int]:
    """Decode bytes as UTF-8 with U+FFFD for bad sequences; the number of rows repaired."""
    values = arr.to_pylist()
    text = [None if v is None else v.decode("utf-8", "replace") for v in values]
    return pa.array(text, pa.string()), sum(1 for v, t in zip(values, text) if v is not None and t.encode() != v)


class _HashTable:
    """Open addressing with linear probing over uint64 hashes stored as hash + _EMPTY_SHIFT, so a
    stored 0 marks an empty slot; one int32 payload per key; vectorised build and lookup."""

    def __init__(self, keys: np.ndarray, payload: np.ndarray):
        self.bits = max(4, int(np.ceil(np.log2(max(len(keys), 1) * 2))))  # load factor <= 1/2
        self.keys, self.payload = np.zeros(1 << self.bits, np.uint64), np.zeros(1 << self.bits, np.int32)
        keys = keys + _EMPTY_SHIFT  # the caller ensures no key hash is -_EMPTY_SHIFT
        pending, home, probe = np.arange(len(keys)), self._home(keys), 0
        while pending.size:  # round r: every pending key tries slot home + r; first claimant wins
            slot = (home[pending] + probe) & (len(self.keys) - 1)
            free = np.flatnonzero(self.keys[slot] == 0)
            taken, first = np.unique(slot[free], return_index=True)
            self.keys[taken], self.payload[taken] = keys[pending[free[first]]], payload[pending[free[first]]]
            lost = np.ones(len(pending), bool)
            lost[free[first]] = False
            pending, probe = pending[lost], probe + 1

    def _home(self, h: np.ndarray) -> np.ndarray:
        return ((h * _MIX) >> np.uint64(64 - self.bits)).astype(np.int64)

    def lookup(self, h: np.ndarray) -> np.ndarray:
        """The payload stored under each hash, 0 where there is none."""
        h = h + _EMPTY_SHIFT
        home = self._home(h)
        key = self.keys[home]  # the first probe, on whole arrays, settles most hashes
        hit = key == h
        found = np.where(hit, self.payload[home], 0)
        active, probe = np.flatnonzero(~hit & (key != 0)), 1
        while active.size:
            slot = (home[active] + probe) & (len(self.keys) - 1)
            key = self.keys[slot]
            hit = key == h[active]
            found[active[hit]] = self.payload[slot[hit]]
            active, probe = active[~hit & (key != 0)], probe + 1
        return found


class QueryMatcher:
    """MetaCLIP substring matching of many captions at once; build once per worker, picklable."""

    def __init__(self, queries: Sequence[str | None], case_sensitive: bool = True):
        self.n_queries, self.case_sensitive = len(queries), case_sensitive
        if not self.n_queries:
            raise ValueError("the query list is empty: nothing could ever match")
        ids: dict[bytes, int] = {}
        self.rejected = {"empty": 0, "duplicate": 0, "unmatchable": 0}
        for i, query in enumerate(queries):
            if query is None or not query.strip():
                self.rejected["empty"] += 1
                continue
            if "\n" in query or "\t" in query or "\r" in query:  # spaced captions have none: never matches
                self.rejected["unmatchable"] += 1
                continue
            key = (query if case_sensitive else query.lower()).encode("utf-8")
            self.rejected["duplicate"] += key in ids
            ids.setdefault(key, i)
        self._query_bytes(ids)
        self._build(np.fromiter(ids.values(), np.int64, len(ids)))

    def _query_bytes(self, ids: dict[bytes, int]) -> None:
        """Concatenated query bytes (in id order) with per-id offsets, for verifying hash hits."""
        qid = np.fromiter(ids.values(), np.int64, len(ids))
        lengths = np.fromiter(map(len, ids), np.int64, len(ids))
        self._qlen, self._qoff = np.zeros(self.n_queries, np.int64), np.zeros(self.n_queries, np.int64)
        self._qlen[qid], self._qoff[qid] = lengths, np.cumsum(lengths) - lengths
        self._qbuf = np.frombuffer(b"".join(ids) + bytes(8), np.uint8)  # padded for 8-byte words
        self._qmask = _low_bytes(np.maximum(np.minimum(self._qlen, 8), 1))  # rejected rows are never hit
        self._qword = _words(self._qbuf)[self._qoff] & self._qmask  # each query's first 8 bytes

    def _build(self, qid: np.ndarray) -> None:
        """The table of every query's hash and of each token prefix of a multi-token query."""
        data = self._qbuf[:-8]
        starts, ends = self._qoff[qid], self._qoff[qid] + self._qlen[qid]
        spaces = np.flatnonzero(data == 32)
        owner = np.searchsorted(ends, spaces, "right")  # the query each inner space belongs to
        self._empty_token = bool((spaces == starts[owner]).any())  # a leading or double space
        for base in _BASES:
            self._base, self._pw, self._ipw = base, np.ones(1, np.uint64), np.ones(1, np.uint64)
            full = self._range_hashes(data, starts, ends)
            ordered = np.sort(full)
            if (ordered[1:] == ordered[:-1]).any() or (full + _EMPTY_SHIFT == 0).any():
                continue  # two distinct queries share a hash: try the next base
            hashes = np.concatenate([full, self._range_hashes(data, starts[owner], spaces)])
            payload = np.concatenate([(qid + 1) * 2, np.ones(len(spaces), np.int64)])  # (id + 1) * 2 | prefix
            order = np.argsort(hashes, kind="stable")
            hashes, payload = hashes[order], payload[order]
            first = np.flatnonzero(np.concatenate([[True], hashes[1:] != hashes[:-1]]))[: len(hashes)]
            if len(first):  # one payload per distinct hash: the query id, or-ed with the prefix flag
                payload = np.maximum.reduceat(payload & ~1, first) | np.maximum.reduceat(payload & 1, first)
            self._table = _HashTable(hashes[first], payload.astype(np.int32))
            self._pw = self._ipw = np.ones(1, np.uint64)  # regrown to caption-chunk size on use
            return
        raise RuntimeError("hash collision among query keys with every base")

    def _powers(self, n: int) -> None:
        """Grow the cached base powers B^i and B^-i to at least n entries."""
        if len(self._pw) >= n:
            return
        n = max(n, 2 * len(self._pw))
        b, binv = np.uint64(self._base), np.uint64(pow(self._base, -1, 1 << 64))
        self._pw, self._ipw = np.ones(n, np.uint64), np.ones(n, np.uint64)
        self._pw[1:], self._ipw[1:] = np.cumprod(np.full(n - 1, b)), np.cumprod(np.full(n - 1, binv))

    def _range_hashes(self, data: np.ndarray, starts: np.ndarray, ends: np.ndarray,
                      prefix: np.ndarray | None = None) -> np.ndarray:
        """Polynomial hash of data[starts:ends] per range, independent of the position."""
        if prefix is None:
            prefix = self._prefix(data)
        return (prefix[ends] - prefix[starts]) * self._ipw[starts]

    def _prefix(self, data: np.ndarray) -> np.ndarray:
        self._powers(len(data) + 1)
        prefix = np.zeros(len(data) + 1, np.uint64)
        np.cumsum((data + np.uint64(1)) * self._pw[: len(data)], out=prefix[1:])
        return prefix

    def match(self, captions: pa.Array | Sequence[str | None]) -> tuple[np.ndarray, np.ndarray]:
        """(rows, query_ids) of every match, sorted by row then id, unique per row."""
        arr = _as_strings(captions)
        if not self.case_sensitive:
            arr = _lower(arr)
        offsets = _offsets(arr)
        rows, ids, start = [], [], 0
        while start < len(arr):
            stop = max(start + 1, int(np.searchsorted(offsets, offsets[start] + CHUNK_BYTES, "right")) - 1)
            r, q = self._match_chunk(arr.slice(start, stop - start))
            rows.append(r + start)
            ids.append(q)
            start = stop
        if not rows:
            return np.zeros(0, np.int64), np.zeros(0, np.int32)
        return np.concatenate(rows), np.concatenate(ids)

    def match_lists(self, captions: pa.Array | Sequence[str | None]) -> list[list[int]]:
        """query_ids per caption as Python lists (for tests and small inputs)."""
        rows, ids = self.match(captions)
        bounds = np.searchsorted(rows, np.arange(len(captions) + 1))
        return [ids[a:b].tolist() for a, b in zip(bounds[:-1], bounds[1:])]

    def _match_chunk(self, arr: pa.StringArray) -> tuple[np.ndarray, np.ndarray]:
        spaced = _spaced(arr)
        offsets = _offsets(spaced)
        raw = np.frombuffer(spaced.buffers()[2], np.uint8)[offsets[0]: offsets[-1]]
        offsets = offsets - offsets[0]
        padded = np.zeros(len(raw) + 8, np.uint8)  # 8 spare bytes for word compares
        data = np.take(_TO_SPACE, raw, out=padded[: len(raw)])
        data[offsets[1:] - 1] = 10  # rows end in "\n": no key holds one, so no range crosses rows
        prefix = self._prefix(data)
        spaces = np.flatnonzero(data == 32)
        m, k, hits = np.arange(len(spaces) - 1), 0, []
        if not self._empty_token:
            m = m[spaces[m + 1] > spaces[m] + 1]  # skip empty tokens unless a key starts with one
        while m.size:  # level k: the k+1 tokens after space m
            m = m[m + k + 1 < len(spaces)]
            starts, ends = spaces[m] + 1, spaces[m + k + 1]
            payload = self._table.lookup(self._range_hashes(data, starts, ends, prefix))
            hit = payload >= 2
            hits.append(((payload[hit] >> 1) - 1, starts[hit], ends[hit]))
            m, k = m[(payload & 1) == 1], k + 1
        ids, starts, ends = (np.concatenate(parts) for parts in zip(*hits)) if hits else (np.zeros(0, np.int64),) * 3
        keep = self._verified(padded, ids, starts, ends)
        rows = np.searchsorted(offsets, starts[keep], "right") - 1
        key = np.sort((rows.astype(np.int64) << 32) | ids[keep].astype(np.int64))
        key = key[np.concatenate([[True], key[1:] != key[:-1]])] if key.size else key
        return key >> 32, (key & 0xFFFFFFFF).astype(np.int32)

    def _verified(self, padded: np.ndarray, ids: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
        """Mask of hash hits whose bytes equal the query's, compared 8 bytes at a time."""
        text, length = _words(padded), self._qlen[ids]
        ok = (ends - starts == length) & ((text[starts] & self._qmask[ids]) == self._qword[ids])
        at, step = np.flatnonzero(ok & (length > 8)), 8  # the few queries longer than one word
        query = _words(self._qbuf)
        while at.size:
            left = length[at] - step
            mask = _low_bytes(np.minimum(left, 8))
            bad = ((text[starts[at] + step] ^ query[self._qoff[ids[at]] + step]) & mask) != 0
            ok[at[bad]] = False
            at, step = at[~bad & (left > 8)], step + 8
        return ok


def _words(padded: np.ndarray) -> np.ndarray:
    """Little-endian uint64 starting at every byte of a buffer padded with 8 zero bytes."""
    return np.ndarray((len(padded) - 7,), dtype="<u8", buffer=padded, strides=(1,))


def _low_bytes(n: np.ndarray) -> np.ndarray:
    """uint64 masks of the n (1..8) low bytes."""
    return np.uint64(0xFFFFFFFFFFFFFFFF) >> (np.uint64(64) - np.uint64(8) * n.astype(np.uint64))


def _count(mask: pa.BooleanArray) -> int:
    return int(pc.sum(mask).as_py() or 0)


def _as_strings(captions: pa.Array | Sequence[str | None]) -> pa.StringArray:
    if isinstance(captions, pa.ChunkedArray):
        captions = captions.combine_chunks()
    arr = captions if isinstance(captions, pa.Array) else pa.array(list(captions), pa.string())
    if pa.types.is_large_string(arr.type):
        arr = arr.cast(pa.string())
    return arr.fill_null("") if arr.null_count else arr


def _lower(arr: pa.StringArray) -> pa.StringArray:
    """str.lower of each caption (Arrow's ASCII kernel when the batch is ASCII)."""
    if pc.all(pc.string_is_ascii(arr)).as_py() is not False:
        return pc.ascii_lower(arr)
    return pa.array([s.lower() for s in arr.to_pylist()], pa.string())


def _spaced(arr: pa.StringArray) -> pa.StringArray:
    """Each caption as ' caption \\n' with punctuation wrapped in spaces (tab/newline/CR: later)."""
    arr = pc.replace_substring_regex(arr, "([,.;:?!`])", r" \1 ")
    return pc.binary_join_element_wise("", arr, "\n", " ")


def _offsets(arr: pa.StringArray) -> np.ndarray:
    return np.frombuffer(arr.buffers()[1], np.int32, len(arr) + 1, arr.offset * 4).astype(np.int64)
