"""data_card.html: one self-contained page that says what a corpus is (issue 20 item 5).

Counts at each stage, the per-query histogram with its head and tail, caption lengths, hosts,
download failures by reason, dedup overlap by eval set and a contact sheet of samples, with
every picture embedded as a data: URI, so the file opens the same from a laptop, an MLflow
artifact or an S3 console. It is written beside the corpus shards (`SHARDS/data_card.html`)
from the stats each stage already wrote; captions and hosts come from the shards' Parquet
files, at most MAX_PARQUET of them (the card says how many it read), so a card for 400M pairs
reads what a card for 4,000 reads.
"""
from __future__ import annotations

import io
import itertools
import random
from collections import Counter
from dataclasses import dataclass

import fsspec
import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq

from clip_core.data.parquet import atomic_open, check_exists
from flows.common import exists, join
from flows.data_card_html import CardFacts, render_card, render_markdown

CARD_NAME = "data_card.html"
MAX_PARQUET = 64  # shard Parquet files read for captions and hosts
MAX_TOKENIZED = 2_000  # captions tokenized for the length in CLIP tokens
SAMPLES = 24  # images on the contact sheet
TABLE_ROWS = 15  # rows of the head, tail and host tables
HOST_PATTERN = r"^[a-zA-Z][a-zA-Z0-9+.-]*://(?:[^@/]*@)?(?P<host>\[[^\]]*\]|[^/:?#]+)"  # a URL's host name
QUERY_BUCKETS = (1, 10, 100, 1_000, 10_000, 100_000)  # lower edges of the per-query histogram


@dataclass(frozen=True)
class DataCard:
    """A written card: where it is, the page, and the Markdown for a Prefect artifact."""

    uri: str
    html: str
    markdown: str


def write_data_card(shards: str, curated: str | None = None, dedup: str | None = None, seed: int = 0) -> DataCard:
    """Gather the corpus' facts and write SHARDS/data_card.html, whole or not at all (a temporary
    name, then a rename: clip_core.data.parquet.atomic_open). curated None: the folder the crawl
    read, when it holds curation stats."""
    facts = gather_facts(shards, curated, dedup, seed)
    page, uri = render_card(facts), join(shards, CARD_NAME)
    fs, path = fsspec.core.url_to_fs(uri)
    with atomic_open(fs, path) as f:
        f.write(page.encode("utf-8"))
    return DataCard(uri, page, render_markdown(facts, uri))


def write_data_card_apart(shards: str, curated: str | None = None, dedup: str | None = None,
                          seed: int = 0) -> DataCard:
    """write_data_card in a fresh (spawned) process, for flows that go on to train in their own
    process. Drawn in the flow's process, the card (matplotlib, PIL, the BPE tokenizer, Arrow's
    regex kernels) was followed by a Ray Train worker crash (SIGSEGV in malloc) in 3 of 3 full
    demos, and by none in a demo with the card left out; the cause is not found, so the card keeps
    apart from the process that then starts Ray."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(write_data_card, shards, curated, dedup, seed).result()


def gather_facts(shards: str, curated: str | None = None, dedup: str | None = None, seed: int = 0) -> CardFacts:
    """Every number and picture of the card, from the stages' stats and the shards."""
    from clip_core.crawl import CrawlStats
    from clip_core.crawl.download import STATS_NAME

    check_exists(join(shards, STATS_NAME), "a data card describes crawled shards: crawl the corpus first")
    for folder, name, stage in ((curated, "curation_stats.json", "curate"), (dedup, "dedup_stats.json", "dedup")):
        if folder:
            check_exists(join(folder, name), f"not a finished {stage} output folder")
    crawl = CrawlStats.read(shards)
    curated = curated or (crawl.pairs if crawl.pairs and exists(join(crawl.pairs, "curation_stats.json")) else None)
    facts = CardFacts(shards=shards)
    if curated:
        add_curation(facts, curated)
    facts.funnel += [("queued for download", crawl.queued), ("downloaded", crawl.success)]
    facts.failures = ([("curate", reason, n) for reason, n in facts.curation.get("skipped", {}).items() if n]
                      + [("crawl: skipped", r, n) for r, n in crawl.skipped.items() if n]
                      + [("crawl: refused", r, n) for r, n in crawl.refused.items() if n]
                      + [("crawl: failed", r, n) for r, n in sorted(crawl.errors.items(), key=lambda e: -e[1])])
    add_shard_columns(facts, shards)
    if dedup:
        add_dedup(facts, dedup)
    facts.samples = sample_images(shards, seed)
    return facts


def add_curation(facts: CardFacts, curated: str) -> None:
    """The curation funnel, t, the per-query histogram with head and tail, the head/tail plot."""
    from clip_core.curation.curate import CurationStats
    from clip_core.curation.plot import PLOT_NAME, QUERY_STATS_NAME

    cur = CurationStats.read(curated)
    facts.funnel += [("candidate pairs", cur.input_rows), ("matched a query", cur.matched),
                     ("kept by balancing (curated)", cur.kept)]
    facts.curation = {"t": cur.t, "queries": cur.n_queries, "queries_matched": cur.queries_matched,
                      "head_queries": cur.head_queries, "skipped": cur.skipped}
    table = read_columns(join(curated, QUERY_STATS_NAME), ["query", "matched", "kept"])
    matched = table["matched"].to_numpy().astype(np.int64)
    edges = [*QUERY_BUCKETS, np.iinfo(np.int64).max]
    buckets = [(f"{lo:,}-{hi - 1:,}" if hi < edges[-1] else f"{lo:,}+", int(((matched >= lo) & (matched < hi)).sum()))
               for lo, hi in zip(edges, edges[1:])]
    rows = [(q, int(m), int(k)) for q, m, k in zip(table["query"].to_pylist(), matched, table["kept"].to_numpy())]
    ranked = sorted((r for r in rows if r[1] > 0), key=lambda r: (-r[1], r[0]))
    facts.queries = {"buckets": [("0 (never matched)", int((matched == 0).sum())), *buckets],
                     "head": ranked[:TABLE_ROWS], "tail": ranked[-TABLE_ROWS:][::-1]}
    plot = join(curated, PLOT_NAME)
    if exists(plot):
        facts.pictures["pairs per query, before and after balancing"] = read_bytes(plot)


def add_shard_columns(facts: CardFacts, shards: str) -> None:
    """Caption lengths (characters, words, CLIP tokens) and hosts, from the shards' Parquet files."""
    from clip_core.data.parquet import list_parquet

    files = [f for f in list_parquet(shards, "crawl the corpus first") if f.rsplit("/", 1)[-1][:1].isdigit()]
    hosts, downloaded, chars, words, captions = Counter(), Counter(), [], [], []
    for uri in files[:MAX_PARQUET]:
        table = read_columns(uri, ["url", "caption", "status"])
        host = pc.struct_field(pc.extract_regex(table["url"].combine_chunks(), HOST_PATTERN), "host")
        ok = pc.equal(table["status"], "success")
        hosts.update(host.to_pylist())
        downloaded.update(pc.filter(host, ok).to_pylist())
        text = pc.filter(table["caption"], ok).to_pylist()
        chars += [len(t or "") for t in text]
        words += [len((t or "").split()) for t in text]
        captions += text
    facts.hosts = [(h, n, downloaded[h]) for h, n in hosts.most_common(TABLE_ROWS)]
    facts.captions = caption_lengths(np.array(chars), np.array(words), captions)
    facts.captions |= {"parquet_read": min(len(files), MAX_PARQUET), "parquet_total": len(files),
                       "hosts_total": len(hosts)}
    if len(chars):
        facts.pictures["caption length (words) of the downloaded pairs"] = histogram_png(
            np.array(words), "words per caption", "pairs")


def caption_lengths(chars: np.ndarray, words: np.ndarray, captions: list[str]) -> dict:
    """Quantiles of the caption lengths; tokens (CLIP's BPE, <start> and <end> included) on a sample."""
    if not len(chars):
        return {"n": 0}
    from clip_core.tokenizer import SimpleTokenizer

    sample = random.Random(0).sample(captions, min(len(captions), MAX_TOKENIZED))
    tokenizer = SimpleTokenizer()
    tokens = np.array([len(tokenizer.encode(t or "")) + 2 for t in sample])
    quantiles = (5, 50, 95)
    return {"n": int(len(chars)),
            "chars": dict(zip(quantiles, np.percentile(chars, quantiles).round(1).tolist())),
            "words": dict(zip(quantiles, np.percentile(words, quantiles).round(1).tolist())),
            "tokens": dict(zip(quantiles, np.percentile(tokens, quantiles).round(1).tolist())),
            "tokenized": len(sample), "over_77_tokens": float((tokens > 77).mean())}


def add_dedup(facts: CardFacts, dedup: str) -> None:
    """Overlap per eval set, copies inside the corpus, the closest matches' contact sheet."""
    from dedup.near_dup import DedupStats

    dd = DedupStats.read(dedup)
    facts.funnel += [("near-duplicates of eval images removed", dd.removed), ("kept after dedup", dd.kept)]
    facts.dedup = {"corpus_images": dd.corpus_images, "removed": dd.removed, "kept": dd.kept,
                   "unreadable": dd.unreadable, "within": dd.within,
                   "eval_sets": [(name, s.n, s.overlap, s.overlap_pct, s.matched_corpus_images,
                                  ", ".join(f"{d} {v:.3f}" for d, v in s.thresholds.items()))
                                 for name, s in dd.eval_sets.items()]}
    for name, title in (("contact_sheet.png", "closest eval-image matches: corpus (left) | eval (right)"),
                        ("within_sheet.png", "copies inside the corpus: removed (left) | kept (right)")):
        if exists(join(dedup, name)):
            facts.pictures[title] = read_bytes(join(dedup, name))


def sample_images(shards: str, seed: int, n: int = SAMPLES) -> list[tuple[bytes, str]]:
    """n samples drawn from the first 8n of the first shard (no need to read it all), as small JPEG
    thumbnails with their captions."""
    from PIL import Image

    from clip_core.data.webdataset import image_field, iter_shard, list_shards

    tars = list_shards(shards)
    if not tars:
        return []
    fs, _ = fsspec.core.url_to_fs(shards)
    samples = list(itertools.islice((s for s in iter_shard(fs, tars[0], decode=False) if image_field(s)), 8 * n))
    picked = random.Random(seed).sample(samples, min(n, len(samples)))
    out = []
    for sample in picked:
        image = Image.open(io.BytesIO(sample[image_field(sample)])).convert("RGB")
        image.thumbnail((128, 128))
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=85)
        caption = sample.get("txt", b"")
        out.append((buffer.getvalue(), caption.decode("utf-8", "replace") if isinstance(caption, bytes) else caption))
    return out


def histogram_png(values: np.ndarray, xlabel: str, ylabel: str) -> bytes:
    """A small bar histogram of integer values, as PNG bytes."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 2.6), dpi=100)
    ax = fig.subplots()
    top = int(np.percentile(values, 99)) + 1  # the long tail (keyword spam) in the last bar
    width = max(1, -(-top // 60))
    ax.hist(np.clip(values, 0, top), bins=np.arange(0, top + width + 1, width) - 0.5, color="tab:blue")
    ax.set(xlabel=xlabel + (f" (last bar: {top}+)" if values.max() > top else ""), ylabel=ylabel)
    fig.subplots_adjust(left=0.12, right=0.98, bottom=0.2, top=0.95)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()


def read_columns(uri: str, columns: list[str]):
    """Columns of a Parquet file through fsspec (s3:// with the user's endpoint and credentials)."""
    with fsspec.open(uri, "rb") as f:
        return pq.read_table(f, columns=columns)


def read_bytes(uri: str) -> bytes:
    with fsspec.open(uri, "rb") as f:
        return f.read()
