"""A guard proxy: the crawl's URL policy applied to every connection img2dataset opens.

Checking the pairs before the crawl is not enough: urllib follows redirects, so a public
page answering `302 Location: http://169.254.169.254/` would reach the metadata service,
and a host can resolve to another address at fetch time than at check time (DNS
rebinding). img2dataset offers no hook into its workers, but urllib honours `http_proxy`,
`https_proxy` and `ftp_proxy`: the crawl points them at this proxy on 127.0.0.1, which
checks each request (every redirect hop is a new one; https arrives as CONNECT), connects
to the address it vetted, and answers a refusal with `403 Refused by crawl policy (REASON)`.

With a `Politeness` the proxy is also the crawl's manners (`polite.Manners`): robots.txt on
every plain-HTTP hop, per-host rate and concurrency limits, Retry-After pauses, a deadline for
the whole response, a size cap and the crawler's User-Agent.

The rest of img2dataset's confinement is here too. It starts its workers with the spawn
method, which re-runs the caller's script in each worker; the call hides `__main__` from
them, so a script needs no `if __name__ == "__main__":` guard. From a thread other than the
main one (a Prefect task) img2dataset runs in a child process, because it installs a SIGINT
handler. While it runs, the call sets NO_ALBUMENTATIONS_UPDATE, a private TMPDIR, a pixel
cap and the guard's proxy variables in os.environ: one crawl per process at a time.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import socketserver
import subprocess
import sys
import tempfile
import threading
import types
from collections.abc import Iterator
from urllib.parse import urlsplit

from clip_core.crawl.polite import REFUSED, Manners, reply
from clip_core.crawl.politeness import Politeness
from clip_core.crawl.robots import RobotsCache
from clip_core.crawl.safety import UrlPolicy

MAX_HEAD = 64 * 1024
HOP_HEADERS = (b"proxy-connection:", b"proxy-authorization:")
CHILD_CODE = "import json, sys, img2dataset; img2dataset.download(**json.loads(sys.argv[1]))"


def _read_head(sock: socket.socket) -> tuple[bytes, bytes] | None:
    """(request head, bytes after it) from a client socket; None when it ends early."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk or len(data) > MAX_HEAD:
            return None
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    return head, rest


def _target(method: str, target: str) -> tuple[str, int, str]:
    """(url to check, port, origin-form path) of a proxy request line."""
    if method == "CONNECT":
        parts = urlsplit(f"//{target}")
        return f"https://{target}/", parts.port or 443, ""
    parts = urlsplit(target)
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return target, parts.port or 80, path


def _pipe(src: socket.socket, dst: socket.socket) -> None:
    """Copy bytes until src ends, then end dst's sending side."""
    with contextlib.suppress(OSError):
        while data := src.recv(65536):
            dst.sendall(data)
    with contextlib.suppress(OSError):
        dst.shutdown(socket.SHUT_WR)


class _GuardHandler(socketserver.BaseRequestHandler):
    """One proxied connection: plain HTTP (absolute URI) or a CONNECT tunnel."""

    def handle(self):
        client, server = self.request, self.server
        client.settimeout(server.timeout_s)
        with contextlib.suppress(OSError):
            request = _read_head(client)
            if request is not None:
                self._forward(client, *request)

    def _forward(self, client: socket.socket, head: bytes, rest: bytes) -> None:
        line, _, headers = head.partition(b"\r\n")
        try:
            method, target, version = line.decode("latin-1").split(" ", 2)
            url, port, path = _target(method, target)
        except ValueError:
            return reply(client, 400, "Bad Request")
        reason, addresses = self.server.policy.vet(url)
        if reason is not None:
            return reply(client, 403, f"{REFUSED} ({reason})")
        manners: Manners | None = self.server.manners
        if manners is not None:
            if method == "CONNECT":
                return manners.tunnel(client, url, str(addresses[0]), port)
            request = _request_bytes(method, path, version, headers, rest, manners.politeness.user_agent)
            return manners.fetch(client, url, str(addresses[0]), port, request)
        try:
            upstream = socket.create_connection((str(addresses[0]), port), timeout=self.server.timeout_s)
        except OSError as err:
            return reply(client, 502, f"Bad Gateway ({err.strerror or err})")
        with upstream:
            if method != "CONNECT":  # urllib sends a GET's head only, with "Connection: close"
                upstream.sendall(_request_bytes(method, path, version, headers, rest))
                return _pipe(upstream, client)
            client.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
            outbound = threading.Thread(target=_pipe, args=(client, upstream), daemon=True)
            outbound.start()
            _pipe(upstream, client)
            outbound.join()


def _request_bytes(method: str, path: str, version: str, headers: bytes, rest: bytes,
                   user_agent: str | None = None) -> bytes:
    """The request for the origin server: origin-form path, hop headers dropped, our User-Agent if given."""
    drop = HOP_HEADERS + ((b"user-agent:",) if user_agent else ())
    kept = [h for h in headers.split(b"\r\n") if h and not h.lower().startswith(drop)]
    if user_agent:
        kept.append(f"User-Agent: {user_agent}".encode("latin-1", "replace"))
    return b"\r\n".join([f"{method} {path} {version}".encode("latin-1"), *kept]) + b"\r\n\r\n" + rest


class _GuardServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 256


class GuardProxy:
    """A forward proxy on 127.0.0.1 that lets through only what `policy` allows.

    With `politeness` it is also the crawl's manners (`polite.Manners`): robots.txt, per-host
    limits, Retry-After, a whole-response deadline, a size cap and our User-Agent; `counts()`
    tells what they did. `robots` seeds its robots.txt cache (the entries the crawl fetched)."""

    def __init__(self, policy: UrlPolicy, timeout: float = 10.0, politeness: Politeness | None = None,
                 robots: RobotsCache | None = None):
        self.server = _GuardServer(("127.0.0.1", 0), _GuardHandler)
        self.server.policy, self.server.timeout_s = policy, timeout
        self.server.manners = Manners(policy, politeness, robots) if politeness is not None else None
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)

    @property
    def url(self) -> str:
        """The proxy's address, for http_proxy / https_proxy."""
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}"

    def counts(self) -> dict[str, int]:
        """What the manners did so far: robots refusals, 429/503 answers, pauses, deadlines, ..."""
        return self.server.manners.snapshot() if self.server.manners is not None else {}

    def __enter__(self) -> GuardProxy:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()


def guard_env(proxy_url: str) -> dict[str, str]:
    """Proxy variables sending urllib through the guard; an S3 endpoint set in the env bypasses it."""
    endpoints = (os.environ.get(k) for k in ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"))
    bypass = ",".join(urlsplit(e).netloc for e in endpoints if e)
    # ftp too: urllib follows redirects to ftp://, which would otherwise connect directly.
    proxies = {f"{scheme}_proxy": proxy_url for scheme in ("http", "https", "ftp")}
    return {**proxies, **{k.upper(): v for k, v in proxies.items()}, "no_proxy": bypass, "NO_PROXY": bypass}


MAX_IMAGE_PIXELS = 89_478_485 * 2  # PIL's decompression-bomb error threshold


@contextlib.contextmanager
def _img2dataset_env(extra: dict[str, str]) -> Iterator[dict[str, str]]:
    """NO_ALBUMENTATIONS_UPDATE=1 (it calls out on import), a private TMPDIR, a pixel cap and `extra`, then restore.

    OpenCV decodes up to 2^30 pixels by default: a 30000 x 30000 decompression bomb (a few
    hundred kB on the wire) would take 2.7 GB per worker before img2dataset sees its size.
    """
    tmp = tempfile.mkdtemp(prefix="clip-crawl-")
    updates = {"NO_ALBUMENTATIONS_UPDATE": "1", "TMPDIR": tmp,
               "OPENCV_IO_MAX_IMAGE_PIXELS": os.environ.get("OPENCV_IO_MAX_IMAGE_PIXELS", str(MAX_IMAGE_PIXELS)), **extra}
    saved = {k: os.environ.get(k) for k in updates}
    os.environ.update(updates)
    try:
        yield dict(os.environ)
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        shutil.rmtree(tmp, ignore_errors=True)


def run_img2dataset(env: dict[str, str], kwargs: dict) -> None:
    """Call `img2dataset.download` with `env` set; in a child process when not on the main thread."""
    with _img2dataset_env(env) as env:
        if threading.current_thread() is not threading.main_thread():
            subprocess.run([sys.executable, "-c", CHILD_CODE, json.dumps(kwargs)], env=env, check=True)
            return
        import img2dataset  # after the env: albumentations checks for updates on import

        handler = signal.getsignal(signal.SIGINT)
        try:
            with _main_hidden_from_spawn():
                img2dataset.download(**kwargs)
        finally:
            signal.signal(signal.SIGINT, handler)  # img2dataset leaves its own installed


@contextlib.contextmanager
def _main_hidden_from_spawn() -> Iterator[None]:
    """Show spawned workers an empty __main__, so they do not re-run the caller's script.

    multiprocessing's spawn re-imports the parent's main script in every child; without an
    `if __name__ == "__main__":` guard each child would call crawl again and the pool would
    respawn failing workers forever. img2dataset's workers need nothing from __main__.
    """
    main = sys.modules["__main__"]
    sys.modules["__main__"] = types.ModuleType("__main__")
    try:
        yield
    finally:
        sys.modules["__main__"] = main
