"""Throughput of clip_core.extract on synthetic WAT files, with raw warcio as the anchor.

Generates --files gzipped WAT files of --pages pages each (a request and a response record
per page, as Common Crawl writes them). A page has about --links links: ~60% `<img>` with
a mix of relative, root-relative, protocol-relative, absolute and data: URLs and alts
that are captions, empty or missing (plus the site logo on every page, a duplicate), and
the rest `<a>` links and head metadata, so an envelope is ~3 KB (real Common Crawl
response envelopes are often larger, so real pairs/s per MB is lower than here).

In the same run it times: warcio iteration reading every payload (the I/O + gunzip
floor), the same plus json.loads (the parsing floor), then `extract` with each worker
count. Wall-clock rates depend on what else runs; CPU seconds (this process plus the pool's
workers) much less so, hence pairs per CPU-second beside pairs/s. Prints a Markdown table
and the JSON rows.

    .venv/bin/python bench/extract_bench.py [--files 20] [--pages 2000] [--links 20]
                                            [--workers 1,2] [--dir /tmp/extract_bench]
"""
import argparse
import json
import os
import random
import resource
import shutil
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor

from warcio.archiveiterator import ArchiveIterator
from warcio.warcwriter import WARCWriter

from clip_core.extract import extract, wat_envelope, write_warcinfo, write_wat_record

WORDS = ("dog cat red blue car house tree river mountain city street beach sunset portrait "
         "vintage modern wooden kitchen garden bicycle coffee cup table chair lamp window "
         "the a of in on with at old new small large happy family wedding").split()


def _caption(rng: random.Random) -> str | None:
    """A 3-8 word caption (70%), an empty alt (20%) or no alt attribute (10%)."""
    r = rng.random()
    if r < 0.2:
        return rng.choice(["", "  "])
    if r < 0.3:
        return None
    return " ".join(rng.choices(WORDS, k=rng.randint(3, 8)))


def _img_src(rng: random.Random, site: int) -> str:
    """An image URL in one of the forms pages use (the mix is a guess, not a measurement)."""
    k, r = rng.getrandbits(40), rng.random()
    if r < 0.35:
        return f"https://static{site % 13}.example/i/{k:x}.jpeg"
    if r < 0.55:
        return f"/media/{k:x}.png"
    if r < 0.70:
        return f"../img/{k:x}.jpg"
    if r < 0.75:
        return f"img/{k:x}.gif"
    if r < 0.85:
        return f"//cdn{site % 7}.example/{k:x}.webp"
    if r < 0.90:
        return f"https://img{site % 5}.example/resize?src={k:x}.jpg&w=300"
    return "data:image/gif;base64,R0lGODlhAQABAAAAACw="


def _page_envelope(rng: random.Random, site: int, i: int, n_links: int) -> tuple[str, dict]:
    """A page URL and a Common-Crawl-shaped response envelope for it."""
    url = f"https://site{site}.example/section/{i}/index.html"
    n_img = max(1, round(0.6 * n_links))
    links = [(_img_src(rng, site), _caption(rng)) for _ in range(n_img - 1)]
    links.append(("/logo.png", f"site {site} logo"))
    env = wat_envelope(url, links, title=f"page {i} of site {site}")
    html = env["Envelope"]["Payload-Metadata"]["HTTP-Response-Metadata"]["HTML-Metadata"]
    html["Links"] += [{"path": "A@/href", "url": f"/section/{rng.randint(0, 999)}/",
                       "text": " ".join(rng.choices(WORDS, k=3))} for _ in range(n_links - n_img)]
    html["Head"]["Metas"] = [{"name": n, "content": " ".join(rng.choices(WORDS, k=12))}
                             for n in ("description", "keywords", "og:title", "og:description")]
    html["Head"]["Scripts"] = [{"path": "SCRIPT@/src", "url": f"/js/app{j}.js"} for j in range(3)]
    return url, env


def write_bench_file(args: tuple[str, int, int, int]) -> str:
    """One WAT file of `pages` pages (seeded by its index); returns its path."""
    path, index, pages, n_links = args
    rng = random.Random(index)
    with open(path, "wb") as f:
        writer = WARCWriter(f, gzip=True)
        write_warcinfo(writer, os.path.basename(path))
        for i in range(pages):
            url, env = _page_envelope(rng, site=(index * pages + i) // 50, i=i, n_links=n_links)
            request = {"Envelope": {"WARC-Header-Metadata": {"WARC-Target-URI": url},
                                    "Payload-Metadata": {"HTTP-Request-Metadata": {}}}}
            write_wat_record(writer, url, request)
            write_wat_record(writer, url, env)
    return path


def _cpu_seconds() -> float:
    """CPU seconds of this process plus its reaped children (the pool's workers)."""
    child = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + child.ru_utime + child.ru_stime


def _timed(fn):
    """fn(), wall seconds, CPU seconds (the latter hardly moves when cores are shared)."""
    wall, cpu = time.perf_counter(), _cpu_seconds()
    out = fn()
    return out, time.perf_counter() - wall, _cpu_seconds() - cpu


def _iterate(paths: list[str], parse_json: bool) -> tuple[int, int]:
    """Records and payload bytes of plain warcio iteration (optionally + json.loads)."""
    records = nbytes = 0
    for path in paths:
        with open(path, "rb") as f:
            for record in ArchiveIterator(f):
                payload = record.raw_stream.read()
                records += 1
                nbytes += len(payload)
                if parse_json and record.rec_type == "metadata":
                    json.loads(payload)
    return records, nbytes


def warcio_floor(paths: list[str], parse_json: bool) -> dict:
    """The anchor rows: what reading (and parsing) the same files costs without extract."""
    (records, nbytes), wall, cpu = _timed(lambda: _iterate(paths, parse_json))
    return {"mode": "warcio + json.loads" if parse_json else "warcio iterate", "workers": 1,
            "seconds": wall, "cpu_s": cpu, "records_per_s": records / wall,
            "MB_per_s": nbytes / wall / 1e6, "pairs_per_s": None, "pairs_per_cpu_s": None}


def extract_run(paths: list[str], out: str, workers: int) -> dict:
    """One `extract` run: wall-clock rates and pairs per CPU-second."""
    stats, wall, cpu = _timed(lambda: extract(paths, out, workers=workers))
    t = stats.totals
    return {"mode": "extract", "workers": workers, "seconds": wall, "cpu_s": cpu,
            "records_per_s": t.records / wall, "MB_per_s": None,
            "pairs_per_s": stats.rows / wall, "pairs_per_cpu_s": stats.rows / cpu,
            "pairs": stats.rows, "img_links": t.img_links, "pages": t.pages}


def _fmt(v) -> str:
    return "-" if v is None else f"{v:,.1f}" if isinstance(v, float) else str(v)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--files", type=int, default=20)
    p.add_argument("--pages", type=int, default=2000)
    p.add_argument("--links", type=int, default=20)
    p.add_argument("--workers", default="1,2")
    p.add_argument("--dir", default=None, help="where to write the WAT files (default: a temp dir)")
    args = p.parse_args()
    root = args.dir or tempfile.mkdtemp(prefix="extract_bench_")
    os.makedirs(root, exist_ok=True)
    start = time.perf_counter()
    jobs = [(f"{root}/bench-{i:05d}.warc.wat.gz", i, args.pages, args.links)
            for i in range(args.files)]
    with ProcessPoolExecutor(os.cpu_count()) as pool:
        paths = list(pool.map(write_bench_file, jobs))
    size = sum(os.path.getsize(x) for x in paths)
    print(f"generated {args.files} files x {args.pages} pages ({size / 1e6:.1f} MB gz) "
          f"in {time.perf_counter() - start:.1f}s")
    rows = [warcio_floor(paths, False), warcio_floor(paths, True)]
    for w in (int(x) for x in args.workers.split(",")):
        rows.append(extract_run(paths, f"{root}/out-{w}", w))
    cols = ["mode", "workers", "seconds", "cpu_s", "records_per_s", "MB_per_s", "pairs_per_s",
            "pairs_per_cpu_s"]
    print("| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    for row in rows:
        print("| " + " | ".join(_fmt(row[c]) for c in cols) + " |")
    print(json.dumps(rows))
    if not args.dir:
        shutil.rmtree(root)


if __name__ == "__main__":
    main()
