"""HTTP server of the synthetic web, on loopback addresses only.

`serve_web` starts a `ThreadingHTTPServer` per host in background threads and returns a
`WebServer` handle (context manager) with `.url`, `.port`, a thread-safe request counter
and `.shutdown()`. Responses come from `web_app.SyntheticWeb`, rendered on request.
Any host outside 127.0.0.0/8 and ::1 is refused: the synthetic web must never be reachable
from, or confused with, the real one. `run_web_server` blocks until SIGINT/SIGTERM (CLI).
"""
from __future__ import annotations

import collections
import ipaddress
import signal
import socket
import socketserver
import threading
import traceback
from collections.abc import Callable, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

from synthweb.app import SyntheticWeb
from synthweb.spec import load_spec


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


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address, web: SyntheticWeb, stats: "_Stats", stop: threading.Event):
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self.web, self.stats, self.stop = web, stats, stop
        super().__init__(address, _Handler)

    def server_bind(self) -> None:
        """Bind without HTTPServer's reverse lookup of the host name."""
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]

    @property
    def authority(self) -> str:
        host, port = self.server_address[:2]
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class _Stats:
    """Thread-safe request counts by status."""

    def __init__(self):
        self._lock, self._counts = threading.Lock(), collections.Counter()

    def add(self, status: int) -> None:
        with self._lock:
            self._counts[status] += 1

    def snapshot(self) -> dict[int, int]:
        with self._lock:
            return dict(self._counts)


class _Handler(BaseHTTPRequestHandler):
    server_version = "SyntheticWeb/1.0"

    def do_GET(self):  # noqa: N802 (http.server's naming)
        self._serve(body=True)

    def do_HEAD(self):  # noqa: N802
        self._serve(body=False)

    def _serve(self, body: bool) -> None:
        server: _Server = self.server
        try:
            resp = server.web.respond(self.path, server.authority)
        except Exception:  # a bug must look like a 500 to the crawler, not a dropped connection
            traceback.print_exc()
            resp = None
        status = resp.status if resp else 500
        server.stats.add(status)
        if resp and resp.delay and server.stop.wait(resp.delay):
            return  # shutting down mid-delay: drop the connection
        try:
            self.send_response(status)
            for key, value in (resp.headers if resp else ()):
                self.send_header(key, value)
            data = resp.body if resp else b"Internal Server Error"
            self.send_header("Content-Type", resp.content_type if resp else "text/plain")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if body:
                self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (timeout); as on the real web

    def log_message(self, format, *args):  # noqa: A002 (http.server's signature)
        pass


class WebServer:
    """Running synthetic-web servers (one per host, same port); a context manager."""

    def __init__(self, servers: list[_Server], stop: threading.Event, stats: _Stats):
        self._servers, self._stop, self._stats = servers, stop, stats
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
        return sum(self._stats.snapshot().values())

    def status_counts(self) -> dict[int, int]:
        """Requests received so far, by HTTP status."""
        return self._stats.snapshot()

    def shutdown(self) -> None:
        """Stop serving, wake delayed responses and close the sockets."""
        self._stop.set()
        for s in self._servers:
            s.shutdown()
            s.server_close()
        for t in self._threads:
            t.join(timeout=5)

    def __enter__(self) -> "WebServer":
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()


def serve_web(root: str, host: str = "127.0.0.1", port: int = 0, extra_hosts: Sequence[str] = (),
              storage_options: dict | None = None) -> WebServer:
    """Serve the web generated under `root` on host:port (and extra loopback hosts, same port)."""
    hosts = [loopback_host(h) for h in (host, *extra_hosts)]
    web = SyntheticWeb(load_spec(root, storage_options))
    stop, stats, servers = threading.Event(), _Stats(), []
    try:
        for h in hosts:
            servers.append(_Server((h, servers[0].server_address[1] if servers else port), web, stats, stop))
    except OSError:
        for s in servers:
            s.server_close()
        raise
    return WebServer(servers, stop, stats)


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
