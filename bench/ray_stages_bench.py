"""Each corpus stage on a real 2-node Ray cluster on 127.0.0.1 against its local executor, in one run.

Synthetic webs (generate_web) feed every stage: their pages as WAT files (extract), the
extracted pairs (queries, curate), the first web's pair list crawled from it served on 127.0.0.1
(crawl), and the crawled shards checked against its eval sets (dedup, phash). Each stage runs
twice on the same input: `LocalExecutor(2)` (this machine's 2 cores) and a `RayExecutor`
connected to a `ray.cluster_utils.Cluster` of two raylets with one CPU each (the same 2 cores,
so the ratio is Ray's overhead, not a speed-up). The timed span is the whole stage call;
cluster start-up, the driver's connection and the local pool's start are reported apart (each is
paid once per flow run). Outputs (files and stats, timings aside) must be equal; exit 1 if not.

    .venv/bin/python bench/ray_stages_bench.py [--pairs 100000] [--webs 4] [--crawl-urls 400] [--image-size 64]
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import shutil
import socket
import tarfile
import tempfile
import time
from pathlib import Path

# Ray's single-machine mode (every raylet on 127.0.0.1): must be set before Ray is imported
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import pyarrow.parquet as pq
from PIL import Image

from clip_core.crawl import crawl
from clip_core.curation.curate import curate
from clip_core.curation.queries import build_queries
from clip_core.executors import LocalExecutor
from clip_core.extract.wat import extract
from dedup.near_dup import dedup
from flows.common import free_port
from synthweb.generator import generate_web
from synthweb.server import serve_web
from synthweb.wat_export import write_web_wat

TIMINGS = {"seconds", "pairs_per_s", "nodes", "wall_seconds", "images_per_second"}  # differ run to run
EVAL_SETS = ("shapes", "colors", "counts", "digits", "words", "retrieval")
STATS_FILES = {"extract_stats.json", "curation_stats.json", "dedup_stats.json", "crawl_stats.json"}


def plain(stats: dict, out: str) -> dict:
    """Stats without timings and nodes, OUT written as "OUT": what the two runs must agree on."""
    def strip(value):
        if isinstance(value, dict):
            return {k: strip(v) for k, v in value.items() if k not in TIMINGS}
        return [strip(v) for v in value] if isinstance(value, list) else value
    return json.loads(json.dumps(strip(stats)).replace(out.rstrip("/"), "OUT"))


def files(folder: str) -> dict:
    """Every output file under folder (stats files aside) by relative name, with its digest."""
    root = Path(folder)
    if root.is_file():
        return {"OUT": repr(pq.read_table(root).to_pylist())}  # the query list: its rows, in order
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and p.name not in STATS_FILES}


def samples(folder: str) -> dict:
    """{key: (caption, url, image size)} over the crawl's tars: what two crawls must agree on."""
    found = {}
    for tar_path in sorted(Path(folder).glob("*.tar")):
        with tarfile.open(tar_path) as tar:
            members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
        for name, blob in members.items():
            if name.endswith(".json"):
                key, meta = name[:-5], json.loads(blob)
                found[key] = (meta["caption"], meta["url"], Image.open(io.BytesIO(members[key + ".jpg"])).size)
    return found


def start_cluster(temp: str):
    """conftest's 2-node cluster: head and one worker, one CPU each, on 127.0.0.1."""
    from ray.cluster_utils import Cluster

    os.environ["RAY_TMPDIR"] = temp  # Ray's socket paths must stay under 108 bytes
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    return cluster


def make_inputs(base: Path, n_pairs: int, webs: int, image_size: int, port: int, crawl_urls: int) -> dict:
    """The synthetic web, its WAT files and the pairs extracted from them (built before any timing)."""
    wats = []
    for seed in range(webs):  # several webs of n_pairs (one web of 200k pairs fails to read back its pages)
        web = generate_web(str(base / f"web{seed}"), n_pairs=n_pairs, seed=3 + seed, image_size=image_size,
                           failure_rates={}, base_url=f"http://127.0.0.1:{port}", eval_sizes=20)
        wats += write_web_wat(web, str(base / f"wat{seed}"), pages_per_file=max(1, n_pairs // 160))
    web = str(base / "web0")  # the one served, crawled and deduplicated against
    pairs = extract(wats, str(base / "pairs"), workers=1, shard_rows=max(50, n_pairs // 8))
    build_queries(str(base / "pairs"), str(base / "queries.parquet"), min_count=3, text_column="caption",
                  partitions=4, executor=LocalExecutor(1))
    urls = pq.read_table(f"{web}/pairs.parquet").slice(0, crawl_urls)  # the crawl's share: its own size
    pq.write_table(urls, str(base / "crawl_pairs.parquet"))
    return {"web": web, "crawl_pairs": str(base / "crawl_pairs.parquet"), "wats": wats, "pairs": str(base / "pairs"), "queries": str(base / "queries.parquet"),
            "pair_rows": pairs.rows}


def stages(inputs: dict, n_pairs: int, crawl_urls: int) -> list[tuple]:
    """(name, items, call(out, executor) -> stats, compare(out) -> comparable) per stage."""
    shard_rows = max(50, n_pairs // 8)
    crawl_opts = {"image_size": 32, "threads": 8, "number_sample_per_shard": max(25, crawl_urls // 8),
                  "allow_networks": ["127.0.0.1/32"], "timeout": 10}
    dedup_opts = {"descriptor": "phash", "calibration_samples": 16, "sheet_size": 0}
    evals = [f"{inputs['web']}/eval/{name}" for name in EVAL_SETS]
    return [
        ("extract", f"{len(inputs['wats'])} WAT files",
         lambda out, ex: extract(inputs["wats"], out, executor=ex, shard_rows=shard_rows), files),
        ("queries", f"{inputs['pair_rows']} captions",
         lambda out, ex: build_queries(inputs["pairs"], out + ".parquet", min_count=3, text_column="caption",
                                       partitions=4, executor=ex), lambda out: files(out + ".parquet")),
        ("curate", f"{inputs['pair_rows']} pairs",
         lambda out, ex: curate(inputs["pairs"], inputs["queries"], out, max_per_query=50, shard_rows=shard_rows,
                                seed=1, executor=ex), files),
        ("crawl", f"{crawl_urls} URLs",
         lambda out, ex: crawl(inputs["crawl_pairs"], out, executor=ex, **crawl_opts), samples),
        ("dedup", "crawled images",
         lambda out, ex: dedup(inputs["shards"], out, evals, executor=ex, **dedup_opts), files),
    ]


def timed(call, out: str, executor) -> tuple[float, object]:
    start = time.perf_counter()
    stats = call(out, executor)
    return time.perf_counter() - start, stats


def to_dict(stats) -> dict:
    return stats.to_dict() if hasattr(stats, "to_dict") else dict(vars(stats))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=100000, help="pairs of each synthetic web")
    parser.add_argument("--webs", type=int, default=4, help="synthetic webs whose pages feed extract, queries, curate")
    parser.add_argument("--crawl-urls", type=int, default=400, help="URLs of the web that the crawl fetches")
    parser.add_argument("--image-size", type=int, default=64, help="side of the web's images")
    args = parser.parse_args()
    ray_temp = tempfile.mkdtemp(prefix="rb", dir="/tmp")
    base = Path(tempfile.mkdtemp(prefix="ray-stages-bench-"))
    port, rows, failed, cluster = free_port(), [], 0, None
    try:
        start = time.perf_counter()
        inputs = make_inputs(base, args.pairs, args.webs, args.image_size, port, args.crawl_urls)
        print(f"inputs ({args.webs} webs of {args.pairs} pairs, {len(inputs['wats'])} WAT files): "
              f"{time.perf_counter() - start:.1f} s", flush=True)
        start = time.perf_counter()
        cluster = start_cluster(ray_temp)
        ids = {cluster.head_node.node_id, *(n.node_id for n in cluster.worker_nodes)}
        started = time.perf_counter() - start
        from flows.executors import RayExecutor

        with serve_web(inputs["web"], port=port), RayExecutor(address=cluster.address) as ray_executor, \
                LocalExecutor(2) as local_executor:
            # Both executors opened once, as build-corpus opens one per flow run: not in the stage times.
            start = time.perf_counter()
            ray_executor.map(abs, [-1, -2])  # the driver's connection
            connected = time.perf_counter() - start
            start = time.perf_counter()
            list(local_executor.map(abs, [-1, -2]))  # the process pool's start
            pool = time.perf_counter() - start
            print(f"2-node cluster start: {started:.1f} s; driver connect: {connected:.1f} s; "
                  f"local pool start: {pool:.1f} s", flush=True)
            for name, items, call, compare in stages(inputs, args.pairs, args.crawl_urls):
                local_out, ray_out = str(base / f"{name}-local"), str(base / f"{name}-ray")
                local_s, local = timed(call, local_out, local_executor)
                ray_s, remote = timed(call, ray_out, ray_executor)
                same_files = compare(local_out) == compare(ray_out)
                a, b = plain(to_dict(local), local_out), plain(to_dict(remote), ray_out)
                same = same_files and a == b
                if not same:
                    print(f"  {name} differs: files equal={same_files}; stats keys differing: "
                          f"{sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))}", flush=True)
                failed += not same
                if name == "crawl":
                    inputs["shards"] = local_out
                    items = f"{args.crawl_urls} URLs ({remote.success} images)"
                if name == "dedup":
                    items = f"{remote.corpus_images} images"
                spread = remote.nodes
                used = f"{sum(1 for n in spread if n in ids)}/2 ({'+'.join(str(v) for v in spread.values())} tasks)"
                rows.append((name, items, local_s, ray_s, used, same))
                print(f"  {name}: local {local_s:.2f} s, 2-node {ray_s:.2f} s, equal={same}", flush=True)
    finally:
        if cluster is not None:
            cluster.shutdown()  # its raylets, even when a stage failed
        shutil.rmtree(base, ignore_errors=True)
        shutil.rmtree(ray_temp, ignore_errors=True)
    print(f"\n{os.cpu_count()} cores, {socket.gethostname()}, load average {os.getloadavg()[0]:.1f}; "
          f"local = LocalExecutor(2); 2-node = RayExecutor on ray.cluster_utils.Cluster, 2 nodes x 1 CPU, 127.0.0.1")
    print(f"cluster start-up {started:.1f} s, driver connect {connected:.1f} s and local pool start {pool:.1f} s: "
          "not in the stage times")
    print(f"{'stage':<8} {'items':<28} {'local s':>8} {'2-node s':>9} {'ratio':>6}  {'nodes used':<18} equal")
    for name, items, local_s, ray_s, used, same in rows:
        print(f"{name:<8} {items:<28} {local_s:8.2f} {ray_s:9.2f} {ray_s / local_s:6.2f}  {used:<18} {same}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
