"""Evaluation sets of the synthetic web, laid out as CLIP_benchmark's WebDataset sets.

Each set is a folder `eval/NAME/` with `classnames.txt` (one class a line), `templates.txt`
(one prompt a line, `{c}` for the class name) and split folders `test/`, `train/` of
shards `000000.tar`, ... whose samples are `KEY.jpg` + `KEY.cls` (class index as ASCII).
The retrieval set has `test/` only, with samples `KEY.jpg` + `KEY.txt` (five captions, one
a line) + `KEY.json` ({"captions": [...]}). Sample i of a split is a pure function of
(seed, set, split, i), so the server can render the very same image for a planted copy.
"""
from __future__ import annotations

import posixpath
import random
from collections.abc import Iterator

import fsspec
import numpy as np
from PIL import Image

from synthweb import concepts as C
from synthweb.captions import clean_captions
from synthweb.render import encode, render_scene
from synthweb.scenes import DigitBank, eval_table, hash64, row
from synthweb.spec import WebSpec
from clip_core.data.parquet import atomic_open
from clip_core.data.webdataset import write_shards

EVAL_JPEG_QUALITY = 95
_TEMPLATES = {
    "shapes": ("a photo of a {c}.", "a drawing of a {c}.", "a {c} shape.", "a picture of a {c}."),
    "colors": ("a photo of a {c} shape.", "something {c}.", "the colour {c}.", "a {c} object."),
    "counts": ("a photo of {c} objects.", "{c} shapes.", "a picture with {c} things in it."),
    "digits": ('a photo of the number: "{c}".', "handwritten digit {c}.", "the number {c}."),
    "words": ('a sign that says "{c}".', "the word {c}.", "text reading {c}."),
}


def classnames(name: str) -> list[str]:
    """Class names of a classification eval set, in class-index order."""
    return {
        "shapes": list(C.SHAPES), "colors": list(C.COLOR_NAMES),
        "counts": list(C.NUMBER_WORDS[1:C.MAX_COUNT + 1]), "digits": [str(d) for d in range(10)],
        "words": list(C.WORDS),
    }[name]


def templates(name: str) -> list[str]:
    """Zero-shot prompt templates of an eval set (`{c}` stands for the class name)."""
    return list(_TEMPLATES[name])


def eval_rows(seed: int, name: str, split: str, n: int, bank: DigitBank, image_size: int) -> list[dict]:
    """The scene rows of samples 0..n-1 of a split."""
    table = eval_table(seed, name, split, np.arange(n), bank, image_size)
    return [row(table, i) for i in range(n)]


def eval_image(seed: int, name: str, split: str, index: int, bank: DigitBank, image_size: int) -> Image.Image:
    """Sample `index` of an eval split, exactly as stored (before JPEG encoding)."""
    return render_scene(row(eval_table(seed, name, split, [index], bank, image_size), 0), bank)[0]


def eval_samples(seed: int, name: str, split: str, n: int, bank: DigitBank, image_size: int) -> Iterator[dict]:
    """WebDataset samples of one split: jpg + cls, or jpg + txt + json for retrieval."""
    for i, scene in enumerate(eval_rows(seed, name, split, n, bank, image_size)):
        sample = {"__key__": f"{i:07d}", "jpg": encode(render_scene(scene, bank)[0], "JPEG", EVAL_JPEG_QUALITY)}
        if name == "retrieval":
            rnd = random.Random(int(hash64(seed, f"eval/{name}/{split}/captions", [i])[0]))
            captions = clean_captions(scene, rnd)
            sample.update(txt="\n".join(captions), json={"captions": captions})
        else:
            sample["cls"] = scene["label"]
        yield sample


def write_eval_sets(out_uri: str, spec: WebSpec, bank: DigitBank, shard_size: int = 1000,
                    storage_options: dict | None = None) -> dict[str, str]:
    """Write every eval set of the spec under `out_uri/eval/`; returns {name: uri}."""
    fs, root = fsspec.core.url_to_fs(out_uri, **(storage_options or {}))
    uris = {}
    for name, splits in spec.eval_sizes.items():
        if not any(n > 0 for n in splits.values()):
            continue
        folder = posixpath.join(root, "eval", name)
        fs.makedirs(folder, exist_ok=True)
        if name != "retrieval":
            _write_lines(fs, posixpath.join(folder, "classnames.txt"), classnames(name))
            _write_lines(fs, posixpath.join(folder, "templates.txt"), templates(name))
        for split, n in splits.items():
            if n <= 0:
                continue
            samples = eval_samples(spec.seed, name, split, n, bank, spec.image_size)
            write_shards(fs.unstrip_protocol(posixpath.join(folder, split)), samples, shard_size, storage_options)
        uris[name] = fs.unstrip_protocol(folder)
    return uris


def _write_lines(fs, path: str, lines: list[str]) -> None:
    with atomic_open(fs, path, "w") as f:
        f.write("\n".join(lines) + "\n")
