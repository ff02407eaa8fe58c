"""Curation's report beside the curated pairs: curation_stats.json, _query_stats.parquet and the
head/tail picture curation_counts.png (MetaCLIP Fig. 2-style: per-query counts before and after
balancing; the head is flattened onto t, the tail left as it is).

The JSON holds settings, totals, skipped counts by reason and the top queries; every query's
matched and kept counts go to the Parquet (500k queries would swamp a JSON file). Its "_" keeps it
out of `*.parquet` globs of the pairs folder. matplotlib is imported only to draw, not in workers.
"""
from __future__ import annotations

import io
import json
from collections import Counter

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from clip_core.curation.balance import count_to_prob

SKIP_REASONS = ("null_caption", "empty_caption", "no_match", "not_sampled")
STATS_NAME, QUERY_STATS_NAME, PLOT_NAME = "curation_stats.json", "_query_stats.parquet", "curation_counts.png"


def summarize(settings: dict, counts: np.ndarray, t: int, first: list[dict], second: list[dict],
              parts: list[tuple[str, int]]) -> dict:
    """curation_stats.json's content from the settings, pass 1 and pass 2 shard results, (part, rows)."""
    totals = Counter()
    for result in first:
        totals.update(result["stats"])
    kept = sum(r["kept"] for r in second)
    skipped = {k: int(totals[k]) for k in SKIP_REASONS[:3]} | {"not_sampled": int(totals["matched"]) - kept}
    return {
        "t": t, **{k: v for k, v in settings.items() if k not in ("queries_uri", "sample_rate")},
        "queries": {"uri": settings["queries_uri"], "n": len(counts), "rejected": first[0]["rejected"] if first else {},
                    "matched": int((counts > 0).sum()), "head": int((counts > t).sum())},
        "totals": {"input_rows": sum(rows for _, rows in parts), "matched": int(totals["matched"]), "kept": kept,
                   "expected_kept": sum(r["expected"] for r in second), "sample_rate": settings["sample_rate"]},
        "skipped": skipped, "repaired": {k: int(totals[k]) for k in ("invalid_utf8", "truncated")},
        "shards": len(parts), "parts": [name for name, _ in parts],
        "files": {"query_stats": QUERY_STATS_NAME, "plot": PLOT_NAME},
    }


def write_report(out_uri: str, queries_uri: str, counts: np.ndarray, kept: np.ndarray, t: int, stats: dict) -> None:
    """Write _query_stats.parquet, the PNG and curation_stats.json (with the top queries), the marker last."""
    with fsspec.open(queries_uri, "rb") as f:
        table = pq.read_table(f)
    kinds = table.column("kind") if "kind" in table.column_names else pa.nulls(len(table), pa.string())
    root = out_uri.rstrip("/")
    with fsspec.open(f"{root}/{QUERY_STATS_NAME}", "wb") as f:
        pq.write_table(pa.table({"query": table.column("query"), "kind": kinds, "matched": counts, "kept": kept,
                                 "prob": count_to_prob(counts, t)}), f)
    top = np.argsort(-counts.astype(np.float64), kind="stable")[:20]
    names = table.column("query").take(top).to_pylist()
    stats["top_queries"] = [{"id": int(i), "query": q, "matched": int(counts[i]), "kept": int(kept[i])}
                            for i, q in zip(top, names) if counts[i]]
    plot_counts(counts, kept, t, f"{root}/{PLOT_NAME}")
    with fsspec.open(f"{root}/{STATS_NAME}", "w") as f:
        json.dump(stats, f, indent=2)


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
