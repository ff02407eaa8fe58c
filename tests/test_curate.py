"""Curation end to end: stats by construction, identical output across shards, workers and
executors, the target-size solver, bad input."""
import argparse
import glob
import json
import os
import shutil
import tempfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from clip_core.curation.curate import LocalExecutor, add_curate_arguments, curate, plan_shards, run_curate_command

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
    totals, skipped = stats["totals"], stats["skipped"]
    assert totals["input_rows"] == 107 and totals["matched"] == 90
    assert skipped == {"null_caption": 5, "empty_caption": 5, "no_match": 7, "not_sampled": 90 - totals["kept"]}
    assert sum(skipped.values()) + totals["kept"] == 107
    assert totals["expected_kept"] == pytest.approx(50 * 20 / 60 + 30 * 20 / 30 + 10)
    assert stats["queries"] == {"uri": queries, "n": 6, "rejected": {"empty": 1, "duplicate": 1, "unmatchable": 0}, "matched": 3, "head": 2}
    rows = _read_parts(tmp / "out")
    assert len(rows) == totals["kept"] == json.loads((tmp / "out" / "curation_stats.json").read_text())["totals"]["kept"]
    assert all(r["query_ids"] == ([0, 2] if r["caption"] == "hot dog stand" else [0] if "dog" in r["caption"] else [1]) for r in rows)
    assert sum(r["caption"] == "hot dog stand" for r in rows) == 10  # a tail query keeps everything
    per_query = pq.read_table(tmp / "out" / "_query_stats.parquet").to_pylist()
    assert [q["matched"] for q in per_query] == [60, 30, 10, 0, 0, 0]
    assert per_query[2]["kept"] == 10 and per_query[0]["kept"] == sum("dog" in r["caption"] for r in rows)
    assert (tmp / "out" / "curation_counts.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (tmp / "out" / "_curate_tmp").exists() and len(stats["parts"]) == stats["shards"] == 3
    assert set(rows[0]) == {"url", "caption", "source", "uid", "query_ids"}
    pair_files = sorted(p.name for p in (tmp / "out").glob("*.parquet") if not p.name.startswith("_"))
    assert pair_files == stats["parts"]  # a *.parquet glob of OUT sees the pairs only


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
    assert _read_parts(tmp_path / "seed6") != outputs[0] and other["totals"]["matched"] == 90


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
    t = stats["t"]
    assert stats["totals"]["estimated_kept"] == pytest.approx(stats["totals"]["expected_kept"])  # rate 1: exact
    assert stats["totals"]["expected_kept"] <= 40
    bigger = curate(pairs, queries, str(tmp / "out2"), max_per_query=t + 1, executor=LocalExecutor(1))
    assert bigger["totals"]["expected_kept"] > 40


def test_case_insensitive_and_repaired_captions(tmp_path):
    captions = ["A DOG", "a Cat", b"caf\xe9 dog".decode("latin-1"), "dog " + "x" * 5000]
    pairs = _write_pairs(tmp_path / "p", captions=captions)
    queries = _write_queries(tmp_path / "q.parquet", ["dog", "cat"])
    stats = curate(pairs, queries, str(tmp_path / "o"), case_sensitive=False, executor=LocalExecutor(1))
    assert stats["totals"]["matched"] == 4 and stats["repaired"]["truncated"] == 1
    binary = pa.table({"caption": pa.array([b"dog \xff", b"cat"], pa.binary())})
    pq.write_table(binary, tmp_path / "bin.parquet")
    stats = curate(str(tmp_path / "bin.parquet"), queries, str(tmp_path / "o2"), executor=LocalExecutor(1))
    assert stats["repaired"]["invalid_utf8"] == 1 and stats["totals"]["kept"] == 2


def test_bad_input_errors(tmp_path):
    queries = _write_queries(tmp_path / "q.parquet")
    pq.write_table(pa.table({"url": ["u"], "text": ["a dog"]}), tmp_path / "nocap.parquet")
    with pytest.raises(ValueError, match=r"no 'caption' column \(columns: \['url', 'text'\]\)"):
        curate(str(tmp_path / "nocap.parquet"), queries, str(tmp_path / "o"))
    pairs = _write_pairs(tmp_path / "p")
    with pytest.raises(ValueError, match="empty"):
        curate(pairs, _write_queries(tmp_path / "empty.parquet", []), str(tmp_path / "o"))
    os.makedirs(tmp_path / "none")
    with pytest.raises(FileNotFoundError):
        plan_shards(str(tmp_path / "none"), 100)


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
    assert remote["totals"] == local["totals"]
    assert _read_parts(tmp / "ray_out") == _read_parts(tmp / "local")
