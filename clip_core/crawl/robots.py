"""robots.txt: fetched once per host through the URL policy, cached for the run and its re-runs.

What a careful crawler does (RFC 9309, whose reading urllib.robotparser implements):
- 2xx: the rules for our product token (else for `*`) decide; Crawl-delay and Request-rate
  space our requests to the host (politeness.HostGate); a fractional Crawl-delay is rounded
  up to whole seconds, as urllib.robotparser reads only those.
- 4xx (404: no robots.txt): everything is allowed.
- 5xx, a timeout or no connection: the host is treated as disallowing everything for this
  crawl (RFC 9309 Sec. 2.3.1.4: "the crawler MUST assume complete disallow"); its images are
  refused with reason `robots_unreachable`, counted, and not requested.
- Redirects are followed up to 5 hops, each hop vetted by the URL policy like any request.

The fetched answers are stored in OUT/_input/robots.parquet (origin, status, body, error): a
re-run uses them, so its safe list, and so its shards, are the same as the first run's. To
read a site's robots.txt again, crawl into a new folder.
"""
from __future__ import annotations

import contextlib
import http.client
import math
import re
import socket
import ssl
import time
from collections import Counter
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import cached_property
from urllib.parse import urljoin, urlsplit
from urllib.robotparser import RobotFileParser

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from clip_core.crawl.safety import PreparedPairs, UrlPolicy
from clip_core.data.parquet import write_parquet

MAX_ROBOTS_BYTES = 500 * 1024  # RFC 9309 Sec. 2.5: parse at least 500 KiB
MAX_REDIRECTS = 5
ROBOTS_NAME = "_input/robots.parquet"
ROBOTS_SCHEMA = pa.schema([("origin", pa.string()), ("status", pa.int32()), ("body", pa.string()),
                           ("error", pa.string())])


def origin_of(url: str) -> str:
    """scheme://host[:port] of a URL: robots.txt's scope."""
    parts = urlsplit(url)
    return f"{parts.scheme.lower()}://{parts.netloc.lower()}"


def host_of(url: str) -> str:
    """host[:port] of a URL: the unit the per-host limits count."""
    return urlsplit(url).netloc.lower()


@dataclass(frozen=True)
class RobotsEntry:
    """One origin's robots.txt answer: HTTP status (0: no answer), body and the error, if any."""

    origin: str
    status: int
    body: str = ""
    error: str | None = None

    @property
    def unreachable(self) -> bool:
        """5xx or no answer: complete disallow for this crawl."""
        return self.status == 0 or self.status >= 500

    @cached_property
    def parser(self) -> RobotFileParser:
        rp = RobotFileParser(f"{self.origin}/robots.txt")
        if 200 <= self.status < 300:
            rp.parse(_whole_delays(self.body.splitlines()))
        elif self.unreachable:
            rp.disallow_all = True
        else:  # 3xx left after the hops, 4xx: no rules
            rp.allow_all = True
        rp.modified()  # can_fetch answers False until the parser believes it has read the file
        return rp

    def refusal(self, url: str, user_agent: str) -> str | None:
        """None when user_agent may fetch url; else `robots` or `robots_unreachable`."""
        if self.parser.can_fetch(user_agent, url):
            return None
        return "robots_unreachable" if self.unreachable else "robots"

    def delay(self, user_agent: str) -> float | None:
        """Seconds between requests that Crawl-delay or Request-rate asks of user_agent, if any."""
        if not 200 <= self.status < 300:
            return None
        delay = self.parser.crawl_delay(user_agent)
        rate = self.parser.request_rate(user_agent)
        spacing = rate.seconds / rate.requests if rate and rate.requests else None
        values = [float(v) for v in (delay, spacing) if v]
        return max(values) if values else None


_DELAY = re.compile(r"^(\s*crawl-delay\s*:\s*)(\d*\.\d+)(.*)$", re.IGNORECASE)


def _whole_delays(lines: list[str]) -> list[str]:
    """Fractional Crawl-delay values rounded up (urllib.robotparser reads whole seconds only): never faster than asked."""
    out = []
    for line in lines:
        m = _DELAY.match(line)
        out.append(f"{m.group(1)}{math.ceil(float(m.group(2)))}{m.group(3)}" if m else line)
    return out


def _connect(url: str, policy: UrlPolicy, timeout: float) -> tuple[http.client.HTTPConnection | None, str | None]:
    """A connection to the address the policy vetted for url's host (never a fresh DNS answer)."""
    reason, addresses = policy.vet(url)
    if reason is not None:
        return None, f"refused by crawl policy ({reason})"
    parts = urlsplit(url)
    https = parts.scheme == "https"
    port = parts.port or (443 if https else 80)
    sock = socket.create_connection((str(addresses[0]), port), timeout=timeout)
    if https:
        sock = ssl.create_default_context().wrap_socket(sock, server_hostname=parts.hostname)
    conn = (http.client.HTTPSConnection if https else http.client.HTTPConnection)(parts.hostname, port,
                                                                                  timeout=timeout)
    conn.sock = sock
    return conn, None


def fetch_robots(origin: str, policy: UrlPolicy, user_agent: str, timeout: float = 10.0) -> RobotsEntry:
    """GET origin/robots.txt with our User-Agent, each redirect hop vetted; any failure is an entry, never raised."""
    url, deadline = f"{origin}/robots.txt", time.monotonic() + timeout
    try:
        for _ in range(MAX_REDIRECTS + 1):
            conn, refused = _connect(url, policy, max(deadline - time.monotonic(), 0.1))
            if conn is None:
                return RobotsEntry(origin, 0, error=refused)
            with contextlib.closing(conn):
                parts = urlsplit(url)
                conn.request("GET", parts.path + (f"?{parts.query}" if parts.query else ""),
                             headers={"User-Agent": user_agent, "Host": parts.netloc, "Connection": "close"})
                resp = conn.getresponse()
                if resp.status in (301, 302, 303, 307, 308) and resp.getheader("Location"):
                    url = urljoin(url, resp.getheader("Location"))
                    continue
                body = _read_until(resp, deadline)
            return RobotsEntry(origin, resp.status, body.decode("utf-8", "replace"))
        return RobotsEntry(origin, 0, error=f"more than {MAX_REDIRECTS} redirects")
    except (OSError, http.client.HTTPException, ValueError) as err:
        return RobotsEntry(origin, 0, error=f"{type(err).__name__}: {err}"[:300])


def _read_until(resp: http.client.HTTPResponse, deadline: float) -> bytes:
    """The body, at most MAX_ROBOTS_BYTES of it; TimeoutError past the deadline (a slow drip)."""
    data = b""
    while len(data) < MAX_ROBOTS_BYTES:
        if time.monotonic() > deadline:
            raise TimeoutError("robots.txt not read within the deadline")
        chunk = resp.read1(65536)
        if not chunk:
            break
        data += chunk
    return data[:MAX_ROBOTS_BYTES]


def fetch_robots_batch(job: tuple[list[str], UrlPolicy, str, float]) -> list[RobotsEntry]:
    """The entries of a batch of origins (a top-level function: executors map it over a cluster)."""
    origins, policy, user_agent, timeout = job
    with ThreadPoolExecutor(min(16, max(len(origins), 1))) as pool:
        return list(pool.map(lambda o: fetch_robots(o, policy, user_agent, timeout), origins))


class RobotsCache:
    """origin -> RobotsEntry, read from and written to OUT/_input/robots.parquet."""

    def __init__(self, entries: Iterable[RobotsEntry] = ()):
        self.entries = {e.origin: e for e in entries}

    @classmethod
    def load(cls, fs: fsspec.AbstractFileSystem, out: str) -> RobotsCache:
        path = f"{out}/{ROBOTS_NAME}"
        if not fs.exists(path):
            return cls()
        with fs.open(path, "rb") as f:
            rows = pq.read_table(f).to_pylist()
        return cls(RobotsEntry(r["origin"], r["status"], r["body"] or "", r["error"]) for r in rows)

    def save(self, fs: fsspec.AbstractFileSystem, out: str) -> None:
        rows = [{"origin": e.origin, "status": e.status, "body": e.body, "error": e.error}
                for e in sorted(self.entries.values(), key=lambda e: e.origin)]
        write_parquet(fs, f"{out}/{ROBOTS_NAME}", pa.Table.from_pylist(rows, schema=ROBOTS_SCHEMA))

    def missing(self, urls: Iterable[str]) -> list[str]:
        """Origins of urls with no entry yet, in first-seen order."""
        return [o for o in dict.fromkeys(origin_of(u) for u in urls) if o not in self.entries]

    def add(self, entries: Iterable[RobotsEntry]) -> None:
        self.entries.update((e.origin, e) for e in entries)


def apply_robots(prepared: PreparedPairs, cache: RobotsCache, user_agent: str) -> PreparedPairs:
    """Move the safe rows robots.txt refuses to `refused` (reason robots / robots_unreachable), counted."""
    urls = prepared.safe.column("url").to_pylist()
    reasons = [cache.entries[origin_of(u)].refusal(u, user_agent) for u in urls]
    if not any(reasons):
        return prepared
    keep = pa.array([i for i, r in enumerate(reasons) if r is None], pa.int64())
    gone = [(u, r) for u, r in zip(urls, reasons) if r is not None]
    refused = pa.concat_tables([prepared.refused, pa.table({"url": pa.array([u for u, _ in gone], pa.string()),
                                                             "reason": pa.array([r for _, r in gone], pa.string())})])
    counts = prepared.refused_counts + Counter(r for _, r in gone)
    return PreparedPairs(prepared.safe.take(keep), refused, prepared.skipped, counts, prepared.input_rows)
