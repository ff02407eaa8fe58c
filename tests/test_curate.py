"""Curation end to end: stats by construction, identical output across shards, workers and
executors, the target-size solver, bad input."""
import argparse
import glob
import json
import os
import shutil
import socket
import tempfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from clip_core.curation.curate import CurationStats, curate, plan_shards
from clip_core.executors import LocalExecutor
from test_crawl import moto_s3  # noqa: F401  (fixture: one S3 server per test)
from flows.commands.corpus import add_curate_arguments, run_curate_command
from clip_core.errors import InputError

QUERIES = ["dog", "cat", "hot dog", "bird", "", "dog"]
# By construction: dog matches 60 (50 "a dog" + 10 "hot dog stand"), cat 30, hot dog 10, bird 0.
CAPTIONS = ["a dog"] * 50 + ["the cat."] * 30 + ["hot dog stand"] * 10 + [None] * 5 + [""] * 4 + ["  "] + ["nothing"] * 7


def _write_pairs(folder, n_files=1, uid=True, captions=CAPTIONS):
    os.makedirs(folder, exist_ok=True)
    table = pa.table({"url": [f"http://x/{i}.jpg" for i in range(len(captions))], "caption": captions,
                      "source": ["test"] * len(captions)})
    if uid:
        table = table.append_column("uid", pa.array(np.arange(len(captions)) * 3 + 1))
    order = np.random.default_rng(n_files).permutation(len(table))  # a different row order per split
    for i, part in enumerate(np.array_split(order, n_files)):
        pq.write_table(table.take(part), f"{folder}/pairs-{i}.parquet", row_group_size=17)
    return str(folder)


def _write_queries(path, queries=QUERIES):
    pq.write_table(pa.table({"query": queries, "kind": ["unigram"] * len(queries)}), path)
    return str(path)


def _totals(stats):
    """The pair counts of a run (what two runs of one input must agree on)."""
    return stats.input_rows, stats.matched, stats.kept, stats.expected_kept, stats.estimated_kept


def _read_parts(out):
    parts = sorted(glob.glob(f"{out}/part-*.parquet"))
    table = pa.concat_tables([pq.read_table(p) for p in parts])
    return table.sort_by([("url", "ascending")]).to_pylist()


@pytest.fixture
def setup(tmp_path):
    return _write_pairs(tmp_path / "pairs"), _write_queries(tmp_path / "queries.parquet"), tmp_path


def test_stats_by_construction(setup):
    pairs, queries, tmp = setup
    stats = curate(pairs, queries, str(tmp / "out"), max_per_query=20, executor=LocalExecutor(1), shard_rows=40)
    assert stats.input_rows == 107 and stats.matched == 90 and stats.t == 20
    assert stats.skipped == {"null_caption": 5, "empty_caption": 5, "no_match": 7, "not_sampled": 90 - stats.kept}
    assert sum(stats.skipped.values()) + stats.kept == 107
    assert stats.expected_kept == pytest.approx(50 * 20 / 60 + 30 * 20 / 30 + 10)
    assert (stats.queries_uri, stats.n_queries, stats.queries_matched, stats.head_queries) == (queries, 6, 3, 2)
    assert stats.rejected == {"empty": 1, "duplicate": 1, "unmatchable": 0}
    rows = _read_parts(tmp / "out")
    assert len(rows) == stats.kept == json.loads((tmp / "out" / "curation_stats.json").read_text())["totals"]["kept"]
    assert all(r["query_ids"] == ([0, 2] if r["caption"] == "hot dog stand" else [0] if "dog" in r["caption"] else [1]) for r in rows)
    assert sum(r["caption"] == "hot dog stand" for r in rows) == 10  # a tail query keeps everything
    per_query = pq.read_table(tmp / "out" / "_query_stats.parquet").to_pylist()
    assert [q["matched"] for q in per_query] == [60, 30, 10, 0, 0, 0]
    assert per_query[2]["kept"] == 10 and per_query[0]["kept"] == sum("dog" in r["caption"] for r in rows)
    assert (tmp / "out" / "curation_counts.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [p for p in (tmp / "out").iterdir() if p.name.startswith("_curate")]  # no staging or work left
    assert len(stats.parts) == stats.shards == 3
    assert set(rows[0]) == {"url", "caption", "source", "uid", "query_ids"}
    pair_files = sorted(p.name for p in (tmp / "out").glob("*.parquet") if not p.name.startswith("_"))
    assert pair_files == stats.parts  # a *.parquet glob of OUT sees the pairs only


def test_stats_read_back_equal_what_curate_returned(setup):
    """A flow that skips a finished curate reads the same typed stats; the file keeps its format."""
    pairs, queries, tmp = setup
    for out, options in (("plain", {"max_per_query": 20}), ("target", {"target_size": 40})):
        stats = curate(pairs, queries, str(tmp / out), executor=LocalExecutor(1), shard_rows=40, **options)
        saved = json.loads((tmp / out / "curation_stats.json").read_text())
        assert CurationStats.read(str(tmp / out)) == stats and stats.to_dict() == saved
        assert json.dumps(stats.to_dict(), indent=2) == (tmp / out / "curation_stats.json").read_text()
        assert list(saved) == ["t", "seed", "case_sensitive", "max_chars", "max_per_query", "target_size", "queries",
                               "totals", "skipped", "repaired", "shards", "parts", "files", "top_queries", "nodes"]
        assert stats.nodes == {socket.gethostname(): 2 * stats.shards}  # both passes ran here, a task per shard
        assert list(saved["totals"]) == ["input_rows", "matched", "kept", "expected_kept", "sample_rate",
                                         "estimated_kept"]
    assert [q["query"] for q in stats.top_queries] == ["dog", "cat", "hot dog"]


def test_same_rows_for_any_sharding_and_worker_count(tmp_path):
    queries = _write_queries(tmp_path / "q.parquet")
    outputs = []
    for n_files, workers, shard_rows in ((1, 1, 10**6), (2, 1, 30), (3, 2, 20)):
        pairs = _write_pairs(tmp_path / f"pairs{n_files}", n_files)
        curate(pairs, queries, str(tmp_path / f"out{n_files}"), max_per_query=20, seed=5,
               executor=LocalExecutor(workers), shard_rows=shard_rows)
        outputs.append(_read_parts(tmp_path / f"out{n_files}"))
    assert outputs[0] == outputs[1] == outputs[2]
    other = curate(str(tmp_path / "pairs1"), queries, str(tmp_path / "seed6"), max_per_query=20, seed=6, executor=LocalExecutor(1))
    assert _read_parts(tmp_path / "seed6") != outputs[0] and other.matched == 90


def test_without_uid_the_draw_is_keyed_by_url_and_caption(tmp_path):
    queries = _write_queries(tmp_path / "q.parquet")
    runs = []
    for n_files in (1, 3):
        pairs = _write_pairs(tmp_path / f"p{n_files}", n_files, uid=False)
        curate(pairs, queries, str(tmp_path / f"o{n_files}"), max_per_query=15, executor=LocalExecutor(1), shard_rows=25)
        runs.append(_read_parts(tmp_path / f"o{n_files}"))
    assert runs[0] == runs[1] and "uid" not in runs[0][0]


def test_target_size_solves_t(setup):
    pairs, queries, tmp = setup
    stats = curate(pairs, queries, str(tmp / "out"), target_size=40, executor=LocalExecutor(1))
    t = stats.t
    assert stats.estimated_kept == pytest.approx(stats.expected_kept)  # rate 1: exact
    assert stats.expected_kept <= 40 and stats.target_size == 40
    bigger = curate(pairs, queries, str(tmp / "out2"), max_per_query=t + 1, executor=LocalExecutor(1))
    assert bigger.expected_kept > 40 and bigger.estimated_kept is None


def test_case_insensitive_and_repaired_captions(tmp_path):
    captions = ["A DOG", "a Cat", b"caf\xe9 dog".decode("latin-1"), "dog " + "x" * 5000]
    pairs = _write_pairs(tmp_path / "p", captions=captions)
    queries = _write_queries(tmp_path / "q.parquet", ["dog", "cat"])
    stats = curate(pairs, queries, str(tmp_path / "o"), case_sensitive=False, executor=LocalExecutor(1))
    assert stats.matched == 4 and stats.repaired["truncated"] == 1
    binary = pa.table({"caption": pa.array([b"dog \xff", b"cat"], pa.binary())})
    pq.write_table(binary, tmp_path / "bin.parquet")
    stats = curate(str(tmp_path / "bin.parquet"), queries, str(tmp_path / "o2"), executor=LocalExecutor(1))
    assert stats.repaired["invalid_utf8"] == 1 and stats.kept == 2


def test_bad_input_errors(tmp_path):
    queries = _write_queries(tmp_path / "q.parquet")
    pq.write_table(pa.table({"url": ["u"], "text": ["a dog"]}), tmp_path / "nocap.parquet")
    with pytest.raises(ValueError, match=r"no 'caption' column \(columns: \['url', 'text'\]\)"):
        curate(str(tmp_path / "nocap.parquet"), queries, str(tmp_path / "o"))
    pairs = _write_pairs(tmp_path / "p")
    with pytest.raises(ValueError, match="empty"):
        curate(pairs, _write_queries(tmp_path / "empty.parquet", []), str(tmp_path / "o"))
    os.makedirs(tmp_path / "none")
    with pytest.raises(InputError, match="none: holds no Parquet files"):
        plan_shards(str(tmp_path / "none"), 100)
    with pytest.raises(InputError, match="missing.parquet: does not exist"):
        plan_shards(str(tmp_path / "missing.parquet"), 100)


def test_rerun_replaces_stale_parts(setup):
    pairs, queries, tmp = setup
    curate(pairs, queries, str(tmp / "out"), executor=LocalExecutor(1), shard_rows=10)
    assert len(glob.glob(f"{tmp}/out/part-*.parquet")) == 7
    curate(pairs, queries, str(tmp / "out"), executor=LocalExecutor(1))
    assert len(glob.glob(f"{tmp}/out/part-*.parquet")) == 1


def test_cli_runs_curate(setup, capsys):
    pairs, queries, tmp = setup
    parser = argparse.ArgumentParser()
    add_curate_arguments(parser)
    args = parser.parse_args([pairs, queries, str(tmp / "cli"), "--max-per-query", "20", "--workers", "1"])
    assert run_curate_command(args) == 0
    assert json.loads(capsys.readouterr().out)["matched"] == 90


@pytest.mark.slow
def test_ray_executor_gives_the_local_result(setup):
    pairs, queries, tmp = setup
    from flows.executors import RayExecutor

    local = curate(pairs, queries, str(tmp / "local"), max_per_query=20, executor=LocalExecutor(1), shard_rows=30)
    ray_dir = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # Ray's socket paths must stay under 108 bytes
    try:
        with RayExecutor(num_cpus=2, _temp_dir=ray_dir) as executor:
            remote = curate(pairs, queries, str(tmp / "ray_out"), max_per_query=20, executor=executor, shard_rows=30)
    finally:
        shutil.rmtree(ray_dir, ignore_errors=True)
    assert _totals(remote) == _totals(local)
    assert _read_parts(tmp / "ray_out") == _read_parts(tmp / "local")


def _snapshot(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


class _DiesInPassTwo(LocalExecutor):
    """A run that fails after matching: the swap must never happen."""

    def map(self, fn, items):
        if fn.__name__ == "sample_shard":
            raise RuntimeError("worker died in pass 2")
        return super().map(fn, items)


def test_failed_rerun_leaves_the_previous_result_whole(setup):
    pairs, queries, tmp = setup
    out = tmp / "out"
    first = curate(pairs, queries, str(out), max_per_query=20, executor=LocalExecutor(1), shard_rows=40)
    before = _snapshot(out)
    pq.write_table(pa.table({"url": ["u"], "caption": [1]}), tmp / "intcap.parquet")
    with pytest.raises(InputError, match=r"intcap.parquet: column 'caption' is int64"):
        curate(str(tmp / "intcap.parquet"), queries, str(out), executor=LocalExecutor(1))
    with pytest.raises(RuntimeError, match="pass 2"):
        curate(pairs, queries, str(out), max_per_query=5, executor=_DiesInPassTwo(1))
    with pytest.raises(InputError, match="--target-size: 1 is below"):  # known only after pass 1
        curate(pairs, queries, str(out), target_size=1, executor=LocalExecutor(1))
    assert _snapshot(out) == before  # parts, stats and report as the first run left them; no staging left
    assert CurationStats.read(str(out)) == first


def test_rerun_replaces_only_what_curate_wrote(setup):
    pairs, queries, tmp = setup
    out = tmp / "out"
    curate(pairs, queries, str(out), executor=LocalExecutor(1), shard_rows=10)
    mine = {"notes.txt": b"mine", "part-7.parquet": b"mine", "sub/part-00009.parquet": b"mine"}
    for name, data in mine.items():
        (out / name).parent.mkdir(exist_ok=True)
        (out / name).write_bytes(data)
    (out / "_curate_staging-0badc0ffee").mkdir()  # a killed run's leftover: never read as input, swept
    pq.write_table(pa.table({"caption": ["a dog"] * 99}), out / "_curate_staging-0badc0ffee" / "part-00000.parquet")
    stats = curate(pairs, queries, str(out), executor=LocalExecutor(1))
    left = _snapshot(out)
    assert sorted(n for n in left if n.startswith("part-0")) == stats.parts == ["part-00000.parquet"]
    assert {n: left[n] for n in mine} == mine and not any(n.startswith("_curate_staging") for n in left)
    for name in mine:  # not pairs: they would be read as such below
        (out / name).unlink()
    again = curate(str(out), queries, str(out), executor=LocalExecutor(1))  # curated pairs, curated again
    assert again.input_rows == stats.kept


def test_out_that_curate_did_not_write_is_refused(setup):
    pairs, queries, tmp = setup
    theirs = tmp / "extracted"
    theirs.mkdir()
    pq.write_table(pa.table({"url": ["u"], "caption": ["a dog"]}), theirs / "part-00000.parquet")
    with pytest.raises(InputError, match="holds part-00000.parquet but no curation_stats.json"):
        curate(pairs, queries, str(theirs), executor=LocalExecutor(1))
    assert sorted(p.name for p in theirs.iterdir()) == ["part-00000.parquet"]
    with pytest.raises(InputError, match=r"pairs-0.parquet: is a file, not a folder"):
        curate(pairs, queries, f"{pairs}/pairs-0.parquet", executor=LocalExecutor(1))


@pytest.mark.parametrize("option, value, problem", [
    ("--max-per-query", "-5", "must be a whole number >= 1, got -5"),
    ("--max-per-query", "0", "must be a whole number >= 1, got 0"),
    ("--target-size", "0", "must be a whole number >= 1, got 0"),
    ("--target-size", "-1", "must be a whole number >= 1, got -1"),
    ("--seed", "-1", "must be a whole number >= 0"),
    ("--shard-rows", "0", "must be a whole number >= 1, got 0"),
    ("--workers", "0", "must be a whole number >= 1, got 0"),
])
def test_cli_numbers_are_checked_at_the_door(setup, capsys, option, value, problem):
    from flows.cli import main

    pairs, queries, tmp = setup
    assert main(["curate", pairs, queries, str(tmp / "out"), option, value]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"clip-pipeline curate: error: {option}: {problem}")
    assert not (tmp / "out").exists()  # nothing was started


def test_target_size_is_at_most_the_target_or_refused(setup):
    pairs, queries, tmp = setup
    at_t1 = 50 / 60 + 30 / 30 + 10 * (1 - (1 - 1 / 60) * (1 - 1 / 10))  # E(kept) at t = 1: 2.98
    for target in (2, 3, 4, 10, 39, 1000):
        if target < at_t1:  # no t keeps at most that many: an error, not 2.98 pairs against "at most 2"
            with pytest.raises(InputError, match=rf"--target-size: {target} is below 2.98, .* at least 3 pairs"):
                curate(pairs, queries, str(tmp / "out"), target_size=target, executor=LocalExecutor(1))
            continue
        stats = curate(pairs, queries, str(tmp / "out"), target_size=target, executor=LocalExecutor(1))
        assert stats.expected_kept <= target + 1e-9


@pytest.mark.parametrize("table, problem", [
    ({"url": ["u"], "caption": [[1, 2]]}, r"column 'caption' is list<.*: int64>, it must be a string"),
    ({"url": [1], "caption": ["a dog"]}, r"column 'url' is int64, it must be a string"),
    ({"caption": ["a dog"], "uid": [[1]]}, r"column 'uid' is list<.*: int64>, it must be an integer or string"),
    ({"url": pa.array([], pa.string()), "caption": pa.array([], pa.string())}, "holds no rows"),
])
def test_bad_pairs_are_refused_by_name(tmp_path, table, problem):
    queries = _write_queries(tmp_path / "q.parquet")
    pq.write_table(pa.table(table), tmp_path / "bad.parquet")
    with pytest.raises(InputError, match=rf"bad.parquet: {problem}"):
        curate(str(tmp_path / "bad.parquet"), queries, str(tmp_path / "o"), executor=LocalExecutor(1))
    assert not (tmp_path / "o").exists()


def test_bad_query_lists_and_unreadable_files_are_refused_by_name(setup):
    pairs, _, tmp = setup
    blank = _write_queries(tmp / "blank.parquet", ["", "  ", None])
    with pytest.raises(InputError, match=r"blank.parquet: has no usable query: all 3 are blank"):
        curate(pairs, blank, str(tmp / "o"), executor=LocalExecutor(1))
    pq.write_table(pa.table({"query": [1, 2]}), tmp / "ints.parquet")
    with pytest.raises(InputError, match=r"ints.parquet: column 'query' is int64, it must be a string column"):
        curate(pairs, str(tmp / "ints.parquet"), str(tmp / "o"), executor=LocalExecutor(1))
    (tmp / "junk.parquet").write_bytes(b"PAR1 but not really")
    with pytest.raises(InputError, match=r"junk.parquet: is not a readable Parquet file"):
        curate(pairs, str(tmp / "junk.parquet"), str(tmp / "o"), executor=LocalExecutor(1))
    with pytest.raises(InputError, match=r"junk.parquet: is not a readable Parquet file"):
        curate(str(tmp / "junk.parquet"), _write_queries(tmp / "q2.parquet"), str(tmp / "o"), executor=LocalExecutor(1))
    assert not (tmp / "o").exists()


def test_dictionary_encoded_columns_give_the_plain_result(tmp_path):
    queries = _write_queries(tmp_path / "q.parquet")
    plain = _write_pairs(tmp_path / "plain", captions=[c or "" for c in CAPTIONS])
    table = pq.read_table(f"{plain}/pairs-0.parquet")
    (tmp_path / "dict").mkdir()
    pq.write_table(table.set_column(1, "caption", table["caption"].dictionary_encode())
                   .set_column(0, "url", table["url"].dictionary_encode()), tmp_path / "dict" / "p.parquet")
    a = curate(plain, queries, str(tmp_path / "a"), max_per_query=20, executor=LocalExecutor(1))
    b = curate(str(tmp_path / "dict"), queries, str(tmp_path / "b"), max_per_query=20, executor=LocalExecutor(1))
    assert _totals(a) == _totals(b) and _read_parts(tmp_path / "a") == _read_parts(tmp_path / "b")


@pytest.mark.slow
def test_s3_out_is_swapped_whole(setup, moto_s3):
    import fsspec
    import uuid

    pairs, queries, tmp = setup
    fs = fsspec.filesystem("s3", endpoint_url=moto_s3, skip_instance_cache=True)
    bucket = f"curate-{uuid.uuid4().hex[:8]}"
    fs.mkdir(bucket)
    fs.put(f"{pairs}/pairs-0.parquet", f"{bucket}/pairs/pairs-0.parquet")
    fs.put(queries, f"{bucket}/queries.parquet")
    fs.pipe(f"{bucket}/out/notes.txt", b"mine")
    src, q, out = f"s3://{bucket}/pairs", f"s3://{bucket}/queries.parquet", f"s3://{bucket}/out"
    first = curate(src, q, out, max_per_query=20, executor=LocalExecutor(1), shard_rows=40)
    local = curate(pairs, queries, str(tmp / "local"), max_per_query=20, executor=LocalExecutor(1), shard_rows=40)
    assert _totals(first) == _totals(local)

    def listing():
        fs.invalidate_cache()
        return sorted(p.rsplit("/", 1)[1] for p in fs.find(f"{bucket}/out"))

    assert listing() == ["_query_stats.parquet", "curation_counts.png", "curation_stats.json", "notes.txt",
                         "part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]
    with pytest.raises(InputError, match="--max-per-query"):
        curate(src, q, out, max_per_query=-5, executor=LocalExecutor(1))
    with pytest.raises(RuntimeError, match="pass 2"):
        curate(src, q, out, max_per_query=5, executor=_DiesInPassTwo(1))
    assert len(listing()) == 7 and CurationStats.read(out) == first
    curate(src, q, out, max_per_query=20, executor=LocalExecutor(1))
    assert listing() == ["_query_stats.parquet", "curation_counts.png", "curation_stats.json", "notes.txt",
                         "part-00000.parquet"]
