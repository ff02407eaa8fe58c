"""Curation's report beside the curated pairs: curation_stats.json, _query_stats.parquet and the
head/tail picture curation_counts.png (MetaCLIP Fig. 2-style: per-query counts before and after
balancing; the head is flattened onto t, the tail left as it is).

The JSON holds settings, totals, skipped counts by reason and the top queries; every query's
matched and kept counts go to the Parquet (500k queries would swamp a JSON file). Its "_" keeps it
out of `*.parquet` globs of the pairs folder. matplotlib is imported only to draw, not in workers.
`CurationStats` is the JSON as a typed object: what `curate` returns and `CurationStats.read(OUT)`
loads back from a finished run.
"""
from __future__ import annotations

import io
import json
from collections import Counter
from dataclasses import dataclass, field, replace

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from clip_core.curation.balance import count_to_prob

SKIP_REASONS = ("null_caption", "empty_caption", "no_match", "not_sampled")
STATS_NAME, QUERY_STATS_NAME, PLOT_NAME = "curation_stats.json", "_query_stats.parquet", "curation_counts.png"
SETTINGS = ("seed", "case_sensitive", "max_chars", "max_per_query", "target_size")  # curate's, as the JSON holds them


@dataclass(frozen=True)
class CurationStats:
    """What curate did: its settings, t, pairs by stage and skip reason, the parts it wrote."""

    t: int  # the most pairs kept per query (given, or solved for target_size)
    seed: int
    case_sensitive: bool
    max_chars: int
    max_per_query: int
    target_size: int | None
    queries_uri: str
    n_queries: int  # entries of the query list
    rejected: dict[str, int]  # entries the matcher dropped, by reason (empty, duplicate, unmatchable)
    queries_matched: int  # queries matching at least one caption
    head_queries: int  # queries matching more than t captions: the ones balancing cuts
    input_rows: int
    matched: int  # pairs whose caption holds at least one query
    kept: int
    expected_kept: float  # E(kept) under the draw
    sample_rate: float  # of the sample target_size solved t on (0: none)
    estimated_kept: float | None  # E(kept) estimated on that sample (None without target_size)
    skipped: dict[str, int]  # input rows not kept, by reason (SKIP_REASONS)
    repaired: dict[str, int]  # captions repaired before matching: invalid_utf8, truncated
    parts: list[str]  # part-NNNNN.parquet names, one per shard
    top_queries: list[dict] = field(default_factory=list)  # the 20 most matched: id, query, matched, kept
    nodes: dict[str, int] = field(default_factory=dict)  # node -> shard tasks (pass 1 and pass 2) run there

    @property
    def shards(self) -> int:
        """Units of work, one part file each."""
        return len(self.parts)

    def to_dict(self) -> dict:
        """curation_stats.json's content."""
        return {"t": self.t, **{k: getattr(self, k) for k in SETTINGS},
                "queries": {"uri": self.queries_uri, "n": self.n_queries, "rejected": self.rejected,
                            "matched": self.queries_matched, "head": self.head_queries},
                "totals": {"input_rows": self.input_rows, "matched": self.matched, "kept": self.kept,
                           "expected_kept": self.expected_kept, "sample_rate": self.sample_rate,
                           "estimated_kept": self.estimated_kept},
                "skipped": self.skipped, "repaired": self.repaired, "shards": self.shards, "parts": self.parts,
                "files": {"query_stats": QUERY_STATS_NAME, "plot": PLOT_NAME}, "top_queries": self.top_queries,
                "nodes": self.nodes}

    @classmethod
    def from_dict(cls, d: dict) -> CurationStats:
        """The stats of curation_stats.json's content (`to_dict`'s inverse)."""
        queries, totals = d["queries"], d["totals"]
        return cls(t=d["t"], **{k: d[k] for k in SETTINGS}, queries_uri=queries["uri"], n_queries=queries["n"],
                   rejected=queries["rejected"], queries_matched=queries["matched"], head_queries=queries["head"],
                   **{k: totals[k] for k in ("input_rows", "matched", "kept", "expected_kept", "sample_rate")},
                   estimated_kept=totals.get("estimated_kept"), skipped=d["skipped"], repaired=d["repaired"],
                   parts=d["parts"], top_queries=d.get("top_queries", []), nodes=d.get("nodes", {}))

    @classmethod
    def read(cls, uri: str) -> CurationStats:
        """The stats of a finished curate: OUT/curation_stats.json, `uri` being OUT."""
        with fsspec.open(f"{uri.rstrip('/')}/{STATS_NAME}", "r") as f:
            return cls.from_dict(json.load(f))


def summarize(settings: dict, counts: np.ndarray, t: int, first: list[dict], second: list[dict],
              parts: list[tuple[str, int]], estimated_kept: float | None = None) -> CurationStats:
    """The stats from the settings, pass 1 and pass 2 shard results and (part, rows); no top queries yet."""
    totals = Counter()
    for result in first:
        totals.update(result["stats"])
    kept = sum(r["kept"] for r in second)
    skipped = {k: int(totals[k]) for k in SKIP_REASONS[:3]} | {"not_sampled": int(totals["matched"]) - kept}
    return CurationStats(
        t=t, **{k: settings[k] for k in SETTINGS}, queries_uri=settings["queries_uri"], n_queries=len(counts),
        rejected=first[0]["rejected"] if first else {}, queries_matched=int((counts > 0).sum()),
        head_queries=int((counts > t).sum()), input_rows=sum(rows for _, rows in parts),
        matched=int(totals["matched"]), kept=kept, expected_kept=sum(r["expected"] for r in second),
        sample_rate=settings["sample_rate"], estimated_kept=estimated_kept, skipped=skipped,
        repaired={k: int(totals[k]) for k in ("invalid_utf8", "truncated")}, parts=[name for name, _ in parts])


def write_report(out_uri: str, queries_uri: str, counts: np.ndarray, kept: np.ndarray, t: int,
                 stats: CurationStats) -> CurationStats:
    """Write _query_stats.parquet, the PNG and curation_stats.json, the marker last; the stats with the top queries."""
    with fsspec.open(queries_uri, "rb") as f:
        table = pq.read_table(f)
    kinds = table.column("kind") if "kind" in table.column_names else pa.nulls(len(table), pa.string())
    root = out_uri.rstrip("/")
    with fsspec.open(f"{root}/{QUERY_STATS_NAME}", "wb") as f:
        pq.write_table(pa.table({"query": table.column("query"), "kind": kinds, "matched": counts, "kept": kept,
                                 "prob": count_to_prob(counts, t)}), f)
    top = np.argsort(-counts.astype(np.float64), kind="stable")[:20]
    names = table.column("query").take(top).to_pylist()
    stats = replace(stats, top_queries=[{"id": int(i), "query": q, "matched": int(counts[i]), "kept": int(kept[i])}
                                        for i, q in zip(top, names) if counts[i]])
    plot_counts(counts, kept, t, f"{root}/{PLOT_NAME}")
    with fsspec.open(f"{root}/{STATS_NAME}", "w") as f:
        json.dump(stats.to_dict(), f, indent=2)
    return stats


def plot_counts(matched: np.ndarray, kept: np.ndarray, t: float, out_uri: str) -> str:
    """Write the log-log rank plot of per-query matched and kept counts with the line at t."""
    from matplotlib.figure import Figure  # Figure directly: no pyplot state, no backend switch

    matched, kept = np.asarray(matched, dtype=np.float64), np.asarray(kept, dtype=np.float64)
    fig = Figure(figsize=(7, 4.5), dpi=100)
    ax = fig.subplots()
    for counts, label, color in ((matched, "matched (before)", "tab:blue"), (kept, "kept (after)", "tab:orange")):
        ranked = np.sort(counts)[::-1]
        ranked = ranked[ranked > 0]
        if ranked.size:  # ~2,000 log-spaced ranks draw the same curve as 500k points
            rank = np.unique(np.geomspace(1, ranked.size, 2000).astype(np.int64))
            ax.loglog(rank, ranked[rank - 1], label=label, color=color, lw=1.3)
    ax.axhline(t, color="k", ls="--", lw=0.8, label=f"t = {t:,}")
    ax.set(xlabel="query rank", ylabel="pairs per query",
           title=f"{int((matched > t).sum()):,} head queries (> t) of {int((matched > 0).sum()):,} matched; "
                 f"query matches {int(matched.sum()):,} -> {int(kept.sum()):,}")
    ax.title.set_fontsize(9)
    ax.legend(loc="upper right", fontsize=8)
    fig.subplots_adjust(left=0.11, right=0.97, bottom=0.11, top=0.92)  # tight_layout costs seconds
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    with fsspec.open(out_uri, "wb") as f:
        f.write(buffer.getvalue())
    return out_uri
