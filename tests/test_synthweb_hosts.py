"""Per-host manners of the synthetic web (robots.txt, Retry-After, dripped bodies) and its request log.

Servers run on 127.0.0.1 .. 127.0.0.4 (Linux routes all of 127.0.0.0/8 to lo); the same paths
are served on every host, so a test reaches a host by writing its address into the URL.
"""
import email.utils
import http.client
import re
import socket
import threading
import time

import pytest

from synthweb.app import SyntheticWeb
from synthweb.generator import generate_web
from synthweb.hosts import ALLOW_ALL, HostRules, RequestRecord, Throttle
from synthweb.server import serve_web

A, B, C, D = "127.0.0.1", "127.0.0.2", "127.0.0.3", "127.0.0.4"
IMF_FIXDATE = re.compile(r"^(Mon|Tue|Wed|Thu|Fri|Sat|Sun), \d\d (Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|Sep|Oct|Nov|Dec) "
                         r"\d{4} \d\d:\d\d:\d\d GMT$")


@pytest.fixture(scope="module")
def web(tmp_path_factory):
    root = generate_web(str(tmp_path_factory.mktemp("web")), n_pairs=40, seed=5, image_size=64,
                        failure_rates={}, eval_sizes=0)  # every pair "ok": image paths answer 200
    app = SyntheticWeb.from_root(root)
    paths = ["/" + app.pair(uid)["url"].split("/", 3)[3] for uid in range(40)]
    return {"root": root, "app": app, "paths": paths}


def _serve(web, rules=None, hosts=(A, B)):
    return serve_web(web["root"], host=hosts[0], port=0, extra_hosts=hosts[1:], rules=rules)


def _get(host, port, path, method="GET", agent=None, timeout=10.0):
    """(status, headers, body) of one request, whatever the status."""
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request(method, path, headers={"User-Agent": agent} if agent else {})
        resp = conn.getresponse()
        return resp.status, dict(resp.getheaders()), resp.read()
    finally:
        conn.close()


def _wait_for(condition, seconds=10.0) -> bool:
    """Poll `condition` until true or `seconds` passed (for the server's threads to catch up)."""
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def test_robots_body_and_status_per_host(web):
    rules = {A: HostRules(robots="User-agent: *\nDisallow: /s/\n"), B: HostRules(robots_status=404),
             C: HostRules(robots_status=503)}
    with _serve(web, rules, hosts=(A, B, C, D)) as server:
        got = {h: _get(h, server.port, "/robots.txt") for h in (A, B, C, D)}
        log = server.request_log()
    assert got[A][0] == 200 and got[A][2] == b"User-agent: *\nDisallow: /s/\n"
    assert got[A][1]["Content-Type"].startswith("text/plain")
    assert got[B][0] == 404 and got[C][0] == 503
    assert got[D][0] == 200 and got[D][2] == ALLOW_ALL.encode() == b"User-agent: *\nAllow: /\n"
    assert [(r.host, r.path, r.status) for r in log] == [
        (A, "/robots.txt", 200), (B, "/robots.txt", 404), (C, "/robots.txt", 503), (D, "/robots.txt", 200)]


def test_robots_delay_outlasts_a_short_client_timeout(web):
    with _serve(web, {B: HostRules(robots_delay=5.0)}) as server:
        with pytest.raises(TimeoutError):
            _get(B, server.port, "/robots.txt", timeout=0.3)
        assert _get(A, server.port, "/robots.txt")[0] == 200  # the other host answers at once
        assert _wait_for(lambda: server.open_connections == 0)  # the delayed handler saw the hang-up
        log = server.request_log()
    assert [(r.host, r.status) for r in log] == [(B, 200), (A, 200)]


@pytest.mark.parametrize("status,fmt", [(429, "seconds"), (503, "http-date")])
def test_throttle_refuses_until_the_pause_has_ended(web, status, fmt):
    rules = {B: HostRules(throttle_first=1, throttle_status=status, retry_after=1.0, retry_after_format=fmt)}
    image = web["paths"][3]
    with _serve(web, rules) as server:
        first = _get(B, server.port, image)
        received = time.time()
        again = [_get(B, server.port, image) for _ in range(2)]  # a client ignoring Retry-After
        other_host = _get(A, server.port, image)
        robots = _get(B, server.port, "/robots.txt")
        _honour(first[1]["Retry-After"], fmt)
        after = _get(B, server.port, image)
        log = server.request_log()
    assert first[0] == status and all(r[0] == status and "Retry-After" in r[1] for r in again)
    assert other_host[0] == 200 and robots[0] == 200 and after[0] == 200
    assert after[2] == web["app"].respond(image).body
    value = first[1]["Retry-After"]
    if fmt == "seconds":
        assert value == "1"
    else:
        assert IMF_FIXDATE.match(value), value
        date = email.utils.parsedate_to_datetime(value).timestamp()
        assert log[0].time + 1.0 <= date <= received + 1.0 + 1  # the pause's end, rounded up to a second
    assert [(r.host, r.path, r.status) for r in log] == [
        (B, image, status), (B, image, status), (B, image, status), (A, image, 200), (B, "/robots.txt", 200),
        (B, image, 200)]


def _honour(retry_after: str, fmt: str) -> None:
    """Sleep as a polite client would on this Retry-After value."""
    if fmt == "seconds":
        time.sleep(int(retry_after))
    else:
        time.sleep(max(0.0, email.utils.parsedate_to_datetime(retry_after).timestamp() - time.time()))


def test_throttle_counts_first_refusals_then_the_pause():
    throttle = Throttle(HostRules(throttle_first=2, retry_after=1.0))
    assert throttle.check(0.0) == 1.0
    assert throttle.check(5.0) == 1.0  # the second of the first two, however late it comes
    assert throttle.check(5.25) == pytest.approx(0.75)
    assert throttle.check(6.0) is None and throttle.check(6.1) is None
    assert Throttle(HostRules()).check(0.0) is None


def test_retry_after_values_round_up():
    seconds, date = HostRules(), HostRules(retry_after_format="http-date")
    assert [seconds.retry_after_value(x, 0.0) for x in (0.3, 1.0, 2.0, 2.01)] == ["1", "1", "2", "3"]
    assert date.retry_after_value(0.5, 1_700_000_000.2) == "Tue, 14 Nov 2023 22:13:21 GMT"
    assert date.retry_after_value(1.0, 1_700_000_000.0) == "Tue, 14 Nov 2023 22:13:21 GMT"


def test_dripped_body_needs_a_response_deadline(web):
    image = web["paths"][7]
    body = web["app"].respond(image).body
    assert len(body) > 100  # over 10 s at 10 bytes a second
    rules = {B: HostRules(drip_paths=r"^/s/site\d+/7/", drip_bytes=1, drip_interval=0.1)}
    with _serve(web, rules) as server:
        conn = http.client.HTTPConnection(B, server.port, timeout=10)  # each byte comes well inside 10 s
        deadline = time.monotonic() + 1.5  # the whole response must arrive in 1.5 s
        conn.request("GET", image)
        resp = conn.getresponse()
        length, got = int(resp.headers["Content-Length"]), b""
        while time.monotonic() < deadline and len(got) < length:
            got += resp.read(1)
        resp.close(), conn.close()  # give up (the response holds the socket open too)
        assert _wait_for(lambda: server.open_connections == 0)  # the server stopped dripping
        whole = _get(A, server.port, image)[2]  # same path, other host: sent at once
        other = _get(B, server.port, web["paths"][8])[2]  # not matched by drip_paths
        log = server.request_log()
    assert resp.status == 200 and length == len(body)
    assert 0 < len(got) < length and body.startswith(got)
    assert whole == body and other == web["app"].respond(web["paths"][8]).body
    assert [(r.host, r.path, r.status) for r in log] == [(B, image, 200), (A, image, 200), (B, web["paths"][8], 200)]


def test_shutdown_stops_a_drip(web):
    image = web["paths"][2]
    server = _serve(web, {A: HostRules(drip_paths="/s/", drip_interval=1.0)})
    conn = http.client.HTTPConnection(A, server.port, timeout=10)
    conn.request("GET", image)
    resp = conn.getresponse()
    assert resp.status == 200 and resp.read(1) == web["app"].respond(image).body[:1]
    server.shutdown()
    assert server.open_connections == 0
    with pytest.raises(http.client.IncompleteRead):
        resp.read()
    conn.close()


def test_log_records_host_path_status_and_agent(web):
    ok, bot = web["paths"][0], "polite-bot/1.0 (+http://127.0.0.1/bot)"
    with _serve(web, {B: HostRules(robots_status=500)}) as server:
        before = time.time()
        _get(A, server.port, "/robots.txt", agent=bot)
        _get(B, server.port, "/robots.txt", agent=bot)
        _get(B, server.port, ok + "?q=1", agent=bot)
        _get(A, server.port, "/nope")  # http.client sends no User-Agent of its own
        _get(A, server.port, ok, method="HEAD", agent="x")
        _get(B, server.port, ok, method="POST", agent=bot)  # unsupported: 501, logged all the same
        with socket.create_connection((A, server.port), timeout=10) as raw:
            raw.sendall(b"NOT-HTTP\r\n\r\n")  # malformed request line: 400
            raw.recv(1024)
        after = time.time()
        log, counts, total = server.request_log(), server.status_counts(), server.requests
    assert [(r.host, r.path, r.status, r.user_agent) for r in log] == [
        (A, "/robots.txt", 200, bot), (B, "/robots.txt", 500, bot), (B, ok + "?q=1", 200, bot),
        (A, "/nope", 404, None), (A, ok, 200, "x"), (B, ok, 501, bot), (A, "", 400, None)]
    assert all(isinstance(r, RequestRecord) for r in log)
    times = [r.time for r in log]
    assert before <= times[0] and times == sorted(times) and times[-1] <= after
    assert total == len(log) and counts == {200: 3, 500: 1, 404: 1, 501: 1, 400: 1}
    log.clear()
    assert len(server.request_log()) == 7  # request_log() hands out a copy


def test_log_under_concurrent_clients(web):
    with _serve(web) as server:
        def fetch(i):
            for k in range(20):
                _get((A, B)[k % 2], server.port, web["paths"][k], agent=f"client-{i}")

        threads = [threading.Thread(target=fetch, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        log = server.request_log()
    assert len(log) == 80 and server.requests == 80 and all(r.status == 200 for r in log)
    for i in range(4):
        mine = [r for r in log if r.user_agent == f"client-{i}"]
        assert [r.path for r in mine] == web["paths"][:20]  # each client's requests in its order
        assert [r.host for r in mine] == [A, B] * 10
    assert [r.time for r in log] == sorted(r.time for r in log)


def test_bad_rules_are_refused(web):
    for bad in (dict(throttle_status=500), dict(retry_after_format="date"), dict(drip_paths="("),
                dict(retry_after=0.0), dict(drip_bytes=0), dict(robots_status=301), dict(robots_delay=-1.0)):
        with pytest.raises(ValueError):
            HostRules(**bad)
    with pytest.raises(ValueError, match="not served"):
        _serve(web, {C: HostRules()})
    with pytest.raises(ValueError):
        _serve(web, {"10.0.0.1": HostRules()})
