"""The extract stage on WAT files written as Common Crawl writes them, with planted pairs.

Every expected row is built by construction; nothing is fetched or resolved (the
hostnames are just strings).
"""
import argparse
import gzip
import hashlib
import io
import json
import random
import re

import pyarrow.parquet as pq
import pytest
from warcio.archiveiterator import ArchiveIterator
from warcio.warcwriter import WARCWriter

from clip_core.extract.wat import SCHEMA, STATS_NAME, ExtractStats, check_wat, extract
from flows.commands.corpus import add_extract_arguments, run_extract_command
from synthweb.wat_writer import wat_envelope, write_warcinfo, write_wat_file, write_wat_record
from clip_core.extract.filters import (
    PairFilter, StopwordLanguageDetector, resolve_image_url, resolve_image_url_reference,
    split_base, url_extension)
from clip_core.errors import InputError

P1 = "https://site.example/a/b/page.html"
P2 = "http://b.example/dir/page"
P4 = "https://d.example/rel/"
E1 = "https://e.example/gallery/"
E3 = "https://f.example/x/"

# File A, through write_wat_file: (page_url, links, base).
PAGES_A = [
    (P1, [("../img/a.jpg", "A red apple"),
          ("/x.png", "  x   marks\tthe spot "),
          ("//cdn.example/x.jpg", "protocol relative"),
          ("data:image/png;base64,iVBORw0KGgo=", "inline pixel"),
          ("javascript:void(0)", "a script"),
          ("mailto:someone@example.com", "mail"),
          ("empty.jpg", ""), ("noalt.jpg", None), ("blank.jpg", "   "),
          ("http://other.example/y.gif#frag", "a gif"),
          ("../img/a.jpg", "A red apple"),  # duplicate within the page
          ("", "no source"),
          ("http:///nohost.jpg", "no host")]),
    (P2, [("p/q.jpg", "Q is for quilt"), ("/root.jpg", "root"),
          ("https://site.example/a/img/a.jpg", "A red apple")],  # duplicate across pages
     "https://static.example/assets/"),
    ("https://c.example/empty", []),
    (P4, [("pic.jpeg", "relative base")], "../shared/"),
]
ROWS_A = [
    ("https://site.example/a/img/a.jpg", "A red apple", P1),
    ("https://site.example/x.png", "x marks the spot", P1),
    ("https://cdn.example/x.jpg", "protocol relative", P1),
    ("http://other.example/y.gif", "a gif", P1),
    ("https://static.example/assets/p/q.jpg", "Q is for quilt", P2),
    ("https://static.example/root.jpg", "root", P2),
    ("https://d.example/shared/pic.jpeg", "relative base", P4),
]
ROWS_B = [
    ("https://site.example/a/img/a.jpg", "Another caption", E1),
    ("https://e.example/gallery/cat.jpg", "a cat on a mat", E1),
    ("https://f.example/x/rel.png", "fallback page url", E3),
]


def _uid(url, caption):
    return hashlib.blake2b(f"{url}\x00{caption}".encode(), digest_size=16).hexdigest()


def _write(writer, uri, rec_type, payload, content_type=None):
    headers = {"Content-Type": content_type} if content_type else {}
    writer.write_record(writer.create_warc_record(
        uri, rec_type, payload=io.BytesIO(payload), length=len(payload),
        warc_headers_dict=headers))


def _envelope(uri, payload_metadata):
    return {"Envelope": {"Format": "WARC", "Payload-Metadata": payload_metadata,
                         "WARC-Header-Metadata": {"WARC-Target-URI": uri}}}


def _write_file_b(path, cut):
    """Records the extractor must skip, three good pages, then a truncated final member."""
    buf = io.BytesIO()
    w = WARCWriter(buf, gzip=True)
    write_warcinfo(w, "b.warc.wat.gz")
    _write(w, E1, "request", b"GET /gallery/ HTTP/1.1\r\nHost: e.example\r\n\r\n")
    _write(w, E1, "response", b"HTTP/1.1 200 OK\r\nContent-Type: text/html\r\n\r\n"
                              b'<img src="raw.jpg" alt="not from a WAT">')
    write_wat_record(w, E1, _envelope(E1, {"HTTP-Request-Metadata": {
        "Request-Message": {"Method": "GET", "Path": "/gallery/"}}}))
    write_wat_record(w, E1 + "logo.jpg", _envelope(E1 + "logo.jpg", {"HTTP-Response-Metadata": {
        "Headers": {"Content-Type": "image/jpeg"}}}))
    _write(w, E1, "metadata", b"fetchTimeMs: 12\r\n", "application/warc-fields")
    _write(w, E1, "metadata", b"{not json at all", "application/json")
    env = wat_envelope(E1, [("https://site.example/a/img/a.jpg", "A red apple"),  # across files
                            ("https://site.example/a/img/a.jpg", "Another caption"),
                            ("cat.jpg", "a cat on a mat")])
    links = env["Envelope"]["Payload-Metadata"]["HTTP-Response-Metadata"]["HTML-Metadata"]["Links"]
    links += [{"path": "A@/href", "url": "/next", "text": "next", "alt": "anchor alt"},
              {"path": "IMG@/longdesc", "url": "desc.html"}, "not a link object"]
    write_wat_record(w, E1, env)
    bad = wat_envelope("https://g.example/", [])
    bad["Envelope"]["Payload-Metadata"]["HTTP-Response-Metadata"]["HTML-Metadata"]["Links"] = {}
    write_wat_record(w, "https://g.example/", bad)
    no_target = wat_envelope(E3, [("rel.png", "fallback page url")])
    del no_target["Envelope"]["WARC-Header-Metadata"]["WARC-Target-URI"]
    write_wat_record(w, E3, no_target)
    last = io.BytesIO()
    noisy = [(hashlib.sha256(str(i).encode()).hexdigest() + ".jpg", f"lost {i}")
             for i in range(200)]  # incompressible, so half the member cuts into the payload
    write_wat_record(WARCWriter(last, gzip=True), "https://h.example/", wat_envelope(
        "https://h.example/", noisy))
    tail = last.getvalue()
    with open(path, "wb") as f:
        f.write(buf.getvalue() + tail[:cut if cut > 0 else len(tail) // 2])
    return str(path)


@pytest.fixture
def wat_files(tmp_path):
    a = write_wat_file(str(tmp_path / "a.warc.wat.gz"), PAGES_A)
    b = _write_file_b(tmp_path / "b.warc.wat.gz", cut=0)
    return [a, b]


def _read_rows(out):
    paths = sorted(str(p) for p in out.glob("part-*.parquet"))
    rows = []
    for p in paths:
        table = pq.read_table(p)
        assert table.schema.equals(SCHEMA)
        rows += table.to_pylist()
    return rows


def test_extracts_exactly_the_planted_pairs(wat_files, tmp_path):
    extract(wat_files, str(tmp_path / "out"), workers=1)
    rows = _read_rows(tmp_path / "out")
    assert [(r["url"], r["caption"], r["page_url"]) for r in rows] == ROWS_A + ROWS_B
    assert all(r["uid"] == _uid(r["url"], r["caption"]) for r in rows)


def test_stats_count_every_record_link_and_drop(wat_files, tmp_path):
    stats = extract(wat_files, str(tmp_path / "out"), workers=1)
    a, b = stats.files
    assert (a.records, a.metadata_records, a.pages, a.pages_without_links) == (9, 8, 4, 1)
    assert (a.links, a.img_links, a.pairs_kept) == (17, 17, 7)
    assert {k: v for k, v in a.dropped.items() if v} == {
        "bad_scheme": 3, "empty_alt": 3, "bad_url": 2, "duplicate": 2}
    assert not any(a.errors.values())
    # warcinfo, request, response, 2 non-page envelopes, warc-fields, non-JSON, 3 pages, cut
    assert (b.records, b.metadata_records, b.pages, b.pages_without_links) == (11, 8, 3, 1)
    assert (b.links, b.img_links, b.pairs_kept) == (7, 4, 3)
    assert {k: v for k, v in b.dropped.items() if v} == {"duplicate": 1}
    assert {k: v for k, v in b.errors.items() if v} == {
        "bad_json": 1, "bad_record": 1, "truncated_record": 1, "truncated_stream": 1}
    assert stats.rows == stats.totals.pairs_kept == 10
    assert stats.totals.dropped["duplicate"] == 3
    saved = json.loads((tmp_path / "out" / STATS_NAME).read_text())
    assert saved["totals"]["pairs_kept"] == 10 and saved["pairs_per_s"] > 0
    assert [f["uri"] for f in saved["files"]] == wat_files
    assert ExtractStats.read(str(tmp_path / "out")) == stats and stats.to_dict() == saved  # read back, same JSON


def test_two_workers_and_any_executor_give_the_same_rows(wat_files, tmp_path):
    extract(wat_files, str(tmp_path / "one"), workers=1)
    extract(wat_files, str(tmp_path / "two"), workers=2)

    class MapOnly:
        def map(self, fn, items):
            return [fn(item) for item in items]

    extract(wat_files, str(tmp_path / "custom"), executor=MapOnly())
    one = _read_rows(tmp_path / "one")
    assert _read_rows(tmp_path / "two") == one
    assert _read_rows(tmp_path / "custom") == one


def test_truncated_gzip_header_keeps_the_records_before_it(tmp_path):
    path = _write_file_b(tmp_path / "b.warc.wat.gz", cut=5)
    stats = extract([path], str(tmp_path / "out"), workers=1)
    assert stats.files[0].errors["truncated_stream"] == 1
    assert stats.files[0].records == 10
    assert [(r["url"], r["caption"], r["page_url"]) for r in _read_rows(tmp_path / "out")] == [
        ("https://site.example/a/img/a.jpg", "A red apple", E1)] + ROWS_B


def test_caption_length_and_extension_filters(wat_files, tmp_path):
    stats = extract(wat_files, str(tmp_path / "out"), workers=1, min_caption_len=5,
                    max_caption_len=15, image_extensions=[".JPG", "png"])
    got = {(r["url"], r["caption"]) for r in _read_rows(tmp_path / "out")}
    want = {(u, c) for u, c, _ in ROWS_A + ROWS_B
            if 5 <= len(c) <= 15 and url_extension(u) in ("jpg", "png")}
    assert got == want and want
    dropped = stats.totals.dropped
    assert dropped["extension"] == 2  # y.gif, pic.jpeg
    assert dropped["caption_short"] == 1 and dropped["caption_long"] >= 1


def test_language_filter_uses_a_pluggable_detector(wat_files, tmp_path):
    class FirstWordIsA:
        def detect(self, text):
            return "xx" if text.lower().startswith("a ") else "und"

    extract(wat_files, str(tmp_path / "out"), workers=1, languages=["xx"],
            language_detector=FirstWordIsA())
    got = {r["caption"] for r in _read_rows(tmp_path / "out")}
    assert got == {"A red apple", "a gif", "a cat on a mat"}


@pytest.mark.parametrize("text, lang", [
    ("a dog sleeping in the park", "en"), ("der Hund schläft auf dem Sofa", "de"),
    ("le chat dans la maison", "fr"), ("кошка на диване", "ru"), ("東京の夜景", "ja"),
    ("北京烤鸭", "zh"), ("red car", "und"), ("", "und"),
])
def test_stopword_detector_is_approximate_but_sane(text, lang):
    assert StopwordLanguageDetector().detect(text) == lang


def test_default_detector_keeps_captions_with_english_function_words(wat_files, tmp_path):
    extract(wat_files, str(tmp_path / "out"), workers=1, languages=["en"])
    assert {r["caption"] for r in _read_rows(tmp_path / "out")} == {
        "x marks the spot", "Q is for quilt", "a cat on a mat"}
    assert PairFilter(languages=frozenset({"en"})).describe()["detector"] == \
        "StopwordLanguageDetector"


@pytest.mark.parametrize("src, base, want", [
    ("../img/a.jpg", "https://h.example/a/b/c.html", "https://h.example/a/img/a.jpg"),
    ("//cdn.example/x.jpg", "http://h.example/", "http://cdn.example/x.jpg"),
    (" /x.png ", "https://h.example/a/", "https://h.example/x.png"),
    ("HTTPS://H.example/X.JPG#top", "https://h.example/", "https://H.example/X.JPG"),
    ("data:image/gif;base64,R0lGOD", "https://h.example/", None),
    ("javascript:alert(1)", "https://h.example/", None),
    ("ftp://h.example/a.jpg", "https://h.example/", None),
    ("http://[::1", "https://h.example/", None),
    ("rel.jpg", "", None),
])
def test_resolve_image_url(src, base, want):
    url, reason = resolve_image_url(src, base)
    assert (url or None) == want and (reason is None) == (want is not None)


URL_PIECES = ["http://", "https://", "HTTP://", "//", "/", "./", "../", ".", "..", "a", "B",
              "x.jpg", ":", "@", "?", "#", ";", "%20", " ", "\u00e9", "[", "]", "h.example",
              "data:", "javascript:", "80", "~", "=", "\\", "", "u@", ":8080"]
BASES = ["https://h.example/a/b/c.html", "http://h.example", "https://H.Example/a//b/",
         "https://u@h.example:8080/a/../b/c?q#f", "https://h.example/a/b/..",
         "HTTPS://h.example/x/",
         "", "not a url", "ftp://h.example/x/", "https://[::1]/a/", "http://h.example/a;p/b",
         "http://:80/a/", "https://h.example/./a/./", "https://h.example/a/.hidden/x",
         "https://h.example/a;p/b/c", "https://h.example/a/b/c/d/e.html", "https://h.example/"]


def test_fast_url_resolution_matches_the_urljoin_reference():
    rng = random.Random(0)
    srcs = [a + b for a in URL_PIECES for b in URL_PIECES]
    srcs += ["".join(rng.choices(URL_PIECES, k=rng.randint(1, 7))) for _ in range(2000)]
    for base in BASES:
        split = split_base(base)
        for src in srcs:
            want = resolve_image_url_reference(src, base)
            assert resolve_image_url(src, split) == want, (src, base)


def test_shards_are_atomic_and_stale_parts_removed(wat_files, tmp_path):
    out = tmp_path / "out"
    stats = extract(wat_files, str(out), workers=1, shard_rows=3)
    assert len(stats.shards) == 4  # 10 rows
    assert sorted(p.name for p in out.iterdir()) == [
        STATS_NAME] + [f"part-{i:05d}.parquet" for i in range(4)]
    rows = _read_rows(out)
    assert len(rows) == 10
    (out / "notes.txt").write_bytes(b"a user's file: extract never removes it")
    extract(wat_files, str(out), workers=1, shard_rows=100)
    assert sorted(p.name for p in out.glob("part-*")) == ["part-00000.parquet"]
    assert (out / "notes.txt").exists()
    assert _read_rows(out) == rows


def test_no_pairs_still_writes_one_empty_shard(tmp_path):
    path = write_wat_file(str(tmp_path / "e.warc.wat.gz"), [("https://x.example/", [])])
    stats = extract([path], str(tmp_path / "out"), workers=4)
    assert stats.rows == 0 and len(stats.shards) == 1
    assert pq.read_table(stats.shards[0]).schema.equals(SCHEMA)


def test_write_wat_file_is_a_common_crawl_shaped_wat(tmp_path):
    pages = [("https://x.example/p", [("a.jpg", "alt a"), ("b.jpg", None)], "https://cdn.example/")]
    path = write_wat_file(str(tmp_path / "w.warc.wat.gz"), pages)
    with open(path, "rb") as f:
        records = [(r.rec_type, r.rec_headers.get_header("Content-Type"), r.content_stream().read())
                   for r in ArchiveIterator(f)]
    assert [t for t, _, _ in records] == ["warcinfo", "metadata", "metadata"]
    assert {c for t, c, _ in records if t == "metadata"} == {"application/json"}
    env = json.loads(records[2][2])["Envelope"]
    html = env["Payload-Metadata"]["HTTP-Response-Metadata"]["HTML-Metadata"]
    assert env["WARC-Header-Metadata"]["WARC-Target-URI"] == "https://x.example/p"
    assert html["Head"]["Base"] == "https://cdn.example/"
    assert html["Links"] == [{"path": "IMG@/src", "url": "a.jpg", "alt": "alt a"},
                             {"path": "IMG@/src", "url": "b.jpg"}]
    (tmp_path / "again").mkdir()
    again = write_wat_file(str(tmp_path / "again" / "w.warc.wat.gz"), pages)
    assert open(again, "rb").read() == open(path, "rb").read()  # deterministic


def test_cli_and_globs(wat_files, tmp_path, capsys):
    parser = argparse.ArgumentParser()
    add_extract_arguments(parser)
    args = parser.parse_args([str(tmp_path / "*.warc.wat.gz"), str(tmp_path / "out"),
                              "--workers", "1", "--lang", "en,und", "--ext", "jpg,png",
                              "--min-caption-len", "2"])
    assert args.lang == ["en", "und"] and args.ext == ["jpg", "png"]
    assert run_extract_command(args) == 0
    assert "pairs" in capsys.readouterr().out
    saved = json.loads((tmp_path / "out" / STATS_NAME).read_text())
    assert [f["uri"] for f in saved["files"]] == wat_files
    assert saved["filters"]["languages"] == ["en", "und"]
    with pytest.raises(FileNotFoundError):
        extract([str(tmp_path / "nothing-*.wat.gz")], str(tmp_path / "o2"))


@pytest.mark.slow
def test_cli_ray_executor_gives_the_same_rows(wat_files, tmp_path):
    pytest.importorskip("ray")
    parser = argparse.ArgumentParser()
    add_extract_arguments(parser)
    assert run_extract_command(parser.parse_args(
        [*wat_files, str(tmp_path / "ray"), "--executor", "ray"])) == 0
    extract(wat_files, str(tmp_path / "local"), workers=1)
    assert _read_rows(tmp_path / "ray") == _read_rows(tmp_path / "local")


def _tree(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("name, data, problem", [
    ("empty.wat.gz", b"", "is empty"),
    ("text.wat.gz", b"hello world, not gzip", "is neither gzip nor WARC"),
    ("gzipped.wat.gz", gzip.compress(b"just some text", mtime=0), "is gzip but holds no WARC records"),
], ids=["empty", "text", "gzipped"])  # ids without the bytes: xdist workers must collect the same names
def test_a_file_that_is_not_a_wat_is_refused_by_name(wat_files, tmp_path, capsys, name, data, problem):
    from flows.cli import main

    (tmp_path / name).write_bytes(data)
    assert main(["extract", *wat_files, str(tmp_path / name), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and re.search(rf"error: .*{name}: {problem}", err[0])
    assert not (tmp_path / "out").exists()  # checked before any file was read


def test_a_valid_file_without_wat_records_is_counted_and_warned(wat_files, tmp_path, capsys):
    (tmp_path / "nothing.wat.gz").write_bytes(gzip.compress(b""))
    buf = io.BytesIO()
    w = WARCWriter(buf, gzip=True)
    write_warcinfo(w, "a.warc.gz")
    _write(w, E1, "response", b"HTTP/1.1 200 OK\r\nContent-Type: text/html\r\n\r\n<img src=a.jpg alt=x>")
    (tmp_path / "crawl.warc.gz").write_bytes(buf.getvalue())  # a WARC given by mistake
    parser = argparse.ArgumentParser()
    add_extract_arguments(parser)
    files = [wat_files[0], str(tmp_path / "nothing.wat.gz"), str(tmp_path / "crawl.warc.gz"), wat_files[1]]
    assert run_extract_command(parser.parse_args([*files, str(tmp_path / "out"), "--workers", "1"])) == 0
    err = capsys.readouterr().err
    assert "warning: " + files[1] + ": holds no WARC records" in err
    assert "warning: " + files[2] + ": holds no WAT metadata records" in err
    assert "warning: " + files[3] + ": ended early" in err  # the truncated final member
    saved = json.loads((tmp_path / "out" / STATS_NAME).read_text())
    assert len(saved["warnings"]) == 3 and saved["rows"] == 10
    assert [f["records"] for f in saved["files"]][1:3] == [0, 2]


@pytest.mark.parametrize("kwargs, problem", [
    ({"workers": 0}, "--workers: must be a whole number >= 1, got 0"),
    ({"shard_rows": 0}, "--shard-rows: must be a whole number >= 1, got 0"),
    ({"min_caption_len": -1}, "--min-caption-len: must be a whole number >= 0"),
    ({"max_caption_len": 0}, "--max-caption-len: must be a whole number >= 1"),
    ({"min_caption_len": 9, "max_caption_len": 3}, "--min-caption-len: 9 is above --max-caption-len 3"),
    ({"languages": []}, r"--lang: must list language codes, got \[\]"),
    ({"image_extensions": [" "]}, "--ext: lists no extension"),
])
def test_options_are_checked_at_the_door(wat_files, tmp_path, kwargs, problem):
    with pytest.raises(InputError, match=problem):
        extract(wat_files, str(tmp_path / "out"), **kwargs)
    assert not (tmp_path / "out").exists()


def test_failed_rerun_leaves_the_previous_result_whole(wat_files, tmp_path):
    out = tmp_path / "out"
    extract(wat_files, str(out), workers=1, shard_rows=3)
    before = _tree(out)

    class DiesOnTheSecondFile:
        def map(self, fn, items):
            for i, item in enumerate(items):
                if i == 1:
                    raise RuntimeError("worker died")
                yield fn(item)

    with pytest.raises(RuntimeError, match="worker died"):
        extract(wat_files, str(out), executor=DiesOnTheSecondFile(), shard_rows=1)
    with pytest.raises(InputError, match="text.wat.gz: is neither gzip nor WARC"):
        (tmp_path / "text.wat.gz").write_bytes(b"not a WAT")
        extract([*wat_files, str(tmp_path / "text.wat.gz")], str(out), workers=1)
    assert _tree(out) == before  # old parts and stats as they were, no staging folder left


def test_out_extract_did_not_write_is_refused(wat_files, tmp_path):
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "part-00000.parquet").write_bytes(b"someone else's")
    with pytest.raises(InputError, match="holds part-00000.parquet but no extract_stats.json"):
        extract(wat_files, str(theirs), workers=1)
    assert _tree(theirs) == {"part-00000.parquet": b"someone else's"}
    with pytest.raises(InputError, match="is a file, not a folder"):
        extract(wat_files, wat_files[0], workers=1)


def test_check_wat_by_first_bytes(tmp_path):
    good = write_wat_file(str(tmp_path / "good.warc.wat.gz"), [("https://x.example/", [("a.jpg", "a")])])
    check_wat(good)
    (tmp_path / "plain.warc").write_bytes(b"WARC/1.0\r\nWARC-Type: warcinfo\r\n\r\n")
    check_wat(str(tmp_path / "plain.warc"))
    (tmp_path / "nothing.wat.gz").write_bytes(gzip.compress(b""))
    check_wat(str(tmp_path / "nothing.wat.gz"))  # valid and empty: read, counted and warned about
    bad = {"empty.wat.gz": (b"", "is empty"), "text.wat.gz": (b"hello, not a WARC", "is neither gzip nor WARC"),
           "gzipped.wat.gz": (gzip.compress(b"hello"), "is gzip but holds no WARC records"),
           "broken.wat.gz": (b"\x1f\x8b\x08\x00" + b"\xff" * 40, "is not valid gzip")}
    for name, (data, problem) in bad.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(InputError, match=rf"{name}: {problem}"):
            check_wat(str(tmp_path / name))
    with pytest.raises(InputError, match="is a folder"):
        check_wat(str(tmp_path))
