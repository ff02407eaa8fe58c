"""The crawl stage: curated (url, caption) pairs -> WebDataset shards, via img2dataset.

CLIP's WIT corpus (Radford et al. 2021, Sec. 2.2) is 400M pairs fetched from the web; here
img2dataset does the fetching and this module does what it does not: validate the pairs,
refuse unsafe URLs before anything is requested (`crawl_safety`), pin the input so that a
rerun resumes shard by shard, retry failed samples into new shards, and reduce the
per-shard `_stats.json` files to one `crawl_stats.json`. While img2dataset runs, its requests
go through `crawl_guard.GuardProxy`, which applies the same policy to redirects.

Layout of OUT (any fsspec URI): img2dataset's `NNNNN.tar`, `NNNNN.parquet`,
`NNNNN_stats.json`; ours: `_input/pairs.parquet` (the staged safe list), `_input/retry_*.parquet`,
`_input/manifest.json`, `refused.parquet` (url, reason) and `crawl_stats.json`.

Resume: img2dataset's incremental mode treats a shard as done when its `_stats.json`
exists; that file is written last, so a shard killed mid-way has a tar and a parquet but
no stats. We delete such leftovers before each call and they are never counted.

img2dataset starts its workers with the spawn method, which re-runs the caller's script in
each worker; the call hides `__main__` from them, so a script needs no
`if __name__ == "__main__":` guard. From a thread other than the main one (a Prefect task)
img2dataset runs in a child process, because it installs a SIGINT handler. One crawl per
process at a time: while it runs the call sets NO_ALBUMENTATIONS_UPDATE, a private TMPDIR
and the guard's proxy variables in os.environ.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import types
import uuid
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from urllib.parse import urlsplit

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from clip_core.crawl_guard import REFUSED, GuardProxy
from clip_core.crawl_safety import PreparedPairs, Resolver, UrlPolicy, parse_networks, prepare_pairs, read_pairs

DEFAULT_DISALLOWED = ("noai", "noimageai", "noindex", "noimageindex")
# Errors a retry cannot fix: gone pages, the site's own opt-out, our guard's refusals.
PERMANENT_ERRORS = ("HTTP Error 404:", "HTTP Error 410:", "HTTP Error 451:", "X-Robots-Tag", REFUSED)
SHARD_FILE = re.compile(r"^(\d+)(_stats\.json|\.tar|\.parquet)$")
MANIFEST_KEYS = ("number_sample_per_shard", "image_size", "resize_mode", "encode_quality")
CHILD_CODE = "import json, sys, img2dataset; img2dataset.download(**json.loads(sys.argv[1]))"


@dataclass
class CrawlStats:
    """What a crawl did: input filtering, final outcome per sample, throughput."""

    input_rows: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    refused: dict[str, int] = field(default_factory=dict)
    queued: int = 0  # safe rows handed to img2dataset
    attempted: int = 0  # queued rows with a recorded outcome
    success: int = 0
    failed_to_download: int = 0
    failed_to_resize: int = 0
    success_rate: float = 0.0
    errors: dict[str, int] = field(default_factory=dict)  # final error message -> samples
    fetch_attempts: int = 0  # sample fetches over every run, retries included
    fetched_this_run: int = 0
    retried_this_run: int = 0
    bytes_written: int = 0  # tar bytes
    shards: int = 0
    incomplete_shards: int = 0
    wall_seconds: float = 0.0
    images_per_second: float = 0.0

    def to_dict(self) -> dict:
        """A JSON-ready dict."""
        return asdict(self)

    def summary(self) -> str:
        """A few human-readable lines."""
        return "\n".join([
            f"input rows {self.input_rows}, skipped {sum(self.skipped.values())} {self.skipped}, "
            f"refused {sum(self.refused.values())} {self.refused}",
            f"attempted {self.attempted}/{self.queued}: success {self.success} "
            f"({self.success_rate:.1%}), failed to download {self.failed_to_download}, "
            f"failed to resize {self.failed_to_resize}",
            f"shards {self.shards} ({self.incomplete_shards} incomplete), {self.bytes_written} bytes; "
            f"fetched {self.fetched_this_run} in {self.wall_seconds:.1f} s "
            f"({self.images_per_second:.1f} images/s)",
        ])


@dataclass
class ShardListing:
    """The shard files in OUT by shard id: complete ones have a `_stats.json`."""

    stats: set[int]
    files: dict[int, list[str]]
    tar_bytes: dict[int, int]
    other_json: list[str]

    def incomplete(self) -> set[int]:
        """Shards with files but no stats (killed mid-way)."""
        return set(self.files) - self.stats


def list_shards(fs: fsspec.AbstractFileSystem, out: str) -> ShardListing:
    """List OUT afresh (no listing cache: workers wrote behind our back)."""
    fs.invalidate_cache()
    listing = ShardListing(set(), {}, {}, [])
    entries = fs.ls(out, detail=True) if fs.exists(out) else []
    for entry in entries:
        name = entry["name"].rstrip("/").rsplit("/", 1)[-1]
        match = SHARD_FILE.match(name)
        if match is None:
            if name.endswith(".json"):
                listing.other_json.append(name)
            continue
        shard, kind = int(match.group(1)), match.group(2)
        if kind == "_stats.json":
            listing.stats.add(shard)
            continue
        listing.files.setdefault(shard, []).append(entry["name"])
        if kind == ".tar":
            listing.tar_bytes[shard] = int(entry.get("size") or 0)
    return listing


def _sweep_incomplete(fs: fsspec.AbstractFileSystem, listing: ShardListing) -> None:
    """Delete the tar/parquet of shards without stats; img2dataset redoes them."""
    for shard in listing.incomplete():
        for path in listing.files.pop(shard):
            fs.rm(path)


def _write_atomic(fs: fsspec.AbstractFileSystem, path: str, write) -> None:
    """Write to a temporary name then rename, so readers never see half a file."""
    tmp = f"{path}.tmp-{uuid.uuid4().hex}"
    with fs.open(tmp, "wb") as f:
        write(f)
    fs.mv(tmp, path)


def write_parquet(fs: fsspec.AbstractFileSystem, path: str, table: pa.Table) -> None:
    """Write a Parquet file atomically."""
    _write_atomic(fs, path, lambda f: pq.write_table(table, f))


def write_json(fs: fsspec.AbstractFileSystem, path: str, obj: dict) -> None:
    """Write a JSON file atomically."""
    _write_atomic(fs, path, lambda f: f.write(json.dumps(obj, indent=2).encode()))


def stage_input(fs: fsspec.AbstractFileSystem, out: str, safe: pa.Table, manifest: dict) -> str:
    """Write the safe list once; on a rerun check it is unchanged, so shards line up."""
    staging, manifest_path = f"{out}/_input/pairs.parquet", f"{out}/_input/manifest.json"
    fs.makedirs(f"{out}/_input", exist_ok=True)
    if fs.exists(manifest_path):
        with fs.open(manifest_path, "rb") as f:
            old = json.load(f)
        changed = [k for k in MANIFEST_KEYS if old.get(k) != manifest[k]]
        if changed:
            raise ValueError(f"{out} was crawled with other {changed}: {old}; use a new output folder")
    if fs.exists(staging):
        with fs.open(staging, "rb") as f:
            if not pq.read_table(f).equals(safe):
                raise ValueError(
                    f"the safe pairs differ from those staged in {staging} by an earlier run "
                    "(input, allow_networks or DNS changed); shards would not line up: use a new "
                    "output folder, or delete OUT to start over")
    else:
        write_parquet(fs, staging, safe)
    write_json(fs, manifest_path, manifest)
    return staging


def guard_env(proxy_url: str) -> dict[str, str]:
    """Proxy variables sending urllib through the guard; an S3 endpoint set in the env bypasses it."""
    endpoints = (os.environ.get(k) for k in ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"))
    bypass = ",".join(urlsplit(e).netloc for e in endpoints if e)
    # ftp too: urllib follows redirects to ftp://, which would otherwise connect directly.
    proxies = {f"{scheme}_proxy": proxy_url for scheme in ("http", "https", "ftp")}
    return {**proxies, **{k.upper(): v for k, v in proxies.items()}, "no_proxy": bypass, "NO_PROXY": bypass}


MAX_IMAGE_PIXELS = 89_478_485 * 2  # PIL's decompression-bomb error threshold


@contextlib.contextmanager
def _img2dataset_env(extra: dict[str, str]) -> Iterator[dict[str, str]]:
    """NO_ALBUMENTATIONS_UPDATE=1 (it calls out on import), a private TMPDIR, a pixel cap and `extra`, then restore.

    OpenCV decodes up to 2^30 pixels by default: a 30000 x 30000 decompression bomb (a few
    hundred kB on the wire) would take 2.7 GB per worker before img2dataset sees its size.
    """
    tmp = tempfile.mkdtemp(prefix="clip-crawl-")
    updates = {"NO_ALBUMENTATIONS_UPDATE": "1", "TMPDIR": tmp,
               "OPENCV_IO_MAX_IMAGE_PIXELS": os.environ.get("OPENCV_IO_MAX_IMAGE_PIXELS", str(MAX_IMAGE_PIXELS)), **extra}
    saved = {k: os.environ.get(k) for k in updates}
    os.environ.update(updates)
    try:
        yield dict(os.environ)
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        shutil.rmtree(tmp, ignore_errors=True)


def run_img2dataset(env: dict[str, str], kwargs: dict) -> None:
    """Call `img2dataset.download` with `env` set; in a child process when not on the main thread."""
    with _img2dataset_env(env) as env:
        if threading.current_thread() is not threading.main_thread():
            subprocess.run([sys.executable, "-c", CHILD_CODE, json.dumps(kwargs)], env=env, check=True)
            return
        import img2dataset  # after the env: albumentations checks for updates on import

        handler = signal.getsignal(signal.SIGINT)
        try:
            with _main_hidden_from_spawn():
                img2dataset.download(**kwargs)
        finally:
            signal.signal(signal.SIGINT, handler)  # img2dataset leaves its own installed


@contextlib.contextmanager
def _main_hidden_from_spawn() -> Iterator[None]:
    """Show spawned workers an empty __main__, so they do not re-run the caller's script.

    multiprocessing's spawn re-imports the parent's main script in every child; without an
    `if __name__ == "__main__":` guard each child would call crawl again and the pool would
    respawn failing workers forever. img2dataset's workers need nothing from __main__.
    """
    main = sys.modules["__main__"]
    sys.modules["__main__"] = types.ModuleType("__main__")
    try:
        yield
    finally:
        sys.modules["__main__"] = main


def read_outcomes(fs: fsspec.AbstractFileSystem, out: str, shards: Sequence[int]) -> dict[str, tuple]:
    """url -> (status, error) over complete shards: success once any attempt succeeded, else the last."""
    final: dict[str, tuple] = {}
    for shard in sorted(shards):
        with fs.open(f"{out}/{shard:05d}.parquet", "rb") as f:
            cols = pq.read_table(f, columns=["url", "status", "error_message"]).to_pydict()
        for url, status, error in zip(cols["url"], cols["status"], cols["error_message"]):
            if final.get(url, ("",))[0] != "success":
                final[url] = (status, error)
    return final


def _shard_counts(fs: fsspec.AbstractFileSystem, out: str, shards: Sequence[int]) -> int:
    """Samples the shards' `_stats.json` say were fetched."""
    total = 0
    for shard in shards:
        with fs.open(f"{out}/{shard:05d}_stats.json", "rb") as f:
            total += int(json.load(f)["count"])
    return total


def is_permanent(error: str | None) -> bool:
    """A failure a retry cannot fix (404, 410, 451, X-Robots-Tag opt-out)."""
    return error is not None and any(marker in error for marker in PERMANENT_ERRORS)


def retry_candidates(outcomes: dict[str, tuple]) -> set[str]:
    """URLs whose last attempt failed to download for a reason that may pass."""
    return {url for url, (status, error) in outcomes.items()
            if status == "failed_to_download" and not is_permanent(error)}


def aggregate(stats: CrawlStats, outcomes: dict[str, tuple]) -> None:
    """Fill the per-sample outcome counts of `stats` from the final outcomes."""
    statuses = Counter(status for status, _ in outcomes.values())
    stats.attempted = len(outcomes)
    stats.success = statuses["success"]
    stats.failed_to_download = statuses["failed_to_download"]
    stats.failed_to_resize = statuses["failed_to_resize"]
    stats.success_rate = stats.success / stats.attempted if stats.attempted else 0.0
    errors = Counter(str(e) for s, e in outcomes.values() if s != "success")
    stats.errors = dict(errors.most_common())


def crawl(
    pairs_uri: str,
    out_uri: str,
    *,
    image_size: int = 256,
    processes: int = 1,
    threads: int = 16,
    resize_mode: str = "center_crop",
    number_sample_per_shard: int = 10_000,
    allow_networks: Sequence[str] = (),
    timeout: int = 10,
    retries: int = 0,
    retry_failed: bool = False,
    disallowed_header_directives: Sequence[str] = DEFAULT_DISALLOWED,
    encode_quality: int = 95,
    user_agent_token: str | None = None,
    guard: bool = True,
    resolver: Resolver = socket.getaddrinfo,
) -> CrawlStats:
    """Download the safe pairs of `pairs_uri` into WebDataset shards under `out_uri`.

    resize_mode "center_crop" (shorter side to image_size, then a centred square) is what
    CLIP's own preprocessing does; "keep_ratio" keeps the whole picture for random crops.
    guard sends img2dataset's requests through `GuardProxy`, so redirects obey the policy too
    (it replaces any proxy configured in the environment).
    """
    start = time.perf_counter()
    fs, out = fsspec.core.url_to_fs(out_uri)
    out = out.rstrip("/")
    policy = UrlPolicy(parse_networks(allow_networks), resolver)
    prepared = prepare_pairs(read_pairs(pairs_uri), policy)
    stats = CrawlStats(input_rows=prepared.input_rows, skipped=dict(prepared.skipped),
                       refused=dict(prepared.refused_counts), queued=prepared.safe.num_rows)
    fs.makedirs(out, exist_ok=True)
    write_parquet(fs, f"{out}/refused.parquet", prepared.refused)
    manifest = {"number_sample_per_shard": number_sample_per_shard, "image_size": image_size,
                "resize_mode": resize_mode, "encode_quality": encode_quality,
                "rows": prepared.safe.num_rows, "pairs_uri": pairs_uri}
    staging = stage_input(fs, out, prepared.safe, manifest)
    options = dict(
        output_folder=_uri(fs, out), image_size=image_size, processes_count=processes,
        thread_count=threads, resize_mode=resize_mode, encode_quality=encode_quality,
        output_format="webdataset", input_format="parquet", url_col="url", caption_col="caption",
        number_sample_per_shard=number_sample_per_shard, save_additional_columns=prepared.extra_columns or None,
        timeout=timeout, retries=retries, disallowed_header_directives=list(disallowed_header_directives),
        user_agent_token=user_agent_token, enable_wandb=False)
    run = functools.partial(_call, fs, out, policy if guard else None)
    before = list_shards(fs, out)
    _sweep_incomplete(fs, before)
    main_shards = math.ceil(prepared.safe.num_rows / number_sample_per_shard)
    if set(range(main_shards)) - before.stats:
        run(before, dict(options, url_list=_uri(fs, staging), incremental_mode="incremental"))
    if retry_failed:
        stats.retried_this_run = _retry_round(fs, out, prepared, main_shards, options, run)
    _finish(fs, out, stats, before.stats, start)
    return stats


def _uri(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """A path of `fs` as a URI img2dataset can open."""
    return fs.unstrip_protocol(path)


def _call(fs, out: str, policy: UrlPolicy | None, listing: ShardListing, kwargs: dict) -> None:
    """Clean OUT for img2dataset (leftovers, our stats file) and run it, behind the guard if given."""
    _sweep_incomplete(fs, listing)
    # img2dataset reads every OUT/*.json as "SHARD_stats.json"; ours is rewritten at the end.
    if "crawl_stats.json" in listing.other_json:
        fs.rm(f"{out}/crawl_stats.json")
        listing.other_json.remove("crawl_stats.json")
    if listing.other_json:
        raise ValueError(f"{out} holds JSON files img2dataset would take for shard stats: {listing.other_json}")
    if policy is None:
        return run_img2dataset({}, kwargs)
    with GuardProxy(policy, timeout=kwargs["timeout"]) as proxy:
        run_img2dataset(guard_env(proxy.url), kwargs)


def _retry_round(fs, out: str, prepared: PreparedPairs, main_shards: int, options: dict, run) -> int:
    """Fetch again the samples whose last attempt failed, into shards after the last one."""
    listing = list_shards(fs, out)
    missing = set(range(main_shards)) - listing.stats
    if missing:
        raise RuntimeError(f"retry_failed needs every shard complete; missing {sorted(missing)}: run again")
    failed = retry_candidates(read_outcomes(fs, out, sorted(listing.stats)))
    if not failed:
        return 0
    urls = prepared.safe.column("url").to_pylist()
    table = prepared.safe.take([i for i, url in enumerate(urls) if url in failed])
    # img2dataset's "extend" numbers new shards after the highest one with stats, so keys stay unique.
    first = max(listing.stats, default=-1) + 1
    path = f"{out}/_input/retry_{first:05d}.parquet"
    write_parquet(fs, path, table)
    run(listing, dict(options, url_list=_uri(fs, path), incremental_mode="extend"))
    return table.num_rows


def _finish(fs, out: str, stats: CrawlStats, done_before: set[int], start: float) -> None:
    """Reduce the shards' outcomes into `stats` and write OUT/crawl_stats.json."""
    listing = list_shards(fs, out)
    complete = sorted(listing.stats)
    aggregate(stats, read_outcomes(fs, out, complete))
    stats.shards = len(complete)
    stats.incomplete_shards = len(listing.incomplete())
    stats.bytes_written = sum(listing.tar_bytes.get(s, 0) for s in complete)
    stats.fetch_attempts = _shard_counts(fs, out, complete)
    stats.fetched_this_run = _shard_counts(fs, out, sorted(listing.stats - done_before))
    stats.wall_seconds = time.perf_counter() - start
    stats.images_per_second = stats.fetched_this_run / stats.wall_seconds if stats.wall_seconds else 0.0
    write_json(fs, f"{out}/crawl_stats.json", stats.to_dict())


def add_crawl_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `clip-pipeline crawl PAIRS OUT`."""
    parser.add_argument("pairs", help="candidate or curated pairs Parquet (url, caption, ...)")
    parser.add_argument("out", help="output folder for the shards (local path or s3://...)")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--resize-mode", default="center_crop",
                        choices=["center_crop", "keep_ratio", "keep_ratio_largest", "border", "no"],
                        help="center_crop is CLIP's preprocessing; keep_ratio keeps the whole image")
    parser.add_argument("--processes", type=int, default=1)
    parser.add_argument("--threads", type=int, default=16)
    parser.add_argument("--number-sample-per-shard", type=int, default=10_000)
    parser.add_argument("--allow-network", action="append", default=[], metavar="CIDR",
                        help="fetch from this network although it is private/loopback (repeatable); "
                             "127.0.0.1/32 reaches the synthetic web")
    parser.add_argument("--timeout", type=int, default=10, help="seconds per request")
    parser.add_argument("--retries", type=int, default=0, help="immediate retries per request")
    parser.add_argument("--retry-failed", action="store_true",
                        help="fetch again the samples that failed to download (not 404/410/451/opt-outs)")
    parser.add_argument("--encode-quality", type=int, default=95)
    parser.add_argument("--user-agent-token", default=None)
    parser.add_argument("--no-guard", dest="guard", action="store_false",
                        help="do not route requests through the guard proxy (redirects then go unchecked)")


def run_crawl_command(args: argparse.Namespace) -> int:
    """Run `crawl` from parsed arguments; print the summary. 0 ok, 1 incomplete shards, 2 bad input."""
    try:
        stats = crawl(
            args.pairs, args.out, image_size=args.image_size, processes=args.processes,
            threads=args.threads, resize_mode=args.resize_mode,
            number_sample_per_shard=args.number_sample_per_shard, allow_networks=args.allow_network,
            timeout=args.timeout, retries=args.retries, retry_failed=args.retry_failed,
            encode_quality=args.encode_quality, user_agent_token=args.user_agent_token, guard=args.guard)
    except (ValueError, FileNotFoundError) as err:
        print(f"crawl: {err}", file=sys.stderr)
        return 2
    except RuntimeError as err:
        print(f"crawl: {err}", file=sys.stderr)
        return 1
    print(stats.summary())
    return 1 if stats.incomplete_shards else 0
