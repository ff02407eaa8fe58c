"""HTTP server of the synthetic web, on loopback addresses only.

`serve_web` starts a `ThreadingHTTPServer` per host in background threads and returns a
`WebServer` handle (context manager) with `.url`, `.port`, thread-safe request counts, a
request log (`RequestRecord`s) and `.shutdown()`. Responses come from `app.SyntheticWeb`,
rendered on request; each host may have `hosts.HostRules` (robots.txt, a rate limiter with
Retry-After, dripped bodies), applied here where they need a clock or a socket.
Any host outside 127.0.0.0/8 and ::1 is refused: the synthetic web must never be reachable
from, or confused with, the real one. `run_web_server` blocks until SIGINT/SIGTERM (CLI).
"""
from __future__ import annotations

import collections
import contextlib
import ipaddress
import itertools
import multiprocessing
import select
import signal
import socket
import socketserver
import sys
import threading
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

from synthweb.app import SyntheticWeb, WebResponse, _text
from synthweb.hosts import HostRules, RequestRecord, Throttle, is_image_path, url_path
from synthweb.spec import load_spec

__all__ = ["HostRules", "RequestRecord", "WebServer", "loopback_host", "run_web_server", "serve_web",
           "serve_web_process", "spec_port"]

LOG_LIMIT = 1_000_000  # records kept (about 30 MB per 100k); counts go on past it
_POLL = 0.05  # seconds between checks for a hung-up client or a shutdown while waiting


def loopback_host(host: str) -> str:
    """The host as a loopback IP literal; ValueError for anything else (names are not resolved)."""
    if host == "localhost":
        return "127.0.0.1"
    try:
        ip = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        raise ValueError(f"host must be a loopback IP address (127.0.0.0/8 or ::1), got {host!r}") from None
    if not ip.is_loopback:
        raise ValueError(f"refusing to serve the synthetic web on non-loopback address {host!r}")
    return str(ip)


class _Shared:
    """State of one WebServer across its hosts: counts, request log, open connections, stop flag."""

    def __init__(self):
        self.stop, self._lock = threading.Event(), threading.Condition()
        self._counts, self._log = collections.Counter(), collections.deque(maxlen=LOG_LIMIT)
        self._seq, self._open, self._closed = itertools.count(), set(), False

    def arrival(self) -> tuple[int, float]:
        """(sequence number, time.time()) of a request line just read; both increase together."""
        with self._lock:
            return next(self._seq), time.time()

    def record(self, seq: int, record: RequestRecord) -> None:
        with self._lock:
            self._counts[record.status] += 1
            self._log.append((seq, record))

    def counts(self) -> dict[int, int]:
        with self._lock:
            return dict(self._counts)

    def log(self) -> list[RequestRecord]:
        with self._lock:
            entries = list(self._log)
        return [record for _, record in sorted(entries, key=lambda e: e[0])]  # arrival order

    def opened(self, sock: socket.socket) -> None:
        with self._lock:
            self._open.add(sock)
            if self._closed:  # accepted just as the server stopped
                _hang_up(sock)

    def closed(self, sock: socket.socket) -> None:
        with self._lock:
            self._open.discard(sock)
            self._lock.notify_all()

    def open_connections(self) -> int:
        with self._lock:
            return len(self._open)

    def hang_up_all(self, timeout: float) -> None:
        """Shut every open connection (wakes handlers blocked on it) and wait for the handlers to end."""
        with self._lock:
            self._closed = True
            for sock in self._open:
                _hang_up(sock)
            self._lock.wait_for(lambda: not self._open, timeout)


def _hang_up(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass  # already gone


def _readable(sock: socket.socket, timeout: float) -> bool:
    """Whether the socket has bytes or a hang-up to read within `timeout` (poll: no fd limit)."""
    if hasattr(select, "poll"):
        poller = select.poll()
        poller.register(sock, select.POLLIN)
        return bool(poller.poll(timeout * 1000))
    return bool(select.select([sock], [], [], timeout)[0])


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address, web: SyntheticWeb, shared: _Shared, rules: HostRules):
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self.web, self.shared, self.rules, self.throttle = web, shared, rules, Throttle(rules)
        super().__init__(address, _Handler)

    def server_bind(self) -> None:
        """Bind without HTTPServer's reverse lookup of the host name."""
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]

    @property
    def authority(self) -> str:
        host, port = self.server_address[:2]
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class _Handler(BaseHTTPRequestHandler):
    server_version = "SyntheticWeb/1.0"
    _arrival: tuple[int, float] | None = None  # set when the request line has been read

    def setup(self) -> None:
        super().setup()
        self.server.shared.opened(self.connection)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.server.shared.closed(self.connection)

    def parse_request(self) -> bool:
        self._arrival = self.server.shared.arrival()
        return super().parse_request()

    def send_error(self, code, message=None, explain=None):
        """Malformed or unsupported requests are logged too."""
        self._record(int(code))
        super().send_error(code, message, explain)

    def do_GET(self):  # noqa: N802 (http.server's naming)
        self._serve(body=True)

    def do_HEAD(self):  # noqa: N802
        self._serve(body=False)

    def _record(self, status: int) -> None:
        seq, arrived = self._arrival or self.server.shared.arrival()
        self._arrival = None
        headers = getattr(self, "headers", None)
        agent = headers.get("User-Agent") if headers is not None else None
        record = RequestRecord(arrived, self.server.server_address[0], getattr(self, "path", ""), status,
                               sys.intern(agent) if agent is not None else None)
        self.server.shared.record(seq, record)

    def _respond(self, path: str) -> WebResponse:
        """The host's answer: refused by its rate limiter, or the synthetic web's response."""
        server: _Server = self.server
        if is_image_path(path) and (left := server.throttle.check(time.monotonic())) is not None:
            status, retry = server.rules.throttle_status, server.rules.retry_after_value(left, time.time())
            return replace(_text(status, HTTPStatus(status).phrase), headers=(("Retry-After", retry),))
        try:
            return server.web.respond(self.path, server.authority, server.rules)
        except Exception:  # a bug must look like a 500 to the crawler, not a dropped connection
            traceback.print_exc()
            return WebResponse(500, b"Internal Server Error", "text/plain")

    def _serve(self, body: bool) -> None:
        path = url_path(self.path)
        resp = self._respond(path)
        self._record(resp.status)
        if resp.delay and not self._client_waits(resp.delay):
            return  # the client hung up or the server is stopping: drop the connection
        try:
            self.send_response(resp.status)
            for key, value in resp.headers:
                self.send_header(key, value)
            self.send_header("Content-Type", resp.content_type)
            self.send_header("Content-Length", str(len(resp.body)))
            self.end_headers()
            if body and self.server.rules.drips(path):
                self._drip(resp.body)
            elif body:
                self.wfile.write(resp.body)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (timeout); as on the real web

    def _drip(self, data: bytes) -> None:
        """Send `data` drip_bytes at a time, drip_interval apart, until done, hung up or stopped."""
        step, interval = self.server.rules.drip_bytes, self.server.rules.drip_interval
        for start in range(0, len(data), step):
            if start and not self._client_waits(interval):
                return
            self.wfile.write(data[start:start + step])

    def _client_waits(self, seconds: float) -> bool:
        """Wait `seconds`; False as soon as the client hangs up or the server stops."""
        stop, sock = self.server.shared.stop, self.connection
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            if stop.is_set():
                return False
            if _readable(sock, min(left, _POLL)):
                try:
                    if not sock.recv(1, socket.MSG_PEEK):
                        return False  # orderly close by the client (or our own hang-up)
                except OSError:
                    return False
                stop.wait(min(left, _POLL))  # the client sent more bytes: not a hang-up
        return not stop.is_set()

    def log_message(self, format, *args):  # noqa: A002 (http.server's signature)
        pass


class WebServer:
    """Running synthetic-web servers (one per host, same port); a context manager."""

    def __init__(self, servers: list[_Server], shared: _Shared):
        self._servers, self._shared = servers, shared
        self._threads = [threading.Thread(target=s.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
                         for s in servers]
        for t in self._threads:
            t.start()

    @property
    def port(self) -> int:
        return self._servers[0].server_address[1]

    @property
    def host(self) -> str:
        return self._servers[0].server_address[0]

    @property
    def url(self) -> str:
        """Base URL of the first host, e.g. http://127.0.0.1:8000."""
        return f"http://{self._servers[0].authority}"

    @property
    def urls(self) -> list[str]:
        """Base URLs of every host served."""
        return [f"http://{s.authority}" for s in self._servers]

    @property
    def requests(self) -> int:
        """Number of requests received so far (all hosts, all statuses)."""
        return sum(self._shared.counts().values())

    def status_counts(self) -> dict[int, int]:
        """Requests received so far, by HTTP status."""
        return self._shared.counts()

    def request_log(self) -> list[RequestRecord]:
        """Every request received so far (robots.txt and refusals included), in arrival order; a copy.

        Keeps the last LOG_LIMIT records; `requests` and `status_counts` count all."""
        return self._shared.log()

    @property
    def open_connections(self) -> int:
        """Connections whose handler is still running (e.g. a dripped or delayed response)."""
        return self._shared.open_connections()

    def shutdown(self, timeout: float = 5.0) -> None:
        """Stop serving, hang up open connections (delayed and dripped ones too) and close the sockets."""
        self._shared.stop.set()
        for s in self._servers:
            s.shutdown()
            s.server_close()
        self._shared.hang_up_all(timeout)
        for t in self._threads:
            t.join(timeout=timeout)

    def __enter__(self) -> "WebServer":
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()


def _host_rules(hosts: list[str], rules: Mapping[str, HostRules] | None) -> dict[str, HostRules]:
    """Rules per served host (default: none); keys must be served loopback hosts."""
    out = {h: HostRules() for h in hosts}
    for key, value in (rules or {}).items():
        host = loopback_host(key)
        if host not in out:
            raise ValueError(f"rules for {key!r}, which is not served; served hosts: {hosts}")
        if not isinstance(value, HostRules):
            raise ValueError(f"rules for {key!r} must be a synthweb.hosts.HostRules, got {type(value).__name__}")
        out[host] = value
    return out


def serve_web(root: str, host: str = "127.0.0.1", port: int = 0, extra_hosts: Sequence[str] = (),
              storage_options: dict | None = None, rules: Mapping[str, HostRules] | None = None) -> WebServer:
    """Serve the web generated under `root` on host:port (and extra loopback hosts, same port),
    each host with its `rules` (keyed by IP as served, e.g. "127.0.0.2"; default: plain)."""
    hosts = [loopback_host(h) for h in (host, *extra_hosts)]
    per_host = _host_rules(hosts, rules)
    web = SyntheticWeb(load_spec(root, storage_options))
    shared, servers = _Shared(), []
    try:
        for h in hosts:
            servers.append(_Server((h, servers[0].server_address[1] if servers else port), web, shared, per_host[h]))
    except OSError:
        for s in servers:
            s.server_close()
        raise
    return WebServer(servers, shared)


def spec_port(root: str, storage_options: dict | None = None) -> int:
    """The port of the web's base_url (where its pair URLs point)."""
    return urlsplit(load_spec(root, storage_options).base_url).port or 80


def run_web_server(root: str, host: str = "127.0.0.1", port: int | None = None, extra_hosts: Sequence[str] = (),
                   announce: Callable[[str], None] | None = print) -> int:
    """Serve until SIGINT or SIGTERM (port None: the base_url's port); returns 0."""
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        with serve_web(root, host, spec_port(root) if port is None else port, extra_hosts) as server:
            if announce:
                announce(f"serving the synthetic web at {' '.join(server.urls)} (Ctrl-C to stop)")
            while not stop.wait(0.5):
                pass
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0


def _serve_until(root: str, host: str, port: int, ready, stop) -> None:
    with serve_web(root, host, port):
        ready.set()
        stop.wait()


@contextlib.contextmanager
def serve_web_process(root: str, host: str = "127.0.0.1", port: int = 0, start_timeout: float = 60.0):
    """serve_web in a child process, for the length of a with block.

    Rendering is Python under the GIL: served from the process that also crawls (the guard proxy's
    threads, a flow's own threads), the web and the crawl take turns on one core. In its own
    process the web has a core to itself (the demo's 10,000-pair crawl: 87 s -> see README).
    """
    ctx = multiprocessing.get_context("spawn")
    ready, stop = ctx.Event(), ctx.Event()
    child = ctx.Process(target=_serve_until, args=(root, loopback_host(host), port, ready, stop),
                        name="synthetic-web", daemon=True)
    child.start()
    try:
        deadline = time.monotonic() + start_timeout
        while not ready.wait(0.1):
            if not child.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the synthetic web under {root} did not start on {host}:{port} "
                                   f"(child exit code {child.exitcode}; is the port taken?)")
        yield
    finally:
        stop.set()
        child.join(10)
        if child.is_alive():
            child.terminate()
            child.join(5)
