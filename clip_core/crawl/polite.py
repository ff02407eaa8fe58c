"""The guard proxy's manners: what it does with a request the URL policy let through.

Plain HTTP (img2dataset's `http://` URLs and every redirect hop to one):
1. robots.txt of the URL's origin (the crawl's cache, or fetched now for a redirect target)
   must allow our User-Agent, else `403 Refused by crawl policy (robots)` without a request.
2. `HostGate.enter`: the host's turn (per-host rps, concurrency, Crawl-delay, pause).
3. The request goes out with our User-Agent; the whole response is read within the deadline
   and under the size cap, else `504/502 Given up by crawl policy (deadline | too_large)`.
4. 429/503 with Retry-After pauses the host that long; the sample is asked again after the
   pause, up to `throttle_retries` times; then the answer reaches img2dataset, which records it
   (a failure --retry-failed fetches again). 429 without Retry-After pauses the host 10 s.
While it waits, the proxy sends the client `100 Continue` lines, which urllib skips: the
client's socket timeout measures the server, never the queue.

HTTPS arrives as CONNECT host:port: the path is not visible, so robots.txt was applied before
the crawl (robots.py, on every listed URL); the tunnel takes the host's turn (a wait longer
than half the deadline answers `503 Given up by crawl policy (host busy)`), and is closed at
the deadline or past the size cap. The User-Agent inside TLS is img2dataset's, with our
product token appended (`user_agent_token`).
"""
from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections import Counter
from dataclasses import dataclass

from clip_core.crawl.politeness import DEFAULT_PAUSE, HostGate, Politeness, retry_after_seconds
from clip_core.crawl.robots import RobotsCache, RobotsEntry, fetch_robots, host_of, origin_of
from clip_core.crawl.safety import UrlPolicy

REFUSED = "Refused by crawl policy"  # permanent: the policy or robots.txt says no
GIVEN_UP = "Given up by crawl policy"  # deadline, size cap, a host too busy: may pass another time
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
TICK = 2.0  # seconds between 100 Continue lines while a request waits
MAX_HEAD = 64 * 1024  # a response head longer than this is not one


def reply(sock: socket.socket, code: int, reason: str) -> None:
    sock.sendall(f"HTTP/1.1 {code} {reason}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".encode())


class GiveUp(Exception):
    """An upstream exchange abandoned by the proxy: `reason` is deadline, too_large or bad_response."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclass
class Response:
    """An upstream answer, whole: status, lower-cased headers, and the raw bytes to pass on."""

    status: int
    headers: dict
    raw: bytes


def _parse_head(raw: bytes) -> tuple[int, dict] | None:
    head, sep, _ = raw.partition(b"\r\n\r\n")
    if not sep:
        return None
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    status = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 502
    headers = {}
    for line in lines[1:]:
        key, _, value = line.partition(":")
        headers[key.strip().lower()] = value.strip()
    return status, headers


def exchange(address: str, port: int, request: bytes, deadline: float, max_bytes: int, tick=None) -> Response:
    """Send request to address:port and read the whole answer within `deadline` seconds and `max_bytes`."""
    end = time.monotonic() + deadline
    with socket.create_connection((address, port), timeout=deadline) as up:
        up.sendall(request)
        chunks, size, parsed, body_at, last_tick = [], 0, None, 0, time.monotonic()
        while True:
            left = end - time.monotonic()
            if left <= 0:
                raise GiveUp("deadline")
            up.settimeout(min(left, 1.0))
            try:
                chunk = up.recv(65536)
            except TimeoutError:
                chunk = None
            if chunk == b"":
                break
            if chunk:
                chunks.append(chunk)
                size += len(chunk)
            if parsed is None and chunk and (parsed := _parse_head(head := b"".join(chunks))) is not None:
                body_at = head.index(b"\r\n\r\n") + 4
                length = parsed[1].get("content-length", "")
                if length.isdigit() and int(length) > max_bytes:
                    raise GiveUp("too_large")
            if size > max_bytes + 65536:
                raise GiveUp("too_large")
            if parsed is None and size > MAX_HEAD:
                raise GiveUp("bad_response")  # no header end in 64 KiB: not HTTP we can pass on
            if parsed is not None and _complete(size - body_at, parsed[1]):
                break
            if tick is not None and time.monotonic() - last_tick >= TICK:
                tick()
                last_tick = time.monotonic()
    status, headers = parsed if parsed is not None else (502, {})
    return Response(status, headers, b"".join(chunks))


def _complete(body_bytes: int, headers: dict) -> bool:
    """True once a response with a Content-Length has all its body."""
    length = headers.get("content-length", "")
    return length.isdigit() and body_bytes >= int(length)


class Manners:
    """robots.txt, per-host limits, Retry-After, deadline and size cap for one guard; thread-safe counts."""

    def __init__(self, policy: UrlPolicy, politeness: Politeness, robots: RobotsCache | None = None):
        self.policy, self.politeness = policy, politeness
        self.gate = HostGate(politeness)
        self.robots = robots if robots is not None else RobotsCache()
        self._robots_locks: dict[str, threading.Lock] = {}
        self._lock = threading.Lock()
        self._counts: Counter = Counter()
        for entry in self.robots.entries.values():
            self.gate.set_crawl_delay(host_of(entry.origin), entry.delay(politeness.user_agent))

    def count(self, what: str, n: int = 1) -> None:
        with self._lock:
            self._counts[what] += n

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self._counts)

    def robots_entry(self, origin: str) -> RobotsEntry:
        """The origin's robots.txt entry, fetched once (the first asker fetches, the others wait)."""
        with self._lock:
            lock = self._robots_locks.setdefault(origin, threading.Lock())
        with lock:
            entry = self.robots.entries.get(origin)
            if entry is None:
                entry = fetch_robots(origin, self.policy, self.politeness.user_agent, self.politeness.deadline)
                self.robots.add([entry])
                self.gate.set_crawl_delay(host_of(origin), entry.delay(self.politeness.user_agent))
                self.count("robots_fetched")
        return entry

    def fetch(self, client: socket.socket, url: str, address: str, port: int, request: bytes) -> None:
        """Answer a plain-HTTP request politely (the module's steps 1-4)."""
        p, host = self.politeness, host_of(url)
        if p.respect_robots:
            refusal = self.robots_entry(origin_of(url)).refusal(url, p.user_agent)
            if refusal is not None:
                self.count(refusal)
                return reply(client, 403, f"{REFUSED} ({refusal})")
        def tick():
            client.sendall(CONTINUE)
        for attempt in range(p.throttle_retries + 1):
            self.gate.enter(host, tick=tick, tick_every=TICK)
            try:
                response = exchange(address, port, request, p.deadline, p.max_image_bytes, tick)
            except GiveUp as err:
                self.count(err.reason)
                return reply(client, 504 if err.reason == "deadline" else 502, f"{GIVEN_UP} ({err.reason})")
            except OSError as err:
                return reply(client, 502, f"Bad Gateway ({err.strerror or err})")
            finally:
                self.gate.leave(host)
            if response.status not in (429, 503):
                break
            self.count(f"http_{response.status}")
            pause = retry_after_seconds(response.headers.get("retry-after"))
            if pause is None and response.status == 429:
                pause = DEFAULT_PAUSE
            if pause is None:
                break
            self.gate.pause(host, pause)
            if pause > p.max_pause or attempt == p.throttle_retries:
                break
            self.count("retried_after_pause")
        client.sendall(response.raw)

    def tunnel(self, client: socket.socket, url: str, address: str, port: int) -> None:
        """A CONNECT tunnel in the host's turn, closed at the deadline or past the size cap."""
        p, host = self.politeness, host_of(url)
        if self.gate.enter(host, max_wait=p.deadline / 2) is None:
            self.count("host_busy")
            return reply(client, 503, f"{GIVEN_UP} (host busy)")
        try:
            try:
                upstream = socket.create_connection((address, port), timeout=p.deadline)
            except OSError as err:
                return reply(client, 502, f"Bad Gateway ({err.strerror or err})")
            with upstream:
                client.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
                timer = threading.Timer(p.deadline, _close_both, (client, upstream))
                timer.start()
                outbound = threading.Thread(target=_copy, args=(client, upstream, None), daemon=True)
                outbound.start()
                if _copy(upstream, client, p.max_image_bytes + 65536):
                    self.count("too_large")
                timer.cancel()
                outbound.join(p.deadline)
        finally:
            self.gate.leave(host)


def _close_both(a: socket.socket, b: socket.socket) -> None:
    for sock in (a, b):
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)


def _copy(src: socket.socket, dst: socket.socket, cap: int | None) -> bool:
    """Copy until src ends (or `cap` bytes: then close both and return True)."""
    total = 0
    with contextlib.suppress(OSError):
        while data := src.recv(65536):
            total += len(data)
            if cap is not None and total > cap:
                _close_both(src, dst)
                return True
            dst.sendall(data)
    with contextlib.suppress(OSError):
        dst.shutdown(socket.SHUT_WR)
    return False
