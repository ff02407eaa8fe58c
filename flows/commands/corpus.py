"""`clip-pipeline extract | queries | curate | crawl`: the corpus stages' options and handlers.

Each handler parses nothing itself and holds no logic: it checks what only the command line
knows, picks the executor (`--executor local|ray`) and calls one library function.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys

from clip_core.crawl.download import crawl
from clip_core.crawl.politeness import DEFAULT_CONCURRENCY, DEFAULT_MAX_IMAGE_BYTES, DEFAULT_RPS, DEFAULT_USER_AGENT
from clip_core.crawl.safety import RESIZE_MODES
from clip_core.checks import whole_number
from clip_core.curation.curate import check_curate_options, curate
from clip_core.curation.queries import build_queries, check_queries_options
from clip_core.errors import BAD_INPUT_ERRORS, EXIT_BAD_INPUT, EXIT_FAILED, EXIT_OK, check
from clip_core.executors import LocalExecutor
from clip_core.extract.wat import DEFAULT_SHARD_ROWS, STATS_NAME, extract
from flows.commands.report import refresh_data_card
from flows.common import check_ray_address


def add_executor_arguments(parser: argparse.ArgumentParser) -> None:
    """--executor and --ray-address: where a stage maps its shards (the same output either way)."""
    parser.add_argument("--executor", choices=("local", "ray"), default="local",
                        help="local processes, or one Ray task per shard on --ray-address")
    parser.add_argument("--ray-address", metavar="ADDR", default=None,
                        help="Ray cluster for --executor ray (default: RAY_ADDRESS; unset: a local Ray on 127.0.0.1)")


def stage_executor(name: str, address: str | None, workers: int | None, local=None):
    """The executor a corpus stage maps its shards with: Ray tasks for "ray" (on address, else RAY_ADDRESS,
    else a local cluster), else `local(workers)` (None: the stage sizes its own local pool)."""
    check(name == "ray" or not address, "--ray-address", "is only used with --executor ray",
          "add --executor ray, or drop --ray-address")
    if name == "ray":
        if workers is not None:
            whole_number("--workers", workers, fix="CPUs of a local Ray; leave it out for all cores")
        from flows.executors import RayExecutor  # Ray is imported only when asked for

        address = address or os.environ.get("RAY_ADDRESS") or None
        if address:  # a malformed or silent address is bad input (exit 2), not a hang inside ray.init
            check_ray_address("--ray-address", address)
        return RayExecutor(address=address, num_cpus=workers)
    return local(workers) if local else contextlib.nullcontext(None)


def _csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def add_extract_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `clip-pipeline extract WAT... OUT`."""
    parser.add_argument("wat", nargs="+", metavar="WAT",
                        help="WAT files (.warc.wat.gz), any fsspec URI; globs are expanded")
    parser.add_argument("out", metavar="OUT", help="output folder for part-NNNNN.parquet")
    parser.add_argument("--workers", type=int, default=None,
                        help="parallel files for --executor local (default: all cores)")
    parser.add_argument("--min-caption-len", type=int, default=None, metavar="N")
    parser.add_argument("--max-caption-len", type=int, default=None, metavar="N")
    parser.add_argument("--lang", type=_csv, default=None, metavar="CODES",
                        help="keep captions detected as these ISO 639-1 codes, e.g. en,und "
                             "(approximate stopword detector; 'und' = undetermined)")
    parser.add_argument("--ext", type=_csv, default=None, metavar="EXTS",
                        help="keep image URLs whose path ends in these extensions, e.g. jpg,png")
    add_executor_arguments(parser)
    parser.add_argument("--shard-rows", type=int, default=DEFAULT_SHARD_ROWS, metavar="N")


def run_extract_command(args: argparse.Namespace) -> int:
    """Run `extract` from parsed arguments; print one summary line."""
    with stage_executor(args.executor, args.ray_address, None) as executor:
        stats = extract(args.wat, args.out, workers=args.workers, executor=executor,
                        min_caption_len=args.min_caption_len,
                        max_caption_len=args.max_caption_len, languages=args.lang,
                        image_extensions=args.ext, shard_rows=args.shard_rows)
    t = stats.totals
    for line in stats.warnings:
        print(f"clip-pipeline extract: warning: {line}", file=sys.stderr)
    print(f"extract: {len(stats.files)} files, {t.pages} pages, {t.img_links} img links -> "
          f"{stats.rows} pairs in {len(stats.shards)} shards ({stats.pairs_per_s:,.0f} pairs/s); "
          f"errors {sum(t.errors.values())}; stats in {args.out.rstrip('/')}/{STATS_NAME}")
    return 0


def add_queries_arguments(parser: argparse.ArgumentParser) -> None:
    """`clip-pipeline queries` options."""
    parser.add_argument("corpus", nargs="*", metavar="CORPUS",
                        help="text files or Parquet with a text column (URIs; files or folders)")
    parser.add_argument("out", metavar="OUT", help="query list Parquet to write")
    parser.add_argument("--min-count", type=int, default=100, help="unigrams occurring at least this often (WIT: 100)")
    parser.add_argument("--min-pmi", type=float, default=8.0, help="bigrams with PMI (bits) at least this")
    parser.add_argument("--min-bigram-count", type=int, help="bigram count floor (default: --min-count)")
    parser.add_argument("--titles", help="titles file: one title a line, optional TAB count (e.g. page views)")
    parser.add_argument("--min-title-count", type=int, default=70, help="title count floor (MetaCLIP: 70)")
    parser.add_argument("--wordnet", metavar="DIR", help="WordNet 3.0 database folder (e.g. /usr/share/wordnet)")
    parser.add_argument("--wordnet-lemmas", choices=("all", "head"), default="all",
                        help="every lemma of a synset, or its first")
    parser.add_argument("--text-column", default="text", help="text column of Parquet corpora")
    parser.add_argument("--workers", type=int, help="local worker processes (default: all cores)")
    add_executor_arguments(parser)


def run_queries_command(args: argparse.Namespace) -> int:
    """Run `clip-pipeline queries` and print the per-kind stats."""
    check_queries_options(args.min_count, args.min_pmi, args.min_bigram_count, args.min_title_count,
                          args.wordnet_lemmas)
    with stage_executor(args.executor, args.ray_address, args.workers, local=LocalExecutor) as executor:
        stats = build_queries(args.corpus, args.out, min_count=args.min_count, min_pmi=args.min_pmi,
                              min_bigram_count=args.min_bigram_count, titles_uri=args.titles,
                              min_title_count=args.min_title_count, wordnet_dir=args.wordnet,
                              wordnet_lemmas=args.wordnet_lemmas, text_column=args.text_column, executor=executor)
    print(json.dumps(stats.to_dict()))
    if not stats.n_queries:
        print(f"clip-pipeline queries: warning: {args.out} holds no query (nothing reached the floors): "
              "curate will refuse it; lower --min-count / --min-title-count or add sources", file=sys.stderr)
    return 0


def add_curate_arguments(parser: argparse.ArgumentParser) -> None:
    """`clip-pipeline curate` options."""
    parser.add_argument("pairs", nargs="+", metavar="PAIRS", help="candidate pairs: Parquet files or folders (URIs)")
    parser.add_argument("queries", metavar="QUERIES", help="query list Parquet (from `clip-pipeline queries`)")
    parser.add_argument("out", metavar="OUT", help="output folder for part-NNNNN.parquet and curation_stats.json")
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--max-per-query", type=int, default=20000, help="t, pairs per query (WIT: 20,000)")
    size.add_argument("--target-size", type=int, help="solve t so the expected number of kept pairs is at most this")
    parser.add_argument("--seed", type=int, default=0, help="seed of the balancing draws")
    parser.add_argument("--case-insensitive", action="store_true", help="lower-case captions and queries to match")
    parser.add_argument("--workers", type=int, help="local worker processes (default: all cores)")
    add_executor_arguments(parser)
    parser.add_argument("--shard-rows", type=int, default=250_000, help="rows per unit of work")


def run_curate_command(args: argparse.Namespace) -> int:
    """Run `clip-pipeline curate` and print the totals."""
    check_curate_options(args.max_per_query, args.target_size, args.seed, args.shard_rows)  # before any executor
    if args.workers is not None:
        whole_number("--workers", args.workers, fix="worker processes; leave it out for all cores")
    with stage_executor(args.executor, args.ray_address, args.workers, local=LocalExecutor) as executor:
        stats = curate(args.pairs, args.queries, args.out, max_per_query=args.max_per_query,
                       target_size=args.target_size, seed=args.seed, case_sensitive=not args.case_insensitive,
                       executor=executor, shard_rows=args.shard_rows)
    print(json.dumps({"t": stats.t, "input_rows": stats.input_rows, "matched": stats.matched, "kept": stats.kept,
                      "expected_kept": stats.expected_kept, "sample_rate": stats.sample_rate,
                      "estimated_kept": stats.estimated_kept, "skipped": stats.skipped, "out": args.out}))
    return 0


def add_crawl_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `clip-pipeline crawl PAIRS OUT`."""
    parser.add_argument("pairs", help="candidate or curated pairs Parquet (url, caption, ...)")
    parser.add_argument("out", help="output folder for the shards (local path or s3://...)")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--resize-mode", default="center_crop",
                        choices=RESIZE_MODES,
                        help="center_crop is CLIP's preprocessing; keep_ratio keeps the whole image")
    parser.add_argument("--processes", type=int, default=1,
                        help="img2dataset processes for --executor local (ray: one per shard task)")
    parser.add_argument("--threads", type=int, default=16, help="download threads per process")
    parser.add_argument("--number-sample-per-shard", type=int, default=10_000)
    parser.add_argument("--allow-network", action="append", default=[], metavar="CIDR",
                        help="fetch from this network although it is private/loopback (repeatable); "
                             "127.0.0.1/32 reaches the synthetic web")
    parser.add_argument("--timeout", type=int, default=10, help="seconds per request")
    parser.add_argument("--retries", type=int, default=0, help="immediate retries per request")
    parser.add_argument("--retry-failed", action="store_true",
                        help="fetch again the samples that failed to download (not 404/410/451/opt-outs)")
    parser.add_argument("--encode-quality", type=int, default=95)
    parser.add_argument("--user-agent", default=DEFAULT_USER_AGENT,
                        help="sent on every request, robots.txt included: name the crawler and a contact URL "
                             "(default: %(default)s)")
    parser.add_argument("--user-agent-token", default=None,
                        help="X-Robots-Tag token, added to img2dataset's own User-Agent on https (default: the "
                             "product token of --user-agent)")
    parser.add_argument("--ignore-robots", action="store_true",
                        help="do not read robots.txt (only for sites that allow it otherwise)")
    parser.add_argument("--per-host-rps", type=float, default=DEFAULT_RPS,
                        help="request starts per second per host, across the node (and the cluster); "
                             "a robots.txt Crawl-delay tightens it; 0: no limit (default: %(default)s)")
    parser.add_argument("--per-host-concurrency", type=int, default=DEFAULT_CONCURRENCY,
                        help="requests in flight per host; 0: no limit (default: %(default)s)")
    parser.add_argument("--max-image-bytes", type=int, default=DEFAULT_MAX_IMAGE_BYTES,
                        help="a larger response is given up (default: %(default)s)")
    parser.add_argument("--throttle-retries", type=int, default=2,
                        help="times a sample answered 429/503 with Retry-After is asked again after the pause")
    parser.add_argument("--no-guard", dest="guard", action="store_false",
                        help="do not route requests through the guard proxy (redirects then go unchecked, "
                             "and the per-host limits, Retry-After and the deadline do not apply)")
    add_executor_arguments(parser)


def run_crawl_command(args: argparse.Namespace) -> int:
    """Run `crawl` from parsed arguments; print the summary. 0 ok, 1 incomplete run, 2 bad input."""
    try:
        with stage_executor(args.executor, args.ray_address, None) as executor:  # None: one local img2dataset call
            stats = crawl(
                args.pairs, args.out, image_size=args.image_size, processes=args.processes,
                threads=args.threads, resize_mode=args.resize_mode,
                number_sample_per_shard=args.number_sample_per_shard, allow_networks=args.allow_network,
                timeout=args.timeout, retries=args.retries, retry_failed=args.retry_failed,
                encode_quality=args.encode_quality, user_agent_token=args.user_agent_token, guard=args.guard,
                executor=executor, user_agent=args.user_agent, per_host_rps=args.per_host_rps,
                per_host_concurrency=args.per_host_concurrency, ignore_robots=args.ignore_robots,
                max_image_bytes=args.max_image_bytes, throttle_retries=args.throttle_retries)
    except BAD_INPUT_ERRORS as err:
        print(f"clip-pipeline crawl: error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except (RuntimeError, subprocess.SubprocessError, OSError) as err:
        print(f"clip-pipeline crawl: error: {err}", file=sys.stderr)
        return EXIT_FAILED
    print(stats.summary())
    if stats.incomplete_shards:
        return EXIT_FAILED
    refresh_data_card("crawl", args.out)
    return EXIT_OK
