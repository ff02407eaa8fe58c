"""Query list: counts and PMI on a corpus counted by hand, bounded map-reduce invariance,
titles, WordNet parsing, dedup across kinds."""
import argparse
import math
import socket
from collections import Counter
from pathlib import Path

import numpy as np

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from clip_core.executors import LocalExecutor
from clip_core.curation.balance import hash_strings
from flows.commands.corpus import add_queries_arguments, run_queries_command
from clip_core.curation.queries import (
    QueryStats, bigrams, build_queries, count_chunk, is_matchable, iter_texts, plan_chunks,
    reduce_partition, words,
)
from clip_core.curation.wordnet import parse_data_line, read_synsets, wordnet_queries
from clip_core.errors import InputError

WORDNET = Path("/usr/share/wordnet")
# By hand: N = 62 word tokens; dog 21, hot 11, the/ate/a 10; each bigram of line one 10, "dog hot" 1.
CORPUS = "the dog ate a hot dog\n" * 10 + "dog hot\n"


def _build(tmp_path, text, **kwargs):
    tmp_path.mkdir(parents=True, exist_ok=True)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(text)
    out = str(tmp_path / "queries.parquet")
    stats = build_queries([str(corpus)], out, executor=LocalExecutor(1), **kwargs)
    return pq.read_table(out).to_pylist(), stats


@pytest.fixture(scope="module")
def wordnet_dir():
    if not (WORDNET / "data.noun").exists():
        pytest.fail(f"WordNet 3.0 not found under {WORDNET}: apt-get install wordnet-base")
    return str(WORDNET)


def test_tokens_keep_case_and_break_at_punctuation():
    assert words("New York's state-of-the-art U.S. dogs, (cats)") == ["New", "York's", "state-of-the-art", "U", "S", "dogs", "cats"]
    vocab = {"New", "York", "is", "big", "a", "dog"}
    assert bigrams("New York, New York is big - a dog", vocab) == ["New York", "New York", "York is", "is big", "a dog"]


def test_counts_and_pmi_by_hand(tmp_path):
    rows, stats = _build(tmp_path, CORPUS, min_count=10, min_bigram_count=10, min_pmi=-100)
    assert stats.tokens == 62  # 6 * 10 + 2
    by_query = {r["query"]: r for r in rows}
    assert {q: r["count"] for q, r in by_query.items() if r["kind"] == "unigram"} == \
        {"dog": 21, "hot": 11, "the": 10, "ate": 10, "a": 10}
    bigram_counts = {q: r["count"] for q, r in by_query.items() if r["kind"] == "bigram"}
    assert bigram_counts == {"hot dog": 10, "the dog": 10, "dog ate": 10, "ate a": 10, "a hot": 10}
    pmi = {q: math.log2(10 * 62 / (by_query[q.split()[0]]["count"] * by_query[q.split()[1]]["count"])) for q in bigram_counts}
    assert pmi["ate a"] == pytest.approx(math.log2(620 / 100)) and pmi["hot dog"] == pytest.approx(math.log2(620 / 231))
    kept, _ = _build(tmp_path / "b", CORPUS, min_count=10, min_bigram_count=10, min_pmi=2.0)
    assert {r["query"] for r in kept if r["kind"] == "bigram"} == {"ate a", "a hot"}  # 2.63 and 2.49 bits


def test_map_reduce_is_invariant_to_chunks_and_partitions(tmp_path):
    text = "".join(f"w{i % 17} w{(i * 7) % 5} tail{i % 3}. \u00e9t\u00e9 {i}\n" for i in range(400))
    coarse, _ = _build(tmp_path / "a", text, min_count=20, min_pmi=-100, min_bigram_count=5)
    fine, _ = _build(tmp_path / "b", text, min_count=20, min_pmi=-100, min_bigram_count=5, partitions=7,
                     chunk_bytes=997, max_keys=5)
    assert coarse == fine and len(coarse) > 20


def test_spills_partition_by_hash_and_reduce_sums(tmp_path):
    text = "".join(f"alpha beta w{i % 23} w{i % 7}\n" for i in range(500))
    (tmp_path / "c.txt").write_text(text)
    chunks = plan_chunks([str(tmp_path / "c.txt")], 700)
    spills = []
    for i, chunk in enumerate(chunks):  # max_keys=10: several spills per chunk
        spills += count_chunk({"what": "unigram", "chunk": chunk, "spill_uri": str(tmp_path / f"s{i}"),
                               "text_column": "text", "partitions": 5, "max_keys": 10})["spills"]
    merged = {}
    for p in range(5):
        for spill in spills:  # row group p of every spill holds only keys hashed to partition p
            keys = pq.ParquetFile(spill).read_row_group(p)["key"]
            assert (hash_strings(keys) % np.uint64(5) == p).all()
        part = reduce_partition({"spill_uris": spills, "partition": p, "min_count": 1})
        merged |= dict(zip(part["key"].to_pylist(), part["count"].to_pylist()))
    assert len(spills) > 2 * len(chunks) > 10 and merged == dict(Counter(words(text)))


def test_byte_range_chunks_read_every_line_once(tmp_path):
    path = tmp_path / "t.txt"
    text = "".join(f"line {i} caf\u00e9 \u732b\n" for i in range(300)) + "last line without newline"
    path.write_text(text)
    for size in (1, 13, 64, 10_000):
        assert "".join(line for c in plan_chunks([str(path)], size) for line in iter_texts(c)) == text


def test_parquet_corpus_and_missing_column(tmp_path):
    pq.write_table(pa.table({"text": ["hot dog stand"] * 30 + [None, ""]}), tmp_path / "c.parquet", row_group_size=7)
    out = str(tmp_path / "q.parquet")
    stats = build_queries([str(tmp_path)], out, min_count=30, min_pmi=-100, executor=LocalExecutor(1))
    assert stats.empty_texts == 2  # skipped, and counted
    assert [r["query"] for r in pq.read_table(out).to_pylist()] == ["dog", "hot", "stand", "dog stand", "hot dog"]
    with pytest.raises(ValueError, match="text"):
        build_queries([str(tmp_path / "c.parquet")], out, text_column="body", executor=LocalExecutor(1))


def test_titles_counts_listing_and_unmatchable(tmp_path):
    titles = tmp_path / "titles.txt"
    titles.write_text("New_York\t50\nNew York\t30\nStar Wars: A New Hope\t500\nBanana\nRare_page\t3\nbad\tcount\n")
    out = str(tmp_path / "q.parquet")
    stats = build_queries([], out, titles_uri=str(titles), min_title_count=70, executor=LocalExecutor(1))
    assert pq.read_table(out).to_pylist() == [{"query": "New York", "kind": "title", "count": 80},
                                              {"query": "Banana", "kind": "title", "count": None}]
    assert stats.kinds["title"]["unmatchable"] == 1 and stats.title_bad_lines == 1
    assert stats.per_kind == {"title": 2} and stats.empty_texts is None  # no corpus: no count of its texts


def test_matchable_under_metaclip_spacing():
    assert is_matchable("hot dog") and is_matchable("a . b") and is_matchable("rock 'n' roll")
    assert not any(map(is_matchable, ["U.S.", "Mr. Bean", "St. Louis", "x,y", "", "  ", "a\tb"]))


def test_wordnet_synsets_and_lemmas(wordnet_dir):
    synsets = list(read_synsets(wordnet_dir))
    assert len(synsets) == 117_659  # WordNet 3.0: 82,115 n + 13,767 v + 18,156 a/s + 3,621 r
    assert sum(s.pos == "n" for s in synsets) == 82_115
    lemmas = wordnet_queries(wordnet_dir)
    assert {"dog", "hot dog", "galore", "Paris", "entity"} <= set(lemmas)
    assert "galore(ip)" not in lemmas and "hot_dog" not in lemmas
    heads = wordnet_queries(wordnet_dir, lemmas="head")
    assert heads[0] == "entity" and len(heads) < len(lemmas)
    line = "07697537 13 n 03 hotdog 2 hot_dog 2 red_hot 0 004 @ 07695965 n 0000 | a frankfurter served hot on a bun  \n"
    assert parse_data_line(line).lemmas == ("hotdog", "hot dog", "red hot")
    assert parse_data_line("  1 This software and database is being provided\n") is None


def test_missing_wordnet_says_how_to_install(tmp_path):
    with pytest.raises(FileNotFoundError, match="apt-get install wordnet-base"):
        wordnet_queries(str(tmp_path))


def test_dedup_across_kinds_first_kind_wins(tmp_path, wordnet_dir):
    (tmp_path / "titles.txt").write_text("dog\t100\nhot dog\t100\nZebra crossing\t100\n")
    rows, stats = _build(tmp_path, CORPUS, min_count=10, min_bigram_count=10, min_pmi=-100,
                         titles_uri=str(tmp_path / "titles.txt"), wordnet_dir=wordnet_dir)
    kind = {r["query"]: r["kind"] for r in rows}
    assert kind["dog"] == "unigram" and kind["hot dog"] == "bigram" and kind["Zebra crossing"] == "title"
    assert kind["entity"] == "synset" and sum(r["query"] == "dog" for r in rows) == 1
    assert stats.kinds["title"]["duplicate"] == 2 and stats.kinds["synset"]["duplicate"] >= 2
    assert all(r["count"] is None for r in rows if r["kind"] == "synset")
    assert len(rows) == len({r["query"] for r in rows}) == stats.n_queries == sum(stats.per_kind.values())
    assert stats.per_kind == dict(Counter(r["kind"] for r in rows))


def test_stats_travel_with_the_query_list(tmp_path):
    """QueryStats.read(OUT) gives what build_queries returned; the columns stay the contract's."""
    (tmp_path / "titles.txt").write_text("New_York\t80\nbad\tcount\n")
    rows, stats = _build(tmp_path, CORPUS, min_count=10, min_pmi=-100, titles_uri=str(tmp_path / "titles.txt"))
    out = str(tmp_path / "queries.parquet")
    assert QueryStats.read(out) == stats and stats.to_dict() == QueryStats.read(out).to_dict()
    assert list(stats.to_dict()) == ["tokens", "empty_texts", "title_bad_lines", "kinds", "n_queries", "nodes"]
    # where the work ran: this host, for every map and reduce task (16 partitions each of 3 counts, and the maps)
    assert list(stats.nodes) == [socket.gethostname()] and stats.nodes[socket.gethostname()] > 3 * 16
    assert stats.per_kind == {"unigram": 5, "bigram": 5, "title": 1} and stats.n_queries == len(rows) == 11
    assert pq.read_schema(out).names == ["query", "kind", "count"]
    pq.write_table(pq.read_table(out).replace_schema_metadata(None), tmp_path / "theirs.parquet")
    with pytest.raises(InputError, match=r"theirs.parquet: holds no query stats"):
        QueryStats.read(str(tmp_path / "theirs.parquet"))


def test_cli_runs_build_queries(tmp_path, capsys):
    (tmp_path / "c.txt").write_text(CORPUS)
    parser = argparse.ArgumentParser()
    add_queries_arguments(parser)
    args = parser.parse_args([str(tmp_path / "c.txt"), str(tmp_path / "q.parquet"), "--min-count", "10", "--workers", "1"])
    assert run_queries_command(args) == 0
    assert '"n_queries": 5' in capsys.readouterr().out


def _no_work_left(folder):
    return not [p for p in Path(folder).iterdir() if ".work-" in p.name]


def test_bad_corpus_files_are_refused_by_name(tmp_path):
    out = str(tmp_path / "q.parquet")
    pq.write_table(pa.table({"text": [1, 2, 3]}), tmp_path / "ints.parquet")
    pq.write_table(pa.table({"text": [["a"], ["b"]]}), tmp_path / "lists.parquet")
    (tmp_path / "junk.parquet").write_bytes(b"not parquet")
    for name, problem in (("ints.parquet", "column 'text' is int64, it must be a string column"),
                          ("lists.parquet", "column 'text' is list<.*>, it must be a string column"),
                          ("junk.parquet", "is not a readable Parquet file: Parquet magic bytes"),
                          ("gone.txt", "does not exist")):
        with pytest.raises(InputError, match=rf"{name}: {problem}"):
            build_queries([str(tmp_path / name)], out, executor=LocalExecutor(1))
    (tmp_path / "bad.txt.gz").write_bytes(b"plain text, not gzip")  # found out by the worker reading it
    with pytest.raises(InputError, match=r"bad.txt.gz: is not a readable text file: Not a gzipped file"):
        build_queries([str(tmp_path / "bad.txt.gz")], out, executor=LocalExecutor(1))
    assert not Path(out).exists() and _no_work_left(tmp_path)


def test_options_and_out_are_checked_before_any_work(tmp_path):
    (tmp_path / "c.txt").write_text(CORPUS)
    corpus, out = [str(tmp_path / "c.txt")], str(tmp_path / "q.parquet")
    bad = [({"min_count": 0}, "--min-count: must be a whole number >= 1"),
           ({"min_pmi": float("nan")}, "--min-pmi: must be a finite number, got nan"),
           ({"min_bigram_count": -1}, "--min-bigram-count: must be a whole number >= 1"),
           ({"wordnet_lemmas": "some"}, "--wordnet-lemmas: must be all or head"),
           ({"wordnet_dir": str(tmp_path)}, "--wordnet: .* lacks data.noun"),
           ({"partitions": 0}, "partitions: must be a whole number >= 1")]
    for kwargs, problem in bad:
        with pytest.raises(InputError, match=problem):
            build_queries(corpus, out, executor=LocalExecutor(1), **kwargs)
    with pytest.raises(InputError, match="CORPUS: no source of queries was given"):
        build_queries([], out, executor=LocalExecutor(1))
    with pytest.raises(InputError, match="is a folder; OUT is the query list file to write"):
        build_queries(corpus, str(tmp_path), executor=LocalExecutor(1))
    with pytest.raises(InputError, match="--workers: must be a whole number >= 1, got 0"):
        LocalExecutor(0)
    assert not Path(out).exists() and _no_work_left(tmp_path)


def test_corpus_folder_listing_skips_hidden_and_underscore_names(tmp_path):
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "c.txt").write_text(CORPUS)
    (tmp_path / "corpus" / "_SUCCESS").write_text("not text")
    (tmp_path / "corpus" / "_q.parquet.work-dead").mkdir()  # a killed run's work folder
    pq.write_table(pa.table({"key": ["x"]}), tmp_path / "corpus" / "_q.parquet.work-dead" / "s.parquet")
    rows, _ = _build(tmp_path / "flat", CORPUS, min_count=10, min_pmi=-100)
    out = str(tmp_path / "q.parquet")
    build_queries([str(tmp_path / "corpus")], out, min_count=10, min_pmi=-100, executor=LocalExecutor(1))
    assert pq.read_table(out).to_pylist() == rows


def test_cli_warns_when_no_query_passes_the_floors(tmp_path, capsys):
    (tmp_path / "c.txt").write_text(CORPUS)
    parser = argparse.ArgumentParser()
    add_queries_arguments(parser)
    args = parser.parse_args([str(tmp_path / "c.txt"), str(tmp_path / "q.parquet"), "--min-count", "1000",
                              "--workers", "1"])
    assert run_queries_command(args) == 0
    assert "holds no query" in capsys.readouterr().err
