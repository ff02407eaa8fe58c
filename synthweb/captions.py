"""Alt-texts and filenames of the synthetic web, as pure functions of a scene row and a seed.

Most alt-texts describe the image with varied templates, word order and synonyms (as the
alt-texts behind WIT do, CLIP Sec. 2.2); the rest are the web's noise: misspellings,
filenames, SEO spam, empty alts, kilobyte-long alts, other languages, and captions of
another image. Eval sets get clean captions (`clean_captions`) for retrieval.
"""
from __future__ import annotations

import random
import re

from synthweb import concepts as C

class Draws:
    """A cheap random stream: pre-drawn uniforms first, then a Random seeded by `key`.

    Seeding a Mersenne Twister per pair costs more than building the caption, so the
    generator draws a block of uniforms per uid in one vectorised hash and wraps it here.
    """

    __slots__ = ("_uniforms", "_next", "_key", "_fallback")

    def __init__(self, uniforms: list[float], key: int):
        self._uniforms, self._next, self._key, self._fallback = uniforms, 0, key, None

    def random(self) -> float:
        """A float in [0, 1)."""
        if self._next < len(self._uniforms):
            self._next += 1
            return self._uniforms[self._next - 1]
        if self._fallback is None:
            self._fallback = random.Random(self._key)
        return self._fallback.random()

    def choice(self, seq):
        """One element of a non-empty sequence."""
        return seq[int(self.random() * len(seq))]

    def randrange(self, start: int, stop: int | None = None) -> int:
        """An int in [start, stop) (or [0, start))."""
        start, stop = (0, start) if stop is None else (start, stop)
        return start + int(self.random() * (stop - start))

    def randint(self, a: int, b: int) -> int:
        """An int in [a, b]."""
        return self.randrange(a, b + 1)

    def getrandbits(self, k: int) -> int:
        """A k-bit int (k <= 52)."""
        return int(self.random() * (1 << k))

    def choices(self, population, weights) -> list:
        """One weighted pick, as a one-element list (as random.choices with k=1)."""
        u, acc = self.random() * sum(weights), 0.0
        for item, weight in zip(population, weights):
            acc += weight
            if u < acc:
                return [item]
        return [population[-1]]


RandomLike = Draws | random.Random
_ARTICLE = re.compile(r"\b([Aa]) (?=[aeiouAEIOU])")
_SHAPE_TEMPLATES = (
    "{n} {size} {color} {shapes}",
    "{n} {color} {shapes} on {bg} background",
    "photo of {n} {color} {shapes}",
    "{color} {shapes} {where}",
    "{shapes}, {color}, {size}",
    "{n} {shapes} in {color} against {bg} backdrop",
    "{n} {color} {shapes} {where} on {bg} background",
    "stock illustration of {n} {size} {color} {shapes}",
    "my {color} {shapes} drawing",
    "{texture} pattern with {n} {color} {shapes}",
    "{count} x {color} {shape}",
    "a picture showing {n} {shapes}. they are {color}.",
)
_DIGIT_TEMPLATES = (
    "handwritten digit {d}", "the number {dw} written by hand", "{color} handwritten {d} on {bg} background",
    "a scanned digit: {d}", "number {d} in {color} ink", "hand-drawn numeral {dw}", "{d}",
)
_WORD_TEMPLATES = (
    'a sign that says "{w}"', "the word {w} in {color} letters", "{w} text, {color}", "typography: {w}",
    "{W} poster", "the word '{w}' written on {bg} background", "logo {w}",
)
_CLEAN_TEMPLATES = (
    "{n} {size} {color} {shapes} on a {bgname} {texture} background.",
    "A {texture} {bgname} background with {n} {color} {shapes}.",
    "{n} {color} {shapes} {where}.",
    "An image of {n} {size} {color} {shapes}.",
    "Exactly {count} {color} {shapes} on {bgname}.",
)
_SCATTERED = ("scattered around", "all over the picture", "spread out", "here and there")


def plural(noun: str, n: int) -> str:
    """English plural of the last word of a noun phrase when n != 1."""
    if n == 1:
        return noun
    return noun + ("es" if noun.endswith(("s", "x", "sh", "ch")) else "s")


def _syn(options: tuple, rnd: RandomLike) -> str:
    """The canonical word (first) half the time, else a synonym."""
    return options[0] if rnd.random() < 0.5 else rnd.choice(options)


class _Slots(dict):
    """Template words of a scene row, drawn lazily (only the slots a template names use draws)."""

    def __init__(self, row: dict, rnd: RandomLike, synonyms: bool = True):
        super().__init__()
        self.row, self.rnd, self.synonyms = row, rnd, synonyms

    def pick(self, options: tuple) -> str:
        return _syn(options, self.rnd) if self.synonyms else options[0]

    def __missing__(self, key: str) -> str:
        self[key] = value = _SLOT_MAKERS[key](self, self.row, self.rnd)
        return value


_SLOT_MAKERS = {
    "color": lambda s, r, rnd: s.pick(C.COLOR_SYNONYMS[C.COLOR_NAMES[r["color"]]]),
    "shape": lambda s, r, rnd: s.pick(C.SHAPE_SYNONYMS[C.SHAPES[r["shape"]]]),
    "shapes": lambda s, r, rnd: plural(s["shape"], r["count"]),
    "n": lambda s, r, rnd: rnd.choice(("a", "one", "a single") if r["count"] == 1
                                      else (C.NUMBER_WORDS[r["count"]], str(r["count"]))),
    "count": lambda s, r, rnd: C.NUMBER_WORDS[r["count"]],
    "size": lambda s, r, rnd: s.pick(C.SIZE_SYNONYMS[r["size"]]),
    "where": lambda s, r, rnd: rnd.choice(C.POSITION_PHRASES[r["position"]] if r["count"] == 1 else _SCATTERED),
    "texture": lambda s, r, rnd: s.pick(C.BACKGROUND_PHRASES[r["background"]]),
    "bgname": lambda s, r, rnd: C.BG_COLORS[r["bg_color"]][0],
    "bg": lambda s, r, rnd: f"a {s['bgname']} {s['texture']}",
    "d": lambda s, r, rnd: str(r["digit"]),
    "dw": lambda s, r, rnd: C.NUMBER_WORDS[r["digit"]],
    "w": lambda s, r, rnd: C.WORDS[r["word"]],
    "W": lambda s, r, rnd: C.WORDS[r["word"]].upper(),
}


def _finish(text: str, rnd: RandomLike) -> str:
    text = _ARTICLE.sub(lambda m: m.group(1) + "n ", text)
    if rnd.random() < 0.4:
        text = text[:1].upper() + text[1:]
    return text


def describe(row: dict, rnd: RandomLike) -> str:
    """A web-style English description of the scene, template and synonyms chosen by rnd."""
    kind = C.KINDS[row["kind"]]
    templates = {"shapes": _SHAPE_TEMPLATES, "digit": _DIGIT_TEMPLATES, "word": _WORD_TEMPLATES}[kind]
    return _finish(rnd.choice(templates).format_map(_Slots(row, rnd)), rnd)


def clean_captions(row: dict, rnd: RandomLike) -> list[str]:
    """Five distinct, fully descriptive captions of a shapes scene (retrieval ground truth)."""
    slots = _Slots(row, rnd, synonyms=False)
    texts = [_ARTICLE.sub(lambda m: m.group(1) + "n ", t.format_map(slots)) for t in _CLEAN_TEMPLATES]
    return [t[:1].upper() + t[1:] for t in texts]


def misspell(text: str, rnd: RandomLike) -> str:
    """One typo (swap, drop, double or replace a letter) in a word of four letters or more."""
    words = text.split(" ")
    candidates = [i for i, w in enumerate(words) if len(w) >= 4 and w.isalpha()]
    if not candidates:
        return text
    i = rnd.choice(candidates)
    w, j = words[i], rnd.randrange(1, len(words[i]) - 1)
    edit = rnd.randrange(4)
    if edit == 0:
        w = w[:j] + w[j + 1] + w[j] + w[j + 2:]
    elif edit == 1:
        w = w[:j] + w[j + 1:]
    elif edit == 2:
        w = w[:j] + w[j] + w[j:]
    else:
        w = w[:j] + rnd.choice("aeioulnrst") + w[j + 1:]
    words[i] = w
    return " ".join(words)


def spam(row: dict, rnd: RandomLike) -> str:
    """SEO spam stuffed with the scene's keywords."""
    slots = _Slots(row, rnd)
    subject = {"shapes": f"{slots['color']} {slots['shape']}", "digit": f"number {slots['d']}",
               "word": f"{slots['w']} sign"}[C.KINDS[row["kind"]]]
    words = [rnd.choice(C.SPAM_WORDS + (subject, subject)) for _ in range(rnd.randint(10, 30))]
    return f"best cheap {subject} " + " ".join(words)


def long_alt(row: dict, rnd: RandomLike) -> str:
    """A kilobytes-long alt: a description buried in boilerplate and keyword repeats."""
    parts, size, target = [describe(row, rnd)], 0, rnd.randint(2000, 8000)
    while size < target:
        part = rnd.choice(C.FILLER_SENTENCES) if rnd.random() < 0.7 else spam(row, rnd)
        parts.append(part)
        size += len(part) + 1
    return " ".join(parts)


def foreign(row: dict, rnd: RandomLike) -> str:
    """A caption in French, German, Spanish or Chinese."""
    colors, shapes, templates, other = C.FOREIGN[rnd.choice(sorted(C.FOREIGN))]
    kind = C.KINDS[row["kind"]]
    if kind == "digit":
        return other[0].format(d=row["digit"])
    if kind == "word":
        return other[1].format(w=C.WORDS[row["word"]])
    return rnd.choice(templates).format(color=colors[row["color"]], shape=shapes[row["shape"]])


def filename(row: dict, rnd: RandomLike, jpeg_only: bool = False) -> str:
    """A URL-safe image filename: a slug, a camera name, a hash or a generic name."""
    ext = rnd.choices((".jpg", ".png", ".jpeg", ".JPG"), weights=(65, 15, 12, 8))[0]
    ext = ".jpg" if jpeg_only and ext == ".png" else ext
    style = rnd.randrange(4)
    if style == 0:
        kind = C.KINDS[row["kind"]]
        slug = {"shapes": f"{C.COLOR_NAMES[row['color']]}-{C.SHAPES[row['shape']]}",
                "digit": f"digit-{row['digit']}", "word": f"{C.WORDS[row['word']]}-sign"}[kind]
        return slug + rnd.choice(("", "-1", "_final", f"-{rnd.randint(2, 99)}")) + ext
    if style == 1:
        return rnd.choice((f"IMG_{rnd.randint(1000, 9999)}", f"DSC{rnd.randint(0, 99999):05d}",
                           f"PXL_2023{rnd.randint(1000000, 9999999)}")) + ext
    if style == 2:
        return f"{rnd.getrandbits(48):012x}" + ext
    return rnd.choice(("image", "photo", "thumb_", "upload-")) + str(rnd.randint(1, 500)) + ext


def alt_text(kind: str, row: dict, rnd: RandomLike, name: str, other: dict) -> str:
    """The alt-text of one pair given its caption kind (see web_spec.CAPTION_KINDS)."""
    if kind == "describe":
        return describe(row, rnd)
    if kind == "misspelled":
        return misspell(describe(row, rnd), rnd)
    if kind == "filename":
        return name
    if kind == "spam":
        return spam(row, rnd)
    if kind == "empty":
        return ""
    if kind == "long":
        return long_alt(row, rnd)
    if kind == "foreign":
        return foreign(row, rnd)
    return describe(other, rnd)  # "mismatch": the caption of another image
