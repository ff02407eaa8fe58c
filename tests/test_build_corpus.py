"""build-corpus re-runs are cheap: a stage whose marker exists is not redone."""
import pytest

import clip_core.crawl
import clip_core.curation.curate
import dedup.near_dup
from flows.build_corpus import CorpusConfig, corpus_metrics, crawl_pairs, curate_pairs, dedup_corpus


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


def test_corpus_metrics_have_fixed_names(tmp_path):
    import json

    (tmp_path / "curated").mkdir()
    (tmp_path / "shards").mkdir()
    (tmp_path / "curated" / "curation_stats.json").write_text(json.dumps(
        {"t": 500, "totals": {"input_rows": 10, "matched": 8, "kept": 6}, "queries": {"matched": 3}}))
    (tmp_path / "shards" / "crawl_stats.json").write_text(json.dumps(
        {"queued": 6, "success": 5, "success_rate": 5 / 6, "refused": {"private": 1}, "images_per_second": 2.0}))
    uris = {"curated": str(tmp_path / "curated"), "shards": str(tmp_path / "shards"), "dedup": None}
    metrics = corpus_metrics(uris)
    assert metrics["curate"] == {"candidates": 10, "matched": 8, "kept": 6, "t": 500, "queries_matched": 3}
    assert metrics["crawl"]["refused"] == 1 and metrics["crawl"]["success"] == 5


def test_a_crawl_that_left_incomplete_shards_is_resumed(finished):
    import json

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
