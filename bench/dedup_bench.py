"""Benchmarks of the dedup stage (CLIP Section 5 / Appendix C duplicate detection).

1. Descriptor throughput (images/s): pHash and the copy detector on this CPU.
2. Search throughput: our index layer against raw FAISS on the same vectors, and numpy.
3. Recall and precision on planted copies of real photographs (textured tiles of
   scikit-image's sample photos, held out from the detector's training) and of synthetic-web
   eval images: thresholds calibrated on one draw of copies, measured on a fresh draw.

    .venv/bin/python bench/dedup_bench.py [--quick] [--out results.md]
"""
from __future__ import annotations

import argparse
import io
import time

import faiss
import numpy as np
import torch
from PIL import Image

from dedup.augment import BENCH_PHOTOS, COPY_KINDS, copy_of, procedural_image, sample_photos
from dedup.calibrate import calibrate, copy_scores, precision_recall, top1_scores
from dedup.descriptors import encode, make_descriptors
from dedup.near_dup import EvalReference
from dedup.index import BinaryIndex, FlatIndex, brute_force_hamming, brute_force_search


SPECS = ("phash", "phash256", "detector", "phash+detector", "phash256+detector")


def _rate(fn, n: int, repeats: int = 3) -> float:
    """Best items/s over a few runs."""
    best = min(_timed(fn) for _ in range(repeats))
    return n / best


def _interleaved(fns, n: int, repeats: int = 5) -> list[float]:
    """Items/s of each function, timed in alternation (a shared CPU drifts) and best of `repeats`."""
    best = [float("inf")] * len(fns)
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            best[i] = min(best[i], _timed(fn))
    return [n / t for t in best]


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def descriptor_throughput(n: int) -> list[tuple]:
    """(descriptor, images/s from PIL, images/s from JPEG bytes)."""
    rng = np.random.default_rng(0)
    images = [procedural_image(rng, 256) for _ in range(n)]
    blobs = []
    for im in images:
        buf = io.BytesIO()
        im.save(buf, "JPEG", quality=90)
        blobs.append(buf.getvalue())
    rows = []
    for d in make_descriptors("phash+detector"):
        pil = _rate(lambda: d.encode(images), n)
        raw = _rate(lambda: d.encode([Image.open(io.BytesIO(b)).convert("RGB") for b in blobs]), n)
        rows.append((d.name, pil, raw))
    return rows


def search_throughput(n_index: int, n_queries: int, dim: int = 128) -> list[tuple]:
    """(what, queries/s, overhead vs raw FAISS) for float (IndexFlatIP) and binary (Hamming) search."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((n_index, dim)).astype(np.float32)
    q = rng.standard_normal((n_queries, dim)).astype(np.float32)
    raw = faiss.IndexFlatIP(dim)
    raw.add(x)
    ours = FlatIndex(x)
    raw_rate, ours_rate = _interleaved([lambda: raw.search(q, 1), lambda: ours.search(q, 1)], n_queries)
    sub = q[: max(1, n_queries // 10)]
    np_rate = _rate(lambda: brute_force_search(sub, x, 1), len(sub), repeats=1)
    codes, qcodes = (rng.integers(0, 256, (n, 8), dtype=np.uint8) for n in (n_index, n_queries))
    raw_b = faiss.IndexBinaryFlat(64)
    raw_b.add(codes)
    ours_b = BinaryIndex(codes)
    raw_b_rate, ours_b_rate = _interleaved([lambda: raw_b.search(qcodes, 1), lambda: ours_b.search(qcodes, 1)],
                                           n_queries, repeats=9)
    subc = qcodes[:200]
    np_b_rate = _rate(lambda: brute_force_hamming(subc, codes, 1), len(subc), repeats=1)
    over = lambda ours_r, raw_r: f"{100 * (raw_r / ours_r - 1):+.1f}%"
    return [("float: raw faiss IndexFlatIP", raw_rate, ""), ("float: dedup FlatIndex (chunked)", ours_rate,
            over(ours_rate, raw_rate)), ("float: numpy brute force", np_rate, ""),
            ("binary: raw faiss IndexBinaryFlat", raw_b_rate, ""),
            ("binary: dedup BinaryIndex (chunked)", ours_b_rate, over(ours_b_rate, raw_b_rate)),
            ("binary: numpy popcount", np_b_rate, "")]


def photo_tiles(size: int = 96, min_std: float = 20.0) -> list[Image.Image]:
    """Non-overlapping tiles of the held-out photographs; near-blank tiles (sky) left out."""
    tiles = []
    for photo in sample_photos(BENCH_PHOTOS):
        for y in range(0, photo.height - size + 1, size):
            for x in range(0, photo.width - size + 1, size):
                tile = photo.crop((x, y, x + size, y + size))
                if np.asarray(tile.convert("L"), np.float32).std() >= min_std:
                    tiles.append(tile)
    return tiles


def synthetic_web_images(n: int) -> tuple[list, list, object] | None:
    """Eval images of the synthetic web and its own planted-copy transform, if clip_core.data is there."""
    try:
        from synthweb.eval_sets import eval_image
        from synthweb.render import transform_copy
        from synthweb.scenes import TRANSFORMS, load_digit_bank
    except ImportError:
        return None
    bank = load_digit_bank()
    index = [eval_image(0, "shapes", "test", i, bank, 128) for i in range(n)]
    others = [eval_image(0, "shapes", "train", i, bank, 128) for i in range(n)]

    def planted(img, rng):
        out, quality = transform_copy(img, int(rng.integers(len(TRANSFORMS))), rng)
        buf = io.BytesIO()
        out.save(buf, "JPEG", quality=quality)
        return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")
    return index, others, planted


def _queries(descriptors, ref, images, copy_fn, seed: int, repeats: int):
    """Positive and leave-one-out negative scores (n, m) of `repeats` draws of copies."""
    rng = np.random.default_rng(seed)
    parts = [copy_scores(descriptors, ref, [copy_fn(im, rng) for im in images], np.arange(len(images)))
             for _ in range(repeats)]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def planted_quality(spec: str, index, others, copy_fn, precision: float, repeats: int = 3) -> dict:
    """Calibrate on one draw of copies (+ half the distinct images), test on a fresh draw (+ the other half)."""
    descriptors = make_descriptors(spec)
    ref = EvalReference("bench", "", "test", np.arange(len(index)), encode(descriptors, index))
    half = len(others) // 2
    cal_pos, cal_neg = _queries(descriptors, ref, index, copy_fn, 1, 1)
    cal = calibrate(cal_pos, np.concatenate([cal_neg, top1_scores(descriptors, ref, others[:half])]), precision)
    pos, neg = _queries(descriptors, ref, index, copy_fn, 2, repeats)
    neg = np.concatenate([neg, top1_scores(descriptors, ref, others[half:])])
    p, r = precision_recall(pos, neg, cal.thresholds)
    oracle = calibrate(pos, neg, precision)
    return {"spec": spec, "thresholds": cal.thresholds, "precision": p, "recall": r,
            "oracle_recall": oracle.recall, "n_pos": len(pos), "n_neg": len(neg)}


def per_kind_recall(spec: str, index, others, precision: float) -> dict:
    """Recall per copy kind, each calibrated and tested on copies of that kind alone."""
    out = {}
    for kind in COPY_KINDS:
        q = planted_quality(spec, index, others, lambda im, rng, k=kind: copy_of(im, rng, [k]), precision, 2)
        out[kind] = q["recall"]
    return out


def _table(head: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows])


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller sizes")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=None, help="also write the Markdown tables here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)
    n = 128 if args.quick else 512
    parts = ["## Descriptor throughput (images/s, %d thread(s))" % args.threads,
             _table(["descriptor", "from PIL", "from JPEG bytes"],
                    [[d, f"{a:.0f}", f"{b:.0f}"] for d, a, b in descriptor_throughput(n)])]
    n_index, n_q = (2000, 10000) if args.quick else (10000, 50000)
    parts += [f"## Search throughput ({n_index} eval vectors, {n_q} corpus queries, k=1)",
              _table(["search", "queries/s", "overhead vs raw FAISS"],
                     [[w, f"{r:.0f}", o] for w, r, o in search_throughput(n_index, n_q)])]
    tiles = photo_tiles()
    rng = np.random.default_rng(0)
    order = rng.permutation(len(tiles))
    index, others = [tiles[i] for i in order[: len(tiles) // 2]], [tiles[i] for i in order[len(tiles) // 2:]]
    datasets = [("photos (skimage, held out)", index, others, copy_of)]
    web = synthetic_web_images(60 if args.quick else 150)
    if web:
        datasets.append(("synthetic-web eval images", *web))
    rows = []
    for name, idx, oth, fn in datasets:
        for precision in (0.95, 0.99):
            for spec in SPECS:
                q = planted_quality(spec, idx, oth, fn, precision)
                rows.append([name, precision, spec, f"{q['precision']:.3f}", f"{q['recall']:.3f}",
                             f"{q['oracle_recall']:.3f}", f"{q['n_pos']}/{q['n_neg']}"])
    parts += ["## Planted copies (moderate: rescale, JPEG q40-70, 85% crop, colour shift; 1-2 each)",
              _table(["images", "precision target", "descriptor", "test precision", "test recall",
                      "oracle recall", "pos/neg"], rows)]
    kinds = {spec: per_kind_recall(spec, index, others, 0.95) for spec in SPECS}
    parts += ["## Recall per copy kind (photos, precision target 0.95)",
              _table(["descriptor", *COPY_KINDS],
                     [[s, *(f"{k[c]:.3f}" for c in COPY_KINDS)] for s, k in kinds.items()])]
    text = "\n\n".join(parts) + "\n"
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    return text


if __name__ == "__main__":
    main()
