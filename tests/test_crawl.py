"""Crawl stage: URL safety, input validation, img2dataset on a loopback web, resume, retry, S3.

Every request goes to 127.0.0.0/8: a server started here on 127.0.0.1 (allowed) and one on
127.0.0.2 (outside the allowlist, must see no request). Private and public addresses appear
only in the pure decision function, with a fake resolver.
"""
import io
import json
import os
import signal
import socket
import subprocess
import sys
import tarfile
import threading
import time
import uuid
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import webdataset as wds
from PIL import Image

from clip_core.crawl.download import (
    CrawlStats, crawl, is_permanent,
)
from clip_core.crawl.safety import UrlPolicy, parse_networks, prepare_pairs, read_pairs
from clip_core.errors import InputError
from flows.commands.corpus import add_crawl_arguments, run_crawl_command

LOOPBACK = ("127.0.0.1/32",)
UNLIMITED = dict(per_host_rps=0, per_host_concurrency=0)  # no per-host limits: a server of the test's own


def _image_bytes(seed: int, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (64, 48), ((37 * seed) % 256, (91 * seed) % 256, 128)).save(buf, format=fmt)
    return buf.getvalue()


class _Handler(BaseHTTPRequestHandler):
    """Routes: /img/N.jpg, /png/N.png, /missing/N (404), /text/N.jpg (HTML), /noai/N.jpg,
    /flaky/N.jpg (503 on the first request), /slow/N.jpg (sleeps server.delay),
    /redirect/N?to=URL (302 to URL); /robots.txt answers 404, counted in server.robots, not in hits."""

    def do_GET(self):
        srv = self.server
        if self.path == "/robots.txt":  # counted apart: the tests count image requests
            with srv.lock:
                srv.robots += 1
            return self._send(404, b"no robots.txt", "text/plain")
        with srv.lock:
            srv.hits[self.path] += 1
            first = srv.hits[self.path] == 1
        path, _, query = self.path.partition("?")
        kind, _, name = path.strip("/").partition("/")
        seed = int("".join(ch for ch in name if ch.isdigit()) or 0)
        if kind == "redirect":
            return self._send(302, b"", "text/plain", {"Location": parse_qs(query)["to"][0]})
        if kind == "missing" or (kind == "flaky" and first):
            return self._send(404 if kind == "missing" else 503, b"no", "text/plain")
        if kind == "text":
            return self._send(200, b"<html>not an image</html>", "text/html")
        if kind == "slow":
            time.sleep(srv.delay)
        fmt = "PNG" if kind == "png" else "JPEG"
        headers = {"X-Robots-Tag": "noai"} if kind == "noai" else {}
        self._send(200, _image_bytes(seed, fmt), f"image/{fmt.lower()}", headers)

    def _send(self, code, body, ctype, headers=None):
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


class ImageWeb:
    """A small image server on a loopback address that counts requests per path."""

    def __init__(self, host="127.0.0.1", delay=0.0):
        self.server = ThreadingHTTPServer((host, 0), _Handler)
        self.server.hits, self.server.lock, self.server.delay = Counter(), threading.Lock(), delay
        self.server.robots = 0
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()

    def url(self, path):
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}{path}"

    @property
    def hits(self):
        with self.server.lock:
            return Counter(self.server.hits)


@pytest.fixture
def web():
    with ImageWeb() as w:
        yield w


@pytest.fixture
def outside():
    with ImageWeb("127.0.0.2") as w:
        yield w


def write_pairs(path, urls, captions, **extra):
    pq.write_table(pa.table({"url": urls, "caption": captions, **extra}), path)
    return str(path)


def read_tars(folder):
    """{key: (jpg bytes, caption, meta)} over every tar, asserting each tar reads to the end."""
    samples = {}
    for name in sorted(os.listdir(folder)):
        if not name.endswith(".tar"):
            continue
        with tarfile.open(os.path.join(folder, name)) as tar:
            for member in tar.getmembers():
                key, ext = member.name.split(".", 1)
                samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
    return {k: (v["jpg"], v["txt"].decode(), json.loads(v["json"])) for k, v in samples.items()}


def once(urls):
    """The request counts of fetching each URL once."""
    return Counter(urlsplit(u).path for u in urls)


def fake_resolver(table):
    """A getaddrinfo stand-in: host -> addresses, counting calls; unknown hosts fail."""
    calls = Counter()

    def resolve(host, port, type=0, **kw):
        calls[host] += 1
        if host not in table:
            raise OSError(f"no such host {host}")
        return [(0, type, 0, "", (a, 0)) for a in table[host]]

    resolve.calls = calls
    return resolve


# Input validation (no fetching).

def test_prepare_pairs_skips_and_refuses():
    table = pa.table({
        "url": pa.array([b"http://127.0.0.1/a.jpg", None, b"", b"http://127.0.0.1/b.jpg",
                         b"http://127.0.0.1/a.jpg", b"http://\xff.jpg", b" http://127.0.0.1/c.jpg ",
                         b"http://meta.test/x", b"ftp://127.0.0.1/d"], pa.binary()),
        "caption": pa.array([b"a", b"b", b"c", None, b"dup", b"bad", b"c", b"m", b"f"], pa.binary()),
        "uid": list(range(9)),
    })
    policy = UrlPolicy(parse_networks(LOOPBACK), fake_resolver({"meta.test": ["169.254.169.254"]}))
    prepared = prepare_pairs(table, policy)
    assert prepared.safe.column("url").to_pylist() == ["http://127.0.0.1/a.jpg", "http://127.0.0.1/c.jpg"]
    assert prepared.safe.column("uid").to_pylist() == [0, 6]
    assert prepared.extra_columns == ["uid"]
    assert prepared.skipped == {"null_url": 1, "empty_url": 1, "null_caption": 1,
                                "duplicate_url": 1, "non_utf8_url": 1}
    assert prepared.refused_counts == {"link_local": 1, "scheme": 1}
    assert prepared.refused.to_pydict() == {"url": ["http://meta.test/x", "ftp://127.0.0.1/d"],
                                            "reason": ["link_local", "scheme"]}
    assert prepared.input_rows == 9


def test_read_pairs_errors(tmp_path):
    with pytest.raises(ValueError, match=r"has no 'caption' column \(columns: \['url', 'text'\]\)"):
        read_pairs(_no_caption(tmp_path))
    with pytest.raises(ValueError, match="no 'url' column"):
        read_pairs(str(_write(tmp_path / "b.parquet", {"caption": ["c"]})))
    with pytest.raises(ValueError, match="has no rows"):
        read_pairs(write_pairs(tmp_path / "c.parquet", pa.array([], pa.string()), pa.array([], pa.string())))
    (tmp_path / "empty.parquet").write_bytes(b"")
    with pytest.raises(ValueError, match="not a readable Parquet file"):
        read_pairs(str(tmp_path / "empty.parquet"))
    with pytest.raises(ValueError, match="reserved by img2dataset"):
        read_pairs(write_pairs(tmp_path / "d.parquet", ["http://x/"], ["c"], status=["ok"]))
    with pytest.raises(ValueError, match="column 'url' is int64, it must be a string or binary column"):
        prepare_pairs(pa.table({"url": [1], "caption": ["c"]}), UrlPolicy())


def _write(path, columns):
    pq.write_table(pa.table(columns), path)
    return path


def _no_caption(tmp_path):
    return str(_write(tmp_path / "a.parquet", {"url": ["http://x/"], "text": ["c"]}))


def test_bad_input_fails_before_any_request(tmp_path, web):
    pairs = str(_write(tmp_path / "p.parquet", {"url": [web.url("/img/1.jpg")], "text": ["c"]}))
    with pytest.raises(ValueError, match="no 'caption' column"):
        crawl(pairs, str(tmp_path / "out"), allow_networks=LOOPBACK)
    assert sum(web.hits.values()) == 0


def test_dictionary_and_large_string_columns():
    table = pa.table({"url": pa.array(["http://127.0.0.1/a", "http://127.0.0.1/b"]).dictionary_encode(),
                      "caption": pa.array(["x", "y"], pa.large_string())})
    prepared = prepare_pairs(table, UrlPolicy(parse_networks("127.0.0.1/32")))
    assert prepared.safe.to_pydict() == {"url": ["http://127.0.0.1/a", "http://127.0.0.1/b"], "caption": ["x", "y"]}


def test_nothing_safe_fetches_nothing_and_says_why(tmp_path, outside):
    pairs = write_pairs(tmp_path / "p.parquet", [outside.url("/img/1.jpg"), "gopher://127.0.0.1/x"], ["a", "b"])
    with pytest.raises(InputError, match=r"nothing to fetch: 2 of 2 URLs refused \(loopback 1, scheme 1\)"):
        crawl(pairs, str(tmp_path / "out"), allow_networks=LOOPBACK)
    assert sum(outside.hits.values()) == 0 and not (tmp_path / "out").exists()


def test_permanent_errors():
    assert is_permanent("HTTP Error 404: Not Found")
    assert is_permanent("Use of image disallowed by X-Robots-Tag directive")
    assert not is_permanent("HTTP Error 503: Service Unavailable")
    assert not is_permanent("<urlopen error [Errno 111] Connection refused>")
    assert not is_permanent(None)


def test_cli_arguments_and_bad_input(tmp_path, capsys):
    import argparse

    parser = argparse.ArgumentParser()
    add_crawl_arguments(parser)
    args = parser.parse_args([_no_caption(tmp_path), str(tmp_path / "out"), "--allow-network",
                              "127.0.0.1/32", "--allow-network", "::1/128", "--retry-failed"])
    assert args.allow_network == ["127.0.0.1/32", "::1/128"] and args.retry_failed
    assert args.resize_mode == "center_crop"
    assert run_crawl_command(args) == 2
    assert "no 'caption' column" in capsys.readouterr().err
    assert (args.executor, args.ray_address) == ("local", None)
    ray_args = parser.parse_args([_no_caption(tmp_path), str(tmp_path / "out"), "--executor", "ray",
                                  "--ray-address", "127.0.0.1:1"])
    assert run_crawl_command(ray_args) == 2  # a silent cluster address is bad input too, checked at the door
    assert "--ray-address: nothing answers at 127.0.0.1:1" in capsys.readouterr().err
    stray = parser.parse_args([_no_caption(tmp_path), str(tmp_path / "out"), "--ray-address", "127.0.0.1:1"])
    assert run_crawl_command(stray) == 2
    assert "--ray-address: is only used with --executor ray" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


# End to end on loopback.

@pytest.mark.slow
def test_crawl_end_to_end_stats_and_rerun(tmp_path, web, outside):
    good = [web.url(f"/img/{i}.jpg") for i in range(6)] + [web.url(f"/png/{i}.png") for i in range(3)]
    bad = [web.url("/missing/1"), web.url("/missing/2"), web.url("/text/1.jpg"), web.url("/noai/1.jpg")]
    blocked = [outside.url("/img/1.jpg"), outside.url("/img/2.jpg"), "file:///etc/hostname"]
    urls = good + bad + blocked + [good[0], web.url("/img/99.jpg")]
    captions = [f"caption {u}" for u in urls[:-2]] + ["a duplicate", None]
    pairs = write_pairs(tmp_path / "pairs.parquet", urls, captions, uid=[f"u{i}" for i in range(len(urls))],
                        query_ids=pa.array([[i, i + 1] for i in range(len(urls))], pa.list_(pa.int32())))
    out = tmp_path / "out"
    stats = crawl(pairs, str(out), image_size=32, threads=4, number_sample_per_shard=5,
                  allow_networks=LOOPBACK, timeout=5, **UNLIMITED)

    assert sum(outside.hits.values()) == 0
    assert web.hits == once(good + bad)
    assert (stats.input_rows, stats.queued, stats.attempted) == (len(urls), 13, 13)
    assert stats.skipped == {"duplicate_url": 1, "null_caption": 1}
    assert stats.refused == {"loopback": 2, "scheme": 1}
    assert (stats.success, stats.failed_to_download, stats.failed_to_resize) == (9, 3, 1)
    assert stats.errors["HTTP Error 404: Not Found"] == 2
    assert stats.errors["Use of image disallowed by X-Robots-Tag directive"] == 1
    assert stats.success_rate == pytest.approx(9 / 13)
    assert (stats.shards, stats.incomplete_shards, stats.fetched_this_run) == (3, 0, 13)
    assert json.loads((out / "crawl_stats.json").read_text()) == stats.to_dict()
    assert CrawlStats.read(str(out)) == stats  # what a flow that skips a finished crawl gets
    assert pq.read_table(out / "refused.parquet").column("reason").to_pylist() == ["loopback"] * 2 + ["scheme"]

    samples = read_tars(out)
    assert sorted(meta["url"] for _, _, meta in samples.values()) == sorted(good)
    for jpg, caption, meta in samples.values():
        assert caption == f"caption {meta['url']}"
        assert meta["uid"] == f"u{urls.index(meta['url'])}" and meta["query_ids"][0] == urls.index(meta["url"])
        assert Image.open(io.BytesIO(jpg)).size == (32, 32)
    shards = sorted(str(p) for p in out.glob("*.tar"))
    rows = list(wds.WebDataset(shards, shardshuffle=False).to_tuple("jpg", "txt", "json"))
    assert sorted(txt.decode() for _, txt, _ in rows) == sorted(f"caption {u}" for u in good)
    assert sorted(os.listdir(out)) == sorted(
        [f"0000{i}{ext}" for i in range(3) for ext in (".tar", ".parquet", "_stats.json")]
        + ["_input", "crawl_stats.json", "refused.parquet"])

    hits = web.hits
    again = crawl(pairs, str(out), image_size=32, threads=4, number_sample_per_shard=5,
                  allow_networks=LOOPBACK, timeout=5)
    assert web.hits == hits and again.fetched_this_run == 0
    assert stats.nodes == {socket.gethostname(): 3} and again.nodes == {}  # shards crawled, by node, this run
    per_run = ("wall_seconds", "images_per_second", "fetched_this_run", "nodes")
    assert {k: v for k, v in again.to_dict().items() if k not in per_run} \
        == {k: v for k, v in stats.to_dict().items() if k not in per_run}
    written = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with pytest.raises(ValueError, match="crawled with other"):
        crawl(pairs, str(out), image_size=64, number_sample_per_shard=5, allow_networks=LOOPBACK)
    with pytest.raises(ValueError, match="differ from those staged"):
        crawl(pairs, str(out), image_size=32, number_sample_per_shard=5, allow_networks=LOOPBACK + ("127.0.0.2/32",))
    assert web.hits == hits and sum(outside.hits.values()) == 0
    # A refused rerun writes nothing: refused.parquet (which it would have changed) included.
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == written


@pytest.mark.slow
def test_retry_failed_fetches_only_failures_into_new_shards(tmp_path, web):
    urls = ([web.url(f"/img/{i}.jpg") for i in range(4)] + [web.url(f"/flaky/{i}.jpg") for i in range(3)]
            + [web.url("/missing/1"), web.url("/noai/1.jpg"), web.url("/text/1.jpg")])
    pairs = write_pairs(tmp_path / "pairs.parquet", urls, [f"c{i}" for i in range(len(urls))])
    out = tmp_path / "out"
    options = dict(image_size=32, threads=2, number_sample_per_shard=4, allow_networks=LOOPBACK, **UNLIMITED)
    first = crawl(pairs, str(out), **options)
    assert (first.success, first.failed_to_download, first.shards) == (4, 5, 3)

    retried = crawl(pairs, str(out), retry_failed=True, **options)
    paths = once(urls)
    paths.update({f"/flaky/{i}.jpg": 1 for i in range(3)})
    assert web.hits == paths  # only the three 503s again: not the 404, the opt-out or the non-image
    assert retried.retried_this_run == 3 and retried.fetched_this_run == 3
    assert (retried.success, retried.failed_to_download, retried.failed_to_resize) == (7, 2, 1)
    assert (retried.attempted, retried.fetch_attempts, retried.shards) == (10, 13, 4)
    assert (out / "00003.tar").exists() and (out / "_input" / "retry_00003.parquet").exists()
    samples = read_tars(out)
    assert len(samples) == 7 and sorted(m["url"] for _, _, m in samples.values()) == sorted(urls[:7])

    nothing_left = crawl(pairs, str(out), retry_failed=True, **options)
    assert web.hits == paths and nothing_left.retried_this_run == 0


KILLED_RUN = """
from clip_core.crawl import crawl
crawl({pairs!r}, {out!r}, image_size=32, threads=2, number_sample_per_shard=4,
      allow_networks=["127.0.0.1/32"], timeout=5, per_host_rps=0, per_host_concurrency=0)
"""


@pytest.mark.slow
def test_killed_run_resumes_to_a_complete_corpus(tmp_path):
    with ImageWeb(delay=0.3) as web:
        urls = [web.url(f"/slow/{i}.jpg") for i in range(24)]
        pairs = write_pairs(tmp_path / "pairs.parquet", urls, [f"slow {i}" for i in range(24)])
        out = tmp_path / "out"
        code = KILLED_RUN.format(pairs=pairs, out=str(out))
        proc = subprocess.Popen([sys.executable, "-c", code], start_new_session=True,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            deadline = time.time() + 120
            # Kill once shard 0 is complete and shard 1 has started (its tar is open).
            while not ((out / "00000_stats.json").exists() and (out / "00001.tar").exists()):
                assert proc.poll() is None and time.time() < deadline, "the crawl ended before it was killed"
                time.sleep(0.02)
        finally:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        assert (out / "00001.tar").exists() and not (out / "00001_stats.json").exists()
        killed_hits = web.hits
        stats = crawl(pairs, str(out), image_size=32, threads=2, number_sample_per_shard=4,
                      allow_networks=LOOPBACK, timeout=5)
        assert (stats.success, stats.shards, stats.incomplete_shards) == (24, 6, 0)
        samples = read_tars(out)
        assert sorted(c for _, c, _ in samples.values()) == sorted(f"slow {i}" for i in range(24))
        for i in range(4):  # shard 0 was complete: not fetched twice
            assert web.hits[f"/slow/{i}.jpg"] == killed_hits[f"/slow/{i}.jpg"] == 1
        assert all(web.hits[f"/slow/{i}.jpg"] <= 2 for i in range(24))


UNGUARDED_SCRIPT = """
from clip_core.crawl import crawl
stats = crawl({pairs!r}, {out!r}, image_size=32, threads=2, allow_networks=["127.0.0.1/32"])
print("CRAWLED", stats.success)
"""


@pytest.mark.slow
def test_a_script_without_main_guard_works(tmp_path, web):
    pairs = write_pairs(tmp_path / "pairs.parquet", [web.url(f"/img/{i}.jpg") for i in range(3)], ["a", "b", "c"])
    script = tmp_path / "script.py"
    script.write_text(UNGUARDED_SCRIPT.format(pairs=pairs, out=str(tmp_path / "out")))
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.count("CRAWLED") == 1 and "CRAWLED 3" in done.stdout
    assert web.hits == once(web.url(f"/img/{i}.jpg") for i in range(3))


@pytest.mark.slow
def test_crawl_from_a_thread_runs_img2dataset_in_a_child(tmp_path, web):
    urls = [web.url(f"/img/{i}.jpg") for i in range(3)]
    pairs = write_pairs(tmp_path / "pairs.parquet", urls, ["a", "b", "c"])
    result, before = {}, signal.getsignal(signal.SIGINT)  # SIG_IGN when started in the background
    thread = threading.Thread(target=lambda: result.update(stats=crawl(
        pairs, str(tmp_path / "out"), image_size=32, threads=2, allow_networks=LOOPBACK)))
    thread.start()
    thread.join(timeout=120)
    assert isinstance(result["stats"], CrawlStats) and result["stats"].success == 3
    assert signal.getsignal(signal.SIGINT) is before  # this process's handler is left alone


@pytest.fixture
def moto_s3(monkeypatch):
    """An S3 server on 127.0.0.1 for one test; the environment points boto at it."""
    from moto.server import ThreadedMotoServer
    from s3fs import S3FileSystem

    S3FileSystem.clear_instance_cache()  # a cached client would still point at an earlier test's server
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    for key, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                       "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": endpoint}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    try:
        yield endpoint
    finally:
        server.stop()
        S3FileSystem.clear_instance_cache()


@pytest.mark.slow
def test_s3_output(tmp_path, web, moto_s3):
    import fsspec

    fs = fsspec.filesystem("s3", endpoint_url=moto_s3, skip_instance_cache=True)
    bucket = f"corpus-{uuid.uuid4().hex[:8]}"  # moto's backend is shared by every server in the process
    fs.mkdir(bucket)
    urls = [web.url(f"/img/{i}.jpg") for i in range(5)] + [web.url("/missing/1")]
    pairs = write_pairs(tmp_path / "pairs.parquet", urls, [f"s3 {i}" for i in range(6)])
    fs.put(pairs, f"{bucket}/pairs.parquet")
    stats = crawl(f"s3://{bucket}/pairs.parquet", f"s3://{bucket}/shards", image_size=32, threads=2,
                  number_sample_per_shard=4, allow_networks=LOOPBACK, **UNLIMITED)
    assert (stats.success, stats.failed_to_download, stats.shards) == (5, 1, 2)
    fs.invalidate_cache()
    names = sorted(p.rsplit("/", 1)[-1] for p in fs.ls(f"{bucket}/shards"))
    assert {"00000.tar", "00001.tar", "00000_stats.json", "crawl_stats.json", "refused.parquet"} <= set(names)
    fs.get(f"{bucket}/shards/00000.tar", str(tmp_path / "local") + "/")
    fs.get(f"{bucket}/shards/00001.tar", str(tmp_path / "local") + "/")
    assert sorted(c for _, c, _ in read_tars(tmp_path / "local").values()) == [f"s3 {i}" for i in range(5)]
    hits = web.hits
    assert crawl(f"s3://{bucket}/pairs.parquet", f"s3://{bucket}/shards", image_size=32, threads=2,
                 number_sample_per_shard=4, allow_networks=LOOPBACK).fetched_this_run == 0
    assert web.hits == hits


def test_read_pairs_takes_a_folder_of_shards(tmp_path):
    """curate writes OUT/part-NNNNN.parquet: the crawl reads the folder in shard order."""
    from clip_core.crawl.safety import read_pairs

    folder = tmp_path / "curated"
    folder.mkdir()
    pq.write_table(pa.table({"url": ["http://127.0.0.1/b"], "caption": ["b"]}), folder / "part-00001.parquet")
    pq.write_table(pa.table({"url": ["http://127.0.0.1/a"], "caption": ["a"]}), folder / "part-00000.parquet")
    (folder / "curation_stats.json").write_text("{}")
    assert read_pairs(str(folder)).column("caption").to_pylist() == ["a", "b"]
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="empty: holds no Parquet files"):
        read_pairs(str(empty))
