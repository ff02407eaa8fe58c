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

Checks first, writes after: the options, OUT and the pairs are all checked before anything
is written (InputError otherwise). OUT must be new, empty or a folder this crawl wrote: its
`_input/manifest.json` is written first and marks it.

Resume: img2dataset's incremental mode treats a shard as done when its `_stats.json`
exists; that file is written last, so a shard killed mid-way has a tar and a parquet but
no stats. Before each call we delete such leftovers, and only those of shard ids the
crawl's record proves it handed to img2dataset (the main run's from the manifest, a retry
round's from its `_input/retry_NNNNN.parquet`), named as img2dataset names them; any other
file in OUT is left alone and never counted.

How img2dataset is run (behind the guard, in its own environment, from any thread, from a
script without a `__main__` guard) is `crawl_guard`'s part; one crawl per process at a time.

Where it runs: by default one img2dataset call in this process. With an executor (Ray tasks on a
cluster), the crawl maps its unfinished shards as tasks (`shard_task.crawl_shard`), each with its
own guard on its own node; the shards, keys and books are the same, and `nodes` in
crawl_stats.json says how many shards each node crawled in this run.
"""
from __future__ import annotations

import contextlib
import functools
import json
import math
import re
import socket
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from clip_core.crawl.guard import REFUSED, GuardProxy, guard_env, run_img2dataset
from clip_core.crawl.polite import GIVEN_UP
from clip_core.crawl.politeness import (
    DEFAULT_CONCURRENCY, DEFAULT_MAX_IMAGE_BYTES, DEFAULT_RPS, DEFAULT_USER_AGENT, Politeness,
)
from clip_core.crawl.robots import RobotsCache, apply_robots, fetch_robots_batch
from clip_core.crawl.safety import (
    PreparedPairs, Resolver, UrlPolicy, check_fetchable, check_options, parse_networks,
    prepare_pairs, read_pairs,
)
from clip_core.crawl.shard_task import crawl_shard, shard_tasks
from clip_core.data.parquet import write_json, write_parquet
from clip_core.errors import InputError, check
from clip_core.executors import Executor, host_name, map_counting_nodes

DEFAULT_DISALLOWED = ("noai", "noimageai", "noindex", "noimageindex")
# Errors a retry cannot fix: gone pages, the site's own opt-out, our guard's refusals, and a URL
# urllib cannot send (normalise_url encodes those first; this catches any that slip through).
PERMANENT_ERRORS = ("HTTP Error 404:", "HTTP Error 410:", "HTTP Error 451:", "X-Robots-Tag", REFUSED,
                    "URL can't contain control characters", "codec can't encode", f"{GIVEN_UP} (too_large)")
ROBOTS_BATCH = 256  # origins per robots.txt task
SHARD_FILE = re.compile(r"^(\d+)(_stats\.json|\.tar|\.parquet)$")
RETRY_FILE = re.compile(r"^retry_(\d+)\.parquet$")
STATS_NAME = "crawl_stats.json"
MANIFEST, STAGED, STATS_ASIDE = "_input/manifest.json", "_input/pairs.parquet", f"_input/{STATS_NAME}"
MANIFEST_KEYS = ("number_sample_per_shard", "image_size", "resize_mode", "encode_quality")


@dataclass
class CrawlStats:
    """What a crawl did: input filtering, final outcome per sample, throughput."""

    input_rows: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    refused: dict[str, int] = field(default_factory=dict)
    queued: int = 0  # safe rows handed to img2dataset
    attempted: int = 0  # queued rows with a recorded outcome
    not_attempted: int = 0  # queued rows without one (their shard is incomplete: run again)
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
    nodes: dict[str, int] = field(default_factory=dict)  # node -> shards it crawled in this run
    politeness: dict[str, int] = field(default_factory=dict)  # this run's guards: robots, http_429, deadline, ...
    user_agent: str = ""
    pairs: str = ""  # the pairs crawled (the curated folder's URI): the data card finds curation from it

    def to_dict(self) -> dict:
        """A JSON-ready dict: crawl_stats.json's content."""
        return asdict(self)

    @classmethod
    def read(cls, uri: str) -> CrawlStats:
        """The stats of a crawl: OUT/crawl_stats.json, `uri` being OUT."""
        with fsspec.open(f"{uri.rstrip('/')}/{STATS_NAME}", "r") as f:
            return cls(**json.load(f))

    def summary(self) -> str:
        """A few human-readable lines."""
        return "\n".join([
            f"input rows {self.input_rows}, skipped {sum(self.skipped.values())} {self.skipped}, "
            f"refused {sum(self.refused.values())} {self.refused}",
            f"attempted {self.attempted}/{self.queued} ({self.not_attempted} not yet): success {self.success} "
            f"({self.success_rate:.1%}), failed to download {self.failed_to_download}, "
            f"failed to resize {self.failed_to_resize}",
            f"shards {self.shards} ({self.incomplete_shards} incomplete), {self.bytes_written} bytes; "
            f"fetched {self.fetched_this_run} in {self.wall_seconds:.1f} s "
            f"({self.images_per_second:.1f} images/s)" + (f"; shards by node {self.nodes}" if self.nodes else ""),
        ])


@dataclass
class ShardListing:
    """This crawl's shard files in OUT by shard id: complete ones have a `_stats.json`."""

    stats: set[int]
    files: dict[int, list[str]]
    tar_bytes: dict[int, int]

    def incomplete(self) -> set[int]:
        """Shards with files but no stats (killed mid-way)."""
        return set(self.files) - self.stats


def shard_file(name: str) -> tuple[int, str] | None:
    """(shard id, kind) of a file named as img2dataset names shards (`00007.tar`), else None."""
    match = SHARD_FILE.match(name)
    # img2dataset pads ids to 5 digits: `000007.tar` or `7.tar` is someone else's file.
    if match is None or f"{int(match.group(1)):05d}" != match.group(1):
        return None
    return int(match.group(1)), match.group(2)


def list_shards(fs: fsspec.AbstractFileSystem, out: str, owned: set[int]) -> ShardListing:
    """List the shard files of the `owned` ids afresh (no listing cache: workers wrote behind our back)."""
    fs.invalidate_cache()
    listing = ShardListing(set(), {}, {})
    for entry in fs.ls(out, detail=True) if fs.exists(out) else []:
        parsed = shard_file(_name(entry["name"]))
        if parsed is None or parsed[0] not in owned:
            continue
        shard, kind = parsed
        if kind == "_stats.json":
            listing.stats.add(shard)
            continue
        listing.files.setdefault(shard, []).append(entry["name"])
        if kind == ".tar":
            listing.tar_bytes[shard] = int(entry.get("size") or 0)
    return listing


def _name(path: str) -> str:
    return path.rstrip("/").rsplit("/", 1)[-1]


@dataclass
class CrawlFolder:
    """OUT of one crawl, and the record (`_input/`) that proves which shards in it the crawl wrote."""

    fs: fsspec.AbstractFileSystem
    out: str
    manifest: dict

    def owned(self) -> set[int]:
        """Shard ids handed to img2dataset: the main run's, and each retry round's from its `_input/retry_NNNNN.parquet`."""
        per_shard = self.manifest["number_sample_per_shard"]
        owned = set(range(math.ceil(self.manifest["rows"] / per_shard)))
        self.fs.invalidate_cache()
        for path in self.fs.glob(f"{self.out}/_input/retry_*.parquet"):
            match = RETRY_FILE.match(_name(path))
            if match is not None:
                with self.fs.open(path, "rb") as f:
                    rows = pq.ParquetFile(f).metadata.num_rows
                first = int(match.group(1))
                owned.update(range(first, first + math.ceil(rows / per_shard)))
        return owned

    def shards(self) -> ShardListing:
        """This crawl's shard files, listed afresh."""
        return list_shards(self.fs, self.out, self.owned())

    def sweep(self) -> ShardListing:
        """Delete the tar/parquet of this crawl's shards that have no stats (img2dataset redoes them); list again."""
        listing = self.shards()
        for shard in listing.incomplete():
            for path in listing.files.pop(shard):
                self.fs.rm(path)
        return listing


# Checks at the door: every option, OUT and the pairs, before anything is written.

def read_crawl_manifest(fs: fsspec.AbstractFileSystem, out: str) -> dict | None:
    """The manifest of the crawl in OUT; None when OUT is new or empty; InputError for anything else.

    crawl deletes only what it can prove it wrote, so it writes only into a folder that is
    empty or holds its own record.
    """
    if not fs.exists(out):
        return None
    check(fs.isdir(out), out, "is a file, not a folder", "give a folder for the shards (a new path)")
    names = sorted(_name(p) for p in fs.ls(out, detail=False))
    if not names:
        return None
    path = f"{out}/{MANIFEST}"
    shown = names[:5] + (["..."] if len(names) > 5 else [])
    check(fs.exists(path), out, f"is not empty and holds no crawl record ({MANIFEST}): {shown}",
          "give a new or empty folder; crawl writes only where it can tell its own files apart")
    try:
        with fs.open(path, "rb") as f:
            manifest = json.load(f)
        owned = CrawlFolder(fs, out, manifest).owned()
    except (ValueError, TypeError, KeyError, ZeroDivisionError, pa.ArrowException) as err:
        raise InputError(path, f"is not a crawl manifest ({err!r})", "crawl into a new folder") from None
    # img2dataset reads every OUT/*.json as a shard's stats: a name it cannot parse stops it, and a
    # shard that is not ours would be taken as done or move where a retry round starts.
    foreign = [n for n in names if n.endswith(".json") and n != STATS_NAME
               and (shard_file(n) or (None,))[0] not in owned]
    check(not foreign, out, f"holds JSON files img2dataset would read as shard stats: {foreign}", "move them out of OUT")
    return manifest


def check_rerun(fs: fsspec.AbstractFileSystem, out: str, old: dict | None, manifest: dict, safe: pa.Table) -> None:
    """On a rerun, InputError unless the options and the staged safe list match, so the shards line up."""
    if old is None:
        return
    changed = [k for k in MANIFEST_KEYS if old.get(k) != manifest[k]]
    check(not changed, out, f"was crawled with other {changed}: {({k: old.get(k) for k in changed})}",
          "use the first run's options, or a new output folder")
    staging = f"{out}/{STAGED}"
    if fs.exists(staging):
        with fs.open(staging, "rb") as f:
            check(pq.read_table(f).equals(safe), staging,
                  "the safe pairs differ from those staged by an earlier run (input, allow_networks, "
                  "--ignore-robots or DNS changed); shards would not line up", "use a new output folder, or delete OUT to start over")


def stage_input(fs: fsspec.AbstractFileSystem, out: str, old: dict | None, manifest: dict,
                prepared: PreparedPairs) -> str:
    """Write the crawl's record: the manifest first (it marks OUT as ours), the safe list once, refused.parquet."""
    fs.makedirs(f"{out}/_input", exist_ok=True)
    write_json(fs, f"{out}/{MANIFEST}", {**(old or {}), **manifest})
    staging = f"{out}/{STAGED}"
    if not fs.exists(staging):
        write_parquet(fs, staging, prepared.safe)
    write_parquet(fs, f"{out}/refused.parquet", prepared.refused)
    return staging


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
    executor: Executor | None = None,
    user_agent: str = DEFAULT_USER_AGENT,
    per_host_rps: float = DEFAULT_RPS,
    per_host_concurrency: int = DEFAULT_CONCURRENCY,
    ignore_robots: bool = False,
    max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES,
    throttle_retries: int = 2,
) -> CrawlStats:
    """Download the safe pairs of `pairs_uri` into WebDataset shards under `out_uri`.

    resize_mode "center_crop" (shorter side to image_size, then a centred square) is what
    CLIP's own preprocessing does; "keep_ratio" keeps the whole picture for random crops.
    guard sends img2dataset's requests through `GuardProxy`, so redirects obey the policy too
    (it replaces any proxy configured in the environment). executor: None runs one
    img2dataset call here; an Executor maps the shards as tasks, each behind a guard of its
    own (`processes` is then 1 per task). Bad input raises InputError before anything is written.

    Manners (politeness.py, polite.py, robots.py): robots.txt of every origin is read first
    (unless ignore_robots) and what it disallows is refused, never requested; behind the guard
    every request carries `user_agent`, waits for its host's turn (`per_host_rps`,
    `per_host_concurrency`, Crawl-delay), pauses on 429/503 Retry-After (asked again up to
    `throttle_retries` times) and is given up past `timeout` seconds or `max_image_bytes`.
    """
    start = time.perf_counter()
    check_options(image_size, processes, threads, number_sample_per_shard, timeout, retries,
                  encode_quality, resize_mode)
    politeness = Politeness(user_agent, per_host_rps, per_host_concurrency, not ignore_robots, max_image_bytes,
                            float(timeout), throttle_retries).check()
    user_agent_token = user_agent_token or politeness.robots_token  # X-Robots-Tag groups, and https requests
    policy = UrlPolicy(parse_networks(allow_networks), resolver)
    fs, out = fsspec.core.url_to_fs(out_uri)
    out = out.rstrip("/")
    old = read_crawl_manifest(fs, out)
    prepared = prepare_pairs(read_pairs(pairs_uri), policy)
    check_fetchable(prepared, pairs_uri)
    robots = RobotsCache.load(fs, out) if old is not None else RobotsCache()
    if politeness.respect_robots:
        _fetch_robots(robots, prepared.safe.column("url").to_pylist(), policy, politeness, executor)
        prepared = apply_robots(prepared, robots, politeness.user_agent)
    manifest = {"number_sample_per_shard": number_sample_per_shard, "image_size": image_size,
                "resize_mode": resize_mode, "encode_quality": encode_quality,
                "rows": prepared.safe.num_rows, "pairs_uri": pairs_uri}
    check_rerun(fs, out, old, manifest, prepared.safe)
    # Every check passed: only now does the crawl write, and only its own files.
    staging = stage_input(fs, out, old, manifest, prepared)
    if robots.entries:
        robots.save(fs, out)
    folder = CrawlFolder(fs, out, manifest)
    stats = CrawlStats(input_rows=prepared.input_rows, skipped=dict(prepared.skipped),
                       refused=dict(prepared.refused_counts), queued=prepared.safe.num_rows,
                       user_agent=politeness.user_agent, pairs=pairs_uri)
    options = dict(
        output_folder=_uri(fs, out), image_size=image_size, processes_count=processes,
        thread_count=threads, resize_mode=resize_mode, encode_quality=encode_quality,
        output_format="webdataset", input_format="parquet", url_col="url", caption_col="caption",
        number_sample_per_shard=number_sample_per_shard, save_additional_columns=prepared.extra_columns or None,
        timeout=timeout, retries=retries, disallowed_header_directives=list(disallowed_header_directives),
        user_agent_token=user_agent_token, enable_wandb=False)
    nodes, counts = Counter(), Counter()
    manners = Manners(policy if guard else None, politeness, robots, counts)
    if executor is None:
        run = functools.partial(_call, folder, manners, options)
    else:
        run = functools.partial(_map_shards, folder, manners, options, executor, nodes)
    before = folder.sweep()
    main_shards = math.ceil(prepared.safe.num_rows / number_sample_per_shard)
    if set(range(main_shards)) - before.stats:
        run(staging, prepared.safe, 0)
    if retry_failed:
        stats.retried_this_run = _retry_round(folder, prepared, main_shards, run)
    stats.politeness = dict(counts)
    _finish(folder, stats, before.stats, start, nodes if executor is not None else None)
    return stats


@dataclass(frozen=True)
class Manners:
    """What every img2dataset run of a crawl is given: the URL policy (None: no guard), the politeness,
    the robots.txt entries, and a Counter the guards' counts are added to."""

    policy: UrlPolicy | None
    politeness: Politeness
    robots: RobotsCache
    counts: Counter


def _fetch_robots(robots: RobotsCache, urls: list[str], policy: UrlPolicy, politeness: Politeness,
                  executor: Executor | None) -> None:
    """Fetch robots.txt of the origins of urls not in the cache: batches over the executor, or threads here."""
    origins = robots.missing(urls)
    batches = [(origins[i:i + ROBOTS_BATCH], policy, politeness.user_agent, politeness.deadline)
               for i in range(0, len(origins), ROBOTS_BATCH)]
    for entries in (executor.map(fetch_robots_batch, batches) if executor is not None and len(batches) > 1
                    else map(fetch_robots_batch, batches)):
        robots.add(entries)


def _uri(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """A path of `fs` as a URI img2dataset can open."""
    return fs.unstrip_protocol(path)


def _call(folder: CrawlFolder, manners: Manners, options: dict, path: str, table: pa.Table,
          first: int) -> None:
    """One img2dataset call here on the rows at `path` (shards from `first`), behind the guard if given.

    Its "incremental" mode skips the main run's finished shards; "extend" numbers a retry round
    after the highest shard with stats, which is `first`.
    """
    mode = "extend" if first else "incremental"
    _run_here(folder, manners, dict(options, url_list=_uri(folder.fs, path), incremental_mode=mode))


def _map_shards(folder: CrawlFolder, manners: Manners, options: dict, executor: Executor,
                nodes: Counter, path: str, table: pa.Table, first: int) -> None:
    """The unfinished shards of `table` (ids from `first`) as tasks on `executor`; count each node's shards.

    Each task's guard gets a share of each host's limits (shard_tasks): the tasks that can run at
    once (the executor's `parallelism()`) never press a host harder than one guard would."""
    done = folder.sweep().stats
    per_shard = options["number_sample_per_shard"]
    parallel = getattr(executor, "parallelism", lambda: -(-table.num_rows // per_shard))()
    politeness = manners.politeness if manners.policy is not None else None
    tasks = shard_tasks(table, first, per_shard, done, options, manners.policy, politeness, manners.robots,
                        max(int(parallel), 1))
    with _stats_aside(folder.fs, folder.out):
        for run in map_counting_nodes(executor, crawl_shard, tasks, nodes):
            manners.counts.update(run.counts or {})


def _run_here(folder: CrawlFolder, manners: Manners, kwargs: dict) -> None:
    """Sweep this crawl's unfinished shards and run img2dataset, behind the guard if given.

    One guard serves all of img2dataset's processes and threads: the per-host limits hold for the node."""
    folder.sweep()
    with _stats_aside(folder.fs, folder.out):
        if manners.policy is None:
            return run_img2dataset({}, kwargs)
        with GuardProxy(manners.policy, kwargs["timeout"], manners.politeness, manners.robots) as proxy:
            try:
                run_img2dataset(guard_env(proxy.url), kwargs)
            finally:
                manners.counts.update(proxy.counts())


@contextlib.contextmanager
def _stats_aside(fs: fsspec.AbstractFileSystem, out: str) -> Iterator[None]:
    """Keep crawl_stats.json under `_input/` while img2dataset runs; put it back if the run fails.

    img2dataset reads every OUT/*.json as a shard's stats; a run that fails leaves the
    previous result's stats in place, a finished one writes new ones.
    """
    path, aside = f"{out}/{STATS_NAME}", f"{out}/{STATS_ASIDE}"
    if fs.exists(path):
        fs.mv(path, aside)
    try:
        yield
    except BaseException:
        if fs.exists(aside) and not fs.exists(path):
            fs.mv(aside, path)
        raise


def _retry_round(folder: CrawlFolder, prepared: PreparedPairs, main_shards: int,
                 run: Callable[[str, pa.Table, int], None]) -> int:
    """Fetch again the samples whose last attempt failed, into shards after the last one."""
    fs, out = folder.fs, folder.out
    listing = folder.shards()
    missing = set(range(main_shards)) - listing.stats
    if missing:
        raise RuntimeError(f"retry_failed needs every shard complete; missing {sorted(missing)}: run again")
    failed = retry_candidates(read_outcomes(fs, out, sorted(listing.stats)))
    if not failed:
        return 0
    urls = prepared.safe.column("url").to_pylist()
    table = prepared.safe.take([i for i, url in enumerate(urls) if url in failed])
    # img2dataset's "extend" numbers new shards after the highest one with stats, so keys stay unique;
    # the file's name and rows are the record of which shards this round owns.
    first = max(listing.stats, default=-1) + 1
    _check_free(fs, out, range(first, first + math.ceil(table.num_rows / folder.manifest["number_sample_per_shard"])))
    path = f"{out}/_input/retry_{first:05d}.parquet"
    write_parquet(fs, path, table)
    run(path, table, first)
    return table.num_rows


def _check_free(fs: fsspec.AbstractFileSystem, out: str, shards: range) -> None:
    """InputError when OUT holds files, not this crawl's, where the next shards would be written."""
    taken = sorted(n for n in (_name(p) for p in fs.ls(out, detail=False)) if (shard_file(n) or (-1,))[0] in shards)
    check(not taken, out, f"holds {taken}, which this crawl did not write, where its retry shards go",
          "move them out of OUT")


def _finish(folder: CrawlFolder, stats: CrawlStats, done_before: set[int], start: float,
            nodes: Counter | None) -> None:
    """Reduce the shards' outcomes into `stats` and write OUT/crawl_stats.json; nodes None: all ran here."""
    fs, out = folder.fs, folder.out
    listing = folder.shards()
    new = listing.stats - done_before
    stats.nodes = dict(nodes) if nodes is not None else ({host_name(): len(new)} if new else {})
    complete = sorted(listing.stats)
    aggregate(stats, read_outcomes(fs, out, complete))
    stats.not_attempted = stats.queued - stats.attempted
    stats.shards = len(complete)
    stats.incomplete_shards = len(listing.incomplete())
    stats.bytes_written = sum(listing.tar_bytes.get(s, 0) for s in complete)
    stats.fetch_attempts = _shard_counts(fs, out, complete)
    stats.fetched_this_run = _shard_counts(fs, out, sorted(listing.stats - done_before))
    stats.wall_seconds = time.perf_counter() - start
    stats.images_per_second = stats.fetched_this_run / stats.wall_seconds if stats.wall_seconds else 0.0
    write_json(fs, f"{out}/{STATS_NAME}", stats.to_dict())
    if fs.exists(f"{out}/{STATS_ASIDE}"):
        fs.rm(f"{out}/{STATS_ASIDE}")
