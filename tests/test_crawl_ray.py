"""The crawl with an executor: shards as tasks, a guard per task on its own node, resume after a failure.

The first test maps the shards with a one-worker LocalExecutor (in this process); the others on
a real two-node Ray cluster on 127.0.0.1 (`ray.cluster_utils.Cluster`, one CPU per node, as in
test_ray_stages.py). Every request goes to 127.0.0.0/8: the image server on 127.0.0.1 (allowed)
and one on 127.0.0.2 (outside the allowlist, must see no request, not even through a redirect).
"""
import dataclasses
import io
import os
import socket

import pytest
from PIL import Image
from test_crawl import outside, read_tars, web, write_pairs  # noqa: F401  (fixtures)

from clip_core.crawl import CrawlStats, crawl
from clip_core.crawl.guard import REFUSED
from clip_core.executors import LocalExecutor
from flows.cli import main

LOOPBACK = ("127.0.0.1/32",)
PER_RUN = {"wall_seconds", "images_per_second", "nodes"}
OPTIONS = dict(image_size=32, threads=2, number_sample_per_shard=3, allow_networks=LOOPBACK, timeout=5,
               per_host_rps=0, per_host_concurrency=0)  # no per-host limits: a server of the test's own


def _urls(web, outside, flaky=True):
    """Images, a 404, an opt-out, a non-image, an allowed redirect, one to a refused host (and a flaky one)."""
    return ([web.url(f"/img/{i}.jpg") for i in range(5)] + [web.url("/png/1.png"), web.url("/missing/1"),
            web.url("/noai/1.jpg"), web.url("/text/1.jpg"), web.url("/redirect/1?to=" + web.url("/img/50.jpg")),
            web.url("/redirect/2?to=" + outside.url("/img/2.jpg"))] + [web.url("/flaky/1.jpg")] * flaky)


def _forget(web):
    """Clear the server's counts: the flaky URL answers 503 again to the next crawl's first request."""
    with web.server.lock:
        web.server.hits.clear()


def _corpus(folder) -> dict:
    """{key: (caption, url, image size)}: what two crawls of one input must agree on."""
    return {k: (c, m["url"], Image.open(io.BytesIO(jpg)).size) for k, (jpg, c, m) in read_tars(folder).items()}


def _plain(stats: CrawlStats) -> dict:
    return {k: v for k, v in stats.to_dict().items() if k not in PER_RUN}


@pytest.mark.slow
def test_mapped_shards_give_the_local_corpus_and_books(tmp_path, web, outside):
    """One task per shard (here, in this process) writes the files, keys and stats one img2dataset call writes."""
    pairs = write_pairs(tmp_path / "pairs.parquet", (urls := _urls(web, outside)), [f"c{i}" for i in range(len(urls))])
    local = crawl(pairs, str(tmp_path / "local"), retry_failed=True, **OPTIONS)
    _forget(web)
    mapped = crawl(pairs, str(tmp_path / "mapped"), retry_failed=True, executor=LocalExecutor(1), **OPTIONS)
    assert _corpus(tmp_path / "mapped") == _corpus(tmp_path / "local") and len(_corpus(tmp_path / "local")) == 8
    assert _plain(mapped) == _plain(local) and local.shards == 5 and local.retried_this_run == 1
    assert sorted(os.listdir(tmp_path / "mapped")) == sorted(os.listdir(tmp_path / "local"))
    assert local.nodes == mapped.nodes == {socket.gethostname(): 5}  # 4 shards and a retry round's one
    assert sum(outside.hits.values()) == 0 and any(REFUSED in e for e in mapped.errors)
    again = crawl(pairs, str(tmp_path / "mapped"), executor=LocalExecutor(1), **OPTIONS)
    assert again.fetched_this_run == 0 and again.nodes == {} and CrawlStats.read(str(tmp_path / "mapped")) == again


@pytest.fixture(scope="module")
def cluster(ray_cluster):
    """conftest's 2-node cluster on 127.0.0.1: (cluster, its node ids)."""
    return ray_cluster


def _recording(address):
    """A RayExecutor that keeps what the tasks returned: (Ray node id, ShardRun) per shard."""
    from flows.executors import RayExecutor

    class Recording(RayExecutor):
        def map(self, fn, items):
            results = super().map(fn, items)
            self.runs.extend(results)
            return results

    executor = Recording(address=address)
    executor.runs = []
    return executor


def _driver_starts_no_guard(monkeypatch):
    """Any guard started in this (the driver's) process fails the test; Ray workers import their own."""
    from clip_core.crawl import download, shard_task

    def refuse(*args, **kwargs):
        raise AssertionError("a guard was started in the driver")

    monkeypatch.setattr(shard_task, "GuardProxy", refuse)
    monkeypatch.setattr(download, "GuardProxy", refuse)


@pytest.mark.slow
def test_ray_crawl_gives_the_local_corpus_with_a_guard_on_each_node(cluster, tmp_path, web, outside, monkeypatch,
                                                                    capsys):
    c, ids = cluster
    urls = _urls(web, outside, flaky=False)
    pairs = write_pairs(tmp_path / "pairs.parquet", urls, [f"c{i}" for i in range(len(urls))])
    local = crawl(pairs, str(tmp_path / "local"), **OPTIONS)
    hits = web.hits
    _driver_starts_no_guard(monkeypatch)
    with _recording(c.address) as executor:
        remote = crawl(pairs, str(tmp_path / "ray"), executor=executor, **OPTIONS)
    assert _corpus(tmp_path / "ray") == _corpus(tmp_path / "local") and len(_corpus(tmp_path / "ray")) == 7
    assert _plain(remote) == _plain(local) and remote.shards == 4 and local.nodes == {socket.gethostname(): 4}
    assert remote.nodes and set(remote.nodes) == ids and sum(remote.nodes.values()) == 4
    assert CrawlStats.read(str(tmp_path / "ray")).nodes == remote.nodes
    # Each task's guard ran in the task's own process, on the task's node, on loopback; never in the driver.
    runs = executor.runs
    assert sorted(run.shard for _, run in runs) == [0, 1, 2, 3] and all(run.complete for _, run in runs)
    assert {node for node, _ in runs} == ids
    assert all(run.guard_url.startswith("http://127.0.0.1:") and run.pid != os.getpid() for _, run in runs)
    pids = {node: {run.pid for n, run in runs if n == node} for node in ids}
    assert not set.intersection(*pids.values())  # the two nodes' guards lived in different processes
    # The redirect to a refused address was refused by the task's guard, as in the local crawl.
    assert sum(outside.hits.values()) == 0 and any(REFUSED in e for e in remote.errors)
    assert web.hits == hits + hits  # each URL once per crawl


@pytest.mark.slow
def test_a_failed_ray_crawl_resumes_without_refetching_finished_shards(cluster, tmp_path, web, capsys):
    c, ids = cluster
    urls = [web.url(f"/img/{i}.jpg") for i in range(15)]
    pairs = write_pairs(tmp_path / "pairs.parquet", urls, [f"r{i}" for i in range(15)])
    out = tmp_path / "out"
    from flows.executors import RayExecutor

    class FailingLastShard(RayExecutor):
        """The task of shard 4 (the last, started once a CPU is free, so after a shard finished) raises."""

        def map(self, fn, items):
            items = [dataclasses.replace(t, options={**t.options, "output_folder": "nosuchprotocol://x"})
                     if t.shard == 4 else t for t in items]
            return super().map(fn, items)

    with pytest.raises(Exception, match="nosuchprotocol"), FailingLastShard(address=c.address) as executor:
        crawl(pairs, str(out), executor=executor, **OPTIONS)
    finished = {int(n[:5]) for n in os.listdir(out) if n.endswith("_stats.json")}
    assert finished and 4 not in finished and not (out / "crawl_stats.json").exists()
    before = web.hits
    # The re-run from the command line: --executor ray --ray-address ADDR.
    assert main(["crawl", pairs, str(out), "--image-size", "32", "--threads", "2", "--number-sample-per-shard", "3",
                 "--allow-network", "127.0.0.1/32", "--timeout", "5", "--executor", "ray", "--per-host-rps", "0",
                 "--ray-address", c.address]) == 0
    stats = CrawlStats.read(str(out))
    assert (stats.success, stats.shards, stats.incomplete_shards) == (15, 5, 0)
    assert sorted(cap for cap, _, _ in _corpus(out).values()) == sorted(f"r{i}" for i in range(15))
    assert sum(stats.nodes.values()) == 5 - len(finished) and set(stats.nodes) <= ids
    for shard in finished:  # fetched in the failed run, not again
        for i in range(3 * shard, 3 * shard + 3):
            assert web.hits[f"/img/{i}.jpg"] == before[f"/img/{i}.jpg"] == 1
