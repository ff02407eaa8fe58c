"""Per-link rules of the extract stage: URL resolution, caption clean-up, optional filters.

CLIP's WIT (Radford et al. 2021, Sec. 2.2) came from a search engine; open reproductions
(LAION, MetaCLIP) start from Common Crawl WAT files instead, where every `<img>` of a page
appears as a link with its `alt` text. This module decides, for one such link, the
absolute image URL, the caption, and whether the pair survives the optional filters
(caption length, image extension, language). `extract.py` does the reading and writing.

Language identification: no language-ID package with a bundled model is installed in
this project, so `StopwordLanguageDetector` is a small, honest, *approximate* detector:
non-Latin scripts map to their most common language (Cyrillic -> "ru", Han -> "zh", ...),
Latin-script text is scored by counts of function words for seven European languages,
and anything without evidence is "und" (undetermined). Short alt texts ("red car") carry
no function words, so they come out "und"; keep them with `languages=("en", "und")`.
Any object with `detect(text) -> str` (an ISO 639-1 code or "und") can replace it.
"""
from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import NamedTuple, Protocol
from urllib.parse import urldefrag, urljoin, urlsplit

from clip_core.checks import whole_number
from clip_core.errors import check

DROP_REASONS = ("empty_alt", "bad_url", "bad_scheme", "extension", "caption_short",
                "caption_long", "language", "duplicate")
HTTP_SCHEMES = ("http", "https")
UNDETERMINED = "und"

# Unicode blocks that settle the language on their own (approximately), as
# (first, last, code); Latin script goes to the stopword vote instead.
_SCRIPT_RANGES = (
    (0x0370, 0x03FF, "el"), (0x0400, 0x04FF, "ru"), (0x0590, 0x05FF, "he"),
    (0x0600, 0x06FF, "ar"), (0x0900, 0x097F, "hi"), (0x0E00, 0x0E7F, "th"),
    (0x3040, 0x30FF, "ja"), (0xAC00, 0xD7AF, "ko"), (0x4E00, 0x9FFF, "zh"),
)
_STOPWORDS = {
    "en": "the a an of and in on with for to at by from is are this that my our your his "
          "her its their over under near into during two three some or as be",
    "de": "der die das und ist mit von zu den dem ein eine im auf für nicht des sich bei "
          "aus einem einer",
    "fr": "le la les et des du un une est dans pour sur au aux avec par ce qui pas en de",
    "es": "el la los las y del un una es en con por para que al su sus se como de",
    "it": "il lo la gli le e di del della un una è in con per che al dei delle nel",
    "pt": "o a os as e do da dos das um uma é em com por para que no na ao de",
    "nl": "de het een en van in is op met voor niet aan bij zijn dat die",
}
_WORD = re.compile(r"[^\W\d_]+")
_SIMPLE_URL = re.compile(r"[A-Za-z0-9\-._~/%:@!$&'()*+,=]+\Z")  # no ?#; space or non-ASCII


class LanguageDetector(Protocol):
    """Anything that names the language of a caption: ISO 639-1 code, or "und"."""

    def detect(self, text: str) -> str: ...


def _script_language(text: str) -> str | None:
    """The language implied by the majority non-Latin script, if letters are mostly one."""
    counts: dict[str, int] = {}
    letters = 0
    for ch in text:
        if not ch.isalpha():
            continue
        letters += 1
        cp = ord(ch)
        for first, last, code in _SCRIPT_RANGES:
            if first <= cp <= last:
                counts[code] = counts.get(code, 0) + 1
                break
    if "ja" in counts:  # kana beside Han characters means Japanese
        counts["ja"] += counts.pop("zh", 0)
    if not counts:
        return None
    code, n = max(counts.items(), key=lambda kv: kv[1])
    return code if 2 * n > letters else None


@dataclass(frozen=True)
class StopwordLanguageDetector:
    """Approximate detector: script ranges, then a function-word vote for Latin text."""

    stopwords: dict[str, frozenset[str]] = field(
        default_factory=lambda: {k: frozenset(v.split()) for k, v in _STOPWORDS.items()})

    def detect(self, text: str) -> str:
        """ISO 639-1 code of `text`, or "und" when the evidence is absent or tied."""
        by_script = _script_language(text)
        if by_script:
            return by_script
        words = _WORD.findall(text.lower())
        scores = {lang: sum(w in vocab for w in words) for lang, vocab in self.stopwords.items()}
        best = max(scores.values(), default=0)
        winners = [lang for lang, s in scores.items() if s == best]
        return winners[0] if best > 0 and len(winners) == 1 else UNDETERMINED


def normalize_caption(alt: object) -> str:
    """The alt text with whitespace runs collapsed to single spaces ("" when absent)."""
    return " ".join(alt.split()) if isinstance(alt, str) else ""


def page_base(page_url: str, base_href: object) -> str:
    """The URL relative links resolve against: `<base href>` (itself resolved) or the page."""
    if not isinstance(base_href, str) or not base_href.strip():
        return page_url
    try:
        base = urljoin(page_url, base_href.strip())
        return base if urlsplit(base).scheme.lower() in HTTP_SCHEMES else page_url
    except ValueError:
        return page_url


class BaseUrl(NamedTuple):
    """A resolution base split once per page, so that simple links resolve by concatenation."""

    url: str
    scheme: str  # "" when the base is not http(s) with a host: every link takes urljoin
    origin: str  # scheme://netloc, as urljoin writes it
    directory: str  # origin + path up to its last "/", merged as urljoin merges it


def split_base(base: str) -> BaseUrl:
    """`base` pre-split for `resolve_image_url`."""
    try:
        parts = urlsplit(base)
        if parts.scheme not in HTTP_SCHEMES or not parts.hostname:
            return BaseUrl(base, "", "", "")
    except ValueError:
        return BaseUrl(base, "", "", "")
    origin, path = f"{parts.scheme}://{parts.netloc}", parts.path
    if "/." in path or "//" in path or ";" in path:  # let urljoin merge the hard ones
        return BaseUrl(base, parts.scheme, origin, urljoin(base, "_")[:-1])
    return BaseUrl(base, parts.scheme, origin, origin + (path[:path.rfind("/") + 1] or "/"))


def resolve_image_url_reference(src: object, base_url: str) -> tuple[str, str | None]:
    """(absolute http(s) URL without fragment, None) or ("", drop reason): the oracle."""
    if not isinstance(src, str) or not src.strip():
        return "", "bad_url"
    try:
        url = urldefrag(urljoin(base_url, src.strip())).url
        parts = urlsplit(url)
    except ValueError:  # e.g. an unbalanced IPv6 bracket
        return "", "bad_url"
    if parts.scheme.lower() not in HTTP_SCHEMES:
        return "", "bad_url" if not parts.scheme else "bad_scheme"
    if not parts.hostname:
        return "", "bad_url"
    return url, None


def _has_host(rest: str) -> bool:
    """Whether `host...` (what follows "//") names a non-empty host."""
    netloc = rest.split("/", 1)[0]
    return bool(netloc.rpartition("@")[2].partition(":")[0])


def _fast_join(src: str, base: BaseUrl) -> str | None:
    """urljoin(base, src) for simple links (plain ASCII, no ?#; or dot segments), else None."""
    if not base.scheme or not _SIMPLE_URL.match(src):
        return None
    if src.startswith(("http://", "https://")):
        return src if _has_host(src.split("://", 1)[1]) else None
    if src.startswith("//"):
        return f"{base.scheme}:{src}" if _has_host(src[2:]) else None
    rest = src.lstrip("./") if src.startswith("../") else src
    if "/." in rest or rest.startswith(".") or "//" in rest or ":" in rest.split("/", 1)[0]:
        return None
    if rest is not src:
        return _up_join(base, src[:len(src) - len(rest)], rest)
    return base.origin + src if src.startswith("/") else base.directory + src


def _up_join(base: BaseUrl, ups: str, rest: str) -> str | None:
    """urljoin for "../../rest": drop one directory per "../", never above the root."""
    if ups != "../" * (len(ups) // 3):
        return None
    dirs = base.directory[len(base.origin) + 1:].split("/")[:-1]  # "/a/b/" -> [a, b]
    kept = dirs[:max(len(dirs) - len(ups) // 3, 0)]
    return f"{base.origin}/{''.join(d + '/' for d in kept)}{rest}"


def resolve_image_url(src: object, base: BaseUrl | str) -> tuple[str, str | None]:
    """As `resolve_image_url_reference`, ~10x faster on the common simple links."""
    base = split_base(base) if isinstance(base, str) else base
    if isinstance(src, str):
        url = _fast_join(src.strip(), base)
        if url is not None:
            return url, None
    return resolve_image_url_reference(src, base.url)


def parse_extensions(extensions: Iterable[str] | None) -> tuple[str, ...] | None:
    """Lower-case extensions without dots ("JPG", ".png" -> "jpg", "png"); None stays None."""
    if extensions is None:
        return None
    return tuple(sorted({e.strip().lower().lstrip(".") for e in extensions if e.strip()}))


def url_extension(url: str) -> str:
    """The lower-case extension of the URL's path ("" when the last segment has none)."""
    last = urlsplit(url).path.rsplit("/", 1)[-1]
    return last.rsplit(".", 1)[-1].lower() if "." in last else ""


@dataclass(frozen=True)
class PairFilter:
    """The optional filters, all off by default; picklable so workers receive it."""

    min_caption_len: int | None = None
    max_caption_len: int | None = None
    languages: frozenset[str] | None = None
    image_extensions: tuple[str, ...] | None = None
    detector: LanguageDetector | None = None

    def __post_init__(self):
        self._check()
        if self.languages is not None and self.detector is None:
            object.__setattr__(self, "detector", StopwordLanguageDetector())

    def _check(self) -> None:
        """InputError for settings that cannot work (negative lengths, empty lists, min above max)."""
        low, high = self.min_caption_len, self.max_caption_len
        if low is not None:
            whole_number("--min-caption-len", low, minimum=0)
        if high is not None:
            whole_number("--max-caption-len", high)
        check(low is None or high is None or low <= high, "--min-caption-len", f"{low} is above "
              f"--max-caption-len {high}: no caption could be kept", "swap or widen them")
        if self.languages is not None:
            codes = sorted(map(str, self.languages))
            check(bool(codes) and all(isinstance(c, str) and c.strip() for c in self.languages), "--lang",
                  f"must list language codes, got {codes}", "e.g. --lang en,und")
        check(self.image_extensions is None or bool(self.image_extensions), "--ext", "lists no extension",
              "e.g. --ext jpg,png")

    def reason(self, url: str, caption: str) -> str | None:
        """Why (url, caption) is dropped, or None when it is kept."""
        if self.image_extensions is not None and url_extension(url) not in self.image_extensions:
            return "extension"
        if self.min_caption_len is not None and len(caption) < self.min_caption_len:
            return "caption_short"
        if self.max_caption_len is not None and len(caption) > self.max_caption_len:
            return "caption_long"
        if self.languages is not None and self.detector.detect(caption) not in self.languages:
            return "language"
        return None

    def describe(self) -> dict:
        """The filter settings as plain JSON values, for the stats file."""
        return {
            "min_caption_len": self.min_caption_len,
            "max_caption_len": self.max_caption_len,
            "languages": sorted(self.languages) if self.languages is not None else None,
            "image_extensions": list(self.image_extensions) if self.image_extensions else None,
            "detector": type(self.detector).__name__ if self.detector is not None else None,
        }
