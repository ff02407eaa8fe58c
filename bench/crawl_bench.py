"""The crawl's cost over a bare `img2dataset.download`, and its per-host limit when it binds.

A loopback image server runs in its own process on several hosts (127.0.0.1 .. 127.0.0.N,
one port; Linux routes 127.0.0.0/8 to lo) and answers /robots.txt with allow-all, so the
crawl fetches robots.txt once per origin but is never refused. Two parts, both by default:

1. Overhead (issue 17 item 7, goal: at most 5% more wall time). The same URLs, spread
   round-robin over `--hosts` hosts, downloaded with the same options by: bare img2dataset;
   `crawl` with every manner on (robots.txt, guard proxy, User-Agent, deadline, size cap,
   per-host gate) and limits that cannot bind: per_host_concurrency = threads (no host can
   have more requests in flight than img2dataset has threads) and per_host_rps
   `--free-rps` (1000: a start every 1 ms per host, where the whole machine reaches some 250
   images/s, about 30 per host at 8 hosts); and `crawl --no-guard` (robots.txt only). Variants
   alternate, each into a fresh folder, and the median of the repeats is reported, in wall
   time and in CPU seconds of this process and its reaped children (img2dataset's workers and
   the guard's threads; the server is not counted). The seconds the gate made requests wait
   are measured, to show the limits did not bind.
2. Binding limit (goal: throughput = limit x hosts within 10%). `crawl` of `--binding-urls`
   URLs over `--binding-hosts` hosts at `--binding-rps` per host, 16 threads (the limit, not
   the threads, binds: 4 hosts x 2 slots = 8 requests in flight at most). images/s =
   fetched_this_run / fetch span, the span being the first image request's arrival to the last
   image answer's end at the server: img2dataset's start-up (spawn, sharding) and the crawl's
   robots.txt, staging and stats are left out and reported beside it.

    .venv/bin/python bench/crawl_bench.py [--images 3000] [--repeats 3] [--binding-urls 300]
"""
from __future__ import annotations

import argparse
import http.client
import io
import json
import math
import multiprocessing
import os
import resource
import statistics
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

ROBOTS = b"User-agent: *\nDisallow:\n"  # allow-all: fetched, never binding


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


def loopback_hosts(count: int) -> list[str]:
    """127.0.0.1 .. 127.0.0.count."""
    return [f"127.0.0.{i}" for i in range(1, count + 1)]


def loopback_network(count: int) -> str:
    """The smallest 127.0.0.0/P holding 127.0.0.1 .. 127.0.0.count: the crawl's allow list."""
    return f"127.0.0.0/{32 - math.ceil(math.log2(count + 1))}"


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 256


def _bind_all(hosts: list[str], handler) -> list[_Server]:
    """One server per host, all on one port (a free one on the first host, tried on the others)."""
    for _ in range(20):
        servers = [_Server((hosts[0], 0), handler)]
        try:
            servers += [_Server((host, servers[0].server_address[1]), handler) for host in hosts[1:]]
            return servers
        except OSError:
            for server in servers:
                server.server_close()
    raise RuntimeError(f"no port free on all of {hosts}")


def serve(hosts: list[str], port_queue, stop) -> None:
    """Serve /robots.txt (allow-all), /img/N.jpg (one of 64 JPEGs), 404 elsewhere, on every host.

    Every request is logged as (host, kind, arrival, end) in monotonic seconds; GET /_log
    answers the log as JSON and clears it."""
    images = make_images(64)
    log, lock = [], threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            arrival = time.monotonic()
            if self.path == "/_log":
                with lock:
                    body, log[:] = json.dumps(log).encode(), []
                return self._send(body, "application/json")
            if self.path == "/robots.txt":
                kind = "robots"
                self._send(ROBOTS, "text/plain")
            elif self.path.startswith("/img/"):
                kind = "image"
                self._send(images[int(self.path.split("/")[-1].split(".")[0]) % len(images)], "image/jpeg")
            else:
                kind = "missing"
                self.send_error(404)
            with lock:
                log.append((self.server.server_address[0], kind, arrival, time.monotonic()))

        def _send(self, body: bytes, content_type: str) -> None:
            self.send_response(200)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    servers = _bind_all(hosts, Handler)
    for server in servers:
        threading.Thread(target=server.serve_forever, args=(0.2,), daemon=True).start()
    port_queue.put(servers[0].server_address[1])
    stop.wait()
    for server in servers:
        server.shutdown()
        server.server_close()


def take_log(port: int) -> list[tuple[str, str, float, float]]:
    """The server's request log since the last call (direct, never through a proxy)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("GET", "/_log")
        return [tuple(r) for r in json.loads(conn.getresponse().read())]
    finally:
        conn.close()


def write_pairs(path: str, port: int, n: int, hosts: list[str], missing_every: int = 50) -> str:
    """n pairs over `hosts` round-robin; every `missing_every`-th URL is a 404 (0: none)."""
    urls = [f"http://{hosts[i % len(hosts)]}:{port}/"
            f"{'missing' if missing_every and i % missing_every == 0 else 'img'}/{i}.jpg" for i in range(n)]
    pq.write_table(pa.table({"url": urls, "caption": [f"a photo number {i}" for i in range(n)],
                             "uid": [f"{i:08d}" for i in range(n)]}), path)
    return path


def download_options(threads: int) -> dict:
    """What every variant downloads with: 256 px centre crops, one process, 1000 samples per shard."""
    return {"image_size": 256, "resize_mode": "center_crop", "processes": 1, "threads": threads,
            "number_sample_per_shard": 1000}


def run_bare(pairs: str, out: str, opts: dict) -> None:
    """img2dataset alone, with the options crawl passes."""
    import img2dataset

    img2dataset.download(
        url_list=pairs, output_folder=out, input_format="parquet", output_format="webdataset",
        url_col="url", caption_col="caption", save_additional_columns=["uid"],
        image_size=opts["image_size"], resize_mode=opts["resize_mode"], processes_count=opts["processes"],
        thread_count=opts["threads"], number_sample_per_shard=opts["number_sample_per_shard"],
        timeout=10, retries=0, incremental_mode="incremental", encode_quality=95, enable_wandb=False)


def run_crawl(pairs: str, out: str, opts: dict, network: str, **manners):
    """The crawl stage with `manners` (guard, per_host_rps, ...); its CrawlStats."""
    from clip_core.crawl import crawl

    return crawl(pairs, out, allow_networks=[network], **opts, **manners)


def cpu_seconds() -> float:
    """User + system time of this process and its waited-for children."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def timed_img2dataset(spent: list[float]) -> None:
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


def timed_gate(waits: list[float]) -> None:
    """Wrap the guard's per-host gate to record how long each request waited for its host's turn."""
    from clip_core.crawl.politeness import HostGate

    inner = HostGate.enter

    def enter(self, host, *args, **kwargs):
        waited = inner(self, host, *args, **kwargs)
        if waited is not None:
            waits.append(waited)
        return waited

    HostGate.enter = enter


def overhead(args, port: int, tmp: str, inside: list[float], waits: list[float]) -> None:
    """Part 1: bare img2dataset, crawl with non-binding limits, crawl --no-guard; medians and ratios."""
    hosts, network = loopback_hosts(args.hosts), loopback_network(args.hosts)
    opts = download_options(args.threads)
    free = {"per_host_rps": args.free_rps, "per_host_concurrency": args.threads}
    variants = {
        "img2dataset": lambda p, o: run_bare(p, o, opts),
        "crawl": lambda p, o: run_crawl(p, o, opts, network, guard=True, **free),
        "crawl --no-guard": lambda p, o: run_crawl(p, o, opts, network, guard=False),
    }
    times: dict[str, list[float]] = {name: [] for name in variants}
    cpu: dict[str, list[float]] = {name: [] for name in variants}
    outside: dict[str, list[float]] = {name: [] for name in variants}
    robots: dict[str, list[int]] = {name: [] for name in variants}
    gate: list[tuple[int, float, float]] = []  # per crawl run: requests gated, seconds waited, longest wait
    pairs = write_pairs(os.path.join(tmp, "pairs.parquet"), port, args.images, hosts)
    run_bare(pairs, os.path.join(tmp, "warmup"), dict(opts, threads=4))  # imports, page cache
    for rep in range(args.repeats):
        order = list(variants) if rep % 2 == 0 else list(reversed(variants))
        for name in order:
            take_log(port)
            start, start_cpu, calls, gated = time.perf_counter(), cpu_seconds(), len(inside), len(waits)
            variants[name](pairs, os.path.join(tmp, f"{name.replace(' ', '')}-{rep}"))
            times[name].append(time.perf_counter() - start)
            cpu[name].append(cpu_seconds() - start_cpu)
            outside[name].append(times[name][-1] - sum(inside[calls:]) if name != "img2dataset" else 0.0)
            robots[name].append(sum(kind == "robots" for _, kind, _, _ in take_log(port)))
            if name == "crawl":
                gate.append((len(waits) - gated, sum(waits[gated:]), max(waits[gated:], default=0.0)))
    base, base_cpu = statistics.median(times["img2dataset"]), statistics.median(cpu["img2dataset"])
    print(f"\n== overhead: {args.images} images (2% 404) over {args.hosts} hosts (allow {network}), processes=1, "
          f"threads={args.threads}, median of {args.repeats}, on {os.cpu_count()} cores, "
          f"load average {os.getloadavg()[0]:.1f}")
    print(f"crawl: manners on, per_host_rps={args.free_rps:g}, per_host_concurrency={args.threads} (= threads)")
    print(f"{'variant':<18} {'wall s':>7} {'images/s':>9} {'vs bare':>8} {'cpu s':>7} {'vs bare':>8} "
          f"{'outside s':>9} {'robots':>6}   wall runs")
    for name, runs in times.items():
        med, med_cpu = statistics.median(runs), statistics.median(cpu[name])
        print(f"{name:<18} {med:7.2f} {args.images / med:9.1f} {med / base:8.3f} {med_cpu:7.2f} "
              f"{med_cpu / base_cpu:8.3f} {statistics.median(outside[name]):9.3f} {max(robots[name]):6d}   "
              + " ".join(f"{t:.2f}" for t in runs))
    print("gate (crawl, per run: requests, seconds waited in all, longest wait): "
          + "; ".join(f"{n}, {total:.3f} s, {longest * 1000:.1f} ms" for n, total, longest in gate))
    print("robots = most robots.txt requests the server saw in one run (one per origin expected for crawl); "
          "outside = crawl's seconds outside img2dataset (checks, robots.txt, staging, stats)")


def binding(args, port: int, tmp: str, inside: list[float]) -> None:
    """Part 2: crawl with a per-host limit that binds; images/s over the fetch span against limit x hosts."""
    hosts, network = loopback_hosts(args.binding_hosts), loopback_network(args.binding_hosts)
    opts = download_options(args.threads)
    limit = args.binding_rps * args.binding_hosts
    pairs = write_pairs(os.path.join(tmp, "binding.parquet"), port, args.binding_urls, hosts, missing_every=0)
    print(f"\n== binding: {args.binding_urls} URLs over {args.binding_hosts} hosts (allow {network}), "
          f"per_host_rps={args.binding_rps:g}, per_host_concurrency={args.binding_concurrency}, processes=1, "
          f"threads={args.threads}; limit x hosts = {limit:g} images/s; load average {os.getloadavg()[0]:.1f}")
    print(f"{'run':>3} {'fetched':>7} {'span s':>7} {'images/s':>8} {'vs limit':>8} {'steady/s':>8} "
          f"{'vs limit':>8} {'per host/s':>11} {'i2d s':>6} {'i2d-span':>8} {'wall s':>7} {'stats/s':>7}")
    ratios = []
    for rep in range(args.binding_repeats):
        take_log(port)
        start, calls = time.perf_counter(), len(inside)
        stats = run_crawl(pairs, os.path.join(tmp, f"binding-{rep}"), opts, network, guard=True,
                          per_host_rps=args.binding_rps, per_host_concurrency=args.binding_concurrency)
        wall = time.perf_counter() - start
        images = [r for r in take_log(port) if r[1] != "robots"]
        span = max(r[3] for r in images) - min(r[2] for r in images)
        per_host = []
        for host in hosts:
            arrivals = sorted(r[2] for r in images if r[0] == host)
            if len(arrivals) > 1:
                per_host.append((len(arrivals) - 1) / (arrivals[-1] - arrivals[0]))
        rate, steady, in_i2d = stats.fetched_this_run / span, sum(per_host), sum(inside[calls:])
        ratios.append(rate / limit)
        print(f"{rep:>3} {stats.fetched_this_run:>7} {span:7.2f} {rate:8.2f} {rate / limit:8.3f} {steady:8.2f} "
              f"{steady / limit:8.3f} {min(per_host):5.2f}-{max(per_host):5.2f} {in_i2d:6.2f} {in_i2d - span:8.2f} "
              f"{wall:7.2f} {stats.images_per_second:7.2f}")
        if stats.fetched_this_run != len(images):
            print(f"    note: the server saw {len(images)} image requests, the crawl fetched {stats.fetched_this_run}")
    print(f"images/s = fetched_this_run / span (first image request's arrival to last answer's end at the server); "
          f"steady = sum over hosts of (requests - 1) / (last - first arrival), the gate's spacing without the "
          f"fencepost; i2d = seconds inside img2dataset, i2d-span its start-up and wind-down; wall = whole crawl; "
          f"stats/s = crawl_stats images_per_second (fetched / wall). images/s vs limit: median "
          f"{statistics.median(ratios):.3f} (goal 0.9-1.1)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=3000, help="URLs in the overhead part")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=16)
    parser.add_argument("--hosts", type=int, default=8, help="loopback hosts in the overhead part")
    parser.add_argument("--free-rps", type=float, default=1000.0, help="per_host_rps in the overhead part")
    parser.add_argument("--binding-urls", type=int, default=300, help="URLs in the binding part; 0 skips it")
    parser.add_argument("--binding-hosts", type=int, default=4)
    parser.add_argument("--binding-rps", type=float, default=5.0)
    parser.add_argument("--binding-concurrency", type=int, default=2)
    parser.add_argument("--binding-repeats", type=int, default=1)
    parser.add_argument("--skip-overhead", action="store_true", help="run the binding part only")
    args = parser.parse_args()
    for name in ("hosts", "binding_hosts"):
        if not 1 <= getattr(args, name) <= 254:
            parser.error(f"--{name.replace('_', '-')} must be 1..254")
    ctx = multiprocessing.get_context("spawn")
    ports, stop = ctx.Queue(), ctx.Event()
    server = ctx.Process(target=serve, args=(loopback_hosts(max(args.hosts, args.binding_hosts)), ports, stop),
                         daemon=True)
    server.start()
    inside: list[float] = []
    waits: list[float] = []
    timed_img2dataset(inside)
    timed_gate(waits)
    try:
        with tempfile.TemporaryDirectory(prefix="crawl-bench-") as tmp:
            os.environ["TMPDIR"] = tmp  # img2dataset's workers leave empty temp folders
            port = ports.get(timeout=60)
            if not args.skip_overhead:
                overhead(args, port, tmp, inside, waits)
            if args.binding_urls:
                binding(args, port, tmp, inside)
    finally:
        stop.set()
        server.join(timeout=5)


if __name__ == "__main__":
    main()
