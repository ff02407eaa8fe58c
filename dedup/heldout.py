"""A held-out test of dedup on real photographs the copy detector never trained on (issue 19).

The photographs: scikit-image's BENCH_PHOTOS (`dedup.augment`; the detector trained on
TRAIN_PHOTOS and procedural scenes only, and calibration's negative pool draws on the same),
scikit-learn's china.jpg and flower.jpg, matplotlib's grace_hopper.jpg and scikit-image's
motorcycle_left.png, all bundled with those packages (no download). `EVAL_PHOTOS` form the eval
set; the corpus holds one copy of each per copy kind of CLIP's Appendix C (rescale + JPEG q=30,
an 85% crop, a colour and brightness shift with a resize, a small rotation) among distractors:
crops of the other held-out photos (`DISTRACTOR_PHOTOS`), faces of scikit-image's LFW subset,
handwritten digits and noise. `write_case` writes it, `score` reads dedup's answer.
"""
from __future__ import annotations

import io
from pathlib import Path

import fsspec

import numpy as np
from PIL import Image

from clip_core.data.webdataset import write_shard

EVAL_PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "china", "flower", "grace_hopper", "motorcycle_left")
DISTRACTOR_PHOTOS = ("camera", "coins", "clock", "page")
HELD_OUT_KINDS = ("rescale_jpeg30", "crop85", "color_resize", "rotate")


def held_out_photo(name: str) -> Image.Image:
    """One of the held-out photographs, as RGB, from the packages that bundle it (no download)."""
    if name in ("china", "flower"):
        from sklearn.datasets import load_sample_image
        return Image.fromarray(load_sample_image(f"{name}.jpg")).convert("RGB")
    if name == "grace_hopper":
        import matplotlib.cbook
        with matplotlib.cbook.get_sample_data("grace_hopper.jpg") as f:
            return Image.open(f).convert("RGB")
    import skimage.data
    if name == "motorcycle_left":
        return Image.open(Path(skimage.data.__file__).parent / "motorcycle_left.png").convert("RGB")
    return Image.fromarray(np.asarray(getattr(skimage.data, name)()).astype(np.uint8)).convert("RGB")


def held_out_copy(img: Image.Image, kind: str, rng: np.random.Generator) -> Image.Image:
    """A copy of one of CLIP's Appendix C kinds, JPEG-encoded as a crawl would store it."""
    w, h = img.size
    quality = 75
    if kind == "rescale_jpeg30":
        s = rng.uniform(0.4, 0.7)
        img, quality = img.resize((round(w * s), round(h * s)), Image.BICUBIC), 30
    elif kind == "crop85":
        cw, ch = round(0.85 * w), round(0.85 * h)
        img = img.crop(((w - cw) // 2, (h - ch) // 2, (w - cw) // 2 + cw, (h - ch) // 2 + ch))
    elif kind == "color_resize":
        arr = np.asarray(img, np.float32) * rng.uniform(0.8, 1.2) + rng.integers(-25, 26, 3)
        img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).resize((round(w * 0.6), round(h * 0.6)))
    elif kind == "rotate":
        img = img.rotate(float(rng.choice([-1, 1]) * rng.uniform(3, 6)), Image.BICUBIC, expand=False)
    else:
        raise ValueError(f"unknown copy kind {kind!r}")
    buf = io.BytesIO()
    img.convert("RGB").save(buf, "JPEG", quality=quality)
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


def distractors(rng: np.random.Generator, n_crops: int = 240, n_faces: int = 60, n_digits: int = 30,
                n_noise: int = 16) -> list[Image.Image]:
    """Real-photo crops (10-60% of a held-out non-eval photo), LFW faces, digits and noise."""
    import skimage.data
    from sklearn.datasets import load_digits

    photos = [held_out_photo(n) for n in DISTRACTOR_PHOTOS]
    out = []
    for _ in range(n_crops):
        p = photos[int(rng.integers(len(photos)))]
        side = np.sqrt(rng.uniform(0.1, 0.6))
        cw, ch = round(p.width * side), round(p.height * side)
        x0, y0 = int(rng.integers(0, p.width - cw + 1)), int(rng.integers(0, p.height - ch + 1))
        size = int(rng.integers(96, 257))
        out.append(p.crop((x0, y0, x0 + cw, y0 + ch)).resize((size, size), Image.BICUBIC))
    faces = skimage.data.lfw_subset()
    for i in rng.choice(len(faces), n_faces, replace=False):
        out.append(Image.fromarray((faces[i] * 255).astype(np.uint8)).convert("RGB").resize((100, 100), Image.BICUBIC))
    digits = load_digits().images
    for i in rng.choice(len(digits), n_digits, replace=False):
        out.append(Image.fromarray((digits[i] * 15).astype(np.uint8)).convert("RGB").resize((64, 64), Image.NEAREST))
    for _ in range(n_noise):
        out.append(Image.fromarray(rng.integers(0, 256, (96, 96, 3), dtype=np.uint8)))
    return out


def _jpeg(img: Image.Image, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    img.convert("RGB").save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def _write_tar(path: Path, samples: list) -> None:
    """[(key, {ext: bytes})] as one WebDataset shard."""
    fs = fsspec.filesystem("file")
    write_shard(fs, str(path), ({"__key__": key, **fields} for key, fields in samples))


def write_case(base: Path, seed: int = 0, eval_photos=EVAL_PHOTOS, shrink: dict | None = None) -> dict:
    """Write the eval set and the corpus under `base`; returns their paths and the truth (key -> kind).
    `shrink` {eval photo index: scale} stores those eval photos smaller (the copies stay the same)."""
    rng = np.random.default_rng(seed)
    photos = [held_out_photo(n) for n in eval_photos]
    stored = [p.resize((round(p.width * shrink[i]), round(p.height * shrink[i])), Image.LANCZOS)
              if shrink and i in shrink else p for i, p in enumerate(photos)]
    eval_dir = base / "photos"
    (eval_dir / "test").mkdir(parents=True)
    (eval_dir / "classnames.txt").write_text("\n".join(eval_photos) + "\n")
    _write_tar(eval_dir / "test" / "000000.tar",
               [(f"{i:05d}", {"jpg": _jpeg(p, 95), "cls": str(i).encode()}) for i, p in enumerate(stored)])
    truth = {}
    samples = []
    for i, p in enumerate(photos):
        for kind in HELD_OUT_KINDS:
            key = f"copy-{kind}-{i:02d}"
            truth[key] = (kind, i)
            samples.append((key, {"jpg": _jpeg(held_out_copy(p, kind, rng)), "txt": b"copy"}))
    samples += [(f"other{j:04d}", {"jpg": _jpeg(img), "txt": b"other"}) for j, img in enumerate(distractors(rng))]
    order = rng.permutation(len(samples))
    corpus = base / "corpus"
    corpus.mkdir()
    half = len(order) // 2
    _write_tar(corpus / "00000.tar", [samples[k] for k in order[:half]])
    _write_tar(corpus / "00001.tar", [samples[k] for k in order[half:]])
    return {"eval": str(eval_dir), "corpus": str(corpus), "truth": truth, "n_corpus": len(samples)}


def score(case: dict, out: str) -> dict:
    """Recall per copy kind, overall recall and precision of dedup's matches.parquet in `out`."""
    import pyarrow.parquet as pq

    found = {m["key"]: m["eval_index"] for m in pq.read_table(Path(out) / "matches.parquet").to_pylist()}
    truth = case["truth"]
    right = {k for k, i in found.items() if k in truth and truth[k][1] == i}
    per_kind = {kind: sum(1 for k, (kk, _) in truth.items() if kk == kind and k in right) /
                sum(1 for kk, _ in truth.values() if kk == kind) for kind in HELD_OUT_KINDS}
    return {"recall": len(right) / len(truth), "precision": len(right) / len(found) if found else 1.0,
            "found": len(found), "false": len(found) - len(right), "per_kind": per_kind}
