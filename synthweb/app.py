"""What the synthetic web answers to a request path, as a pure function (no sockets here).

Routes:
  /s/{site}/{uid}/{filename}   the pair's image URL; its fate (see web_spec.FATES) decides
                               404, 500, a delay, a 301/302 to /img/..., an HTML body served
                               as image/jpeg, truncated or corrupt JPEG bytes, a
                               decompression-bomb PNG, or `X-Robots-Tag: noai`
  /img/{site}/{uid}/{filename} the canonical image, always served (redirect target)
  /s/{site}/page{n}.html       an HTML page with `<img src alt>` of pairs n*P .. n*P+P-1
  /  and /robots.txt           a small index and the host's robots file (allow-all unless its
                               `hosts.HostRules` say otherwise: body, status, delay)
The format follows the filename: `.png` is PNG, anything else JPEG. Rules that need a clock
(rate limits) or a socket (dripped bodies) live in `server`; this stays a pure function.
"""
from __future__ import annotations

import functools
import html
import re
import struct
import threading
import zlib
from dataclasses import dataclass, replace
from http import HTTPStatus
from urllib.parse import unquote, urlsplit

import numpy as np
from PIL import Image

from synthweb.eval_sets import eval_image
from synthweb.hosts import HostRules
from synthweb.render import encode, render_scene, transform_copy
from synthweb.scenes import PLANTED, SPLITS, DigitBank, hash64, load_digit_bank, row, web_table
from synthweb.generator import pair_columns, site_name
from synthweb.spec import EVAL_SETS, FATES, WebSpec, load_spec

_IMAGE = re.compile(r"^/(s|img)/(site\d{4})/(\d{1,18})/([A-Za-z0-9._-]+)$")
_PAGE = re.compile(r"^/s/(site\d{4})/page(\d{1,18})\.html$")
_NOAI = "noai, noimageai"
_BLOCK = 1024  # uids drawn together (see SyntheticWeb._pair)


@dataclass(frozen=True)
class WebResponse:
    status: int
    body: bytes = b""
    content_type: str = "text/html; charset=utf-8"
    headers: tuple[tuple[str, str], ...] = ()
    delay: float = 0.0  # seconds to wait before answering (slow hosts, timeouts)


def _text(status: int, message: str) -> WebResponse:
    page = f"<html><head><title>{status}</title></head><body><h1>{html.escape(message)}</h1></body></html>"
    return WebResponse(status, page.encode())


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def bomb_png(size: int) -> bytes:
    """A valid one-colour PNG declaring size x size pixels (1-bit grey), about 100 KB at 30000."""
    rows, z, parts = b"\x00" * ((size + 7) // 8 + 1), zlib.compressobj(9), []
    for start in range(0, size, 1000):
        parts.append(z.compress(rows * min(1000, size - start)))
    parts.append(z.flush())
    header = struct.pack(">IIBBBBB", size, size, 1, 0, 0, 0, 0)
    chunks = _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", b"".join(parts)) + _png_chunk(b"IEND", b"")
    return b"\x89PNG\r\n\x1a\n" + chunks


def _phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Error"


def robots_response(rules: HostRules) -> WebResponse:
    """A host's /robots.txt: its body with a 2xx status, an error page with 4xx/5xx; after its delay."""
    status = rules.robots_status
    if status < 300:
        resp = WebResponse(status, rules.robots_body().encode(), "text/plain; charset=utf-8")
    else:
        resp = _text(status, _phrase(status))
    return replace(resp, delay=rules.robots_delay)


class SyntheticWeb:
    """The synthetic web of one spec: image bytes, pages and failures for any path."""

    def __init__(self, spec: WebSpec, bank: DigitBank | None = None):
        self.spec = spec
        self.bank = bank if bank is not None else load_digit_bank()
        self._bomb: bytes | None = None
        self._bomb_lock = threading.Lock()
        # Drawing one uid's row costs ~2 ms, a block of 1024 ~25 ms: a crawl asks for uids in
        # runs, so rows are drawn a block at a time and the last blocks kept (~10 MB at 64).
        self._block = functools.lru_cache(maxsize=64)(self._draw_block)

    @classmethod
    def from_root(cls, root: str, storage_options: dict | None = None) -> "SyntheticWeb":
        """The web generated under `root` (reads `root/web.json` only)."""
        return cls(load_spec(root, storage_options))

    def bomb(self) -> bytes:
        """The decompression-bomb PNG, built once on first use (about half a second)."""
        with self._bomb_lock:
            if self._bomb is None:
                self._bomb = bomb_png(self.spec.bomb_size)
            return self._bomb

    def _draw_block(self, block: int) -> dict:
        uids = np.arange(block * _BLOCK, min((block + 1) * _BLOCK, self.spec.n_pairs))
        return pair_columns(self.spec, uids, self.bank)

    def _pair(self, uid: int) -> tuple[str, dict]:
        """(url, scene row) of a uid below n_pairs, from its block."""
        cols = self._block(uid // _BLOCK)
        return cols["url"][uid % _BLOCK], row(cols["table"], uid % _BLOCK)

    def _scene(self, uid: int) -> dict:
        if 0 <= uid < self.spec.n_pairs:
            return self._pair(uid)[1]
        return row(web_table(self.spec, [uid], self.bank), 0)

    def render(self, uid: int, scene: dict | None = None) -> tuple[Image.Image, int]:
        """The image content of a uid and the JPEG quality it is served at."""
        scene = scene if scene is not None else self._scene(uid)
        if scene["content"] != PLANTED:
            return render_scene(scene, self.bank)[0], self.spec.jpeg_quality
        source = eval_image(self.spec.seed, EVAL_SETS[scene["eval_set"]], SPLITS[scene["eval_split"]],
                            scene["eval_index"], self.bank, self.spec.image_size)
        rng = np.random.default_rng(int(hash64(self.spec.seed, "planted/render", [uid])[0]))
        return transform_copy(source, scene["transform"], rng)

    def image(self, uid: int, filename: str = "image.jpg", scene: dict | None = None) -> tuple[bytes, str]:
        """(bytes, content type) of a uid's image in the format its filename names."""
        image, quality = self.render(uid, scene)
        if filename.lower().endswith(".png"):
            return encode(image, "PNG"), "image/png"
        return encode(image, "JPEG", quality), "image/jpeg"

    def pair(self, uid: int) -> dict:
        """The pair of a uid as in pairs.parquet: uid, url, caption."""
        cols = pair_columns(self.spec, [uid], self.bank)
        return {"uid": uid, "url": cols["url"][0], "caption": cols["caption"][0]}

    def respond(self, path: str, authority: str | None = None, rules: HostRules | None = None) -> WebResponse:
        """The response to GET `path`; `authority` (host:port, default the base_url's) builds redirects,
        `rules` (default: none) give the host's robots.txt."""
        authority = authority or urlsplit(self.spec.base_url).netloc
        path = unquote(urlsplit(path).path)
        if path in ("/", "/index.html"):
            return WebResponse(200, self.index().encode())
        if path == "/robots.txt":
            return robots_response(rules or HostRules())
        if m := _PAGE.match(path):
            page = self.page(m.group(1), int(m.group(2)))
            return WebResponse(200, page.encode()) if page else _text(404, "Not Found")
        if m := _IMAGE.match(path):
            return self._image_response(m.group(1), m.group(2), int(m.group(3)), m.group(4), authority)
        return _text(404, "Not Found")

    def _image_response(self, route: str, site: str, uid: int, name: str, authority: str) -> WebResponse:
        if uid >= self.spec.n_pairs:
            return _text(404, "Not Found")
        url, scene = self._pair(uid)
        if not url.endswith(f"/s/{site}/{uid}/{name}"):
            return _text(404, "Not Found")
        fate = "ok" if route == "img" else FATES[scene["fate"]]
        if fate in ("404", "500"):
            return _text(int(fate), "Not Found" if fate == "404" else "Internal Server Error")
        if fate.startswith("redirect"):
            target = f"http://{authority}/img/{site}/{uid}/{name}"
            return WebResponse(int(fate[-3:]), b"", headers=(("Location", target),))
        return self._body_response(fate, uid, name, scene)

    def _body_response(self, fate: str, uid: int, name: str, scene: dict) -> WebResponse:
        rng = np.random.default_rng(int(hash64(self.spec.seed, "failure", [uid])[0]))
        if fate == "html":
            page = "<!doctype html><html><body><h1>Access denied</h1><p>Please enable cookies.</p></body></html>"
            return WebResponse(200, page.encode(), "image/jpeg")
        if fate == "bomb":
            return WebResponse(200, self.bomb(), "image/png")
        if fate == "corrupt":
            return WebResponse(200, b"\xff\xd8\xff\xe0" + rng.bytes(int(rng.integers(2000, 20000))), "image/jpeg")
        if fate == "truncated":
            data, _ = self.image(uid, "cut.jpg", scene)
            return WebResponse(200, data[: int(len(data) * rng.uniform(0.3, 0.7))], "image/jpeg")
        data, ctype = self.image(uid, name, scene)
        delay = {"slow": self.spec.slow_seconds, "timeout": self.spec.timeout_seconds}.get(fate, 0.0)
        headers = (("X-Robots-Tag", _NOAI),) if fate == "noai" else ()
        return WebResponse(200, data, ctype, headers, delay)

    def page(self, site: str, n: int) -> str | None:
        """HTML of page n listing its pairs as `<img src alt>`, or None if no such page."""
        per_page, n_pages = self.spec.pairs_per_page, -(-self.spec.n_pairs // self.spec.pairs_per_page)
        if n >= n_pages or site != site_name(n % self.spec.n_sites):
            return None
        uids = np.arange(n * per_page, min((n + 1) * per_page, self.spec.n_pairs))
        cols = pair_columns(self.spec, uids, self.bank)
        pairs = zip(cols["url"], cols["caption"])
        imgs = [f'<img src="{html.escape(url)}" alt="{html.escape(alt)}">' for url, alt in pairs]
        nav = f'<a href="{self._page_path(n + 1)}">next</a>' if n + 1 < n_pages else ""
        return (f'<!doctype html><html><head><meta charset="utf-8"><title>{site} page {n}</title></head>'
                f"<body><h1>{site} page {n}</h1>\n" + "\n".join(imgs) + f"\n{nav}</body></html>\n")

    def _page_path(self, n: int) -> str:
        return f"/s/{site_name(n % self.spec.n_sites)}/page{n}.html"

    def index(self) -> str:
        """A front page linking the first pages."""
        n_pages = min(-(-self.spec.n_pairs // self.spec.pairs_per_page), 100)
        links = [f'<a href="{self._page_path(n)}">page {n}</a>' for n in range(n_pages)]
        return "<!doctype html><html><body><h1>synthetic web</h1>\n" + "<br>\n".join(links) + "\n</body></html>\n"
