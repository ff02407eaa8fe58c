"""Per-host manners of the synthetic web: what a polite crawler has to cope with.

`HostRules` says how one loopback host treats crawlers: its robots.txt (body, status,
delay; RFC 9309), a rate limiter that answers 429/503 with Retry-After (RFC 9110
Sec. 10.2.3) and keeps refusing until the announced pause has ended, and image paths
whose body is dripped a byte at a time (a client needs a whole-response deadline).
The defaults are the plain web: allow-all robots.txt, no limits, no dripping.
`Throttle` is the clock-driven rate limiter of one host; `RequestRecord` is one line of
the server's request log. Nothing here touches sockets.
"""
from __future__ import annotations

import math
import re
import threading
from dataclasses import dataclass
from email.utils import formatdate
from typing import NamedTuple
from urllib.parse import unquote, urlsplit

ALLOW_ALL = "User-agent: *\nAllow: /\n"
IMAGE_PREFIXES = ("/s/", "/img/")
RETRY_AFTER_FORMATS = ("seconds", "http-date")


class RequestRecord(NamedTuple):
    """One request as the server saw it (a tuple: cheap for logs of 100k requests)."""

    time: float  # time.time() when the request line was read
    host: str  # the server address it arrived on, e.g. "127.0.0.2"
    path: str  # the request target as sent, e.g. "/s/site0001/17/x.jpg"
    status: int  # the status answered (or about to be, if the client hung up first)
    user_agent: str | None


def url_path(target: str) -> str:
    """The decoded path of a request target (no query), as the routes see it."""
    return unquote(urlsplit(target).path)


def is_image_path(path: str) -> bool:
    """Whether a decoded path is under the image routes /s/ or /img/."""
    return path.startswith(IMAGE_PREFIXES)


@dataclass(frozen=True)
class HostRules:
    """How one host treats crawlers; every default is today's plain behaviour."""

    robots: str | None = None  # robots.txt body; None: allow-all
    robots_status: int = 200  # 404: no robots.txt; 500/503: server error (body: an error page)
    robots_delay: float = 0.0  # seconds before answering robots.txt
    throttle_first: int = 0  # the first N image requests are refused with a Retry-After
    throttle_status: int = 429  # 429 or 503
    retry_after: float = 1.0  # seconds of pause each refusal announces
    retry_after_format: str = "seconds"  # or "http-date" (IMF-fixdate)
    drip_paths: str | None = None  # regex (re.search) on the path: image bodies sent slowly
    drip_bytes: int = 1
    drip_interval: float = 1.0

    def __post_init__(self):
        fix = "see synthweb.hosts.HostRules"
        if self.robots is not None and not isinstance(self.robots, str):
            raise ValueError(f"HostRules.robots must be a str or None, got {type(self.robots).__name__}; {fix}")
        if not (200 <= self.robots_status < 300 or 400 <= self.robots_status < 600):
            raise ValueError(f"HostRules.robots_status must be 2xx, 4xx or 5xx, got {self.robots_status}")
        if self.throttle_status not in (429, 503):
            raise ValueError(f"HostRules.throttle_status must be 429 or 503, got {self.throttle_status}")
        if self.retry_after_format not in RETRY_AFTER_FORMATS:
            raise ValueError(f"HostRules.retry_after_format must be one of {RETRY_AFTER_FORMATS}, "
                             f"got {self.retry_after_format!r}")
        for name in ("robots_delay", "retry_after", "drip_interval"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0) or (name != "robots_delay" and value == 0):
                raise ValueError(f"HostRules.{name} must be a finite number of seconds > 0 "
                                 f"(>= 0 for robots_delay), got {value!r}")
        if self.throttle_first < 0 or self.drip_bytes < 1:
            raise ValueError(f"HostRules.throttle_first must be >= 0 and drip_bytes >= 1, "
                             f"got {self.throttle_first} and {self.drip_bytes}")
        if self.drip_paths is not None:
            try:
                re.compile(self.drip_paths)
            except re.error as e:
                raise ValueError(f"HostRules.drip_paths is not a regex ({e}): {self.drip_paths!r}") from None

    def robots_body(self) -> str:
        """The robots.txt text this host serves with a 2xx status."""
        return ALLOW_ALL if self.robots is None else self.robots

    def drips(self, path: str) -> bool:
        """Whether the image body at decoded `path` is sent `drip_bytes` per `drip_interval`."""
        return self.drip_paths is not None and is_image_path(path) and re.search(self.drip_paths, path) is not None

    def retry_after_value(self, remaining: float, wall_now: float) -> str:
        """The Retry-After header for a pause of `remaining` seconds from `wall_now` (rounded up)."""
        if self.retry_after_format == "http-date":  # 1 s resolution: round up so the pause has ended
            return formatdate(math.ceil(wall_now + remaining), usegmt=True)
        return str(max(1, math.ceil(remaining - 1e-9)))  # delay-seconds is an integer (RFC 9110)


class Throttle:
    """One host's rate limiter: refuse the first N image requests, then any inside the pause."""

    def __init__(self, rules: HostRules):
        self._first, self._pause = rules.throttle_first, rules.retry_after
        self._refused, self._until = 0, -math.inf
        self._lock = threading.Lock()

    def check(self, now: float) -> float | None:
        """Seconds of pause left if an image request at monotonic time `now` is refused, else None."""
        with self._lock:
            if self._refused < self._first:
                self._refused += 1
                self._until = now + self._pause
                return self._pause
            if now < self._until:
                return self._until - now
            return None
