"""Scenes: the labels behind every synthetic-web image, as pure functions of (seed, id).

A scene table is a dict of equal-length int64 arrays (kind, shape, color, count, ...), so
the labels of 100k web images come from one vectorised pass of a counter-based hash
(splitmix64), and the server derives the same row for a single URL from the seed and the
uid in its path. The web table adds each uid's fate (failure mode) and content: fresh,
an exact or near duplicate of an earlier uid, or a planted copy of an eval image.
"""
from __future__ import annotations

import hashlib
import importlib.util
from pathlib import Path
from typing import NamedTuple

import numpy as np

from synthweb import concepts as C
from synthweb.spec import CAPTION_KINDS, EVAL_SETS, FATES, WebSpec

FRESH, EXACT_DUP, NEAR_DUP, PLANTED = 0, 1, 2, 3
CONTENTS = ("fresh", "exact_dup", "near_dup", "planted")
SPLITS = ("test", "train")
TRANSFORMS = ("jpeg", "rescale", "crop", "color")
N_CLASSES = {"shapes": len(C.SHAPES), "colors": len(C.COLORS), "counts": C.MAX_COUNT,
             "digits": 10, "words": len(C.WORDS), "retrieval": 0}
SCENE_FIELDS = ("kind", "shape", "color", "count", "size", "position", "background",
                "bg_color", "word", "digit", "digit_sample", "width", "height", "variant", "label")
_U64 = np.uint64


class DigitBank(NamedTuple):
    images: np.ndarray  # (N, 8, 8) float, ink 0..16
    target: np.ndarray  # (N,) int


def load_digit_bank() -> DigitBank:
    """sklearn's bundled handwritten digits (UCI, 1797 real 8x8 scans; no download)."""
    found = importlib.util.find_spec("sklearn")  # locates the package without importing it (seconds)
    path = Path(found.submodule_search_locations[0], "datasets", "data", "digits.csv.gz") if found else None
    if path is not None and path.exists():
        data = np.loadtxt(path, delimiter=",", dtype=np.float32)  # the file load_digits reads
        return DigitBank(data[:, :-1].reshape(-1, 8, 8), data[:, -1].astype(np.int64))
    from sklearn.datasets import load_digits

    d = load_digits()
    return DigitBank(d.images.astype(np.float32), d.target.astype(np.int64))


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser, elementwise on uint64."""
    with np.errstate(over="ignore"):
        x = (x ^ (x >> _U64(30))) * _U64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> _U64(27))) * _U64(0x94D049BB133111EB)
        return x ^ (x >> _U64(31))


def hash64(seed: int, salt: str, ids) -> np.ndarray:
    """A uint64 per id, independent across (seed, salt) streams."""
    key = int.from_bytes(hashlib.blake2b(f"{seed}/{salt}".encode(), digest_size=8).digest(), "little")
    with np.errstate(over="ignore"):
        x = np.asarray(ids, dtype=np.int64).astype(_U64) * _U64(0x9E3779B97F4A7C15) + _U64(key)
    return _mix(_mix(x))


def uniform(seed: int, salt: str, ids) -> np.ndarray:
    """Floats in [0, 1), one per id."""
    return (hash64(seed, salt, ids) >> _U64(11)).astype(np.float64) * 2.0**-53


def randint(seed: int, salt: str, ids, n) -> np.ndarray:
    """Integers in [0, n), one per id (n may be an array)."""
    return (hash64(seed, salt, ids) % np.asarray(n, dtype=_U64)).astype(np.int64)


def pick(u: np.ndarray, probs) -> np.ndarray:
    """Category index of each uniform draw under `probs` (the remainder goes to index 0)."""
    rest = np.asarray(probs, dtype=np.float64)[1:]
    edges = (1.0 - rest.sum()) + np.concatenate([[0.0], np.cumsum(rest)[:-1]])  # start of categories 1..K-1
    return np.searchsorted(edges, u, side="right").astype(np.int64)


def pick_digits(bank: DigitBank, part: int, classes: np.ndarray, r: np.ndarray) -> np.ndarray:
    """Sample indices of the given classes from a third of the bank (0 eval test, 1 eval train, 2 web)."""
    idx = np.arange(part, len(bank.target), 3)
    order = idx[np.argsort(bank.target[idx], kind="stable")]
    counts = np.bincount(bank.target[order], minlength=10)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    return order[starts[classes] + r % counts[classes]]


def draw_scenes(seed: int, stream: str, ids, bank: DigitBank, kind_probs, image_size: int,
                digit_part: int, vary_dims: bool) -> dict[str, np.ndarray]:
    """Random labels for each id of a stream ("web", "eval/shapes/test", ...)."""
    ids = np.asarray(ids, dtype=np.int64)
    r = lambda field, n: randint(seed, f"{stream}/{field}", ids, n)  # noqa: E731
    u = lambda field: uniform(seed, f"{stream}/{field}", ids)  # noqa: E731
    count = np.where(u("single") < 0.4, 1, 2 + r("count", C.MAX_COUNT - 1))
    digit = r("digit", 10)
    dims = pick(u("dims"), (0.7, 0.18, 0.12)) if vary_dims else np.zeros(len(ids), np.int64)
    big = image_size * 4 // 3
    t = {
        "kind": pick(u("kind"), kind_probs), "shape": r("shape", len(C.SHAPES)),
        "color": r("color", len(C.COLORS)), "count": count, "size": r("size", len(C.SIZES)),
        "position": r("position", len(C.POSITIONS)), "background": r("background", len(C.BACKGROUNDS)),
        "bg_color": r("bg_color", len(C.BG_COLORS)), "word": r("word", len(C.WORDS)), "digit": digit,
        "digit_sample": pick_digits(bank, digit_part, digit, r("digit_sample", 1 << 30)),
        "width": np.where(dims == 1, big, image_size), "height": np.where(dims == 2, big, image_size),
        "variant": np.zeros(len(ids), np.int64), "label": np.full(len(ids), -1, np.int64),
    }
    t["render_key"] = hash64(seed, f"{stream}/render", ids)
    return t


def eval_table(seed: int, name: str, split: str, ids, bank: DigitBank, image_size: int) -> dict[str, np.ndarray]:
    """Scenes of eval set `name`: class = index mod n_classes, the class's label forced."""
    ids = np.asarray(ids, dtype=np.int64)
    probs = {"digits": (0, 1, 0), "words": (0, 0, 1)}.get(name, (1, 0, 0))
    t = draw_scenes(seed, f"eval/{name}/{split}", ids, bank, probs, image_size, SPLITS.index(split), False)
    if name == "retrieval":
        return t
    label = ids % N_CLASSES[name]
    t["label"] = label
    if name in ("shapes", "colors"):
        t["count"] = np.ones_like(label)
    field = {"shapes": "shape", "colors": "color", "counts": "count", "digits": "digit", "words": "word"}[name]
    t[field] = label + 1 if name == "counts" else label
    if name == "digits":
        r = randint(seed, f"eval/{name}/{split}/digit_sample", ids, 1 << 30)
        t["digit_sample"] = pick_digits(bank, SPLITS.index(split), label, r)
    return t


def fates(spec: WebSpec, uids) -> np.ndarray:
    """Each uid's fate: an index into FATES (0 = served normally)."""
    probs = [0.0] + [spec.failure_rates.get(f, 0.0) for f in FATES[1:]]
    return pick(uniform(spec.seed, "fate", uids), probs)


def caption_kinds(spec: WebSpec, uids) -> np.ndarray:
    """Each uid's alt-text kind: an index into CAPTION_KINDS (0 = plain description)."""
    probs = [0.0] + [spec.caption_rates.get(k, 0.0) for k in CAPTION_KINDS[1:]]
    return pick(uniform(spec.seed, "caption_kind", uids), probs)


def _content_bands(spec: WebSpec, uids: np.ndarray) -> np.ndarray:
    """Content kind before resolving sources; planted only where the URL serves fine."""
    probs = (0.0, spec.duplicate_rate, spec.near_duplicate_rate, spec.planted_rate)
    band = pick(uniform(spec.seed, "content", uids), probs)
    band[(band == PLANTED) & ((fates(spec, uids) != 0) | (not _plantable_sets(spec)))] = FRESH
    band[(band != PLANTED) & (uids == 0)] = FRESH
    return band


def _sources(spec: WebSpec, uids: np.ndarray) -> np.ndarray:
    window = np.minimum(np.maximum(uids, 1), spec.duplicate_window)
    return np.maximum(uids - 1 - randint(spec.seed, "source", uids, window), 0)


def _plantable_sets(spec: WebSpec) -> list[str]:
    return [n for n in EVAL_SETS if spec.eval_sizes.get(n, {}).get("test", 0) > 0]


def _planted_targets(spec: WebSpec, uids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(eval set code, split code, index) for uids that carry a planted eval image."""
    codes = np.array([EVAL_SETS.index(n) for n in _plantable_sets(spec)], dtype=np.int64)
    set_code = codes[randint(spec.seed, "planted/set", uids, len(codes))]
    n_train = np.array([spec.eval_sizes.get(EVAL_SETS[c], {}).get("train", 0) for c in set_code], np.int64)
    to_train = uniform(spec.seed, "planted/split", uids) >= spec.planted_test_fraction
    split = np.where(to_train & (n_train > 0), 1, 0)
    n = np.array([spec.eval_sizes[EVAL_SETS[c]][SPLITS[s]] for c, s in zip(set_code, split)], np.int64)
    return set_code, split, randint(spec.seed, "planted/index", uids, np.maximum(n, 1))


def base_scenes(spec: WebSpec, uids, bank: DigitBank) -> dict[str, np.ndarray]:
    """Each web uid's own random scene, before duplicates and planted copies replace some."""
    return draw_scenes(spec.seed, "web", uids, bank, _kind_probs(spec), spec.image_size, 2, True)


def web_table(spec: WebSpec, uids, bank: DigitBank) -> dict[str, np.ndarray]:
    """Labels, fate and content of each web uid (vectorised; the server calls it on one uid)."""
    uids = np.asarray(uids, dtype=np.int64)
    t = base_scenes(spec, uids, bank)
    content, src = _content_bands(spec, uids), _sources(spec, uids)
    is_dup = (content == EXACT_DUP) | (content == NEAR_DUP)
    content[is_dup & (_content_bands(spec, src) != FRESH)] = FRESH  # a copy is only ever of a fresh image
    dup = np.flatnonzero((content == EXACT_DUP) | (content == NEAR_DUP))
    _assign(t, dup, base_scenes(spec, src[dup], bank))
    near = content == NEAR_DUP
    t["variant"][near] = 1 + randint(spec.seed, "variant", uids[near], 1 << 30)
    t.update(fate=fates(spec, uids), content=content, caption_kind=caption_kinds(spec, uids),
             src_uid=np.where(np.isin(content, (EXACT_DUP, NEAR_DUP)), src, uids))
    _plant(spec, t, uids, bank)
    return t


def _plant(spec: WebSpec, t: dict, uids: np.ndarray, bank: DigitBank) -> None:
    rows = np.flatnonzero(t["content"] == PLANTED)
    for key in ("eval_set", "eval_split", "eval_index", "transform"):
        t[key] = np.full(len(uids), -1, np.int64)
    if not len(rows):
        return
    set_code, split, index = _planted_targets(spec, uids[rows])
    t["eval_set"][rows], t["eval_split"][rows], t["eval_index"][rows] = set_code, split, index
    t["transform"][rows] = randint(spec.seed, "planted/transform", uids[rows], len(TRANSFORMS))
    for code in np.unique(set_code):
        for s in np.unique(split[set_code == code]):
            sel = (set_code == code) & (split == s)
            src = eval_table(spec.seed, EVAL_SETS[code], SPLITS[s], index[sel], bank, spec.image_size)
            _assign(t, rows[sel], src)


def _assign(t: dict, rows: np.ndarray, src: dict) -> None:
    for key, values in src.items():
        t[key][rows] = values


def _kind_probs(spec: WebSpec) -> tuple[float, float, float]:
    rates = spec.kind_rates
    total = sum(rates.values()) or 1.0
    return tuple(rates.get(k, 0.0) / total for k in C.KINDS)


def site_of(spec: WebSpec, uids) -> np.ndarray:
    """The site index hosting each uid's page."""
    return (np.asarray(uids, dtype=np.int64) // spec.pairs_per_page) % spec.n_sites


def row(table: dict[str, np.ndarray], i: int) -> dict:
    """Row i of a table as plain Python values."""
    return {k: v[i].item() for k, v in table.items()}
