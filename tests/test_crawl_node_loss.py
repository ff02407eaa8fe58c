"""A Ray node killed mid-crawl: the run (and a re-run) still give the whole corpus, no finished shard fetched twice.

A real cluster on 127.0.0.1 (`ray.cluster_utils.Cluster`): a head with no CPU (the driver's
node) and two worker nodes of one CPU each, so every shard task runs on a worker node. Once a
shard is finished and the doomed node is writing one (a process under its raylet holds a shard's
tar open in its private folder), the node is removed: its raylet and workers die as on a machine
lost from the cluster. Ray retries the lost task on the surviving node; the crawl is then run
again, as a user would, and must have nothing left to fetch.
"""
import os
import shutil
import tempfile
import threading
import time

import pytest
from test_crawl import ImageWeb, read_tars, write_pairs

from clip_core.crawl import CrawlStats, crawl

OPTIONS = dict(image_size=32, threads=2, number_sample_per_shard=3, allow_networks=("127.0.0.1/32",), timeout=5,
               per_host_rps=0, per_host_concurrency=0)  # no per-host limits: a server of the test's own
N = 24  # 8 shards of 3


@pytest.fixture
def cluster(monkeypatch):
    from ray.cluster_utils import Cluster

    temp = tempfile.mkdtemp(prefix="rk", dir="/tmp")  # Ray's socket paths must stay under 108 bytes
    monkeypatch.setenv("RAY_TMPDIR", temp)
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    try:
        nodes = [c.add_node(num_cpus=1) for _ in range(2)]
        c.wait_for_nodes()
        yield c, nodes
    finally:
        c.shutdown()
        shutil.rmtree(temp, ignore_errors=True)


def _shard_being_written(node) -> str | None:
    """The name of a shard tar that a process under `node`'s raylet holds open, if any."""
    import psutil  # Ray's vendored copy, on the path once Ray is imported

    raylet = psutil.Process(node.all_processes["raylet"][0].process.pid)
    for proc in raylet.children(recursive=True):
        try:
            for f in proc.open_files():
                if "clip-crawl-shard-" in f.path and f.path.endswith(".tar"):
                    return os.path.basename(f.path)
        except psutil.Error:  # the process ended meanwhile
            continue
    return None


def _kill_mid_shard(cluster, node, out, killed: dict, deadline: float) -> None:
    """Remove `node` once a shard is finished in OUT and the node is writing another."""
    while time.time() < deadline:
        finished = [n for n in os.listdir(out) if n.endswith("_stats.json")] if out.exists() else []
        if finished and (name := _shard_being_written(node)):
            killed.update(shard=name, finished={int(n[:5]) for n in finished})
            cluster.remove_node(node, allow_graceful=False)
            return
        time.sleep(0.05)


@pytest.mark.slow
def test_a_node_killed_mid_crawl_then_a_rerun_give_the_whole_corpus(cluster, tmp_path):
    from flows.executors import RayExecutor

    c, (doomed, _survivor) = cluster
    out = tmp_path / "out"
    with ImageWeb(delay=0.3) as web:
        urls = [web.url(f"/slow/{i}.jpg") for i in range(N)]
        pairs = write_pairs(tmp_path / "pairs.parquet", urls, [f"slow {i}" for i in range(N)])
        killed: dict = {}
        killer = threading.Thread(target=_kill_mid_shard, args=(c, doomed, out, killed, time.time() + 240))
        killer.start()
        try:
            with RayExecutor(address=c.address) as executor:
                first = crawl(pairs, str(out), executor=executor, **OPTIONS)
        except Exception as err:  # noqa: BLE001 -- a run may fail with its node; the re-run must finish it
            first = err
        finally:
            killer.join()
        assert killed, f"the node was not killed mid-shard (first run: {first!r})"
        hits_after_first = web.hits
        with RayExecutor(address=c.address) as executor:
            stats = crawl(pairs, str(out), executor=executor, **OPTIONS)

        assert (stats.success, stats.shards, stats.incomplete_shards) == (N, 8, 0)
        assert CrawlStats.read(str(out)) == stats
        assert sorted(c for _, c, _ in read_tars(out).values()) == sorted(f"slow {i}" for i in range(N))
        for shard in killed["finished"]:  # finished before the node died: fetched once, never again
            for i in range(3 * shard, 3 * shard + 3):
                assert web.hits[f"/slow/{i}.jpg"] == 1
        assert all(web.hits[f"/slow/{i}.jpg"] <= 2 for i in range(N))  # at most the lost shard's retry
        if isinstance(first, CrawlStats):  # Ray re-ran the lost task: the re-run had nothing left to fetch
            assert stats.fetched_this_run == 0 and web.hits == hits_after_first
