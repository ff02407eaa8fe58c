"""One crawl shard as a task an executor maps: img2dataset on the shard's rows, behind its own guard.

With an executor (`crawl(..., executor=...)`, e.g. Ray tasks on a cluster) the crawl maps its
shards instead of making one img2dataset call. The manifest fixes which rows make which shard
(`number_sample_per_shard` rows each, in the staged order), so a task needs only its rows and its
shard id. It runs img2dataset (multiprocessing, one process) into a private folder on the node's
disk, seeded so that img2dataset's "extend" numbering starts at the shard id (same file names and
sample keys as the local run), then copies the tar, the parquet and, last, the `_stats.json` into
OUT: the stats file marks the shard done, so a task killed mid-way leaves at most files that the
next run sweeps, never a shard that looks finished.

URL safety on every node: the driver has already refused unsafe URLs; each task starts its own
`GuardProxy` on 127.0.0.1 of the machine it runs on (a worker on a real cluster cannot reach the
driver's loopback) and routes its img2dataset through it. The task's result names the guard's
process and address, so a caller can see where the guard ran.

Why tasks of our own rather than img2dataset's `distributor="ray"`: that one runs img2dataset's
downloader in Ray workers that inherit no per-node guard (the only guard would listen on the
driver's loopback, which other nodes cannot reach), it needs Ray in the calling process (the
library imports no Ray), and it neither resumes per shard nor says where a shard ran.
"""
from __future__ import annotations

import dataclasses
import io
import json
import os
import socket
import tempfile
from collections import Counter
from dataclasses import dataclass

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from clip_core.crawl.guard import GuardProxy, guard_env, run_img2dataset
from clip_core.crawl.politeness import Politeness
from clip_core.crawl.robots import RobotsCache, RobotsEntry, host_of, origin_of
from clip_core.crawl.safety import UrlPolicy

SUFFIXES = (".tar", ".parquet", "_stats.json")  # the order of the copy: stats last, it marks the shard done
# A stats file img2dataset's logger can read, for the seed that sets where "extend" numbers from.
SEED_STATS = {"count": 0, "successes": 0, "failed_to_download": 0, "failed_to_resize": 0,
              "start_time": 0.0, "end_time": 0.0, "status_dict": {}}


@dataclass(frozen=True)
class ShardTask:
    """What one task needs: the shard id, its rows (Parquet bytes), img2dataset's options and the URL policy."""

    shard: int
    rows: bytes
    options: dict  # img2dataset's keyword arguments; output_folder is OUT's URI
    policy: UrlPolicy | None  # None: no guard (--no-guard)
    politeness: Politeness | None = None  # the guard's manners, with this task's share of the per-host limits
    robots: tuple[RobotsEntry, ...] = ()  # robots.txt of the task's origins, as the crawl fetched them


@dataclass(frozen=True)
class ShardRun:
    """What a task did: its shard, whether it finished, and the guard it used (pid and address on its host)."""

    shard: int
    complete: bool
    host: str
    pid: int
    guard_url: str | None
    counts: dict | None = None  # what the guard's manners did (robots refusals, 429s, pauses, deadlines)


def shard_tasks(table: pa.Table, first: int, per_shard: int, skip: set[int], options: dict,
                policy: UrlPolicy | None, politeness: Politeness | None = None, robots: RobotsCache | None = None,
                parallel: int = 1):
    """The tasks of `table`'s shards (ids from `first`, `per_shard` rows each), but those in `skip`.

    With politeness, each task gets a share of every host's limits: 1 / (the number of tasks
    holding the host, at most `parallel`, the tasks that can run at once), so that the guards of
    a cluster together never exceed one host's limits."""
    todo = [k for k in range(-(-table.num_rows // per_shard)) if first + k not in skip]
    slices = {k: table.slice(k * per_shard, per_shard) for k in todo}
    hosts = {k: {host_of(u) for u in rows.column("url").to_pylist()} for k, rows in slices.items()}
    holders = Counter(h for k in todo for h in hosts[k])
    for k in todo:
        manners = None
        if politeness is not None:
            shares = {h: 1.0 / min(holders[h], parallel) for h in hosts[k]}
            manners = dataclasses.replace(politeness, shares=shares, default_share=1.0 / max(parallel, 1))
        origins = {origin_of(u) for u in slices[k].column("url").to_pylist()}
        entries = tuple(robots.entries[o] for o in sorted(origins) if o in robots.entries) if robots else ()
        yield ShardTask(first + k, _parquet_bytes(slices[k]), options, policy, manners, entries)


def _parquet_bytes(table: pa.Table) -> bytes:
    """The rows as Parquet bytes: compact to ship, whatever the table's buffers hold beyond the slice."""
    buf = io.BytesIO()
    pq.write_table(table, buf)
    return buf.getvalue()


def crawl_shard(task: ShardTask) -> ShardRun:
    """Run img2dataset for one shard behind a guard started here, then copy its files into OUT (stats last)."""
    fs, out = fsspec.core.url_to_fs(task.options["output_folder"])
    out = out.rstrip("/")
    with tempfile.TemporaryDirectory(prefix="clip-crawl-shard-") as work:
        folder = _seeded_folder(work, task)
        kwargs = dict(task.options, output_folder=folder, url_list=f"{work}/rows.parquet",
                      incremental_mode="extend", processes_count=1, distributor="multiprocessing")
        guard_url, counts = None, None
        if task.policy is None:
            run_img2dataset({}, kwargs)
        else:
            with GuardProxy(task.policy, kwargs["timeout"], task.politeness, RobotsCache(task.robots)) as proxy:
                guard_url = proxy.url
                run_img2dataset(guard_env(proxy.url), kwargs)
                counts = proxy.counts()
        complete = _copy_out(fs, folder, out, task.shard)
    return ShardRun(task.shard, complete, socket.gethostname(), os.getpid(), guard_url, counts)


def _seeded_folder(work: str, task: ShardTask) -> str:
    """A private output folder whose one stats file makes img2dataset's "extend" start at the task's shard id."""
    with open(f"{work}/rows.parquet", "wb") as f:
        f.write(task.rows)
    folder = f"{work}/out"
    os.makedirs(folder)
    if task.shard:
        with open(f"{folder}/{task.shard - 1:05d}_stats.json", "w") as f:
            json.dump(SEED_STATS, f)
    return folder


def _copy_out(fs: fsspec.AbstractFileSystem, folder: str, out: str, shard: int) -> bool:
    """Copy the shard's files that exist into OUT, stats last; True when the shard finished (its stats exist)."""
    present = [s for s in SUFFIXES if os.path.exists(f"{folder}/{shard:05d}{s}")]
    for suffix in present:
        fs.put_file(f"{folder}/{shard:05d}{suffix}", f"{out}/{shard:05d}{suffix}")
    return "_stats.json" in present
