"""Copy augmentations and label-free training images for the copy detector.

CLIP (Radford et al. 2021), Appendix C: the duplicate detector was trained to match an image
with its own augmentations: "crop and zoom, aspect ratio distortion, downsizing and upscaling
to different resolutions, minor rotations, jpeg compression, and HSV color jitter".
`train_view` draws one such view. `copy_of` makes the moderate copies a web crawl meets
(rescale, JPEG q=40-70, an 85% crop, a colour shift): planted duplicates for tests, positive
pairs for calibration. `procedural_image` and `sample_photos` are the training images: no
labels, no downloads.
"""
from __future__ import annotations

import io
from collections.abc import Callable, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

COPY_KINDS = ("rescale", "jpeg", "crop", "color")
# Colour photographs bundled with scikit-image; the bench holds these out of training.
BENCH_PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "camera", "coins", "clock", "page")
TRAIN_PHOTOS = ("brick", "grass", "gravel", "cell", "moon", "text", "hubble_deep_field",
                "immunohistochemistry", "retina", "colorwheel", "logo")


def jpeg(img: Image.Image, quality: int) -> Image.Image:
    """Re-encode as JPEG at `quality` and decode again."""
    buf = io.BytesIO()
    img.convert("RGB").save(buf, "JPEG", quality=int(quality))
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


def hsv_jitter(img: Image.Image, rng: np.random.Generator, hue=0.04, sat=0.3, val=0.25) -> Image.Image:
    """Shift hue and scale saturation and value by random amounts."""
    hsv = np.asarray(img.convert("HSV"), np.float32)  # (H, W, 3), every channel 0..255
    hsv[..., 0] = (hsv[..., 0] + 255 * rng.uniform(-hue, hue)) % 256
    hsv[..., 1] *= rng.uniform(1 - sat, 1 + sat)
    hsv[..., 2] *= rng.uniform(1 - val, 1 + val)
    out = Image.fromarray(np.clip(hsv, 0, 255).astype(np.uint8), "HSV")
    return out.convert("RGB")


def _crop_box(w: int, h: int, rng: np.random.Generator, area: tuple, aspect: tuple) -> tuple:
    """A random box covering `area` of the image with a log-uniform aspect change."""
    a = rng.uniform(*area)
    r = np.exp(rng.uniform(np.log(aspect[0]), np.log(aspect[1])))
    cw, ch = min(w, max(8, round(w * np.sqrt(a * r)))), min(h, max(8, round(h * np.sqrt(a / r))))
    x0, y0 = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
    return x0, y0, x0 + cw, y0 + ch


def train_view(img: Image.Image, rng: np.random.Generator, size: int) -> Image.Image:
    """One Appendix C augmentation of `img`, squashed to `size` x `size`."""
    img = img.convert("RGB")
    if rng.random() < 0.3:
        img = img.rotate(rng.uniform(-10, 10), Image.BILINEAR, fillcolor=tuple(rng.integers(0, 256, 3).tolist()))
    img = img.crop(_crop_box(*img.size, rng, area=(0.45, 1.0), aspect=(0.7, 1.45)))
    if rng.random() < 0.5:  # downsize and upscale: the detail a small copy lost
        s = rng.uniform(0.25, 0.9)
        img = img.resize((max(8, round(img.width * s)), max(8, round(img.height * s))), Image.BILINEAR)
    if rng.random() < 0.8:
        img = hsv_jitter(img, rng)
    img = img.resize((size, size), Image.BILINEAR)
    if rng.random() < 0.5:  # per-channel gain and offset: a tint the HSV jitter does not make
        arr = np.asarray(img, np.float32) * rng.uniform(0.85, 1.15) + rng.integers(-25, 26, 3)
        img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
    if rng.random() < 0.7:
        img = jpeg(img, rng.integers(20, 95))
    return img


def copy_of(img: Image.Image, rng: np.random.Generator, kinds: Sequence[str] | None = None) -> Image.Image:
    """A moderate copy: each of `kinds` (default: one or two at random), then JPEG q=40-70."""
    img = img.convert("RGB")
    if kinds is None:
        kinds = rng.choice(COPY_KINDS, size=int(rng.integers(1, 3)), replace=False).tolist()
    w, h = img.size
    if "crop" in kinds:  # 85% of each side, anywhere in the image
        cw, ch = round(0.85 * w), round(0.85 * h)
        x0, y0 = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        img = img.crop((x0, y0, x0 + cw, y0 + ch))
    if "rescale" in kinds:
        s = rng.choice([rng.uniform(0.5, 0.8), rng.uniform(1.25, 1.6)])
        img = img.resize((max(8, round(img.width * s)), max(8, round(img.height * s))), Image.BICUBIC)
    if "color" in kinds:
        shift = rng.integers(-20, 21, 3)
        arr = np.asarray(img, np.float32) * rng.uniform(0.9, 1.1) + shift
        img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
    return jpeg(img, rng.integers(40, 71))


def _random_colour(rng: np.random.Generator) -> tuple:
    return tuple(int(c) for c in rng.integers(0, 256, 3))


def _background(size: int, rng: np.random.Generator) -> Image.Image:
    """Solid, gradient, smooth noise or fine noise, in a random palette."""
    kind = rng.integers(4)
    a, b = np.asarray(_random_colour(rng), np.float32), np.asarray(_random_colour(rng), np.float32)
    if kind == 0:
        t = np.zeros((size, size, 1), np.float32)
    elif kind == 1:
        theta = rng.uniform(0, 2 * np.pi)
        yy, xx = np.mgrid[0:size, 0:size] / size
        t = ((np.cos(theta) * xx + np.sin(theta) * yy) % 1.0)[..., None]
    else:
        cells = int(rng.integers(2, 9)) if kind == 2 else size // int(rng.integers(1, 4))
        noise = Image.fromarray((rng.random((cells, cells)) * 255).astype(np.uint8))
        t = np.asarray(noise.resize((size, size), Image.BICUBIC), np.float32)[..., None] / 255
    return Image.fromarray((a * (1 - t) + b * t).astype(np.uint8))


def simple_scene(rng: np.random.Generator, size: int = 128, styles: int = 64) -> Image.Image:
    """A few copies of one shape in one colour on a plain or textured background.

    Background, colour and shape come from one of `styles` styles, so a training batch holds
    images that differ only in count, size and position: the hard negatives that teach the
    detector layout (and that synthetic-web eval sets are full of).
    """
    style = np.random.default_rng(int(rng.integers(styles)))
    img = _background(size, style) if style.random() < 0.5 else Image.new("RGB", (size, size), _random_colour(style))
    draw, colour, sides = ImageDraw.Draw(img), _random_colour(style), int(style.integers(0, 9))
    r = size * rng.uniform(0.05, 0.25)
    for _ in range(int(rng.integers(1, 7))):
        cx, cy = rng.uniform(r, size - r, 2)
        if sides < 3:
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=colour)
        else:
            draw.regular_polygon((cx, cy, r), sides, rotation=rng.uniform(0, 360), fill=colour)
    return img


def procedural_image(rng: np.random.Generator, size: int = 128) -> Image.Image:
    """A random scene: a textured background with shapes, lines and letters on top."""
    if rng.random() < 0.35:
        return simple_scene(rng, size)
    img = _background(size, rng)
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(1, 9))):
        x0, y0 = rng.uniform(-0.2, 1.0, 2) * size
        x1, y1 = np.array([x0, y0]) + rng.uniform(0.05, 0.6, 2) * size
        kind, colour = rng.integers(4), _random_colour(rng)
        if kind == 0:
            draw.ellipse((x0, y0, x1, y1), fill=colour)
        elif kind == 1:
            draw.polygon([tuple(p) for p in rng.uniform(0, size, (int(rng.integers(3, 7)), 2))], fill=colour)
        elif kind == 2:
            draw.line((x0, y0, x1, y1), fill=colour, width=int(rng.integers(1, 8)))
        else:
            letters = "".join(rng.choice(list("ABCDEFGHKMNPRSTWXYZ0123456789"), int(rng.integers(1, 6))))
            draw.text((x0, y0), letters, fill=colour, font_size=int(rng.integers(10, size // 3)))
    if rng.random() < 0.3:
        img = img.filter(ImageFilter.GaussianBlur(rng.uniform(0.5, 2.0)))
    return img


def sample_photos(names: Sequence[str] = TRAIN_PHOTOS) -> list[Image.Image]:
    """scikit-image's bundled sample photographs as RGB images; [] without scikit-image."""
    try:
        import skimage.data
    except ImportError:
        return []
    photos = []
    for name in names:
        arr = np.asarray(getattr(skimage.data, name)())
        if arr.dtype == bool:
            arr = arr.astype(np.uint8) * 255
        photos.append(Image.fromarray(arr.astype(np.uint8)).convert("RGB"))
    return photos


def photo_crop(photos: Sequence[Image.Image], rng: np.random.Generator, size: int = 128) -> Image.Image:
    """A random square-ish crop of a random photograph, resized to `size`."""
    photo = photos[int(rng.integers(len(photos)))]
    box = _crop_box(*photo.size, rng, area=(0.02, 0.5), aspect=(0.75, 1.33))
    return photo.crop(box).resize((size, size), Image.BILINEAR)


def image_source(photos: Sequence[Image.Image] = (), photo_fraction: float = 0.5,
                 size: int = 128) -> Callable[[np.random.Generator], Image.Image]:
    """A generator of training images: procedural scenes mixed with crops of `photos`."""
    def draw(rng: np.random.Generator) -> Image.Image:
        if photos and rng.random() < photo_fraction:
            return photo_crop(photos, rng, size)
        return procedural_image(rng, size)
    return draw


def negative_pool(n: int, seed: int = 0, size_range: tuple = (64, 257)) -> list[Image.Image]:
    """`n` calibration negatives that copy nothing, the same for a seed: crops of 5-60% of
    TRAIN_PHOTOS at 64-256 px (other real photographs, the hard negatives a web corpus is full
    of), some in grey and some blown up from a thumbnail of 8-32 px (scans, faces, icons), and
    procedural scenes. An eval set holding one of TRAIN_PHOTOS would see a few of its crops
    counted as negatives: a slightly higher threshold, never a false match."""
    rng = np.random.default_rng([seed, 1905])
    photos = sample_photos(TRAIN_PHOTOS)
    out = []
    for i in range(n):
        side = int(rng.integers(*size_range))
        if not photos or i % 3 == 2:
            out.append(procedural_image(rng, side))
            continue
        photo = photos[int(rng.integers(len(photos)))]
        img = photo.crop(_crop_box(*photo.size, rng, area=(0.05, 0.6), aspect=(0.75, 1.33)))
        if rng.random() < 0.3:
            img = img.convert("L").convert("RGB")
        if rng.random() < 0.3:
            thumb = int(rng.integers(8, 33))
            img = img.resize((thumb, thumb), Image.BOX)
            out.append(img.resize((side, side), Image.NEAREST if rng.random() < 0.5 else Image.BICUBIC))
        else:
            out.append(img.resize((side, side), Image.BICUBIC))
    return out
