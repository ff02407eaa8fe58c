"""extract, queries, curate and dedup on a real two-node Ray cluster give the local run's output.

Two raylets on 127.0.0.1 (`ray.cluster_utils.Cluster`, Ray's single-machine mode: conftest sets
RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 before Ray is imported), one CPU each; the stages connect
with `RayExecutor(address=...)` and their stats' `nodes` must name both nodes with work on each.
"""
import json
import socket
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from test_near_dup import KINDS, _eval_set, _jpeg, _write_tar

from clip_core.curation.curate import curate
from clip_core.curation.queries import QueryStats, build_queries
from clip_core.executors import LocalExecutor
from clip_core.extract.wat import ExtractStats, extract
from dedup.augment import copy_of, procedural_image
from dedup.near_dup import DedupStats, dedup
from flows.cli import main
from flows.executors import RayExecutor
from synthweb.generator import generate_web
from synthweb.wat_export import write_web_wat

TIMINGS = {"seconds", "pairs_per_s", "nodes"}  # what may differ between two runs of one input


@pytest.fixture(scope="module")
def cluster(ray_cluster):
    """conftest's 2-node cluster on 127.0.0.1: (cluster, its node ids)."""
    return ray_cluster


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """WAT files of a small synthetic web (10 files) and the candidate pairs extracted from them."""
    base = tmp_path_factory.mktemp("inputs")
    web = generate_web(str(base / "web"), n_pairs=400, seed=3, image_size=32, eval_sizes=0)
    wats = write_web_wat(web, str(base / "wat"), pages_per_file=2)
    extract(wats, str(base / "pairs"), workers=1, shard_rows=50)  # several part files: several shards
    return {"wats": wats, "pairs": str(base / "pairs"), "base": base}


def _plain(stats: dict, out=None) -> dict:
    """A stats dict without timings and nodes, OUT (if any) written as "OUT": what two runs must agree on."""
    def strip(value):
        if isinstance(value, dict):
            return {k: strip(v) for k, v in value.items() if k not in TIMINGS}
        return [strip(v) for v in value] if isinstance(value, list) else value
    text = json.dumps(strip(stats))
    return json.loads(text.replace(str(out).rstrip("/"), "OUT") if out else text)


def _files(folder, skip=()) -> dict:
    """Every file under folder by relative name, with its bytes."""
    root = Path(folder)
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.name not in skip}


def _spread(nodes: dict, ids: set, items: int) -> None:
    assert set(nodes) == ids and all(n > 0 for n in nodes.values()) and sum(nodes.values()) == items


@pytest.mark.slow
def test_extract_on_two_nodes_gives_the_local_result(cluster, inputs, tmp_path):
    c, ids = cluster
    local = extract(inputs["wats"], str(tmp_path / "local"), workers=1, shard_rows=50)
    with RayExecutor(address=c.address) as executor:
        remote = extract(inputs["wats"], str(tmp_path / "ray"), executor=executor, shard_rows=50)
    assert _files(tmp_path / "ray", skip={"extract_stats.json"}) == _files(tmp_path / "local",
                                                                           skip={"extract_stats.json"})
    assert len(remote.shards) > 1 and remote.rows == local.rows > 0
    assert _plain(remote.to_dict(), tmp_path / "ray") == _plain(local.to_dict(), tmp_path / "local")
    _spread(remote.nodes, ids, len(inputs["wats"]))  # a task per WAT file, on both nodes
    assert local.nodes == {socket.gethostname(): len(inputs["wats"])}
    assert ExtractStats.read(str(tmp_path / "ray")).nodes == remote.nodes


@pytest.mark.slow
def test_queries_on_two_nodes_give_the_local_list(cluster, inputs, tmp_path):
    c, ids = cluster
    options = {"min_count": 3, "min_pmi": 0.0, "text_column": "caption", "partitions": 2}
    local = build_queries(inputs["pairs"], str(tmp_path / "local.parquet"), executor=LocalExecutor(1), **options)
    with RayExecutor(address=c.address) as executor:
        remote = build_queries(inputs["pairs"], str(tmp_path / "ray.parquet"), executor=executor, **options)
    assert pq.read_table(tmp_path / "ray.parquet").equals(pq.read_table(tmp_path / "local.parquet"))
    assert local.n_queries > 10 and _plain(remote.to_dict()) == _plain(local.to_dict())
    tasks = sum(local.nodes.values())  # map tasks (a chunk each) and reduce tasks (a partition each)
    _spread(remote.nodes, ids, tasks)
    assert QueryStats.read(str(tmp_path / "ray.parquet")).nodes == remote.nodes


@pytest.mark.slow
def test_curate_on_two_nodes_gives_the_local_pairs(cluster, inputs, tmp_path):
    c, ids = cluster
    queries = str(tmp_path / "queries.parquet")
    build_queries(inputs["pairs"], queries, min_count=3, text_column="caption", partitions=2,
                  executor=LocalExecutor(1))
    options = {"max_per_query": 5, "shard_rows": 60, "seed": 1}
    local = curate(inputs["pairs"], queries, str(tmp_path / "local"), executor=LocalExecutor(1), **options)
    with RayExecutor(address=c.address) as executor:
        remote = curate(inputs["pairs"], queries, str(tmp_path / "ray"), executor=executor, **options)
    assert _files(tmp_path / "ray", skip={"curation_stats.json"}) == _files(tmp_path / "local",
                                                                            skip={"curation_stats.json"})
    assert remote.shards > 2 and 0 < remote.kept < remote.matched
    assert _plain(remote.to_dict(), tmp_path / "ray") == _plain(local.to_dict(), tmp_path / "local")
    _spread(remote.nodes, ids, 2 * remote.shards)  # pass 1 and pass 2: a task per shard each


@pytest.fixture(scope="module")
def dedup_inputs(tmp_path_factory):
    """An eval set of 16 images; a corpus of 4 shards, each with 2 planted copies and 4 distinct images."""
    rng, base = np.random.default_rng(0), tmp_path_factory.mktemp("dedup")
    eval_images = [procedural_image(rng, 96) for _ in range(16)]
    eval_dir = _eval_set(base / "toyset", eval_images)
    (base / "corpus").mkdir()
    for s in range(4):
        copies = [(f"copy{s}{j}", {"jpg": _jpeg(copy_of(eval_images[4 * s + j], rng, KINDS[j])), "txt": b"c"})
                  for j in range(2)]
        distinct = [(f"other{s}{j}", {"jpg": _jpeg(procedural_image(rng, 96)), "txt": b"d"}) for j in range(4)]
        _write_tar(base / "corpus" / f"{s:05d}.tar", copies + distinct)
    return {"eval": eval_dir, "corpus": str(base / "corpus")}


@pytest.mark.slow
def test_dedup_on_two_nodes_gives_the_local_matches(cluster, dedup_inputs, tmp_path, one_thread):
    c, ids = cluster
    options = {"descriptor": "phash", "calibration_samples": 16, "sheet_size": 0}
    local = dedup(dedup_inputs["corpus"], str(tmp_path / "local"), [dedup_inputs["eval"]], **options)
    with RayExecutor(address=c.address) as executor:
        remote = dedup(dedup_inputs["corpus"], str(tmp_path / "ray"), [dedup_inputs["eval"]], executor=executor,
                       **options)
    assert _files(tmp_path / "ray", skip={"dedup_stats.json"}) == _files(tmp_path / "local",
                                                                         skip={"dedup_stats.json"})
    assert remote.corpus_images == 24 and remote.removed > 0
    assert _plain(remote.to_dict(), tmp_path / "ray") == _plain(local.to_dict(), tmp_path / "local")
    _spread(remote.nodes, ids, 4)  # a task per corpus shard
    assert local.nodes == {socket.gethostname(): 4}
    assert DedupStats.read(str(tmp_path / "ray")).nodes == remote.nodes


@pytest.mark.slow
def test_dedup_within_on_two_nodes_gives_the_local_groups(cluster, tmp_path, one_thread):
    from test_dedup_within import within_corpus

    c, ids = cluster
    case = within_corpus(tmp_path)
    options = {"descriptor": "phash256", "sheet_size": 0, "within": True, "buckets": 4, "pool_negatives": 200}
    local = dedup(case["corpus"], str(tmp_path / "local"), [case["eval"]], **options)
    with RayExecutor(address=c.address) as executor:
        remote = dedup(case["corpus"], str(tmp_path / "ray"), [case["eval"]], executor=executor, **options)
    assert _files(tmp_path / "ray", skip={"dedup_stats.json"}) == _files(tmp_path / "local",
                                                                         skip={"dedup_stats.json"})
    assert remote.within == local.within and remote.within["exact_removed"] == 2
    rows = pq.read_table(tmp_path / "ray" / "within_duplicates.parquet").to_pylist()
    assert {(r["key"], r["kept_key"], r["kind"]) for r in rows} == {(k, v, kind) for k, (v, kind) in case["expected"].items()}
    _spread(remote.nodes, ids, 3)  # a task per corpus shard (the bucket tasks are not counted)


@pytest.mark.slow
def test_the_command_line_sends_a_stage_to_the_cluster(cluster, inputs, tmp_path, monkeypatch, capsys):
    """--executor ray --ray-address ADDR, and RAY_ADDRESS as its default, reach the cluster's two nodes."""
    c, ids = cluster
    assert main(["extract", *inputs["wats"], str(tmp_path / "flag"), "--executor", "ray",
                 "--ray-address", c.address]) == 0
    _spread(ExtractStats.read(str(tmp_path / "flag")).nodes, ids, len(inputs["wats"]))
    monkeypatch.setenv("RAY_ADDRESS", c.address)
    assert main(["queries", inputs["pairs"], str(tmp_path / "q.parquet"), "--min-count", "3",
                 "--text-column", "caption", "--executor", "ray"]) == 0
    assert set(QueryStats.read(str(tmp_path / "q.parquet")).nodes) == ids
    assert pq.read_table(tmp_path / "q.parquet").num_rows > 10


def test_a_ray_address_without_the_ray_executor_is_refused(inputs, tmp_path, capsys):
    assert main(["extract", *inputs["wats"], str(tmp_path / "out"), "--ray-address", "127.0.0.1:1"]) == 2
    assert "--ray-address: is only used with --executor ray" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("stage", ["extract", "queries", "curate", "crawl", "dedup"])
def test_a_silent_ray_address_is_bad_input_not_a_hang(tmp_path, stage, capsys):
    """Nothing listens at 127.0.0.1:1: each stage exits 2 at once, before Ray is asked to connect."""
    from flows.cli import main

    args = {"extract": ["x.warc.wat.gz", "out"], "queries": ["c.parquet", "out"], "curate": ["p.parquet", "q.parquet", "out"],
            "crawl": ["p.parquet", "out"], "dedup": ["corpus", "out", "--eval", "ev"]}[stage]
    assert main([stage, *[str(tmp_path / a) if "." in a or a in ("out", "corpus", "ev") else a for a in args],
                 "--executor", "ray", "--ray-address", "127.0.0.1:1"]) == 2
    assert "nothing answers at 127.0.0.1:1" in capsys.readouterr().err
