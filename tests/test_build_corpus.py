"""build-corpus re-runs are cheap: a stage whose marker exists is not redone; its report reads
the stages' typed stats back."""
import json
import socket

import pytest

import clip_core.crawl
import clip_core.curation.curate
import clip_core.curation.queries
import dedup.near_dup
from clip_core.errors import InputError
from flows.build_corpus import (CorpusConfig, build_query_list, cluster_executor, corpus_metrics, crawl_pairs,
                                curate_pairs, dedup_corpus)
from flows.common import check_ray_address, free_port


def _refuse(*args, **kwargs):
    raise AssertionError("a finished stage ran again")


@pytest.fixture
def finished(tmp_path, monkeypatch):
    for module, name in ((clip_core.curation.curate, "curate"), (clip_core.crawl, "crawl"),
                         (dedup.near_dup, "dedup")):
        monkeypatch.setattr(module, name, _refuse)
    for folder, marker in (("curated", "curation_stats.json"), ("shards", "crawl_stats.json"),
                           ("dedup", "dedup_stats.json")):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / marker).write_text("{}")
    return tmp_path


def test_finished_stages_are_skipped(finished):
    cfg = CorpusConfig(storage=str(finished))
    assert curate_pairs.fn(cfg, ["pairs.parquet"], "q.parquet", str(finished / "curated")) == str(finished / "curated")
    assert crawl_pairs.fn(cfg, str(finished / "curated"), str(finished / "shards"), None) == str(finished / "shards")
    assert dedup_corpus.fn(cfg, str(finished / "shards"), ["eval"], str(finished / "dedup")) == str(finished / "dedup")


def test_a_missing_marker_runs_the_stage(finished):
    (finished / "shards" / "crawl_stats.json").unlink()  # a crawl killed before it finished
    with pytest.raises(AssertionError, match="ran again"):
        crawl_pairs.fn(CorpusConfig(storage=str(finished)), str(finished / "curated"), str(finished / "shards"), None)


def _write_stats(tmp_path) -> dict:
    """The three stats files as the stages write them (their to_dict), a stage's folder each."""
    from clip_core.crawl import CrawlStats
    from clip_core.curation.curate import CurationStats
    from dedup.near_dup import DedupStats, EvalSetStats

    curation = CurationStats(
        t=500, seed=0, case_sensitive=True, max_chars=4096, max_per_query=500, target_size=None,
        queries_uri="q.parquet", n_queries=9, rejected={"empty": 0, "duplicate": 0, "unmatchable": 0},
        queries_matched=3, head_queries=1, input_rows=10, matched=8, kept=6, expected_kept=6.2, sample_rate=0.0,
        estimated_kept=None, skipped={"null_caption": 1, "empty_caption": 0, "no_match": 1, "not_sampled": 2},
        repaired={"invalid_utf8": 0, "truncated": 0}, parts=["part-00000.parquet"])
    crawl = CrawlStats(queued=6, success=5, success_rate=5 / 6, refused={"private": 1}, images_per_second=2.0)
    shapes = EvalSetStats(root="eval/shapes", split="test", n=8, eval_unreadable=[], matches=2,
                          matched_corpus_images=2, overlap=2, overlap_pct=25.0, thresholds={"phash": 0.9},
                          calibration={"manual": True})
    dd = DedupStats(corpus="shards", descriptor="phash", descriptors=["phash"], precision_target=0.99,
                    splits=["test"], k=1, seed=0, corpus_shards=1, corpus_images=5, unreadable=1,
                    dropped={"no_image": 1, "undecodable": 0, "truncated": 0, "corrupt": 0}, damaged_shards=[],
                    unreadable_samples=[{"key": "x", "error": "sample has no image"}], removed=2, kept=2,
                    eval_sets={"shapes": shapes})
    for folder, name, stats in (("curated", "curation_stats.json", curation), ("shards", "crawl_stats.json", crawl),
                                ("dedup", "dedup_stats.json", dd)):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / name).write_text(json.dumps(stats.to_dict(), indent=2))
    return {"curated": str(tmp_path / "curated"), "shards": str(tmp_path / "shards"), "dedup": str(tmp_path / "dedup")}


def test_corpus_metrics_have_fixed_names(tmp_path):
    uris = _write_stats(tmp_path)
    metrics = corpus_metrics({**uris, "dedup": None})
    assert metrics["curate"] == {"candidates": 10, "matched": 8, "kept": 6, "t": 500, "queries_matched": 3}
    assert metrics["crawl"]["refused"] == 1 and metrics["crawl"]["success"] == 5 and "dedup" not in metrics
    assert corpus_metrics(uris)["dedup"] == {"corpus_images": 5, "removed": 2, "kept": 2, "unreadable": 1,
                                             "overlap_pct.shapes": 25.0}


def test_a_crawl_that_left_incomplete_shards_is_resumed(finished):
    (finished / "shards" / "crawl_stats.json").write_text(json.dumps({"incomplete_shards": 2}))
    with pytest.raises(AssertionError, match="ran again"):
        crawl_pairs.fn(CorpusConfig(storage=str(finished)), str(finished / "curated"), str(finished / "shards"), None)


@pytest.mark.slow  # a temporary Prefect server
def test_bad_input_is_not_retried_io_errors_are(tmp_path):
    from prefect import flow, task

    from clip_core.errors import InputError
    from flows.common import retry_unless_bad_input

    calls = []

    @task(retries=2, retry_delay_seconds=0, retry_condition_fn=retry_unless_bad_input)
    def stage(error: Exception) -> None:
        calls.append(type(error).__name__)
        raise error

    @flow
    def run(error: Exception) -> None:
        stage(error)

    for error in (InputError("pairs.parquet", "no 'caption' column"), ConnectionError("S3 went away")):
        with pytest.raises(type(error)):
            run(error)
    assert calls == ["InputError", "ConnectionError", "ConnectionError", "ConnectionError"]


def test_a_blank_ray_address_means_local_executors():
    assert CorpusConfig(ray_address="  ").ray_address is None and CorpusConfig().ray_address is None
    assert CorpusConfig(ray_address="auto").ray_address == "auto"


@pytest.mark.parametrize("address", ["http://127.0.0.1:6379", "127.0.0.1", "ray://:10001", "head:port"])
def test_a_malformed_ray_address_is_refused(address):
    with pytest.raises(InputError, match="cfg.ray_address: .* is not a Ray address"):
        check_ray_address("cfg.ray_address", address)


def test_a_ray_address_where_nothing_listens_is_refused():
    port = free_port()  # free now: nothing answers there
    with pytest.raises(InputError, match=f"nothing answers at 127.0.0.1:{port}"):
        check_ray_address("cfg.ray_address", f"127.0.0.1:{port}")
    with socket.create_server(("127.0.0.1", 0)) as server:
        check_ray_address("cfg.ray_address", f"ray://127.0.0.1:{server.getsockname()[1]}")  # answers: accepted
    check_ray_address("cfg.ray_address", "auto")


def test_the_stages_map_with_the_flows_executor(tmp_path, monkeypatch):
    """queries, curate and dedup get the one executor the flow opened (a cluster's, or None: local)."""
    seen, executor = {}, object()
    for module, name in ((clip_core.curation.queries, "build_queries"), (clip_core.curation.curate, "curate"),
                         (dedup.near_dup, "dedup")):
        monkeypatch.setattr(module, name, lambda *a, _name=name, **kw: seen.setdefault(_name, kw["executor"]))
    cfg = CorpusConfig(storage=str(tmp_path))
    build_query_list.fn(cfg, ["pairs.parquet"], str(tmp_path / "q.parquet"), executor)
    curate_pairs.fn(cfg, ["pairs.parquet"], "q.parquet", str(tmp_path / "curated"), executor)
    dedup_corpus.fn(cfg, str(tmp_path / "shards"), ["eval"], str(tmp_path / "dedup"), executor)
    assert seen == {"build_queries": executor, "curate": executor, "dedup": executor}
    with cluster_executor(None) as local:
        assert local is None
