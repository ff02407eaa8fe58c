"""Curation driver: candidate pairs -> balanced WIT-style pairs (CLIP Sec. 2.2; MetaCLIP Sec. 3,
the substring-match / count / balance stages of `metaclip/curation/curate.py`).

Two per-shard maps around one small reduce (DESIGN.md, Scale):
  pass 1  match each shard's captions and write the per-row match counts and query ids as raw
          int32 files under the staging folder: pass 2 reads them back (a few ns a row) instead of
          matching again (~2.5 us a caption), and raw files cost ~1/40 of a Parquet list column
          to write; per-query counts go beside them as a sparse .npz, and the sampled query
          lists that `--target-size` needs come back with the result (balance.py);
  reduce  sum the counts (uint64), fix t (given, or solved), p_q = min(1, t / count_q);
  pass 2  draw per (seed, uid, query) and write part-NNNNN.parquet: every input column plus
          `query_ids: list<int32>`, written under a temporary name and renamed.
Then curation_stats.json, _query_stats.parquet and curation_counts.png. Everything is built in
OUT/_curate_staging-<token>/ and swapped into OUT at the end (clip_core.data.staging): a run that
fails, on bad input or otherwise, leaves the previous complete result in OUT as it was. Options,
the query list, the pairs' schemas and OUT are checked before any work. A shard is a
run of row groups of one input file (about shard_rows rows); a worker holds one batch of
batch_rows rows plus its shard's matched query ids (4 bytes each), whatever the corpus size.
Output rows do not depend on shards, executor or worker count.
"""
from __future__ import annotations

import functools
import math
import posixpath
from collections import Counter
from dataclasses import dataclass, replace

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from clip_core.checks import whole_number
from clip_core.curation.balance import (
    count_to_prob, expected_size, in_sample, keep_mask, keep_probability, row_keys, solve_t,
)
from clip_core.curation.matching import DEFAULT_MAX_CHARS, QueryMatcher, clean_captions, load_query_list
from clip_core.curation.plot import (
    PLOT_NAME, QUERY_STATS_NAME, STATS_NAME, CurationStats, summarize, write_report,
)
from clip_core.data.parquet import atomic_parquet, check_column, list_parquet, parquet_errors, parquet_metadata
from clip_core.data.staging import StagedOutput
from clip_core.errors import InputError
from clip_core.executors import Executor, LocalExecutor, map_counting_nodes

PAIRS_FIX = "give candidate pairs Parquet: a string column caption (and url), one row a pair"

QUERY_IDS = pa.field("query_ids", pa.list_(pa.int32()))
KEY_COLUMNS = ("url", "caption", "uid")  # read as plain arrays (dictionary-encoded ones decoded)


@dataclass(frozen=True)
class Shard:
    """A unit of work: some row groups of one Parquet file."""
    index: int
    uri: str
    row_groups: tuple[int, ...]
    num_rows: int


def check_pairs_schema(uri: str, schema: pa.Schema) -> None:
    """InputError unless caption is text and url / uid (when present) can key the draws."""
    check_column(uri, schema, "caption", "text", PAIRS_FIX)
    check_column(uri, schema, "url", "text", PAIRS_FIX, required=False)
    check_column(uri, schema, "uid", "key", "uid must be an integer or string id per pair; drop the column "
                 "to key pairs by url and caption", required=False)


def plan_shards(uris: str | list[str], shard_rows: int) -> list[Shard]:
    """Shards of about shard_rows rows from whole row groups; checks each file's columns first."""
    shards = []
    for uri in list_parquet(uris, PAIRS_FIX):
        meta = parquet_metadata(uri, PAIRS_FIX)
        with parquet_errors(uri, PAIRS_FIX):
            schema = meta.schema.to_arrow_schema()
        check_pairs_schema(uri, schema)
        groups, rows = [], 0
        for g in range(meta.num_row_groups):
            groups.append(g)
            rows += meta.row_group(g).num_rows
            if rows >= shard_rows:
                shards.append(Shard(len(shards), uri, tuple(groups), rows))
                groups, rows = [], 0
        if groups or not meta.num_row_groups:
            shards.append(Shard(len(shards), uri, tuple(groups), rows))
    return shards


def _batches(shard: Shard, batch_rows: int, columns: list[str] | None = None):
    """The shard's record batches, url / caption / uid decoded; errors name the file."""
    with parquet_errors(shard.uri, PAIRS_FIX), fsspec.open(shard.uri, "rb") as f:
        pf = pq.ParquetFile(f)
        if shard.row_groups:
            for batch in pf.iter_batches(batch_rows, row_groups=list(shard.row_groups), columns=columns,
                                         use_threads=False):
                yield _decode_keys(batch)


def _decode_keys(batch: pa.RecordBatch) -> pa.RecordBatch:
    """Dictionary-encoded url / caption / uid as plain arrays (what matching and hashing take)."""
    if not any(pa.types.is_dictionary(batch.schema.field(n).type) for n in KEY_COLUMNS if n in batch.schema.names):
        return batch
    columns = [c.dictionary_decode() if n in KEY_COLUMNS and pa.types.is_dictionary(c.type) else c
               for n, c in zip(batch.schema.names, batch.columns)]
    return pa.RecordBatch.from_arrays(columns, names=batch.schema.names)


def _read_schema(uri: str) -> pa.Schema:
    with parquet_errors(uri, PAIRS_FIX), fsspec.open(uri, "rb") as f:
        schema = pq.read_schema(f)
    for name in KEY_COLUMNS:  # as _decode_keys hands the batches over
        if name in schema.names and pa.types.is_dictionary(schema.field(name).type):
            field = schema.field(name)
            schema = schema.set(schema.get_field_index(name), field.with_type(field.type.value_type))
    return schema


@functools.lru_cache(maxsize=2)  # one matcher per worker process, keyed by the list's content
def cached_matcher(queries_uri: str, digest: str, case_sensitive: bool) -> QueryMatcher:
    """The QueryMatcher of a query list, built once per process."""
    queries, found = load_query_list(queries_uri)
    if found != digest:
        raise RuntimeError(f"query list {queries_uri} changed during curation")
    return QueryMatcher(queries, case_sensitive)


def match_shard(task: dict) -> dict:
    """Pass 1 on one shard: per-row match lists (raw int32 files), sparse counts, a sample."""
    shard, matcher = task["shard"], cached_matcher(task["queries_uri"], task["digest"], task["case_sensitive"])
    matched_ids, stats, sample = [], Counter(), ([], [])
    names = _read_schema(shard.uri).names
    columns = ["caption"] + [c for c in ("uid", "url") if c in names and task["sample_rate"]]
    with fsspec.open(_tmp(task, "lengths", shard), "wb") as lengths_file, \
            fsspec.open(_tmp(task, "ids", shard), "wb") as ids_file:
        for batch in _batches(shard, task["batch_rows"], columns):
            captions, repaired = clean_captions(batch.column("caption"), task["max_chars"])
            rows, ids = matcher.match(captions)
            lengths = np.bincount(rows, minlength=len(batch)).astype(np.int32)
            lengths_file.write(lengths.tobytes())
            ids_file.write(ids.astype(np.int32).tobytes())
            matched_ids.append(ids)
            stats.update(repaired)
            stats["matched"] += int(np.count_nonzero(lengths))
            if task["sample_rate"]:
                chosen = (lengths > 0) & in_sample(row_keys(batch), task["sample_rate"])
                sample[0].append(lengths[chosen])
                sample[1].append(ids[np.repeat(chosen, lengths)])
    _save_sparse(_tmp(task, "counts", shard, ".npz"), _bincount(matched_ids, matcher.n_queries))
    stats["no_match"] = shard.num_rows - stats["matched"] - stats["null_caption"] - stats["empty_caption"]
    sample = tuple(np.concatenate(part) if part else np.zeros(0, np.int32) for part in sample)
    return {"stats": dict(stats), "rejected": matcher.rejected, "sample_lengths": sample[0], "sample_ids": sample[1]}


def sample_shard(task: dict) -> dict:
    """Pass 2 on one shard: keep decisions, OUT/part-NNNNN.parquet, sparse kept counts."""
    shard = task["shard"]
    with fsspec.open(task["probs_uri"], "rb") as f:
        probs = np.load(f)
    kept_ids, kept, expected = [], 0, 0.0
    schema = _read_schema(shard.uri)
    if "query_ids" in schema.names:  # curating curated pairs again: replace their query_ids
        schema = schema.remove(schema.get_field_index("query_ids"))
    schema = schema.append(QUERY_IDS)
    with fsspec.open(_tmp(task, "lengths", shard), "rb") as lengths_file, \
            fsspec.open(_tmp(task, "ids", shard), "rb") as ids_file, \
            atomic_parquet(_part_uri(task["work_uri"], shard), schema, **_output_options(schema)) as writer:
        for batch in _batches(shard, task["batch_rows"]):
            lengths = _read_int32(lengths_file, len(batch))
            ids = _read_int32(ids_file, int(lengths.sum()))
            matched = batch.filter(pa.array(lengths > 0))
            matched = matched.drop_columns(["query_ids"]) if "query_ids" in matched.column_names else matched
            lengths = lengths[lengths > 0]
            parents = np.repeat(np.arange(len(lengths)), lengths)
            keep = keep_mask(parents, ids, row_keys(matched), probs, task["seed"], len(lengths))
            expected += float(keep_probability(parents, ids, probs, len(lengths)).sum())
            kept_ids.append(ids[keep[parents]])
            kept += int(keep.sum())
            offsets = np.concatenate([[0], np.cumsum(lengths[keep])]).astype(np.int32)
            lists = pa.ListArray.from_arrays(pa.array(offsets), pa.array(kept_ids[-1], pa.int32()),
                                             type=QUERY_IDS.type)
            columns = [*matched.filter(pa.array(keep)).columns, lists]
            writer.write_batch(pa.RecordBatch.from_arrays(columns, schema=schema))
    _save_sparse(_tmp(task, "kept", shard, ".npz"), _bincount(kept_ids, len(probs)))
    return {"kept": kept, "expected": expected}


def _bincount(parts: list[np.ndarray], n: int) -> np.ndarray:
    """Per-query counts of a shard's id arrays (one bincount, not one per batch)."""
    return np.bincount(np.concatenate(parts) if parts else np.zeros(0, np.int64), minlength=n).astype(np.uint64)


def _read_int32(f, n: int) -> np.ndarray:
    data = f.read(4 * n)
    if len(data) != 4 * n:
        raise OSError(f"{f} ended early: pass 1's match file is truncated")
    return np.frombuffer(data, np.int32)


def _output_options(schema: pa.Schema) -> dict:
    """zstd; no dictionary for the high-cardinality columns (it only costs time there)."""
    unique = ("url", "caption", "uid", "query_ids")
    return {"compression": "zstd", "use_dictionary": [n for n in schema.names if n not in unique]}


def _tmp(task: dict, kind: str, shard: Shard, ext: str = ".i32") -> str:
    return f"{task['work_uri']}/_tmp/{kind}-{shard.index:05d}{ext}"


def _part_uri(out_uri: str, shard: Shard) -> str:
    return f"{out_uri.rstrip('/')}/part-{shard.index:05d}.parquet"


def _save_sparse(uri: str, counts: np.ndarray) -> None:
    nonzero = np.flatnonzero(counts)
    with fsspec.open(uri, "wb") as f:
        np.savez(f, ids=nonzero, counts=counts[nonzero])


def _sum_sparse(uris: list[str], n: int) -> np.ndarray:
    total = np.zeros(n, np.uint64)
    for uri in uris:
        with fsspec.open(uri, "rb") as f, np.load(f) as z:
            total[z["ids"]] += z["counts"]
    return total


def check_curate_options(max_per_query: int, target_size: int | None, seed: int, shard_rows: int,
                         batch_rows: int = 16384, max_chars: int = DEFAULT_MAX_CHARS, sample_size: int = 1) -> None:
    """InputError for a number curation cannot honour; runs before any file is read."""
    whole_number("--max-per-query", max_per_query, fix="it is t, the most pairs kept per query; WIT used 20000")
    if target_size is not None:
        whole_number("--target-size", target_size, fix="the most pairs to keep in all, in expectation")
    whole_number("--seed", seed, minimum=0, maximum=2**64 - 1, fix="the seed of the balancing draws")
    whole_number("--shard-rows", shard_rows, fix="rows per unit of work")
    for name, value in (("batch_rows", batch_rows), ("max_chars", max_chars), ("sample_size", sample_size)):
        whole_number(name, value)


def curate(pairs_uris: str | list[str], queries_uri: str, out_uri: str, *, max_per_query: int = 20000,
           target_size: int | None = None, seed: int = 0, case_sensitive: bool = True,
           executor: Executor | None = None, shard_rows: int = 250_000, batch_rows: int = 16384,
           max_chars: int = DEFAULT_MAX_CHARS, sample_size: int = 1_000_000,
           keep_temp: bool = False) -> CurationStats:
    """Match, count, balance and write curated pairs under out_uri; return their stats.

    Every check comes first; the result is built aside and swapped into out_uri at the end."""
    check_curate_options(max_per_query, target_size, seed, shard_rows, batch_rows, max_chars, sample_size)
    output = StagedOutput(out_uri, "curate", STATS_NAME, outputs=(QUERY_STATS_NAME, PLOT_NAME),
                          legacy=("_curate_tmp",))
    output.check()
    queries, digest = load_query_list(queries_uri)
    shards = plan_shards(pairs_uris, shard_rows)
    total_rows = sum(s.num_rows for s in shards)
    if not total_rows:
        raise InputError(" ".join([pairs_uris] if isinstance(pairs_uris, str) else pairs_uris),
                         "holds no rows: nothing to curate", PAIRS_FIX)
    rate = min(1.0, sample_size / total_rows) if target_size is not None else 0.0
    base = {"queries_uri": queries_uri, "digest": digest, "case_sensitive": case_sensitive, "work_uri": output.uri,
            "batch_rows": batch_rows, "max_chars": max_chars, "sample_rate": rate, "seed": seed}
    with output:
        stats = _run_passes(base, shards, len(queries), max_per_query, target_size, executor)
        output.commit(keep_work=keep_temp)
    return stats


def _run_passes(base: dict, shards: list[Shard], n_queries: int, max_per_query: int, target_size: int | None,
                executor: Executor | None) -> CurationStats:
    """Pass 1, the reduce, pass 2 and the report, all written under base["work_uri"]; the stats."""
    owned, executor, nodes = executor is None, executor or LocalExecutor(), Counter()
    try:
        first = list(map_counting_nodes(executor, match_shard, [{**base, "shard": s} for s in shards], nodes))
        counts = _sum_sparse([_tmp(base, "counts", s, ".npz") for s in shards], n_queries)
        empty = [np.zeros(0, np.int32)]
        offsets = np.concatenate([[0], np.cumsum(np.concatenate([r["sample_lengths"] for r in first] or empty))])
        sample_ids = np.concatenate([r["sample_ids"] for r in first] or empty)
        t = _choose_t(counts, offsets, sample_ids, max_per_query, target_size, base["sample_rate"])
        probs_uri = f"{base['work_uri']}/_tmp/entry_prob.npy"
        with fsspec.open(probs_uri, "wb") as f:
            np.save(f, count_to_prob(counts, t))
        second = list(map_counting_nodes(executor, sample_shard, [{**base, "shard": s, "probs_uri": probs_uri}
                                                                  for s in shards], nodes))
    finally:
        if owned:
            executor.close()
    kept = _sum_sparse([_tmp(base, "kept", s, ".npz") for s in shards], n_queries)
    settings = {k: base[k] for k in ("seed", "case_sensitive", "max_chars", "queries_uri", "sample_rate")}
    parts = [(posixpath.basename(_part_uri(base["work_uri"], s)), s.num_rows) for s in shards]
    settings |= {"max_per_query": max_per_query, "target_size": target_size}
    rate = base["sample_rate"]
    estimated = expected_size(offsets, sample_ids, counts, t, rate) if rate else None
    stats = replace(summarize(settings, counts, int(t), first, second, parts, estimated), nodes=dict(nodes))
    return write_report(base["work_uri"], base["queries_uri"], counts, kept, int(t), stats)


def _choose_t(counts: np.ndarray, offsets: np.ndarray, sample_ids: np.ndarray, max_per_query: int,
              target_size: int | None, rate: float) -> int:
    """t as given, or the largest t whose expected size is at most target_size (InputError if none)."""
    if target_size is None:
        return max_per_query
    smallest = expected_size(offsets, sample_ids, counts, 1, rate)
    if smallest > target_size:  # solve_t would return t = 1 and keep more than asked: "at most" fails
        raise InputError("--target-size", f"{target_size} is below {smallest:,.2f}, the expected size at the "
                         "smallest t, 1 pair per query", f"ask for at least {math.ceil(round(smallest, 6))} pairs")
    return solve_t(counts, offsets, sample_ids, target_size, rate)
