"""The synthetic web: determinism, labels vs pixels, failures, eval layout, planted copies, serving."""
import io
import socket
import struct
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image
from scipy import ndimage

from flows.common import free_port
from synthweb import concepts as C
from synthweb.captions import plural
from synthweb.render import render_scene
from synthweb.scenes import eval_table, load_digit_bank, row, web_table
from synthweb.generator import generate_web
from synthweb.app import SyntheticWeb
from synthweb.server import loopback_host, serve_web, serve_web_process
from synthweb.spec import FATES, WebSpec, load_spec
from clip_core.data.webdataset import list_shards, read_samples, write_shards

N_PAIRS = 3000
FAILURES = {f: 0.02 for f in FATES[1:]}


def _generate(path, port, **kw):
    return generate_web(str(path), n_pairs=N_PAIRS, seed=7, base_url=f"http://127.0.0.1:{port}",
                        image_size=64, failure_rates=FAILURES, eval_sizes=48, planted_rate=0.03,
                        slow_seconds=0.05, timeout_seconds=2.0, bomb_size=30000, **kw)


@pytest.fixture(scope="module")
def web(tmp_path_factory):
    port = free_port()
    root = _generate(tmp_path_factory.mktemp("web"), port)
    return {"root": root, "port": port, "app": SyntheticWeb.from_root(root),
            "pairs": pq.read_table(f"{root}/pairs.parquet").to_pylist(),
            "truth": pq.read_table(f"{root}/truth.parquet").to_pylist(),
            "planted": pq.read_table(f"{root}/eval/planted.parquet").to_pylist()}


def _path(url: str) -> str:
    return "/" + url.split("/", 3)[3]


def _by_fate(web, fate):
    return [(p, t) for p, t in zip(web["pairs"], web["truth"]) if t["fate"] == fate]


def _small(data_or_image, size=32) -> np.ndarray:
    image = data_or_image if isinstance(data_or_image, Image.Image) else Image.open(io.BytesIO(data_or_image))
    return np.asarray(image.convert("RGB").resize((size, size), Image.BOX), np.float32)


def _centred(data: bytes, size: int = 32) -> np.ndarray:
    """size x size pixels minus their per-channel mean (a global colour shift cancels)."""
    pixels = _small(data, size)
    return pixels - pixels.mean((0, 1))


def test_same_seed_same_web(web, tmp_path):
    again = _generate(tmp_path / "again", web["port"])
    for name in ("pairs.parquet", "truth.parquet", "eval/planted.parquet"):
        assert pq.read_table(f"{again}/{name}").equals(pq.read_table(f"{web['root']}/{name}"))
    for split in ("test", "train"):
        old, new = (open(f"{r}/eval/digits/{split}/000000.tar", "rb").read() for r in (web["root"], again))
        assert old == new
    app = SyntheticWeb.from_root(again)
    for uid in (0, 11, 2999):
        assert app.image(uid, "x.jpg") == web["app"].image(uid, "x.jpg")
        assert app.image(uid, "x.png") == web["app"].image(uid, "x.png")


def test_other_seed_other_web(web, tmp_path):
    other = generate_web(str(tmp_path / "other"), n_pairs=200, seed=8, eval_sizes=0)
    captions = [r["caption"] for r in pq.read_table(f"{other}/pairs.parquet").to_pylist()]
    assert captions != [p["caption"] for p in web["pairs"][:200]]


def test_pairs_schema_and_urls(web):
    spec = load_spec(web["root"])
    assert spec.n_pairs == N_PAIRS and spec.seed == 7
    assert [p["uid"] for p in web["pairs"]] == list(range(N_PAIRS))
    for p, t in zip(web["pairs"][:50], web["truth"]):
        assert p["url"].startswith(f"http://127.0.0.1:{web['port']}/s/site")
        assert p["url"].endswith(f"/{p['uid']}/{t['filename']}")


def test_vectorised_table_matches_single_uid():
    spec, bank = WebSpec(n_pairs=5000, seed=3, planted_rate=0.05), load_digit_bank()
    uids = np.arange(5000)
    full = web_table(spec, uids, bank)
    for uid in (0, 1, 77, 4999):
        one = web_table(spec, [uid], bank)
        assert {k: v[0] for k, v in one.items()} == {k: v[uid] for k, v in full.items()}


def test_responses_drawn_by_block_are_the_single_uid_responses(web):
    """The server draws rows 1024 uids at a time; every answer must be the one uid's own."""
    app, by_uid = web["app"], {p["uid"]: p for p in web["pairs"]}
    for uid in (0, 1023, 1024, 2047, 2048, N_PAIRS - 1):  # both sides of the block edges
        path = _path(by_uid[uid]["url"])
        scene = row(web_table(app.spec, [uid], app.bank), 0)  # drawn alone
        fate, got = FATES[scene["fate"]], app.respond(path)
        if fate in ("404", "500") or fate.startswith("redirect"):
            assert got.status == int(fate[-3:])
        else:
            want = app._body_response(fate, uid, path.rsplit("/", 1)[1], scene)
            assert (got.status, got.body, got.content_type) == (want.status, want.body, want.content_type)


def test_shapes_match_their_labels():
    bank = load_digit_bank()
    table = eval_table(1, "counts", "test", np.arange(60), bank, 128)
    for i in range(60):
        scene = row(table, i)
        scene["background"], scene["shape"] = 0, i % 8  # solid background: fg pixels are exact
        image, meta = render_scene(scene, bank)
        pixels = np.asarray(image, np.int16)
        fg = np.asarray(C.COLORS[scene["color"]][1])
        mask = np.abs(pixels - fg).sum(-1) < 30
        labels, n = ndimage.label(mask)
        blobs = (np.bincount(labels.ravel())[1:] >= 8).sum()  # polygon tips can leave lone pixels
        assert blobs == scene["count"] == len(meta["objects"])
        for cx, cy, _ in meta["objects"]:
            assert mask[int(cy), int(cx)], "an object's centre has its colour"


def test_dominant_colour_is_the_label():
    bank = load_digit_bank()
    table = eval_table(2, "colors", "test", np.arange(36), bank, 64)
    palette = np.asarray([rgb for _, rgb in C.COLORS], np.float32)
    for i in range(36):
        scene = row(table, i)
        pixels = np.asarray(render_scene(scene, bank)[0], np.float32).reshape(-1, 1, 3)
        counts = (np.abs(pixels - palette).sum(-1) < 40).sum(0)  # pixels of each named colour
        assert counts.argmax() == scene["color"] == scene["label"] and counts.max() > 50


def test_digit_bank_is_sklearns_digits():
    from sklearn.datasets import load_digits

    bank, digits = load_digit_bank(), load_digits()
    assert np.array_equal(bank.images, digits.images) and np.array_equal(bank.target, digits.target)


def test_digits_and_words_labels():
    bank = load_digit_bank()
    digits = eval_table(0, "digits", "train", np.arange(30), bank, 64)
    assert (bank.target[digits["digit_sample"]] == digits["digit"]).all()
    assert (digits["digit"] == np.arange(30) % 10).all()
    words = eval_table(0, "words", "test", np.arange(30), bank, 64)
    assert (words["kind"] == 2).all() and (words["word"] == np.arange(30) % len(C.WORDS)).all()
    image, meta = render_scene(row(words, 3), bank)
    assert (np.abs(np.asarray(image, np.int16) - meta["fg"]).sum(-1) < 30).sum() > 50  # ink was drawn


def test_captions_are_web_like(web):
    by_kind = {}
    for p, t in zip(web["pairs"], web["truth"]):
        by_kind.setdefault(t["caption_kind"], []).append((p, t))
    assert set(by_kind) == {"describe", "misspelled", "filename", "spam", "empty", "long", "foreign", "mismatch"}
    assert all(p["caption"] == "" for p, _ in by_kind["empty"])
    assert all(p["caption"] == t["filename"] for p, t in by_kind["filename"])
    assert all(len(p["caption"].encode()) > 1500 for p, _ in by_kind["long"])
    assert all(p["caption"].startswith("best cheap") for p, _ in by_kind["spam"])
    for p, t in by_kind["describe"]:
        if t["kind"] == "shapes":
            text = p["caption"].lower()
            assert any(w in text for w in C.COLOR_SYNONYMS[t["color"]]), p["caption"]
            assert any(w in text for w in C.SHAPE_SYNONYMS[t["shape"]] + (plural(t["shape"], 2),)), p["caption"]


def test_duplicates_render_alike(web):
    app = web["app"]
    exact = [t for t in web["truth"] if t["content"] == "exact_dup"][:5]
    near = [t for t in web["truth"] if t["content"] == "near_dup"][:5]
    assert exact and near
    for t in exact:
        assert np.array_equal(np.asarray(app.render(t["uid"])[0]), np.asarray(app.render(t["src_uid"])[0]))
    for t in near:
        a, b = (np.asarray(app.render(u)[0], np.float32) for u in (t["uid"], t["src_uid"]))
        assert a.shape == b.shape and 0 < np.abs(a - b).mean() < 25


def test_failures_behave(web):
    app = web["app"]
    respond = lambda fate: app.respond(_path(_by_fate(web, fate)[0][0]["url"]), "127.0.0.1:1")  # noqa: E731
    assert respond("404").status == 404 and respond("500").status == 500
    assert respond("ok").status == 200 and respond("ok").content_type.startswith("image/")
    for fate in ("redirect301", "redirect302"):
        r = respond(fate)
        assert r.status == int(fate[-3:])
        target = dict(r.headers)["Location"]
        assert target.startswith("http://127.0.0.1:1/img/")
        landed = app.respond(_path(target), "127.0.0.1:1")
        Image.open(io.BytesIO(landed.body)).load()
    assert dict(respond("noai").headers)["X-Robots-Tag"].startswith("noai")
    assert respond("slow").delay == 0.05 and respond("timeout").delay == 2.0
    html = respond("html")
    assert html.content_type == "image/jpeg" and html.body.lstrip().startswith(b"<")
    for fate in ("truncated", "corrupt", "html"):
        with pytest.raises(OSError):
            Image.open(io.BytesIO(respond(fate).body)).load()


def test_bomb_declares_huge_size(web):
    body = web["app"].respond(_path(_by_fate(web, "bomb")[0][0]["url"]), "127.0.0.1:1").body
    assert body[:8] == b"\x89PNG\r\n\x1a\n" and body[12:16] == b"IHDR"
    assert struct.unpack(">II", body[16:24]) == (30000, 30000)
    assert len(body) < 200_000
    with pytest.raises(Image.DecompressionBombError):
        Image.open(io.BytesIO(body))


def test_unknown_paths_are_404(web):
    app, url = web["app"], web["pairs"][5]["url"]
    for path in ("/nope", _path(url) + "x", _path(url).replace("/5/", "/6/"), f"/s/site0000/{N_PAIRS}/a.jpg",
                 "/s/site0001/page0.html", f"/s/site0000/page{10 ** 6}.html"):
        assert app.respond(path, "127.0.0.1:1").status == 404, path


def test_eval_layout(web):
    root = web["root"]
    for name in ("shapes", "colors", "counts", "digits", "words"):
        classnames = open(f"{root}/eval/{name}/classnames.txt").read().splitlines()
        templates = open(f"{root}/eval/{name}/templates.txt").read().splitlines()
        assert templates and all("{c}" in t for t in templates)
        for split in ("test", "train"):
            samples = list(read_samples(f"{root}/eval/{name}/{split}"))
            assert len(samples) == 48 and {"__key__", "jpg", "cls"} == set(samples[0])
            assert max(s["cls"] for s in samples) + 1 == len(classnames)
            assert Image.open(io.BytesIO(samples[0]["jpg"])).size == (64, 64)


def test_eval_shards_read_with_webdataset(web):
    import webdataset as wds

    shards = list_shards(f"{web['root']}/eval/digits/test")
    samples = list(wds.WebDataset(shards, shardshuffle=False))
    assert len(samples) == 48 and int(samples[13]["cls"]) == 3


def test_retrieval_set_has_captions(web):
    samples = list(read_samples(f"{web['root']}/eval/retrieval/test"))
    assert len(samples) == 48
    for s in samples[:5]:
        lines = s["txt"].splitlines()
        assert len(lines) == 5 and lines == s["json"]["captions"]


def test_planted_copies_match_their_source(web):
    root, app = web["root"], web["app"]
    planted = web["planted"]
    assert len(planted) >= 20 and {p["transform"] for p in planted} == {"jpeg", "rescale", "crop", "color"}
    truth = {t["uid"]: t for t in web["truth"]}
    splits = {}
    for p in planted:
        assert truth[p["uid"]]["content"] == "planted" and truth[p["uid"]]["fate"] == "ok"
        assert truth[p["uid"]]["eval_set"] == p["eval_set"] and web["pairs"][p["uid"]]["url"] == p["url"]
        key = (p["eval_set"], p["split"])
        if key not in splits:
            jpgs = [s["jpg"] for s in read_samples(f"{root}/eval/{key[0]}/{key[1]}")]
            splits[key] = (jpgs, np.stack([_centred(j, 8) for j in jpgs]))
        jpgs, thumbs = splits[key]
        copy = app.respond(_path(p["url"]), "127.0.0.1:1").body
        if p["transform"] != "crop":  # a crop moves content; it is checked by nearest neighbour only
            assert np.abs(_centred(jpgs[p["eval_index"]]) - _centred(copy)).mean() < 8, p
        distances = np.abs(thumbs - _centred(copy, 8)).mean((1, 2, 3))
        assert int(np.argmin(distances)) == p["eval_index"], p


def _can_bind(host: str) -> bool:
    try:
        with socket.socket() as s:
            s.bind((host, 0))
        return True
    except OSError:  # 127.0.0.2 is not configured everywhere (macOS)
        return False


def test_serving_over_loopback(web):
    pairs = web["pairs"]
    ok = _by_fate(web, "ok")[0][0]
    redirect = _by_fate(web, "redirect301")[0][0]
    extra = ["127.0.0.2"] if _can_bind("127.0.0.2") else []
    with serve_web(web["root"], port=web["port"], extra_hosts=extra) as server:
        assert server.url == f"http://127.0.0.1:{web['port']}" and server.requests == 0
        with urllib.request.urlopen(ok["url"], timeout=10) as r:
            assert r.status == 200
            Image.open(io.BytesIO(r.read())).load()
        with urllib.request.urlopen(redirect["url"], timeout=10) as r:
            assert "/img/" in r.geturl()
            Image.open(io.BytesIO(r.read())).load()
        page = urllib.request.urlopen(f"{server.urls[-1]}/s/site0000/page0.html", timeout=10).read().decode()
        assert page.count("<img ") == 20 and pairs[0]["url"] in page
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(_by_fate(web, "404")[0][0]["url"], timeout=10)
        assert err.value.code == 404
        assert server.requests == 5 and server.status_counts()[301] == 1


def test_web_served_from_a_child_process(web):
    ok = _by_fate(web, "ok")[0]
    with serve_web_process(web["root"], port=web["port"]):
        with urllib.request.urlopen(ok[0]["url"], timeout=10) as r:
            served = r.read()
    assert served == web["app"].image(ok[0]["uid"], _path(ok[0]["url"]).rsplit("/", 1)[1])[0]
    with pytest.raises(OSError):  # the child is gone with the block: nothing listens any more
        urllib.request.urlopen(ok[0]["url"], timeout=2)


def test_a_web_process_that_cannot_start_says_so(web):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(RuntimeError, match="did not start"):
            with serve_web_process(web["root"], port=port):
                pass


def test_shutdown_does_not_wait_for_slow_responses(web):
    url = _by_fate(web, "timeout")[0][0]["url"]
    server = serve_web(web["root"], port=web["port"])
    with pytest.raises(OSError):  # socket timeout: slower than the client waits
        urllib.request.urlopen(url, timeout=0.3)
    start = time.monotonic()
    server.shutdown()
    assert time.monotonic() - start < 1.5


@pytest.mark.parametrize("host", ["0.0.0.0", "10.0.0.1", "192.168.1.2", "::", "example.invalid", "8.8.8.8"])
def test_refuses_non_loopback_hosts(web, host):
    with pytest.raises(ValueError):
        serve_web(web["root"], host=host)
    with pytest.raises(ValueError):
        serve_web(web["root"], extra_hosts=[host])


def test_loopback_hosts_accepted():
    assert loopback_host("127.0.0.2") == "127.0.0.2" and loopback_host("localhost") == "127.0.0.1"
    assert loopback_host("::1") == "::1"


def test_request_counter_is_thread_safe(web):
    url = f"http://127.0.0.1:{web['port']}/robots.txt"
    with serve_web(web["root"], port=web["port"]) as server:
        fetch = lambda: [urllib.request.urlopen(url, timeout=10).read() for _ in range(10)]  # noqa: E731
        threads = [threading.Thread(target=fetch) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert server.requests == 40


def test_webdataset_io_round_trip(tmp_path):
    samples = [{"__key__": f"{i:04d}", "jpg": bytes([i]) * 10, "cls": i % 3, "txt": f"caption {i}",
                "json": {"i": i}} for i in range(25)]
    paths = write_shards(str(tmp_path / "shards"), samples, maxcount=10)
    assert [p.rsplit("/", 1)[1] for p in paths] == ["000000.tar", "000001.tar", "000002.tar"]
    assert sorted(p.name for p in (tmp_path / "shards").iterdir()) == ["000000.tar", "000001.tar", "000002.tar"]
    assert list(read_samples(str(tmp_path / "shards"))) == samples


def test_generate_through_fsspec_memory():
    root = generate_web("memory://synthweb", n_pairs=100, eval_sizes={"shapes": {"test": 10}}, planted_rate=0.2)
    assert SyntheticWeb.from_root(root).spec.n_pairs == 100
    assert len(list(read_samples(f"{root}/eval/shapes/test"))) == 10


@pytest.mark.slow
def test_100k_pairs_generate_in_seconds(tmp_path):
    start = time.monotonic()
    generate_web(str(tmp_path / "big"), n_pairs=100_000, eval_sizes=0)
    assert time.monotonic() - start < 30
    assert pq.read_metadata(tmp_path / "big" / "pairs.parquet").num_rows == 100_000


def test_run_web_server_stops_on_sigterm(web):
    import signal
    import subprocess
    import sys

    code = f"from synthweb.server import run_web_server; run_web_server({web['root']!r})"
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert "serving the synthetic web" in proc.stdout.readline()  # on the base_url's port
        assert urllib.request.urlopen(f"http://127.0.0.1:{web['port']}/robots.txt", timeout=10).status == 200
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
