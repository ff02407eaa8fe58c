"""build-corpus with `ray_address` on a real two-node Ray cluster gives the local flow's corpus.

One setting, `CorpusConfig.ray_address`, sends queries, curate, crawl and dedup to the cluster
(the `ray_cluster` fixture of conftest: two raylets on 127.0.0.1); their stats must name its
nodes. The synthetic web is generated once and served here, so both runs crawl the same URLs.
"""
import socket
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import ray

from clip_core.crawl import CrawlStats
from clip_core.curation.curate import CurationStats
from clip_core.curation.queries import QueryStats
from clip_core.errors import InputError
from dedup.near_dup import DedupStats
from flows.build_corpus import CorpusConfig, build_corpus, corpus_nodes, web_eval_dirs
from flows.common import free_port, join
from synthweb.generator import generate_web
from synthweb.server import serve_web, spec_port


@pytest.fixture(scope="module")
def web(tmp_path_factory):
    """A 300-pair synthetic web with small images and eval sets, served on 127.0.0.1 for the module."""
    root = generate_web(str(tmp_path_factory.mktemp("web") / "web"), n_pairs=300, seed=4, image_size=32,
                        base_url=f"http://127.0.0.1:{free_port()}", eval_sizes=10)
    with serve_web(root, port=spec_port(root)):
        yield root


def _config(storage, web, ray_address=None) -> CorpusConfig:
    """Several curate and corpus shards (tasks to spread), a fast descriptor, the local web only."""
    return CorpusConfig(storage=str(storage), pairs=[join(web, "pairs.parquet")], eval_dirs=web_eval_dirs(web),
                        min_count=3, min_pmi=0.0, wordnet=None, max_per_query=20, curate_shard_rows=100,
                        samples_per_shard=100, image_size=32, threads=4, timeout=5, descriptor="phash",
                        ray_address=ray_address,
                        per_host_rps=0, per_host_concurrency=0)  # no per-host limits: the test's own server


def _files(folder, skip=()) -> dict:
    root = Path(folder)
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.name not in skip}


def _rows(uri) -> list[dict]:
    """A Parquet file's rows in a fixed order (the order of rows is not part of the contract)."""
    return sorted(pq.read_table(uri).to_pylist(), key=repr)


@pytest.mark.slow
def test_build_corpus_on_two_nodes_gives_the_local_corpus(ray_cluster, web, tmp_path):
    cluster, ids = ray_cluster
    local = build_corpus(_config(tmp_path / "local", web))
    remote = build_corpus(_config(tmp_path / "ray", web, ray_address=cluster.address))
    assert not ray.is_initialized()  # the flow's one executor disconnected at the end of the run

    assert _files(remote["curated"], skip={"curation_stats.json"}) == _files(local["curated"],
                                                                             skip={"curation_stats.json"})
    assert pq.read_table(remote["queries"]).equals(pq.read_table(local["queries"]))
    for name in ("matches.parquet", "kept_keys.parquet"):
        assert _rows(join(remote["dedup"], name)) == _rows(join(local["dedup"], name)), name
    crawled, crawled_here = CrawlStats.read(remote["shards"]), CrawlStats.read(local["shards"])
    assert (crawled.shards, crawled.success, crawled.errors) == (crawled_here.shards, crawled_here.success,
                                                                 crawled_here.errors)
    dd = DedupStats.read(remote["dedup"])
    assert dd.corpus_shards > 1 and dd.kept > 0 and dd.removed > 0  # planted copies of eval images found

    here, seen = socket.gethostname(), set()
    for read, uri in ((QueryStats.read, "queries"), (CurationStats.read, "curated"), (CrawlStats.read, "shards"),
                      (DedupStats.read, "dedup")):
        assert set(read(local[uri]).nodes) == {here}, uri
        nodes = read(remote[uri]).nodes
        assert set(nodes) <= ids and sum(nodes.values()) == sum(read(local[uri]).nodes.values()), (uri, nodes)
        seen |= set(nodes)
    # every stage ran its tasks on the cluster, and the cluster's two nodes both took work; within one
    # stage of a few sub-second tasks Ray may reuse one leased worker for all of them (per-stage spread
    # over many tasks is tests/test_ray_stages.py's)
    assert seen == ids
    rows = corpus_nodes(remote, built_queries=True)  # the flow's `corpus-nodes` artifact
    assert {r["stage"] for r in rows} == {"queries", "curate", "crawl", "dedup"} and {r["node"] for r in rows} == ids


@pytest.mark.slow
def test_an_unreachable_cluster_is_refused_before_any_work(tmp_path, web):
    with pytest.raises(InputError, match="ray_address: nothing answers at 127.0.0.1:1"):
        build_corpus(_config(tmp_path / "out", web, ray_address="127.0.0.1:1"))
    assert not (tmp_path / "out").exists()


def test_the_pipeline_trains_on_the_same_cluster(tmp_path, monkeypatch):
    """clip-pipeline's ray_address reaches training's RunSettings; a wrong one stops it before any state."""
    import flows.train
    from flows.pipeline import clip_pipeline, train_model

    runs = []
    monkeypatch.setattr(flows.train, "train", lambda config, run: runs.append(run))
    train_model.fn("corpus", str(tmp_path / "out"), ray_address="head:6379")
    train_model.fn("corpus", str(tmp_path / "out"), ray_address="")
    assert [r.ray_address for r in runs] == ["head:6379", None]
    with pytest.raises(InputError, match="clip-pipeline ray_address: 'http://head:6379' is not a Ray address"):
        clip_pipeline.fn(storage=str(tmp_path / "run"), ray_address="http://head:6379")
    assert not (tmp_path / "run").exists() and not (tmp_path / "out").exists()
