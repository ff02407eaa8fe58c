"""Crawl at the door: bad options, a foreign OUT and unfetchable pairs are refused before any write,
the crawl deletes only the unfinished shards it can prove it wrote, and URLs are encoded as HTTP needs.

Every request goes to 127.0.0.0/8 (the loopback image server of test_crawl).
"""
import argparse
import json
import math

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from clip_core.crawl.download import (
    MANIFEST, CrawlFolder, _check_free, _stats_aside, crawl, is_permanent,
    read_crawl_manifest, stage_input,
)
from clip_core.data.parquet import write_parquet
from flows.commands.corpus import add_crawl_arguments, run_crawl_command
from clip_core.crawl.safety import (
    UrlPolicy, check_fetchable, normalise_url, parse_networks, prepare_pairs, read_pairs,
)
from clip_core.errors import InputError
from test_crawl import LOOPBACK, once, read_tars, web, write_pairs  # noqa: F401  (fixture)


def _cli(*argv):
    parser = argparse.ArgumentParser()
    add_crawl_arguments(parser)
    return run_crawl_command(parser.parse_args([str(a) for a in argv]))


def _snapshot(folder):
    return {p.relative_to(folder): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


@pytest.fixture
def pairs(tmp_path, web):
    urls = [web.url(f"/img/{i}.jpg") for i in range(3)]
    return write_pairs(tmp_path / "pairs.parquet", urls, ["a", "b", "c"], uid=[1, 2, 3])


# OUT must be new, empty or a crawl folder: nothing else in it is ever deleted.

def test_a_foreign_out_is_refused_and_left_untouched(tmp_path, pairs, web):
    out = tmp_path / "eval"
    out.mkdir()
    (out / "000000.tar").write_bytes(b"a user's eval shard")  # the probe: it vanished, exit 0
    (out / "00007.tar").write_bytes(b"another")
    (out / "config.json").write_text("{}")
    before = _snapshot(out)
    with pytest.raises(InputError, match="holds no crawl record"):
        crawl(pairs, str(out), allow_networks=LOOPBACK)
    assert _snapshot(out) == before and sum(web.hits.values()) == 0


def test_an_empty_or_missing_out_is_fine_to_start(tmp_path):
    fs = fsspec.filesystem("file")
    (tmp_path / "empty").mkdir()
    assert read_crawl_manifest(fs, str(tmp_path / "empty")) is None
    assert read_crawl_manifest(fs, str(tmp_path / "new")) is None


def test_out_that_is_a_file_exits_2(tmp_path, pairs, capsys):
    (tmp_path / "out").write_text("not a folder")
    assert _cli(pairs, tmp_path / "out", "--allow-network", "127.0.0.1/32") == 2
    err = capsys.readouterr().err
    assert err.startswith("clip-pipeline crawl: error: ") and "is a file, not a folder" in err
    assert (tmp_path / "out").read_text() == "not a folder"


def test_foreign_json_in_a_crawl_folder_is_refused_before_writing(tmp_path, pairs):
    out = _finished_looking_crawl(tmp_path, pairs)
    (out / "config.json").write_text("{}")  # img2dataset would parse its name as a shard id
    before = _snapshot(out)
    with pytest.raises(InputError, match=r"would read as shard stats: \['config.json'\]"):
        crawl(pairs, str(out), allow_networks=LOOPBACK)
    assert _snapshot(out) == before


def _finished_looking_crawl(tmp_path, pairs, image_size=32, rows_per_shard=2):
    """OUT as crawl's own record writes it, plus a crawl_stats.json."""
    out = tmp_path / "out"
    prepared = prepare_pairs(read_pairs(pairs), UrlPolicy(parse_networks(LOOPBACK)))
    manifest = {"number_sample_per_shard": rows_per_shard, "image_size": image_size, "resize_mode": "center_crop",
                "encode_quality": 95, "rows": prepared.safe.num_rows, "pairs_uri": pairs}
    stage_input(fsspec.filesystem("file"), str(out), None, manifest, prepared)
    (out / "crawl_stats.json").write_text('{"success": 3}')
    return out


def test_a_refused_rerun_writes_nothing(tmp_path, pairs, web):
    out = _finished_looking_crawl(tmp_path, pairs)
    before = _snapshot(out)
    with pytest.raises(InputError, match=r"crawled with other \['image_size'\]"):
        crawl(pairs, str(out), image_size=64, number_sample_per_shard=2, allow_networks=LOOPBACK)
    # The probe: a changed input that a rerun refuses must not replace the finished corpus's refused.parquet.
    more = write_pairs(tmp_path / "more.parquet", [web.url("/img/0.jpg"), "ftp://127.0.0.1/x"], ["a", "x"])
    with pytest.raises(InputError, match="differ from those staged"):
        crawl(more, str(out), image_size=32, number_sample_per_shard=2, allow_networks=LOOPBACK)
    assert _snapshot(out) == before and sum(web.hits.values()) == 0


def test_sweep_deletes_only_unfinished_shards_this_crawl_owns(tmp_path):
    fs, out = fsspec.filesystem("file"), tmp_path / "out"
    (out / "_input").mkdir(parents=True)
    manifest = {"number_sample_per_shard": 2, "rows": 5}  # main shards 0, 1, 2
    (out / MANIFEST).write_text(json.dumps(manifest))
    write_parquet(fs, str(out / "_input" / "retry_00003.parquet"), pa.table({"url": ["u"]}))  # shard 3
    for name in ("00000.tar", "00000.parquet", "00000_stats.json", "00001.tar", "00002.parquet", "00003.tar",
                 "00004.tar", "000001.tar", "1.tar", "notes.txt"):
        (out / name).write_text("{}")
    folder = CrawlFolder(fs, str(out), manifest)
    assert folder.owned() == {0, 1, 2, 3}
    listing = folder.sweep()
    assert listing.stats == {0} and listing.incomplete() == set()
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["_input", "00000.tar", "00000.parquet", "00000_stats.json", "00004.tar", "000001.tar", "1.tar", "notes.txt"])


def test_crawl_stats_go_back_when_the_run_fails(tmp_path):
    fs, out = fsspec.filesystem("file"), tmp_path / "out"
    (out / "_input").mkdir(parents=True)
    (out / "crawl_stats.json").write_text('{"success": 3}')
    with pytest.raises(RuntimeError, match="img2dataset died"):
        with _stats_aside(fs, str(out)):
            assert not (out / "crawl_stats.json").exists()  # img2dataset would read it as a shard's stats
            raise RuntimeError("img2dataset died")
    assert (out / "crawl_stats.json").read_text() == '{"success": 3}'


# Every option is checked before anything is written.

@pytest.mark.parametrize("option, value, flag", [
    ("number_sample_per_shard", 0, "--number-sample-per-shard"),  # the probe: ZeroDivisionError after a manifest
    ("image_size", 0, "--image-size"),
    ("image_size", 100_000, "--image-size"),
    ("processes", 0, "--processes"),
    ("threads", -1, "--threads"),
    ("timeout", 0, "--timeout"),
    ("retries", -1, "--retries"),
    ("encode_quality", 101, "--encode-quality"),
    ("encode_quality", -1, "--encode-quality"),
    ("resize_mode", "stretch", "--resize-mode"),
])
def test_bad_options_are_refused_before_any_write(tmp_path, pairs, web, option, value, flag):
    with pytest.raises(InputError, match=f"^{flag}: must be"):
        crawl(pairs, str(tmp_path / "out"), allow_networks=LOOPBACK, **{option: value})
    assert not (tmp_path / "out").exists() and sum(web.hits.values()) == 0


def test_bad_option_on_the_command_line_exits_2(tmp_path, pairs, capsys):
    assert _cli(pairs, tmp_path / "out", "--number-sample-per-shard", "0") == 2
    assert capsys.readouterr().err == ("clip-pipeline crawl: error: --number-sample-per-shard: must be a whole "
                                       "number >= 1, got 0 (pass --number-sample-per-shard 1 or more)\n")
    assert not (tmp_path / "out").exists()
    assert _cli(pairs, tmp_path / "out", "--allow-network", "localhost") == 2
    assert "--allow-network: 'localhost' is not a CIDR network" in capsys.readouterr().err


@pytest.mark.parametrize("columns, problem", [
    ({"url": ["http://127.0.0.1/a"], "caption": [7]}, "column 'caption' is int64, it must be a string or binary"),
    ({"url": [["http://127.0.0.1/a"]], "caption": ["c"]},
     "column 'url' is list<element: string>, it must be a string or binary"),
])
def test_pairs_columns_that_are_not_text_name_the_file(tmp_path, columns, problem, capsys):
    pq.write_table(pa.table(columns), tmp_path / "p.parquet")
    assert _cli(tmp_path / "p.parquet", tmp_path / "out") == 2
    assert f"{tmp_path / 'p.parquet'}: {problem}" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_missing_pairs_name_the_file(tmp_path, capsys):
    assert _cli(tmp_path / "nope.parquet", tmp_path / "out") == 2
    assert f"clip-pipeline crawl: error: {tmp_path / 'nope.parquet'}: does not exist" in capsys.readouterr().err


# Nothing to fetch: say how many were refused, why, and the fix (no arrow error).

def test_loopback_without_allow_network_says_how_to_allow_it(tmp_path, pairs, web, capsys):
    assert _cli(pairs, tmp_path / "out") == 2  # the probe: "array_take has no kernel ... (int64, null)"
    err = capsys.readouterr().err
    assert err.startswith(f"clip-pipeline crawl: error: {pairs}: nothing to fetch: 3 of 3 URLs refused (loopback 3)")
    assert "--allow-network 127.0.0.1/32" in err
    assert not (tmp_path / "out").exists() and sum(web.hits.values()) == 0


def test_nothing_left_after_skips_and_refusals():
    table = pa.table({"url": ["ftp://127.0.0.1/a", "http://127.0.0.1/b", "http://127.0.0.1/c"],
                      "caption": ["a", None, " "], "uid": [1, 2, 3],
                      "query_ids": pa.array([[1], [2], [3]], pa.list_(pa.int32()))})
    prepared = prepare_pairs(table, UrlPolicy(parse_networks(LOOPBACK)))
    assert prepared.safe.num_rows == 0 and prepared.safe.schema.field("query_ids").type == pa.list_(pa.int32())
    with pytest.raises(InputError, match=r"nothing to fetch: 1 of 3 URLs refused \(scheme 1\); "
                                         r"2 of 3 rows skipped \(null_caption 1, empty_caption 1\)"):
        check_fetchable(prepared, "pairs.parquet")


# URLs are encoded as HTTP needs them, once.

@pytest.mark.parametrize("url, expected", [
    ("http://h.test/a b.jpg", "http://h.test/a%20b.jpg"),
    ("http://h.test/café.jpg", "http://h.test/caf%C3%A9.jpg"),
    ("http://h.test/a%20b.jpg", "http://h.test/a%20b.jpg"),  # already encoded: kept
    ("http://h.test/100%.jpg", "http://h.test/100%25.jpg"),  # a stray % is not an escape
    ("http://h.test/i.jpg?q=x y&z=é#é", "http://h.test/i.jpg?q=x%20y&z=%C3%A9#%C3%A9"),
    ("http://h.test/a\tb", "http://h.test/a%09b"),
    ("http://bücher.test/x", "http://xn--bcher-kva.test/x"),
    ("http://us er@bücher.test:8080/x", "http://us%20er@xn--bcher-kva.test:8080/x"),
    ("http://[::1]:80/a b", "http://[::1]:80/a%20b"),
    ("https://h.test/a/b.jpg?x=1&y=(2)#f", "https://h.test/a/b.jpg?x=1&y=(2)#f"),  # well-formed: unchanged
    ("http://" + "ä" * 70 + ".test/", None),  # no IDNA form (label too long)
])
def test_normalise_url(url, expected):
    assert normalise_url(url) == expected
    if expected is not None:
        assert normalise_url(expected) == expected


def test_encoded_urls_are_checked_deduplicated_and_refused_as_written():
    table = pa.table({"url": ["http://127.0.0.1/a b.jpg", "http://127.0.0.1/a%20b.jpg", "http://" + "ä" * 70 + "/"],
                      "caption": ["a", "b", "c"]})
    prepared = prepare_pairs(table, UrlPolicy(parse_networks(LOOPBACK)))
    assert prepared.safe.column("url").to_pylist() == ["http://127.0.0.1/a%20b.jpg"]
    assert prepared.skipped == {"duplicate_url": 1}
    assert prepared.refused.to_pydict() == {"url": ["http://" + "ä" * 70 + "/"], "reason": ["invalid_url"]}


def test_unsendable_url_errors_are_permanent():
    assert is_permanent("URL can't contain control characters. '/a b.jpg' (found at least ' ')")
    assert is_permanent("'ascii' codec can't encode character '\\xe9' in position 9: ordinal not in range(128)")


@pytest.mark.slow
def test_urls_with_spaces_and_non_ascii_are_fetched(tmp_path, web):
    paths = ["/img/a b 1.jpg", "/img/café 2.jpg", "/img/pre%20encoded 3.jpg"]
    pairs = write_pairs(tmp_path / "pairs.parquet", [web.url(p) for p in paths], ["space", "accent", "both"])
    stats = crawl(pairs, str(tmp_path / "out"), image_size=32, threads=3, allow_networks=LOOPBACK, timeout=5)
    assert (stats.success, stats.failed_to_download, stats.not_attempted) == (3, 0, 0), stats.errors
    assert web.hits == once(["/img/a%20b%201.jpg", "/img/caf%C3%A9%202.jpg", "/img/pre%20encoded%203.jpg"])
    assert sorted(c for _, c, _ in read_tars(tmp_path / "out").values()) == ["accent", "both", "space"]
    assert math.isclose(stats.success_rate, 1.0)


def test_shard_files_this_crawl_did_not_write_are_refused(tmp_path, pairs):
    out = _finished_looking_crawl(tmp_path, pairs)  # 3 rows, 2 a shard: shards 0 and 1 are its own
    (out / "00009_stats.json").write_text('{"count": 1}')  # would move where img2dataset numbers a retry round
    with pytest.raises(InputError, match=r"would read as shard stats: \['00009_stats.json'\]"):
        crawl(pairs, str(out), number_sample_per_shard=2, allow_networks=LOOPBACK)
    (out / "00009_stats.json").unlink()
    (out / "00002.tar").write_text("theirs")
    with pytest.raises(InputError, match=r"holds \['00002.tar'\], which this crawl did not write"):
        _check_free(fsspec.filesystem("file"), str(out), range(2, 3))  # before a retry round writes shard 2
    assert (out / "00002.tar").read_text() == "theirs"
