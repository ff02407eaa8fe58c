"""The data card's facts (`CardFacts`, filled by flows.data_card) and their two renderings:
self-contained HTML (data_card.html) and Markdown for Prefect.

Both embed their pictures as data: URIs, never a storage path, so they show the same on any
machine. All text from the web (captions, queries, hosts, error messages) is escaped.
"""
from __future__ import annotations

import base64
import html
from dataclasses import dataclass, field
from typing import Sequence

@dataclass
class CardFacts:
    """What the card shows; each part empty when its stage has not run."""

    shards: str
    funnel: list[tuple[str, int]] = field(default_factory=list)  # stage -> pairs or images
    curation: dict = field(default_factory=dict)
    queries: dict = field(default_factory=dict)  # buckets, head, tail
    captions: dict = field(default_factory=dict)
    hosts: list[tuple[str, int, int]] = field(default_factory=list)  # host, rows, downloaded
    failures: list[tuple[str, str, int]] = field(default_factory=list)  # stage, reason, count
    dedup: dict = field(default_factory=dict)
    samples: list[tuple[bytes, str]] = field(default_factory=list)  # JPEG thumbnail, caption
    pictures: dict[str, bytes] = field(default_factory=dict)  # title -> PNG



STYLE = """body{font:14px/1.45 system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#1f272d}
h1{font-size:1.5em}h2{font-size:1.2em;margin-top:1.8em;border-bottom:1px solid #ccd}
table{border-collapse:collapse;margin:.5em 0}td,th{padding:.2em .7em;border-bottom:1px solid #e4e6ea;text-align:left}
td.n{text-align:right;font-variant-numeric:tabular-nums}.note{color:#5f7281}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(140px,1fr));gap:10px}
figure{margin:0}img.thumb{width:128px;height:128px;object-fit:contain;background:#f3f4f6}
figcaption{font-size:12px;color:#445461}.row{display:flex;gap:2em;flex-wrap:wrap}"""


def data_uri(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def _cell(value) -> str:
    if isinstance(value, float):
        return f'<td class="n">{value:,.2f}</td>'
    if isinstance(value, int):
        return f'<td class="n">{value:,}</td>'
    return f"<td>{html.escape(str(value))}</td>"


def table(header: Sequence[str], rows: Sequence[Sequence]) -> str:
    """An HTML table, numbers right-aligned."""
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(_cell(v) for v in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def picture(title: str, png: bytes) -> str:
    return f'<figure><img style="max-width:100%" alt="{html.escape(title)}" src="{data_uri(png)}">' \
           f"<figcaption>{html.escape(title)}</figcaption></figure>"


def render_card(facts: CardFacts) -> str:
    """The whole page."""
    parts = [f"<h1>Data card: {html.escape(facts.shards)}</h1>",
             "<h2>Counts at each stage</h2>", table(("stage", "pairs / images"), facts.funnel)]
    parts += _queries(facts) + _captions(facts)
    parts += ["<h2>Hosts</h2>", f'<p class="note">{facts.captions.get("hosts_total", 0):,} hosts; the '
              f"{len(facts.hosts)} with the most pairs:</p>",
              table(("host", "pairs crawled", "downloaded"), facts.hosts)]
    parts += ["<h2>Pairs lost, by reason</h2>",
              table(("stage", "reason", "pairs"), facts.failures) if facts.failures else "<p>none</p>"]
    parts += _dedup(facts)
    parts += ["<h2>Samples</h2>", '<div class="grid">' + "".join(
        f'<figure><img class="thumb" alt="" src="{data_uri(jpg, "image/jpeg")}"><figcaption title="'
        f'{html.escape(caption)}">{html.escape(_short(caption))}</figcaption></figure>'
        for jpg, caption in facts.samples) + "</div>"]
    body = "\n".join(parts)
    return (f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8"><title>Data card: '
            f"{html.escape(facts.shards)}</title><style>{STYLE}</style></head><body>\n{body}\n</body></html>\n")


def _short(text: str, limit: int = 90) -> str:
    return text if len(text) <= limit else text[:limit - 1] + "\u2026"


def _queries(facts: CardFacts) -> list[str]:
    if not facts.queries:
        return ["<h2>Queries</h2><p>no curation stats found for this corpus</p>"]
    cur, q = facts.curation, facts.queries
    title = "pairs per query, before and after balancing"
    return ["<h2>Queries</h2>",
            f'<p>t = {cur["t"]:,} pairs at most per query; {cur["queries_matched"]:,} of {cur["queries"]:,} '
            f'queries matched a caption, {cur["head_queries"]:,} matched more than t (the head balancing cuts).</p>',
            '<div class="row">', table(("pairs matched", "queries"), q["buckets"]),
            picture(title, facts.pictures[title]) if title in facts.pictures else "", "</div>",
            '<div class="row"><div><h3>Head</h3>', table(("query", "matched", "kept"), q["head"]),
            "</div><div><h3>Tail</h3>", table(("query", "matched", "kept"), q["tail"]), "</div></div>"]


def _captions(facts: CardFacts) -> list[str]:
    c = facts.captions
    if not c.get("n"):
        return ["<h2>Captions</h2><p>no downloaded pairs</p>"]
    rows = [(unit, *(c[unit][q] for q in (5, 50, 95))) for unit in ("chars", "words", "tokens")]
    title = next((t for t in facts.pictures if t.startswith("caption length")), None)
    return ["<h2>Captions</h2>",
            f'<p class="note">{c["n"]:,} downloaded pairs from {c["parquet_read"]} of {c["parquet_total"]} shard '
            f'Parquet files; tokens (CLIP BPE with &lt;start&gt; and &lt;end&gt;) on {c["tokenized"]:,} of them: '
            f'{c["over_77_tokens"]:.1%} exceed the 77-token context and are cut.</p>',
            '<div class="row">', table(("length in", "5th pct", "median", "95th pct"), rows),
            picture(title, facts.pictures[title]) if title else "", "</div>"]


def _dedup(facts: CardFacts) -> list[str]:
    d = facts.dedup
    if not d:
        return ["<h2>Dedup against the eval sets</h2><p>not run for this corpus</p>"]
    out = ["<h2>Dedup against the eval sets</h2>",
           f'<p>{d["removed"]:,} of {d["corpus_images"]:,} corpus images near-duplicate an eval image and are left '
           f'out of training; {d["unreadable"]:,} could not be checked.</p>',
           table(("eval set", "images", "with a copy in the corpus", "overlap %", "corpus images matched",
                  "thresholds"), d["eval_sets"])]
    if d["within"]:
        w = d["within"]
        out.append(f'<p>Copies inside the corpus: {w.get("groups", 0):,} groups, {w.get("exact_removed", 0):,} '
                   f'exact and {w.get("near_removed", 0):,} near copies removed.</p>')
    out += [picture(t, png) for t, png in facts.pictures.items() if "corpus (left)" in t or "removed (left)" in t]
    return out


def render_markdown(facts: CardFacts, card_uri: str) -> str:
    """The card's numbers for a Prefect artifact, with the curation plot and samples embedded."""
    def md_table(header, rows):
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        return "\n".join(lines + ["| " + " | ".join(_md(v) for v in row) + " |" for row in rows])

    parts = [f"**Data card** (whole page: `{card_uri}`)", md_table(("stage", "pairs / images"), facts.funnel)]
    if facts.dedup:
        parts.append(md_table(("eval set", "images", "overlap", "overlap %"),
                              [row[:4] for row in facts.dedup["eval_sets"]]))
    parts += [f"![{t}]({data_uri(png)})" for t, png in facts.pictures.items() if t.startswith("pairs per query")]
    thumbs = [f"![{_md(_short(caption, 40))}]({data_uri(jpg, 'image/jpeg')})" for jpg, caption in facts.samples[:12]]
    if thumbs:  # a table: Prefect's UI draws images one under the other otherwise
        rows = [thumbs[i:i + 6] for i in range(0, len(thumbs), 6)]
        parts.append(md_table(["samples", *[" "] * (len(rows[0]) - 1)], rows))
    return "\n\n".join(parts)


def _md(value) -> str:
    if isinstance(value, float):
        return f"{value:,.2f}"
    if isinstance(value, int):
        return f"{value:,}"
    return html.escape(str(value)).replace("|", "\\|")
