"""Drawing synthetic-web images from scene labels with PIL and numpy.

A scene (see `scenes.py`) names a background texture and colour and either shapes (count
objects of one shape and colour on a 3x3 grid), a real handwritten digit (sklearn's 8x8
scans, recoloured and upscaled) or a rendered word (OCR-style). Drawing is a pure function
of the scene row: all randomness comes from a generator seeded by the row's `render_key`,
and near-duplicates perturb position and colour through a separate generator seeded by
`variant`, so the base layout is unchanged. A 256x256 JPEG takes a few milliseconds.
"""
from __future__ import annotations

import io
import math

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from synthweb import concepts as C
from synthweb.scenes import TRANSFORMS, DigitBank

_POLYGON_SIDES = {"triangle": 3, "square": 4, "pentagon": 5, "hexagon": 6, "diamond": 4}


def render_scene(scene: dict, bank: DigitBank) -> tuple[Image.Image, dict]:
    """The RGB image of a scene row, and metadata (colours, object centres and radii)."""
    rng = np.random.default_rng(scene["render_key"])
    w, h = scene["width"], scene["height"]
    bg = C.BG_COLORS[scene["bg_color"]][1]
    image = Image.fromarray(background(w, h, C.BACKGROUNDS[scene["background"]], bg, rng))
    fg, offset = _variant(C.COLORS[scene["color"]][1], scene["variant"], w)
    meta = {"fg": fg, "bg": bg, "objects": []}
    kind = C.KINDS[scene["kind"]]
    if kind == "shapes":
        for cx, cy, r in layout(w, h, scene["count"], scene["position"], scene["size"], rng):
            cx, cy = cx + offset[0], cy + offset[1]
            draw_shape(ImageDraw.Draw(image), C.SHAPES[scene["shape"]], cx, cy, r, fg, rng)
            meta["objects"].append((cx, cy, r))
    elif kind == "digit":
        meta["objects"].append(_paste_digit(image, bank.images[scene["digit_sample"]], fg, offset, rng))
    else:
        meta["objects"].append(_draw_word(image, C.WORDS[scene["word"]], fg, offset, rng))
    return image, meta


def _variant(fg: tuple, variant: int, w: int) -> tuple[tuple, tuple]:
    """Near-duplicate perturbation: a small colour shift and a shift of a few pixels."""
    if not variant:
        return fg, (0, 0)
    rng = np.random.default_rng(variant)
    shifted = tuple(int(c) for c in np.clip(np.asarray(fg) + rng.integers(-18, 19, 3), 0, 255))
    step = max(2, w // 40)
    return shifted, tuple(int(d) for d in rng.integers(-step, step + 1, 2))


def _shade(rgb: tuple, amount: int) -> np.ndarray:
    """A colour `amount` darker (light colours) or lighter (dark ones)."""
    sign = -1 if sum(rgb) > 384 else 1
    return np.clip(np.asarray(rgb, np.int16) + sign * amount, 0, 255)


def background(w: int, h: int, texture: str, rgb: tuple, rng: np.random.Generator) -> np.ndarray:
    """A (h, w, 3) uint8 texture: solid, stripes, dots, gradient or noise in muted tones."""
    base = np.asarray(rgb, np.float32)
    if texture == "solid":
        pattern = base[None, None]
    elif texture in ("stripes", "gradient"):
        vertical = rng.random() < 0.5
        n = w if vertical else h
        if texture == "stripes":
            half = max(1, int(rng.integers(3, 8)) * max(1, w // 128))
            line = np.where(((np.arange(n) // half) % 2 == 0)[:, None], _shade(rgb, 28), base)  # (n, 3)
        else:
            t = np.linspace(0.0, 1.0, n, dtype=np.float32)[:, None]
            line = base * (1 - t) + _shade(rgb, 45) * t
        pattern = line[None] if vertical else line[:, None]
    elif texture == "dots":
        p = int(rng.integers(8, 18)) * max(1, w // 128)
        y, x = np.ogrid[0:p, 0:p]
        tile = np.where(((x - p / 2) ** 2 + (y - p / 2) ** 2 < (p / 4) ** 2)[..., None], _shade(rgb, 30), base)
        pattern = np.tile(tile, (h // p + 1, w // p + 1, 1))[:h, :w]
    else:
        pattern = base + rng.integers(-14, 15, (h, w, 1), dtype=np.int16)  # grey grain
    return np.ascontiguousarray(np.broadcast_to(np.clip(pattern, 0, 255).astype(np.uint8), (h, w, 3)))


def layout(w: int, h: int, count: int, position: int, size: int, rng: np.random.Generator) -> list[tuple]:
    """(cx, cy, r) of `count` non-overlapping objects, one per 3x3 grid cell."""
    cw, ch = w / 3, h / 3
    half = min(cw, ch) / 2
    r = half * C.SIZE_FACTORS[size] * (1.5 if count == 1 else 1.0)
    cells = [position] if count == 1 else rng.permutation(9)[:count].tolist()
    out = []
    for cell in cells:
        jitter = max(0.0, half - r)
        cx = (cell % 3 + 0.5) * cw + rng.uniform(-jitter, jitter)
        cy = (cell // 3 + 0.5) * ch + rng.uniform(-jitter, jitter)
        out.append((float(np.clip(cx, r + 1, w - r - 1)), float(np.clip(cy, r + 1, h - r - 1)), float(r)))
    return out


def shape_points(shape: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    """Polygon vertices of a shape (every shape but the circle), rotated by `angle`."""
    if shape == "star":
        radii = [r if k % 2 == 0 else 0.45 * r for k in range(10)]
        angles = [-math.pi / 2 + angle + k * math.pi / 5 for k in range(10)]
    elif shape == "cross":
        a = 0.34 * r
        local = [(a, r), (a, a), (r, a), (r, -a), (a, -a), (a, -r),
                 (-a, -r), (-a, -a), (-r, -a), (-r, a), (-a, a), (-a, r)]
        radii = [math.hypot(px, py) for px, py in local]
        angles = [math.atan2(py, px) + angle for px, py in local]
    else:
        n = _POLYGON_SIDES[shape]
        start = {"square": math.pi / 4, "diamond": 0.0}.get(shape, -math.pi / 2)
        radii = [r] * n
        angles = [start + angle + 2 * math.pi * k / n for k in range(n)]
    squash = 0.62 if shape == "diamond" else 1.0
    return [(cx + squash * q * math.cos(t), cy + q * math.sin(t)) for q, t in zip(radii, angles)]


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float,
               fill: tuple, rng: np.random.Generator) -> None:
    """Draw one filled shape centred at (cx, cy) with radius r, slightly rotated."""
    angle = float(rng.uniform(-0.2, 0.2))
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    else:
        draw.polygon(shape_points(shape, cx, cy, r, angle), fill=fill)


def _paste_digit(image: Image.Image, digit: np.ndarray, fg: tuple, offset: tuple, rng) -> tuple:
    """Paste an 8x8 handwritten digit as a mask in colour fg; returns (cx, cy, r)."""
    w, h = image.size
    side = int(min(w, h) * rng.uniform(0.55, 0.8))
    ink = Image.fromarray((digit * (255 / 16)).astype(np.uint8)).resize((side, side), Image.BICUBIC)
    pen = np.clip((np.asarray(ink, np.float32) - 70) * 2.2, 0, 255)  # sharpen the upscaled blur into strokes
    mask = Image.fromarray(pen.astype(np.uint8))
    x0 = int(rng.integers(0, w - side + 1)) + offset[0]
    y0 = int(rng.integers(0, h - side + 1)) + offset[1]
    image.paste(fg, (x0, y0, x0 + side, y0 + side), mask)
    return (x0 + side / 2, y0 + side / 2, side / 2)


def _draw_word(image: Image.Image, word: str, fg: tuple, offset: tuple, rng) -> tuple:
    """Draw a word with Pillow's scalable default font; returns (cx, cy, half-width)."""
    w, h = image.size
    size = int(min(h * 0.32, 0.9 * w / (0.6 * len(word))) * rng.uniform(0.8, 1.0))
    font = ImageFont.load_default(size=max(8, size))
    draw = ImageDraw.Draw(image)
    left, top, right, bottom = draw.textbbox((0, 0), word, font=font)
    x = rng.uniform(0, max(0, w - (right - left))) - left + offset[0]
    y = rng.uniform(0, max(0, h - (bottom - top))) - top + offset[1]
    draw.text((x, y), word, font=font, fill=fg)
    return (x + (left + right) / 2, y + (top + bottom) / 2, (right - left) / 2)


def transform_copy(image: Image.Image, transform: int, rng: np.random.Generator) -> tuple[Image.Image, int]:
    """A planted copy of an eval image: (transformed image, JPEG quality to encode it at)."""
    name, (w, h) = TRANSFORMS[transform], image.size
    if name == "jpeg":
        return image, int(rng.integers(30, 61))
    if name == "rescale":
        s = rng.uniform(0.6, 0.85) if rng.random() < 0.5 else rng.uniform(1.2, 1.6)
        return image.resize((round(w * s), round(h * s)), Image.BICUBIC), 88
    if name == "crop":
        f = rng.uniform(0.85, 0.95)
        cw, ch = round(w * f), round(h * f)
        x0, y0 = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        return image.crop((x0, y0, x0 + cw, y0 + ch)).resize((w, h), Image.BICUBIC), 88
    shift = rng.integers(-12, 13, 3)  # per-channel tint plus a small contrast change
    arr = np.clip(np.asarray(image, np.float32) * rng.uniform(0.94, 1.06) + shift, 0, 255)
    return Image.fromarray(arr.astype(np.uint8)), 88


def encode(image: Image.Image, fmt: str = "JPEG", quality: int = 90) -> bytes:
    """Image bytes as JPEG (at `quality`) or PNG."""
    buf = io.BytesIO()
    if fmt == "PNG":
        image.save(buf, "PNG", compress_level=1)
    else:
        image.save(buf, "JPEG", quality=quality)
    return buf.getvalue()
