"""How hard the crawl may press on one host: the options, the per-host gate, Retry-After.

A crawl of 400M images talks to millions of hosts; a few large ones hold most images, and
they are the ones that answer 429 or block a crawler that ignores them. The guard proxy
(`guard.py`) sees every request, so it is where these limits live:

- `HostGate`: at most `per_host_concurrency` requests in flight per host and request starts at
  least 1 / `per_host_rps` seconds apart (a robots.txt Crawl-delay or Request-rate tightens
  the spacing); a host that answered 429/503 with Retry-After is paused until then. One gate
  serves every thread and process behind one guard, so the limits hold per node; a cluster
  divides them between the guards that can reach a host at once (`share`, see download.py).
- `Politeness`: the crawl's options (`--user-agent`, `--per-host-rps`, ...), checked at the door.
- `retry_after_seconds`: Retry-After as seconds or an HTTP date (RFC 9110 Sec. 10.2.3).
"""
from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime

from clip_core.checks import finite_number, whole_number
from clip_core.errors import InputError

CRAWLER_NAME = "clip-pipeline-crawler"
CONTACT_URL = "https://github.com/clip-pipeline/clip-pipeline/blob/main/README.md#what-the-crawler-promises-a-site-operator"
DEFAULT_USER_AGENT = f"{CRAWLER_NAME}/0.1 (+{CONTACT_URL})"
DEFAULT_RPS = 2.0  # request starts per second per host
DEFAULT_CONCURRENCY = 2  # requests in flight per host
DEFAULT_MAX_IMAGE_BYTES = 20 * 1024 * 1024
DEFAULT_PAUSE = 10.0  # seconds a host that answered 429 without Retry-After is left alone
MAX_PAUSE = 600.0  # a longer Retry-After pauses the host this long; its sample fails now and joins --retry-failed
_TOKEN = re.compile(r"^[A-Za-z0-9._-]+$")


@dataclass(frozen=True)
class Politeness:
    """The crawl's manners: who it says it is, what it reads of robots.txt, how hard it presses a host.

    per_host_rps / per_host_concurrency 0 mean no limit (for servers you run yourself);
    throttle_retries is how often a sample answered 429/503 with Retry-After is asked again
    within the run, after the pause; deadline bounds a whole response (the crawl's --timeout).
    """

    user_agent: str = DEFAULT_USER_AGENT
    per_host_rps: float = DEFAULT_RPS
    per_host_concurrency: int = DEFAULT_CONCURRENCY
    respect_robots: bool = True
    max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES
    deadline: float = 10.0
    throttle_retries: int = 2
    max_pause: float = MAX_PAUSE
    shares: dict = field(default_factory=dict)  # host -> fraction of the limits this guard may use
    default_share: float = 1.0

    @property
    def robots_token(self) -> str:
        """The product token robots.txt groups name us by: the User-Agent's first word before '/'."""
        return self.user_agent.split("/", 1)[0].split()[0]

    def share(self, host: str) -> float:
        return self.shares.get(host, self.default_share)

    def check(self) -> Politeness:
        """self, or InputError naming the flag that is out of range."""
        ua = self.user_agent.strip() if isinstance(self.user_agent, str) else ""
        if not ua or not _TOKEN.match(ua.split("/", 1)[0].split()[0]) or any(ord(c) < 32 for c in ua):
            raise InputError("--user-agent", f"{self.user_agent!r} is not a User-Agent with a product token",
                             f"name the crawler and a contact, such as {DEFAULT_USER_AGENT!r}")
        rps = finite_number("--per-host-rps", self.per_host_rps, "requests per second per host; 0 for no limit")
        if rps < 0:
            raise InputError("--per-host-rps", f"must be >= 0, got {rps}", "requests per second per host; 0 for no limit")
        whole_number("--per-host-concurrency", self.per_host_concurrency, 0, None,
                     fix="requests in flight per host; 0 for no limit")
        whole_number("--max-image-bytes", self.max_image_bytes, 1, None, fix="bytes, such as 20000000")
        whole_number("--throttle-retries", self.throttle_retries, 0, None, fix="retries after a 429/503, such as 2")
        finite_number("--timeout", self.deadline, "seconds per response, such as --timeout 10", above=0)
        return self


def retry_after_seconds(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a Retry-After value (delta-seconds or an HTTP date); None when absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when is None or when.tzinfo is None:
        return None
    return max(when.timestamp() - (time.time() if now is None else now), 0.0)


@dataclass
class _Host:
    active: int = 0
    next_start: float = 0.0  # monotonic time before which no request may start
    paused_until: float = 0.0


class HostGate:
    """Per-host admission: concurrency slots, spaced starts and pauses, shared by every thread of a guard."""

    def __init__(self, politeness: Politeness, clock: Callable[[], float] = time.monotonic):
        self.politeness, self.clock = politeness, clock
        self._hosts: dict[str, _Host] = {}
        self._delays: dict[str, float] = {}  # host -> robots.txt Crawl-delay (seconds between starts)
        self._cond = threading.Condition()

    def set_crawl_delay(self, host: str, seconds: float | None) -> None:
        """A robots.txt Crawl-delay (or 1 / Request-rate) for host: it can only slow the host down."""
        if seconds:
            with self._cond:
                self._delays[host] = float(seconds)

    def interval(self, host: str) -> float:
        """Seconds between request starts to host: 1 / (rps x share), or the Crawl-delay if longer."""
        p = self.politeness
        spacing = 1.0 / (p.per_host_rps * p.share(host)) if p.per_host_rps else 0.0
        return max(spacing, self._delays.get(host, 0.0))

    def slots(self, host: str) -> int:
        """Requests host may have in flight behind this guard (0: no limit)."""
        p = self.politeness
        return max(1, int(p.per_host_concurrency * p.share(host))) if p.per_host_concurrency else 0

    def enter(self, host: str, max_wait: float | None = None, tick: Callable[[], None] | None = None,
              tick_every: float = 2.0) -> float | None:
        """Wait for host's turn and take a slot; the seconds waited, or None past max_wait (no slot taken).

        `tick` is called about every `tick_every` seconds while waiting (the proxy keeps the client's
        connection alive with it)."""
        start = last_tick = self.clock()
        with self._cond:
            state = self._hosts.setdefault(host, _Host())
            while True:
                now = self.clock()
                slots = self.slots(host)
                ready_at = max(state.next_start, state.paused_until)
                if (not slots or state.active < slots) and now >= ready_at:
                    state.active += 1
                    state.next_start = max(now, state.next_start) + self.interval(host)
                    return now - start
                if max_wait is not None and max(ready_at, now) - start > max_wait:
                    return None
                self._cond.wait(min(max(ready_at - now, 0.01), tick_every))
                if tick is not None and self.clock() - last_tick >= tick_every:
                    last_tick = self.clock()
                    self._cond.release()
                    try:
                        tick()
                    finally:
                        self._cond.acquire()

    def leave(self, host: str) -> None:
        """Give host's slot back."""
        with self._cond:
            self._hosts[host].active -= 1
            self._cond.notify_all()

    def pause(self, host: str, seconds: float) -> None:
        """Start nothing on host for `seconds` (at most max_pause) from now."""
        with self._cond:
            state = self._hosts.setdefault(host, _Host())
            state.paused_until = max(state.paused_until, self.clock() + min(seconds, self.politeness.max_pause))
            self._cond.notify_all()
