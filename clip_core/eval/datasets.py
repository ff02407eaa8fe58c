"""Evaluation sets on disk: CLIP_benchmark's WebDataset layout or an ImageFolder tree.

CLIP (Radford et al. 2021), Section 3.1.4: zero-shot classifiers are built from each
dataset's class names and prompt templates ("A photo of a {label}."); the paper's names and
templates for 27 datasets ship in clip_core/assets/clip_prompts.json.

A set is a folder with `classnames.txt` (one class a line, in label order), `templates.txt`
(one prompt a line, `{c}` or `{}` for the class name) and split folders (`test/`, `train/`).
A split holds either WebDataset shards `*.tar` of `KEY.jpg|png|webp` + `KEY.cls` (class
index as ASCII) or `KEY.txt` (captions, one a line) / `KEY.json` (a list of captions, or
{"captions": [...]}) for retrieval; or an ImageFolder tree `split/classname/*.jpg`.
Without classnames.txt: the ImageFolder's sorted folder names, else the paper's classes of
`dataset_name`; without templates.txt: the paper's templates of `dataset_name`, else the
paper's default prompt "a photo of a {c}.". A classnames.txt or templates.txt that is present
but blank is an error, never a silent fall-back. A truncated or corrupt shard is an error
too (`DamagedShardError`, naming the shard): an eval set is reference data, and a number
measured on part of it would not compare with others.
Sample `index` is the position in the split: shards sorted by name, members in tar order
(ImageFolder: class folders sorted, files sorted) -- the dedup and overlap stages rely on it.
"""
from __future__ import annotations

import json
import posixpath
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, replace
from functools import lru_cache
from importlib import resources

import fsspec
from PIL import Image

from clip_core.data.webdataset import IMAGE_EXTS, image_field, iter_shard
from clip_core.errors import InputError
from clip_core.transforms import load_image

__all__ = ["EvalSet", "Sample", "load_eval_set", "iter_samples", "read_image", "read_images",
           "paper_prompts", "fill_template", "check_templates", "list_splits", "DEFAULT_TEMPLATES"]

DEFAULT_TEMPLATES = ("a photo of a {c}.",)  # the paper's single default prompt
_PLACEHOLDERS = ("{c}", "{}")
# CLIP_benchmark dataset names whose paper name in clip_prompts.json differs beyond case/punctuation
_ALIASES = {
    "imagenet1k": "imagenet", "cars": "stanfordcars", "fgvcaircraft": "fgvcaircraft",
    "dtd": "describabletextures", "pets": "oxfordpets", "flowers": "flowers102",
    "fer2013": "facialemotionrecognition2013", "pcam": "patchcamelyon", "patchcamelyon": "patchcamelyon",
    "renderedsst2": "sst2", "voc2007": "pascalvoc2007", "clevrcount": "clevrcounts",
    "clevrcountall": "clevrcounts", "kitticlosestvehicledistance": "kitti",
}


@dataclass(frozen=True)
class Sample:
    """One eval example; `label` for classification, `captions` for retrieval."""

    key: str
    image_bytes: bytes
    index: int
    label: int | None = None
    captions: tuple[str, ...] | None = None
    ext: str = "jpg"


@dataclass(frozen=True)
class EvalSet:
    """An eval set folder with its class names, templates and kind."""

    name: str
    root: str
    classnames: tuple[str | tuple[str, ...], ...] = ()  # a tuple lists synonyms of one class
    templates: tuple[str, ...] = ()
    kind: str = "classification"  # or "retrieval"
    split: str = "test"
    splits: tuple[str, ...] = field(default=())

    @property
    def num_classes(self) -> int:
        return len(self.classnames)

    def samples(self, split: str | None = None) -> Iterator[Sample]:
        """The samples of a split (default: this set's split)."""
        return iter_samples(self.root, split or self.split)

    def with_split(self, split: str) -> EvalSet:
        """The same set read from another split."""
        return replace(self, split=split)


# ----- prompts -----

def _norm_name(name: str) -> str:
    name = name.lower().split("/")[-1]  # "vtab/flowers", "wds/cifar10"
    return re.sub(r"[^a-z0-9]", "", name)


@lru_cache(maxsize=1)
def _paper_prompt_table() -> dict[str, dict]:
    text = resources.files("clip_core").joinpath("assets/clip_prompts.json").read_text()
    return {_norm_name(k): {"name": k, **v} for k, v in json.loads(text).items()}


def paper_prompts(dataset_name: str) -> tuple[list, list[str]]:
    """The paper's (classnames, templates with `{c}`) for a dataset name such as "cifar10"."""
    table = _paper_prompt_table()
    key = _norm_name(dataset_name)
    key = _ALIASES.get(key, key)
    if key not in table:
        known = ", ".join(sorted(v["name"] for v in table.values()))
        raise ValueError(f"no paper prompts for dataset {dataset_name!r}; known: {known}")
    entry = table[key]
    classes = [c if isinstance(c, str) else tuple(c) for c in entry["classes"]]  # FER2013 lists synonyms
    return classes, [t.replace("{}", "{c}") for t in entry["templates"]]


def check_templates(templates: Iterable[str], where: str = "templates") -> tuple[str, ...]:
    """Templates with `{}` rewritten to `{c}`; raises if one has no placeholder."""
    out = []
    for i, t in enumerate(templates):
        if not any(p in t for p in _PLACEHOLDERS):
            raise ValueError(f"{where}: template {i + 1} {t!r} has no class placeholder `{{c}}` (or `{{}}`)")
        out.append(t.replace("{}", "{c}"))
    if not out:
        raise ValueError(f"{where}: no templates")
    return tuple(out)


def fill_template(template: str, classname: str) -> str:
    """A prompt: the template with `{c}` (or `{}`) replaced by the class name."""
    return template.replace("{c}", classname).replace("{}", classname)


# ----- files -----

def _fs(path: str):
    return fsspec.core.url_to_fs(str(path))


_FILL_FIX = {  # what to write into an empty prompt file
    "templates.txt": "write one template a line with {c} for the class name, e.g. 'a photo of a {c}.', "
                     "or delete the file to use the dataset's or the paper's default",
    "classnames.txt": "write one class name a line, in label order",
}


def _read_lines(fs, path: str) -> list[str] | None:
    """The non-blank lines of a text file; None when there is no file; an error when it has none."""
    if not fs.isfile(path):
        return None
    with fs.open(path, "r", encoding="utf-8") as f:
        lines = [line.rstrip("\r\n") for line in f if line.strip()]
    if not lines:
        raise InputError(path, "has no entries (the file is empty or blank)", _FILL_FIX.get(posixpath.basename(path)))
    return lines


def _check_root(path: str, fs, root: str) -> None:
    if fs.isfile(root):
        raise InputError(path, "is a file, not an eval set folder", "pass the folder that holds test/")
    if not fs.isdir(root):
        raise InputError(path, "no eval set folder there", "check the path")


def list_splits(path: str) -> tuple[str, ...]:
    """Split folder names of an eval set (e.g. ("test", "train"))."""
    fs, root = _fs(path)
    _check_root(path, fs, root)
    return tuple(sorted(posixpath.basename(p.rstrip("/")) for p in fs.ls(root, detail=False) if fs.isdir(p)))


def _split_dir(path: str, split: str):
    fs, root = _fs(path)
    _check_root(path, fs, root)
    folder = posixpath.join(root, split)
    if not fs.isdir(folder):
        have = ", ".join(list_splits(path)) or "none"
        raise InputError(path, f"eval set has no split {split!r} (splits: {have})",
                         f"add a {split}/ folder of shards or images, or pick one of its splits")
    return fs, root, folder


# ----- WebDataset shards -----

def _iter_tar(fs, path: str) -> Iterator[dict]:
    """Raw samples {"__key__", ext: bytes} of one shard, extensions lower-cased."""
    for sample in iter_shard(fs, path, decode=False):
        yield {k if k == "__key__" else k.lower(): v for k, v in sample.items()}


def _captions(raw: dict, where: str) -> tuple[str, ...]:
    if "txt" in raw:
        return tuple(line.strip() for line in raw["txt"].decode("utf-8").splitlines() if line.strip())
    value = json.loads(raw["json"].decode("utf-8"))
    if isinstance(value, dict):
        value = value.get("captions", value.get("caption"))
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(c, str) for c in value):
        raise ValueError(f"{where}: json is neither a list of captions nor {{\"captions\": [...]}}")
    return tuple(value)


def _to_sample(raw: dict, index: int, where: str) -> Sample:
    key = raw["__key__"]
    ext = image_field(raw)
    if ext is None:
        fields = sorted(k for k in raw if k != "__key__")
        raise ValueError(f"{where}: sample {key!r} has no image (fields: {fields})")
    if "cls" in raw:
        try:
            label = int(raw["cls"].decode("ascii").strip())
        except ValueError as err:
            raise ValueError(f"{where}: sample {key!r} has a non-integer cls {raw['cls'][:20]!r}") from err
        return Sample(key, raw[ext], index, label=label, ext=ext)
    if "txt" in raw or "json" in raw:
        return Sample(key, raw[ext], index, captions=_captions(raw, f"{where}: {key}"), ext=ext)
    raise ValueError(f"{where}: sample {key!r} has neither a cls label nor captions (txt/json)")


def _iter_shards(fs, shards: list[str]) -> Iterator[Sample]:
    index = 0
    for shard in shards:
        for raw in _iter_tar(fs, shard):
            yield _to_sample(raw, index, shard)
            index += 1


# ----- ImageFolder -----

def _folder_labels(folders: list[str], classnames: list[str] | None, where: str) -> dict[str, int]:
    """Class folder -> label: by name in classnames.txt, else by sorted folder order."""
    if classnames is None or all(f in classnames for f in folders):
        names = classnames or folders
        return {f: names.index(f) for f in folders}
    if len(folders) == len(classnames):  # e.g. synset-id folders with readable classnames.txt
        return {f: i for i, f in enumerate(folders)}
    raise ValueError(f"{where}: {len(folders)} class folders do not match the {len(classnames)} "
                     f"lines of classnames.txt (and their names differ)")


def _iter_image_folder(fs, root: str, folder: str) -> Iterator[Sample]:
    dirs = sorted(p.rstrip("/") for p in fs.ls(folder, detail=False) if fs.isdir(p))
    names = [posixpath.basename(d) for d in dirs]
    labels = _folder_labels(names, _read_lines(fs, posixpath.join(root, "classnames.txt")), folder)
    index = 0
    for d, name in zip(dirs, names):
        for path in sorted(fs.ls(d, detail=False)):
            ext = path.rsplit(".", 1)[-1].lower()
            if ext not in IMAGE_EXTS:
                continue
            stem = posixpath.basename(path).rsplit(".", 1)[0]
            yield Sample(f"{name}/{stem}", fs.cat_file(path), index, label=labels[name], ext=ext)
            index += 1


def iter_samples(path: str, split: str = "test") -> Iterator[Sample]:
    """Samples of one split in stable order (shards sorted, tar order); index = position."""
    fs, root, folder = _split_dir(str(path), split)
    shards = sorted(p for p in fs.ls(folder, detail=False) if p.endswith(".tar"))
    return _iter_shards(fs, shards) if shards else _iter_image_folder(fs, root, folder)


def read_image(sample: Sample) -> Image.Image:
    """The decoded PIL image of a sample (ImageDecodeError names the key)."""
    return load_image(sample.image_bytes, name=f"{sample.key}.{sample.ext}")


def read_images(samples: Iterable[Sample]) -> Iterator[Image.Image]:
    """Decoded images of samples, in order."""
    return (read_image(s) for s in samples)


# ----- the set -----

def _first_sample(path: str, split: str) -> Sample:
    sample = next(iter_samples(path, split), None)
    if sample is None:
        raise ValueError(f"eval set {path}: split {split!r} is empty (no samples)")
    return sample


def _image_folder_classes(fs, root: str, split: str) -> list[str] | None:
    """Sorted class folder names when the split is an ImageFolder tree, else None."""
    folder = posixpath.join(root, split)
    entries = fs.ls(folder, detail=False)
    if any(p.endswith(".tar") for p in entries):
        return None
    return sorted(posixpath.basename(p.rstrip("/")) for p in entries if fs.isdir(p))


def _classification_prompts(fs, root: str, path: str, dataset_name: str | None, use_paper_prompts: bool,
                            folder_classes: list[str] | None) -> tuple[list[str], tuple[str, ...]]:
    classnames = _read_lines(fs, posixpath.join(root, "classnames.txt")) or folder_classes
    templates = _read_lines(fs, posixpath.join(root, "templates.txt"))
    if dataset_name and (use_paper_prompts or classnames is None or templates is None):
        paper_classes, paper_templates = paper_prompts(dataset_name)
        classnames = paper_classes if use_paper_prompts or classnames is None else classnames
        templates = paper_templates if use_paper_prompts or templates is None else templates
    if classnames is None:
        raise ValueError(f"eval set {path}: no classnames.txt; pass a dataset name (e.g. 'cifar10') "
                         f"to use the paper's class names")
    return classnames, check_templates(templates or DEFAULT_TEMPLATES, f"{path}/templates.txt")


def load_eval_set(path: str, split: str = "test", dataset_name: str | None = None, *,
                  use_paper_prompts: bool = False) -> EvalSet:
    """Open an eval set folder; `dataset_name` supplies (or, if asked, overrides) the paper's prompts."""
    path = str(path).rstrip("/")
    fs, root = _fs(path)
    first = _first_sample(path, split)
    name = dataset_name or posixpath.basename(root)
    splits = list_splits(path)
    if first.captions is not None:
        return EvalSet(name, path, kind="retrieval", split=split, splits=splits)
    classnames, templates = _classification_prompts(fs, root, path, dataset_name, use_paper_prompts,
                                                    _image_folder_classes(fs, root, split))
    return EvalSet(name, path, tuple(classnames), templates, "classification", split, splits)
