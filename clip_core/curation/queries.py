"""The query list of WIT (CLIP Sec. 2.2): words occurring at least 100 times in English Wikipedia,
bigrams with high pointwise mutual information, Wikipedia article titles above a search volume,
and WordNet synsets not already included (MetaCLIP `build_metadata.py`: views >= 70 for titles).

Tokens: `\\w+` runs joined by inner ' ’ or -, case kept (MetaCLIP's entries are case-sensitive, and
so is matching). Any other non-space character is a break: a bigram is two word tokens separated
by whitespace only, so every counted bigram can match a caption. PMI is nltk's (MetaCLIP used
it): log2(c(a b) * N / (c(a) * c(b))), N = all word tokens. MetaCLIP kept PMI >= 30 with no
count floor; with N ~ 3e9 Wikipedia tokens that means c(a) c(b) <= 2.8 c(a b), pairs of rare
words only. Here a bigram needs
c(a b) >= min_bigram_count (default min_count) and PMI >= min_pmi (default 8 bits).

Counting is a map-reduce that stays bounded on a billions-of-tokens dump:
  map     per chunk (64 MiB byte range of a text file split at line starts, a Parquet row
          group, or a whole compressed file) count in a Counter and spill it, whenever it holds
          max_keys keys and at the end, to a Parquet whose row group p holds the keys with
          hash(key) % partitions == p: memory ~ max_keys, whatever the chunk;
  reduce  per partition p, read row group p of every spill, summing as it goes, and keep the
          keys over the threshold: memory ~ distinct keys / partitions.
Unigrams run first; bigrams are counted in a second pass only between words that passed the
unigram threshold, so the bigram space is the vocabulary's, never the corpus's.
Queries are deduplicated (first kind wins: unigram, bigram, title, synset), whitespace is
collapsed, and entries that can never match under MetaCLIP's spacing (a , . ; : ? ! ` not
between spaces, e.g. "U.S.") are dropped and counted. The counts (`QueryStats`) travel inside the
query list, as JSON in its Parquet key-value metadata: the columns are the contract's, and
`QueryStats.read(OUT)` gets them back from a finished list.
"""
from __future__ import annotations

import functools
import json
import posixpath
import re
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from clip_core.checks import finite_number, whole_number
from clip_core.curation.balance import hash_strings
from clip_core.curation.wordnet import check_wordnet, wordnet_queries
from clip_core.data.parquet import atomic_parquet, check_column, list_files, parquet_metadata, read_errors
from clip_core.errors import check
from clip_core.executors import Executor, LocalExecutor, map_counting_nodes

WORD = r"\w+(?:['’\-]\w+)*"
_WORDS = re.compile(WORD)
_TOKENS = re.compile(WORD + r"|\S")  # word tokens and single breaking characters
_DEAD = re.compile(r"[^ ][,.;:?!`]|[,.;:?!`][^ ]")  # a spaced punctuation mark not between spaces
KINDS = ("unigram", "bigram", "title", "synset")
SCHEMA = pa.schema([("query", pa.string()), ("kind", pa.string()), ("count", pa.int64())])
_COMPRESSED = (".gz", ".bz2", ".xz", ".zst", ".lz4")
CORPUS_FIX = "give UTF-8 text files (optionally compressed) or Parquet with a string text column"
STATS_KEY = b"query_stats"  # the query list's Parquet metadata key holding QueryStats as JSON


@dataclass(frozen=True)
class QueryStats:
    """What build_queries did: the queries of each kind, and the counts they came from."""

    n_queries: int
    kinds: dict[str, dict[str, int]] = field(default_factory=dict)  # kind -> candidates, added, duplicate, unmatchable
    tokens: int = 0  # word tokens of the corpus: N of the PMI
    empty_texts: int | None = None  # NULL or empty corpus texts skipped (None: no corpus given)
    title_bad_lines: int | None = None  # title lines whose count is not a number (None: no titles given)
    nodes: dict[str, int] = field(default_factory=dict)  # node -> map and reduce tasks run there

    @property
    def per_kind(self) -> dict[str, int]:
        """Queries in the list, by kind."""
        return {kind: s["added"] for kind, s in self.kinds.items()}

    def to_dict(self) -> dict:
        """The stats as JSON values (the counts of a source not given are left out)."""
        d = {"tokens": self.tokens, "empty_texts": self.empty_texts, "title_bad_lines": self.title_bad_lines,
             "kinds": self.kinds, "n_queries": self.n_queries, "nodes": self.nodes}
        return {k: v for k, v in d.items() if v is not None}

    @classmethod
    def read(cls, uri: str) -> QueryStats:
        """The stats a query list written by build_queries carries; InputError for any other file."""
        meta = parquet_metadata(uri, "give a query list that `clip-pipeline queries` wrote")
        text = (meta.metadata or {}).get(STATS_KEY)
        check(text is not None, uri, "holds no query stats: `clip-pipeline queries` did not write it",
              "build the list with `clip-pipeline queries`, or do without its stats")
        return cls(**json.loads(text))


@dataclass(frozen=True)
class Chunk:
    """A unit of counting: bytes [start, end) of a text file (end -1: all), or Parquet row groups."""
    uri: str
    start: int = 0
    end: int = -1
    row_groups: tuple[int, ...] = ()


def words(text: str) -> list[str]:
    """Word tokens of a text, case kept."""
    return _WORDS.findall(text)


def bigrams(text: str, vocab: set[str] | frozenset[str]) -> list[str]:
    """"a b" for adjacent word tokens (whitespace between) that are both in vocab."""
    tokens = _TOKENS.findall(text)
    return [f"{a} {b}" for a, b in zip(tokens, tokens[1:]) if a in vocab and b in vocab]


def is_matchable(query: str) -> bool:
    """False when " query " can never be in a spaced caption (MetaCLIP spacing)."""
    return bool(query.strip()) and not _DEAD.search(f" {query} ") and not re.search(r"[\t\n\r]", query)


def plan_chunks(uris: list[str], chunk_bytes: int = 64 << 20, text_column: str = "text") -> list[Chunk]:
    """Chunks of every file under uris (files or folders; "_..." / "..." names skipped): byte ranges,
    row groups, whole files. InputError for a missing path or a Parquet file without a string text_column."""
    chunks = []
    for uri in uris:
        files = list_files(uri, CORPUS_FIX)
        check(bool(files), uri, "holds no files", CORPUS_FIX)
        fs = fsspec.core.url_to_fs(uri)[0]
        for file in files:
            if file.endswith(".parquet"):
                meta = parquet_metadata(file, CORPUS_FIX)
                check_column(file, meta.schema.to_arrow_schema(), text_column, "string", CORPUS_FIX)
                chunks += [Chunk(file, row_groups=(g,)) for g in range(meta.num_row_groups)]
            elif file.endswith(_COMPRESSED):
                chunks.append(Chunk(file))
            else:
                size = fs.size(file)
                chunks += [Chunk(file, s, min(s + chunk_bytes, size)) for s in range(0, size, chunk_bytes)]
    return chunks


def iter_texts(chunk: Chunk, text_column: str = "text") -> Iterator[str]:
    """Lines of a text chunk (those starting inside it) or texts of a Parquet row group."""
    what = "Parquet file" if chunk.row_groups else "text file"
    with read_errors(chunk.uri, CORPUS_FIX, what):
        yield from _iter_texts(chunk, text_column)


def _iter_texts(chunk: Chunk, text_column: str) -> Iterator[str]:
    if chunk.row_groups:
        with fsspec.open(chunk.uri, "rb") as f:
            pf = pq.ParquetFile(f)
            check_column(chunk.uri, pf.schema_arrow, text_column, "string", CORPUS_FIX)
            for batch in pf.iter_batches(8192, row_groups=list(chunk.row_groups), columns=[text_column]):
                yield from (t or "" for t in batch.column(0).to_pylist())  # NULL: "", counted as empty
        return
    with fsspec.open(chunk.uri, "rb", compression="infer" if chunk.end < 0 else None) as f:
        if chunk.start > 0:
            f.seek(chunk.start - 1)
            f.readline()  # the line holding byte start-1 belongs to the previous chunk
        while chunk.end < 0 or f.tell() < chunk.end:
            line = f.readline()
            if not line:
                break
            yield line.decode("utf-8", "replace")


def spill(counts: Counter, uri: str, partitions: int, listed: Counter | None = None) -> None:
    """Write counts to one Parquet whose row group p holds the keys hashed to partition p."""
    keys = pa.array(list(counts), pa.string())
    part = hash_strings(keys) % np.uint64(partitions) if len(keys) else np.zeros(0, np.uint64)
    order = np.argsort(part, kind="stable")
    table = pa.table({"key": keys, "count": pa.array(list(counts.values()), pa.int64()),
                      "listed": pa.array([(listed or {}).get(k, 0) for k in counts], pa.int64())}).take(order)
    bounds = np.searchsorted(part[order], np.arange(partitions + 1))
    with atomic_parquet(uri, table.schema) as writer:
        for p in range(partitions):  # an empty partition still writes its (empty) row group
            writer.write_table(table.slice(bounds[p], bounds[p + 1] - bounds[p]))


def count_chunk(task: dict) -> dict:
    """Map: count one chunk's unigrams, vocab bigrams or titles; spill every max_keys keys."""
    counts, listed, tokens, bad, empty, spills = Counter(), Counter(), 0, 0, 0, []
    vocab = _vocab(task["vocab_uri"]) if task["what"] == "bigram" else None
    for text in iter_texts(task["chunk"], task["text_column"]):
        if not text:  # a NULL or empty Parquet text: nothing to count, but counted as skipped
            empty += 1
            continue
        if task["what"] == "unigram":
            found = words(text)
            tokens += len(found)
            counts.update(found)
        elif task["what"] == "bigram":
            counts.update(bigrams(text, vocab))
        else:
            title, tab, count = text.rstrip("\r\n").partition("\t")
            title = " ".join(title.replace("_", " ").split())
            if not title or (tab and not count.strip().isdigit()):
                bad += bool(text.strip())
                continue
            counts[title] += int(count) if tab else 0
            listed[title] += not tab
        if len(counts) >= task["max_keys"]:  # bounds the map's memory whatever the chunk holds
            spills.append(f"{task['spill_uri']}-{len(spills):03d}.parquet")
            spill(counts, spills[-1], task["partitions"], listed)
            counts, listed = Counter(), Counter()
    spills.append(f"{task['spill_uri']}-{len(spills):03d}.parquet")
    spill(counts, spills[-1], task["partitions"], listed)
    return {"tokens": tokens, "bad_lines": bad, "empty_texts": empty, "spills": spills}


def reduce_partition(task: dict) -> pa.Table:
    """Reduce: sum partition p over every spill; keep count >= min_count (or listed titles)."""
    merged = None
    for uri in task["spill_uris"]:
        with fsspec.open(uri, "rb") as f:
            part = pq.ParquetFile(f).read_row_group(task["partition"])
        merged = part if merged is None else _sum_by_key(pa.concat_tables([merged, part]))
    merged = _sum_by_key(merged)
    keep = pc.or_(pc.greater_equal(merged["count"], task["min_count"]), pc.greater(merged["listed"], 0))
    return merged.filter(keep)


def _sum_by_key(table: pa.Table) -> pa.Table:
    summed = table.group_by("key").aggregate([("count", "sum"), ("listed", "sum")])
    return pa.table({"key": summed["key"], "count": summed["count_sum"], "listed": summed["listed_sum"]})


@functools.lru_cache(maxsize=1)  # one vocabulary per worker process
def _vocab(uri: str) -> frozenset[str]:
    with fsspec.open(uri, "rb") as f:
        return frozenset(pq.read_table(f, columns=["key"])["key"].to_pylist())


def _count(what: str, chunks: list[Chunk], work: str, min_count: int, cfg: dict,
           executor: Executor, nodes: Counter) -> tuple[pa.Table, list[dict]]:
    """Map over chunks, reduce over partitions: the keys of `what` with count >= min_count (tasks counted per node)."""
    tasks = [{**cfg, "what": what, "chunk": c, "spill_uri": f"{work}/{what}-{i:05d}"} for i, c in enumerate(chunks)]
    mapped = list(map_counting_nodes(executor, count_chunk, tasks, nodes))
    spills = [uri for m in mapped for uri in m["spills"]]
    reduces = [{"spill_uris": spills, "partition": p, "min_count": min_count} for p in range(cfg["partitions"])]
    parts = list(map_counting_nodes(executor, reduce_partition, reduces, nodes))
    empty = pa.table({"key": pa.array([], pa.string()), "count": pa.array([], pa.int64()),
                      "listed": pa.array([], pa.int64())})
    table = pa.concat_tables(parts) if parts else empty
    return table.sort_by([("count", "descending"), ("key", "ascending")]), mapped


def _with_pmi(table: pa.Table, vocab: pa.Table, n_tokens: int) -> pa.Table:
    """Add pmi = log2(c(a b) N / (c(a) c(b))) to a bigram count table."""
    halves = pc.split_pattern(table["key"], " ", max_splits=1)
    first, second = pc.list_element(halves, 0), pc.list_element(halves, 1)
    count_of = vocab["count"].to_numpy().astype(np.float64)
    c_a = count_of[pc.index_in(first, value_set=vocab["key"]).to_numpy(zero_copy_only=False)]
    c_b = count_of[pc.index_in(second, value_set=vocab["key"]).to_numpy(zero_copy_only=False)]
    pmi = np.log2(table["count"].to_numpy().astype(np.float64) * n_tokens / (c_a * c_b)) if len(table) else np.zeros(0)
    return table.append_column("pmi", pa.array(pmi, pa.float64()))


def build_queries(corpus_uris: str | list[str], out_uri: str, *, min_count: int = 100, min_pmi: float = 8.0,
                  min_bigram_count: int | None = None, titles_uri: str | None = None, min_title_count: int = 70,
                  wordnet_dir: str | None = None, wordnet_lemmas: str = "all", text_column: str = "text",
                  partitions: int = 16, chunk_bytes: int = 64 << 20, max_keys: int = 1 << 20,
                  executor: Executor | None = None) -> QueryStats:
    """Write the query list Parquet (query, kind, count) to out_uri; return its stats."""
    corpus_uris = [corpus_uris] if isinstance(corpus_uris, str) else list(corpus_uris)
    check_queries_options(min_count, min_pmi, min_bigram_count, min_title_count, wordnet_lemmas, partitions,
                          chunk_bytes, max_keys)
    check(bool(corpus_uris or titles_uri or wordnet_dir), "CORPUS", "no source of queries was given",
          "give corpus files, --titles FILE or --wordnet DIR")
    fs, out_path = fsspec.core.url_to_fs(out_uri)
    check(not fs.isdir(out_path), out_uri, "is a folder; OUT is the query list file to write",
          "give a file path such as queries.parquet")
    chunks = plan_chunks(corpus_uris, chunk_bytes, text_column)  # every input checked before any work
    title_chunks = plan_chunks([titles_uri], chunk_bytes, text_column) if titles_uri else []
    if wordnet_dir:
        check_wordnet(wordnet_dir)
    owned, executor = executor is None, executor or LocalExecutor()
    parent, name = posixpath.split(out_uri)  # "_": out of a folder listing, should OUT sit in the corpus
    work = posixpath.join(parent, f"_{name}.work-{uuid.uuid4().hex[:8]}")  # per run: workers cache by URI
    fs, work_path = fsspec.core.url_to_fs(work)
    fs.makedirs(work_path, exist_ok=True)
    cfg = {"text_column": text_column, "partitions": partitions, "max_keys": max_keys,
           "vocab_uri": f"{work}/vocab.parquet"}
    candidates, counts, nodes = {}, {"tokens": 0}, Counter()
    try:
        if chunks:
            vocab, mapped = _count("unigram", chunks, work, min_count, cfg, executor, nodes)
            counts["tokens"] = n_tokens = sum(m["tokens"] for m in mapped)
            counts["empty_texts"] = sum(m["empty_texts"] for m in mapped)
            with fsspec.open(cfg["vocab_uri"], "wb") as f:
                pq.write_table(vocab.select(["key", "count"]), f)
            floor = min_count if min_bigram_count is None else min_bigram_count
            pairs, _ = _count("bigram", chunks, work, floor, cfg, executor, nodes)
            pairs = _with_pmi(pairs, vocab, n_tokens)
            candidates["unigram"] = vocab
            candidates["bigram"] = pairs.filter(pc.greater_equal(pairs["pmi"], min_pmi))
        if titles_uri:
            titles, mapped = _count("title", title_chunks, work, min_title_count, cfg, executor, nodes)
            counts["title_bad_lines"] = sum(m["bad_lines"] for m in mapped)
            candidates["title"] = titles.append_column("counted", pc.greater(titles["count"], 0))
        if wordnet_dir:
            candidates["synset"] = pa.table({"key": wordnet_queries(wordnet_dir, wordnet_lemmas)})
        table, kinds = _merge(candidates)
    finally:
        fs.rm(work_path, recursive=True)
        if owned:
            executor.close()
    stats = QueryStats(n_queries=len(table), kinds=kinds, **counts, nodes=dict(nodes))
    with atomic_parquet(out_uri, SCHEMA.with_metadata({STATS_KEY: json.dumps(stats.to_dict())})) as writer:
        writer.write_table(table)
    return stats


def check_queries_options(min_count: int, min_pmi: float, min_bigram_count: int | None, min_title_count: int,
                          wordnet_lemmas: str, partitions: int = 16, chunk_bytes: int = 1, max_keys: int = 1) -> None:
    """InputError for a number or choice build_queries cannot honour; runs before any file is read."""
    whole_number("--min-count", min_count, fix="unigrams occurring at least this often; WIT used 100")
    finite_number("--min-pmi", min_pmi, fix="the bigram PMI floor in bits")
    if min_bigram_count is not None:
        whole_number("--min-bigram-count", min_bigram_count, fix="leave it out to use --min-count")
    whole_number("--min-title-count", min_title_count, minimum=0, fix="MetaCLIP used 70")
    check(wordnet_lemmas in ("all", "head"), "--wordnet-lemmas", f"must be all or head, got {wordnet_lemmas!r}")
    for name, value in (("partitions", partitions), ("chunk_bytes", chunk_bytes), ("max_keys", max_keys)):
        whole_number(name, value)


def _merge(candidates: dict[str, pa.Table]) -> tuple[pa.Table, dict]:
    """Dedupe across kinds (first wins), drop unmatchable entries; the table and per-kind stats."""
    seen, rows, stats = set(), {"query": [], "kind": [], "count": []}, {}
    for kind in KINDS:
        table = candidates.get(kind)
        if table is None:
            continue
        counts = table["count"].to_pylist() if "count" in table.column_names else [None] * len(table)
        if "counted" in table.column_names:  # titles listed without a count carry no count
            counts = [c if k else None for c, k in zip(counts, table["counted"].to_pylist())]
        s = stats[kind] = {"candidates": len(table), "added": 0, "duplicate": 0, "unmatchable": 0}
        for query, count in zip(table["key"].to_pylist(), counts):
            query = " ".join(query.split())
            if not is_matchable(query):
                s["unmatchable"] += 1
            elif query in seen:
                s["duplicate"] += 1
            else:
                seen.add(query)
                s["added"] += 1
                for column, value in zip(rows, (query, kind, count)):
                    rows[column].append(value)
    return pa.table(rows, schema=SCHEMA), stats
