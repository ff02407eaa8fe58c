"""The crawl's manners, counted from the synthetic web's own request log (issue 17).

Five loopback hosts serve the same synthetic web, each with its own rules (synthweb.hosts):
A disallows one site in robots.txt for every agent and drips one image a byte a second, B asks
for a Crawl-delay in a group naming our product token, C has no rules (our per-host rate binds),
D answers its first image request 429 with Retry-After, E's robots.txt answers 503.
"""
import threading
import time
from urllib.parse import urlsplit

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from clip_core.crawl import CrawlStats, crawl
from clip_core.crawl.polite import GIVEN_UP
from clip_core.crawl.politeness import DEFAULT_USER_AGENT, HostGate, Politeness, retry_after_seconds
from clip_core.crawl.robots import RobotsEntry
from clip_core.errors import InputError
from flows.cli import main
from synthweb.app import SyntheticWeb
from synthweb.generator import generate_web
from synthweb.hosts import HostRules
from synthweb.server import serve_web

A, B, C, D, E = (f"127.0.0.{i}" for i in range(1, 6))
NETWORK = ["127.0.0.0/29"]
RPS = 4.0
ON_A = slice(16, 24)  # the pairs on host A: half on the site its robots.txt disallows, half on another
UA = DEFAULT_USER_AGENT


@pytest.fixture(scope="module")
def web(tmp_path_factory):
    root = generate_web(str(tmp_path_factory.mktemp("web")), n_pairs=60, seed=7, image_size=48,
                        failure_rates={}, eval_sizes=0)  # every pair "ok"
    app = SyntheticWeb.from_root(root)
    return root, ["/" + app.pair(uid)["url"].split("/", 3)[3] for uid in range(60)]


def _site(path: str) -> str:
    return path.split("/")[2]


def _rules(paths):
    """(the site A's robots.txt disallows, rules per host); A drips its first allowed image of ON_A."""
    blocked = _site(paths[ON_A][0])
    dripped = next(p for p in paths[ON_A] if _site(p) != blocked)
    return blocked, {
        A: HostRules(robots=f"User-agent: *\nDisallow: /s/{blocked}/\n", drip_paths=f"^{dripped}$",
                     drip_interval=1.0),
        B: HostRules(robots="User-agent: clip-pipeline-crawler\nCrawl-delay: 0.5\n\nUser-agent: *\nDisallow: /\n"),
        D: HostRules(throttle_first=1, retry_after=1.0),
        E: HostRules(robots_status=503),
    }


def _pairs(tmp_path, port, hosts_paths):
    urls = [f"http://{host}:{port}{path}" for host, paths in hosts_paths for path in paths]
    path = tmp_path / "pairs.parquet"
    pq.write_table(pa.table({"url": urls, "caption": [f"c{i}" for i in range(len(urls))]}), path)
    return str(path), urls


def _gaps(times):
    times = sorted(times)
    return [b - a for a, b in zip(times, times[1:])]


@pytest.mark.slow
def test_the_crawl_keeps_robots_rates_pauses_and_deadlines(tmp_path, web):
    root, paths = web
    blocked, rules = _rules(paths)
    with serve_web(root, host=A, extra_hosts=(B, C, D, E), rules=rules) as server:
        layout = [(A, paths[ON_A]), (B, paths[8:12]), (C, paths[30:42]), (D, paths[24:27]), (E, paths[27:30])]
        pairs, urls = _pairs(tmp_path, server.port, layout)
        on_a_blocked = [u for u in urls[:8] if _site(urlsplit(u).path) == blocked]
        stats = crawl(pairs, str(tmp_path / "out"), image_size=32, threads=8, number_sample_per_shard=100,
                      allow_networks=NETWORK, timeout=3, per_host_rps=RPS, per_host_concurrency=2)
        log = server.request_log()

    by_host = {h: [r for r in log if r.host == h] for h in (A, B, C, D, E)}
    # Every request, robots.txt included, says who we are.
    assert log and {r.user_agent for r in log} == {UA}
    # robots.txt: fetched once per host; Disallowed paths and the unreachable host's images never requested.
    assert all(sum(r.path == "/robots.txt" for r in rs) == 1 for rs in by_host.values())
    assert on_a_blocked and not any(urlsplit(u).path == r.path for u in on_a_blocked for r in by_host[A])
    assert [r.path for r in by_host[E]] == ["/robots.txt"]
    assert stats.refused == {"robots": len(on_a_blocked), "robots_unreachable": 3}
    refused = pq.read_table(tmp_path / "out" / "refused.parquet").to_pylist()
    assert sorted(r["url"] for r in refused if r["reason"] == "robots") == sorted(on_a_blocked)
    # Per-host spacing, from the server's clock: C at RPS, B at its Crawl-delay (0.5 -> 1 s), slower.
    c_times = [r.time for r in by_host[C] if r.path != "/robots.txt"]
    b_times = [r.time for r in by_host[B] if r.path != "/robots.txt"]
    assert len(c_times) == 12 and min(_gaps(c_times)) >= 0.8 / RPS
    assert len(b_times) == 4 and min(_gaps(b_times)) >= 0.9  # 0.5 s rounded up to whole seconds
    # 429 with Retry-After: the host paused, the sample asked again after the pause and saved.
    d = [r for r in by_host[D] if r.path != "/robots.txt"]
    assert [r.status for r in d].count(429) == 1 and [r.status for r in d].count(200) == 3
    first_429 = next(r for r in d if r.status == 429)
    assert all(r.time >= first_429.time + 0.9 for r in d if r is not first_429)
    assert stats.politeness["http_429"] == 1 and stats.politeness["retried_after_pause"] == 1
    # The dripped image: given up at the deadline, counted with its reason.
    assert stats.politeness["deadline"] == 1
    assert stats.errors == {f"HTTP Error 504: {GIVEN_UP} (deadline)": 1}
    expected = (8 - len(on_a_blocked) - 1) + 4 + 12 + 3
    assert stats.success == expected and stats.failed_to_download == 1


@pytest.mark.slow
def test_a_rerun_reads_robots_from_its_cache(tmp_path, web):
    root, paths = web
    blocked, rules = _rules(paths)
    with serve_web(root, host=A, extra_hosts=(E,), rules={A: rules[A], E: rules[E]}) as server:
        dripped = rules[A].drip_paths.strip("^$")
        pairs, _ = _pairs(tmp_path, server.port, [(A, [p for p in paths[ON_A] if p != dripped]), (E, paths[27:29])])
        out = str(tmp_path / "out")
        options = dict(image_size=32, threads=4, allow_networks=NETWORK, timeout=3)
        first = crawl(pairs, out, **options)
        before = len(server.request_log())
        again = crawl(pairs, out, **options)
        assert len(server.request_log()) == before  # nothing fetched again, robots.txt included
    assert again.refused == first.refused == {"robots": 4, "robots_unreachable": 2} and first.success == 3
    assert CrawlStats.read(out) == again


@pytest.mark.slow
def test_ignore_robots_fetches_what_robots_disallows(tmp_path, web):
    root, paths = web
    with serve_web(root, host=A, rules={A: HostRules(robots="User-agent: *\nDisallow: /\n")}) as server:
        pairs, _ = _pairs(tmp_path, server.port, [(A, paths[2:5])])
        stats = crawl(pairs, str(tmp_path / "out"), image_size=32, threads=2, allow_networks=NETWORK,
                      ignore_robots=True)
        assert stats.success == 3 and not stats.refused
        assert not any(r.path == "/robots.txt" for r in server.request_log())


@pytest.mark.slow
def test_on_a_cluster_the_guards_share_a_hosts_rate(tmp_path, web, ray_cluster):
    """Two shard tasks on two nodes, one host: together they keep the host's rate (each takes half)."""
    from flows.executors import RayExecutor

    cluster, ids = ray_cluster
    root, paths = web
    with serve_web(root, host=C) as server:
        pairs, _ = _pairs(tmp_path, server.port, [(C, paths[30:50])])
        with RayExecutor(address=cluster.address) as executor:
            stats = crawl(pairs, str(tmp_path / "out"), image_size=32, threads=4, number_sample_per_shard=10,
                          allow_networks=NETWORK, per_host_rps=RPS, per_host_concurrency=4, executor=executor)
        times = sorted(r.time for r in server.request_log() if r.path != "/robots.txt")
    assert stats.success == 20 and set(stats.nodes) == ids
    window = 2.0  # at most RPS x window starts in any window, plus one per guard for the edges
    assert max(sum(t <= s < t + window for s in times) for t in times) <= RPS * window + 2


def test_retry_after_reads_seconds_and_http_dates():
    assert retry_after_seconds("7") == 7.0
    assert retry_after_seconds("Wed, 21 Oct 2015 07:28:00 GMT", now=1445412475.0) == pytest.approx(5.0)
    assert retry_after_seconds("Wed, 21 Oct 2015 07:28:00 GMT", now=1445412490.0) == 0.0  # already past
    assert retry_after_seconds("soon") is None and retry_after_seconds(None) is None


def test_robots_entries_follow_rfc_9309():
    rules = "User-agent: clip-pipeline-crawler\nDisallow: /private/\nCrawl-delay: 3\n\nUser-agent: *\nDisallow: /\n"
    ok = RobotsEntry("http://h", 200, rules)
    assert ok.refusal("http://h/public/x.jpg", UA) is None and ok.refusal("http://h/private/x.jpg", UA) == "robots"
    assert ok.refusal("http://h/public/x.jpg", "OtherBot/1.0") == "robots" and ok.delay(UA) == 3.0
    assert RobotsEntry("http://h", 404).refusal("http://h/x", UA) is None  # no robots.txt: all allowed
    assert RobotsEntry("http://h", 503).refusal("http://h/x", UA) == "robots_unreachable"
    assert RobotsEntry("http://h", 0, error="timed out").refusal("http://h/x", UA) == "robots_unreachable"


def test_the_gate_spaces_starts_and_bounds_concurrency():
    gate = HostGate(Politeness(per_host_rps=20.0, per_host_concurrency=2))
    starts, active, peak, lock = [], [0], [0], threading.Lock()

    def request():
        gate.enter("h")
        with lock:
            starts.append(time.monotonic())
            active[0] += 1
            peak[0] = max(peak[0], active[0])
        time.sleep(0.15)
        with lock:
            active[0] -= 1
        gate.leave("h")

    threads = [threading.Thread(target=request) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert peak[0] == 2 and min(_gaps(starts)) >= 0.9 / 20.0
    gate.pause("h", 0.3)
    assert gate.enter("h", max_wait=0.05) is None  # paused: no slot within the wait
    assert gate.enter("h") >= 0.2


@pytest.mark.parametrize("flags", [["--per-host-rps", "-1"], ["--per-host-concurrency", "-2"],
                                   ["--user-agent", ""], ["--max-image-bytes", "0"]])
def test_bad_politeness_flags_exit_2_before_anything_is_written(tmp_path, flags):
    pairs = tmp_path / "pairs.parquet"
    pq.write_table(pa.table({"url": ["http://127.0.0.1:9/x.jpg"], "caption": ["x"]}), pairs)
    assert main(["crawl", str(pairs), str(tmp_path / "out"), *flags]) == 2
    assert not (tmp_path / "out").exists()
    with pytest.raises(InputError):
        Politeness(user_agent="bad\nagent").check()


@pytest.mark.slow
def test_a_response_over_max_image_bytes_is_given_up_and_not_retried(tmp_path, web):
    root, paths = web
    with serve_web(root, host=A) as server:
        pairs, _ = _pairs(tmp_path, server.port, [(A, paths[2:4])])
        options = dict(image_size=32, threads=2, allow_networks=NETWORK, max_image_bytes=200)  # each JPEG > 200 B
        stats = crawl(pairs, str(tmp_path / "out"), **options)
        again = crawl(pairs, str(tmp_path / "out"), retry_failed=True, **options)
    assert stats.success == 0 and stats.errors == {f"HTTP Error 502: {GIVEN_UP} (too_large)": 2}
    assert stats.politeness["too_large"] == 2 and again.retried_this_run == 0  # a size cap is not a passing failure


def test_build_corpus_is_polite_to_the_web_but_not_to_its_own():
    from flows.build_corpus import CorpusConfig, crawl_manners

    assert crawl_manners(CorpusConfig(), ours=False) == {"user_agent": UA, "per_host_rps": 2.0,
                                                         "per_host_concurrency": 2}
    assert crawl_manners(CorpusConfig(), ours=True)["per_host_rps"] == 0.0
    cfg = CorpusConfig(per_host_rps=0.5, per_host_concurrency=1, user_agent="MyBot/1 (+https://example.org/bot)")
    assert crawl_manners(cfg, ours=True) == {"user_agent": "MyBot/1 (+https://example.org/bot)",
                                             "per_host_rps": 0.5, "per_host_concurrency": 1}


@pytest.mark.slow
def test_a_redirect_to_a_disallowed_path_is_refused_by_the_guard(tmp_path):
    """Every image of this web answers 302 to /img/...; robots.txt disallows /img/: no /img/ request is made."""
    root = generate_web(str(tmp_path / "web"), n_pairs=4, seed=3, image_size=48, failure_rates={"redirect302": 1.0},
                        eval_sizes=0)
    app = SyntheticWeb.from_root(root)
    paths = ["/" + app.pair(uid)["url"].split("/", 3)[3] for uid in range(4)]
    with serve_web(root, host=A, rules={A: HostRules(robots="User-agent: *\nDisallow: /img/\n")}) as server:
        pairs, _ = _pairs(tmp_path, server.port, [(A, paths)])
        stats = crawl(pairs, str(tmp_path / "out"), image_size=32, threads=2, allow_networks=NETWORK)
        log = server.request_log()
    assert sorted(r.path for r in log if r.path != "/robots.txt") == sorted(paths)  # the 302s, never /img/
    assert all(r.status == 302 for r in log if r.path != "/robots.txt")
    assert stats.success == 0 and stats.politeness["robots"] == 4
    assert stats.errors == {"HTTP Error 403: Refused by crawl policy (robots)": 4}
