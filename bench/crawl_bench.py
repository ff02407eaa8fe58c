"""Overhead of the crawl stage over a bare `img2dataset.download` on the same URLs.

A loopback image server runs in its own process; each variant downloads the same pairs
with the same options into a fresh folder, variants alternate, and the median of the
repeats is reported. The crawl's wall time includes validation, staging, the guard proxy
(when on) and the stats reduce. Goal: the stage adds at most 5%.

Besides wall time (noisy on a shared machine) it reports CPU seconds of this process and
its reaped children (img2dataset's workers; the server is not counted), and for crawl the
seconds spent outside `img2dataset.download` (validation, staging, stats).

    .venv/bin/python bench/crawl_bench.py [--images 3000] [--repeats 3]
"""
from __future__ import annotations

import argparse
import io
import multiprocessing
import os
import resource
import statistics
import tempfile
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image


def make_images(count: int, size: int = 320) -> list[bytes]:
    """Distinct noisy JPEGs (about 20 KB each), a web-like mix of aspect ratios."""
    rng = np.random.default_rng(0)
    images = []
    for i in range(count):
        w, h = (size, size * 3 // 4) if i % 2 else (size * 3 // 4, size)
        pixels = (rng.random((h, w, 3)) * 60 + rng.integers(0, 190, 3)).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, format="JPEG", quality=85)
        images.append(buf.getvalue())
    return images


def serve(port_queue, stop) -> None:
    """Serve /img/N.jpg (one of 64 JPEGs) and 404 elsewhere until `stop` is set."""
    images = make_images(64)

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            if not self.path.startswith("/img/"):
                self.send_error(404)
                return
            body = images[int(self.path.split("/")[-1].split(".")[0]) % len(images)]
            self.send_response(200)
            self.send_header("Content-Type", "image/jpeg")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    server.request_queue_size = 256
    port_queue.put(server.server_address[1])
    server.timeout = 0.2
    while not stop.is_set():
        server.handle_request()


def write_pairs(path: str, port: int, n: int) -> None:
    """n pairs; every 50th URL is a 404."""
    urls = [f"http://127.0.0.1:{port}/{'img' if i % 50 else 'missing'}/{i}.jpg" for i in range(n)]
    pq.write_table(pa.table({"url": urls, "caption": [f"a photo number {i}" for i in range(n)],
                             "uid": [f"{i:08d}" for i in range(n)]}), path)


def run_bare(pairs: str, out: str, opts: dict) -> None:
    """img2dataset alone, with the options crawl passes."""
    import img2dataset

    img2dataset.download(
        url_list=pairs, output_folder=out, input_format="parquet", output_format="webdataset",
        url_col="url", caption_col="caption", save_additional_columns=["uid"],
        image_size=opts["image_size"], resize_mode=opts["resize_mode"], processes_count=opts["processes"],
        thread_count=opts["threads"], number_sample_per_shard=opts["number_sample_per_shard"],
        timeout=10, retries=0, incremental_mode="incremental", encode_quality=95, enable_wandb=False)


def run_crawl(pairs: str, out: str, opts: dict, guard: bool) -> None:
    from clip_core.crawl import crawl

    crawl(pairs, out, allow_networks=["127.0.0.1/32"], guard=guard, **opts)


def cpu_seconds() -> float:
    """User + system time of this process and its waited-for children."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def timed_img2dataset(spent: list[float]):
    """Wrap crawl's img2dataset call to record the seconds spent inside it."""
    import clip_core.crawl.download as crawl_module

    inner = crawl_module.run_img2dataset

    def run(env, kwargs):
        start = time.perf_counter()
        try:
            inner(env, kwargs)
        finally:
            spent.append(time.perf_counter() - start)

    crawl_module.run_img2dataset = run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=3000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=16)
    args = parser.parse_args()
    opts = dict(image_size=256, resize_mode="center_crop", processes=1, threads=args.threads,
                number_sample_per_shard=1000)
    variants = {
        "img2dataset": lambda p, o: run_bare(p, o, opts),
        "crawl": lambda p, o: run_crawl(p, o, opts, guard=True),
        "crawl --no-guard": lambda p, o: run_crawl(p, o, opts, guard=False),
    }
    ctx = multiprocessing.get_context("spawn")
    ports, stop = ctx.Queue(), ctx.Event()
    server = ctx.Process(target=serve, args=(ports, stop), daemon=True)
    server.start()
    times: dict[str, list[float]] = {name: [] for name in variants}
    cpu: dict[str, list[float]] = {name: [] for name in variants}
    outside: dict[str, list[float]] = {name: [] for name in variants}
    inside: list[float] = []
    timed_img2dataset(inside)
    with tempfile.TemporaryDirectory(prefix="crawl-bench-") as tmp:
        os.environ["TMPDIR"] = tmp  # img2dataset's workers leave empty temp folders
        pairs = os.path.join(tmp, "pairs.parquet")
        write_pairs(pairs, ports.get(timeout=60), args.images)
        run_bare(pairs, os.path.join(tmp, "warmup"), dict(opts, threads=4))  # imports, page cache
        for rep in range(args.repeats):
            order = list(variants) if rep % 2 == 0 else list(reversed(variants))
            for name in order:
                start, start_cpu, calls = time.perf_counter(), cpu_seconds(), len(inside)
                variants[name](pairs, os.path.join(tmp, f"{name.replace(' ', '')}-{rep}"))
                times[name].append(time.perf_counter() - start)
                cpu[name].append(cpu_seconds() - start_cpu)
                outside[name].append(times[name][-1] - sum(inside[calls:]) if name != "img2dataset" else 0.0)
    stop.set()
    server.join(timeout=5)
    base = statistics.median(times["img2dataset"])
    print(f"\n{args.images} images (2% 404), processes=1, threads={args.threads}, "
          f"median of {args.repeats}, on {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}")
    base_cpu = statistics.median(cpu["img2dataset"])
    print(f"{'variant':<18} {'wall s':>7} {'images/s':>9} {'vs bare':>8} {'cpu s':>7} {'vs bare':>8} "
          f"{'outside s':>9}   wall runs")
    for name, runs in times.items():
        med, med_cpu = statistics.median(runs), statistics.median(cpu[name])
        print(f"{name:<18} {med:7.2f} {args.images / med:9.1f} {med / base:8.3f} {med_cpu:7.2f} "
              f"{med_cpu / base_cpu:8.3f} {statistics.median(outside[name]):9.3f}   "
              + " ".join(f"{t:.2f}" for t in runs))


if __name__ == "__main__":
    main()
