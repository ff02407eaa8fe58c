"""A synthetic web of image-text pairs, deterministic from a seed, for crawling offline.

`generate_web` writes only tables and eval sets; web images are rendered by the server on
request from (seed, url path), so the web scales to millions of URLs. Image URLs are
`{base_url}/s/{site}/{uid}/{filename}` (site = `site%04d`, uid = the pair's integer id),
pages `{base_url}/s/{site}/page{n}.html` list `<img src alt>` of pairs n*P .. n*P+P-1.

Output layout under `out_uri`:
  web.json          the WebSpec (seed, sizes, rates); all the server reads
  pairs.parquet     url, caption, uid  (candidate pairs, the design's contract)
  truth.parquet     per uid: concept labels, fate, content (fresh / exact_dup / near_dup /
                    planted), src_uid, caption_kind, filename, width, height
  eval/NAME/        classnames.txt, templates.txt, test/ and train/ WebDataset shards
  eval/planted.parquet  uid, url, eval_set, split, eval_index, transform
"""
from __future__ import annotations

import contextlib
import posixpath

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from synthweb import concepts as C
from synthweb.captions import Draws, alt_text, filename
from synthweb.eval_sets import write_eval_sets
from synthweb.scenes import (
    CONTENTS, PLANTED, SPLITS, TRANSFORMS, DigitBank, base_scenes, hash64, load_digit_bank,
    randint, site_of, uniform, web_table,
)
from synthweb.spec import CAPTION_KINDS, EVAL_SETS, FATES, WebSpec, default_eval_sizes, save_spec
from clip_core.data.parquet import atomic_open

CHUNK = 100_000  # uids per vectorised pass; bounds memory for millions of pairs
DRAWS = 32  # pre-drawn uniforms per uid for its filename and alt-text
TEXT_FIELDS = ("kind", "shape", "color", "count", "size", "position", "background", "bg_color",
               "word", "digit", "content", "caption_kind")  # what filenames and alt-texts read


def site_name(site: int) -> str:
    """Name of site index `site` in URL paths."""
    return f"site{site:04d}"


def _rows(table: dict[str, np.ndarray]) -> list[dict]:
    keys = [k for k in TEXT_FIELDS if k in table]
    return [dict(zip(keys, values)) for values in zip(*(table[k].tolist() for k in keys))]


def pair_columns(spec: WebSpec, uids, bank: DigitBank) -> dict:
    """url, caption, filename and the web table of the given uids (the server uses it for pages)."""
    uids = np.asarray(uids, dtype=np.int64)
    table = web_table(spec, uids, bank)
    others = _rows(base_scenes(spec, randint(spec.seed, "mismatch", uids, spec.n_pairs), bank))
    blocks = uniform(spec.seed, "text", (uids[:, None] * DRAWS + np.arange(DRAWS)).ravel()).reshape(-1, DRAWS)
    blocks, keys = blocks.tolist(), hash64(spec.seed, "text", uids).tolist()
    sites = site_of(spec, uids).tolist()
    urls, captions, names = [], [], []
    for i, scene in enumerate(_rows(table)):
        rnd = Draws(blocks[i], keys[i])  # filename first, then alt-text: one stream per uid
        name = filename(scene, rnd, jpeg_only=scene["content"] == PLANTED)
        kind = CAPTION_KINDS[scene["caption_kind"]]
        captions.append(alt_text(kind, scene, rnd, name, others[i]))
        urls.append(f"{spec.base_url.rstrip('/')}/s/{site_name(sites[i])}/{int(uids[i])}/{name}")
        names.append(name)
    return {"uid": uids, "url": urls, "caption": captions, "filename": names, "table": table}


def _labels(cols: dict) -> dict[str, pa.Array]:
    """Truth columns: strings for categories, null where a label does not apply to the kind."""
    t = cols["table"]
    shapes, digits, words = t["kind"] == 0, t["kind"] == 1, t["kind"] == 2
    named = lambda names, key, valid: pa.array(np.asarray(names, dtype=object)[t[key]], mask=~valid)  # noqa: E731
    return {
        "kind": named(C.KINDS, "kind", np.ones_like(shapes)),
        "shape": named(C.SHAPES, "shape", shapes),
        "color": named(C.COLOR_NAMES, "color", np.ones_like(shapes)),
        "count": pa.array(t["count"], mask=~shapes),
        "size": named(C.SIZES, "size", shapes),
        "position": named(C.POSITIONS, "position", shapes & (t["count"] == 1)),
        "background": named(C.BACKGROUNDS, "background", np.ones_like(shapes)),
        "bg_color": named([n for n, _ in C.BG_COLORS], "bg_color", np.ones_like(shapes)),
        "word": named(C.WORDS, "word", words),
        "digit": pa.array(t["digit"], mask=~digits),
    }


def truth_table(cols: dict) -> pa.Table:
    """Each pair's concept labels and how the web treats its URL."""
    t = cols["table"]
    planted = t["content"] == PLANTED
    return pa.table({
        "uid": cols["uid"], "filename": cols["filename"], **_labels(cols),
        "width": t["width"], "height": t["height"],
        "fate": np.asarray(FATES, dtype=object)[t["fate"]],
        "content": np.asarray(CONTENTS, dtype=object)[t["content"]],
        "src_uid": t["src_uid"],
        "caption_kind": np.asarray(CAPTION_KINDS, dtype=object)[t["caption_kind"]],
        "eval_set": pa.array(np.asarray(EVAL_SETS, dtype=object)[t["eval_set"]], mask=~planted),
    })


def planted_table(cols: dict) -> pa.Table:
    """Pairs whose image is a transformed eval image: which one, and how it was changed."""
    t = cols["table"]
    rows = np.flatnonzero(t["content"] == PLANTED)
    return pa.table({
        "uid": cols["uid"][rows],
        "url": pa.array([cols["url"][i] for i in rows], pa.string()),
        "eval_set": pa.array(np.asarray(EVAL_SETS, dtype=object)[t["eval_set"][rows]], pa.string()),
        "split": pa.array(np.asarray(SPLITS, dtype=object)[t["eval_split"][rows]], pa.string()),
        "eval_index": t["eval_index"][rows],
        "transform": pa.array(np.asarray(TRANSFORMS, dtype=object)[t["transform"][rows]], pa.string()),
    })


def _pairs_table(cols: dict) -> pa.Table:
    return pa.table({"url": pa.array(cols["url"], pa.string()), "caption": pa.array(cols["caption"], pa.string()),
                     "uid": pa.array(cols["uid"], pa.int64())})


def _write_tables(fs, root: str, spec: WebSpec, bank: DigitBank) -> None:
    """Stream pairs, truth and planted tables chunk by chunk (each file written atomically)."""
    paths = {"pairs": "pairs.parquet", "truth": "truth.parquet", "planted": "eval/planted.parquet"}
    with contextlib.ExitStack() as stack:
        files = {k: stack.enter_context(atomic_open(fs, posixpath.join(root, p))) for k, p in paths.items()}
        writers: dict[str, pq.ParquetWriter] = {}
        for start in range(0, spec.n_pairs, CHUNK):
            cols = pair_columns(spec, np.arange(start, min(start + CHUNK, spec.n_pairs)), bank)
            for key, table in (("pairs", _pairs_table(cols)), ("truth", truth_table(cols)),
                               ("planted", planted_table(cols))):
                writers.setdefault(key, pq.ParquetWriter(files[key], table.schema)).write_table(table)
        for writer in writers.values():
            writer.close()


def generate_web(out_uri: str, n_pairs: int = 10_000, seed: int = 0, base_url: str = "http://127.0.0.1:8000",
                 image_size: int = 128, failure_rates: dict | None = None, caption_rates: dict | None = None,
                 eval_sizes: dict | int | None = None, shard_size: int = 1000,
                 storage_options: dict | None = None, **spec_fields) -> str:
    """Write a synthetic web (spec, pairs, truth, eval sets, planted copies) to `out_uri`; returns it.

    `eval_sizes` is {set: {split: n}} or one n for every split; other WebSpec fields
    (duplicate_rate, planted_rate, slow_seconds, timeout_seconds, ...) pass as keywords.
    """
    sizes = default_eval_sizes(eval_sizes, eval_sizes) if isinstance(eval_sizes, int) else eval_sizes
    fields = dict(seed=seed, n_pairs=n_pairs, base_url=base_url, image_size=image_size, **spec_fields)
    for key, value in (("failure_rates", failure_rates), ("caption_rates", caption_rates), ("eval_sizes", sizes)):
        if value is not None:
            fields[key] = value
    spec = WebSpec(**fields)
    fs, root = fsspec.core.url_to_fs(out_uri, **(storage_options or {}))
    fs.makedirs(posixpath.join(root, "eval"), exist_ok=True)
    bank = load_digit_bank()
    write_eval_sets(out_uri, spec, bank, shard_size, storage_options)
    _write_tables(fs, root, spec, bank)
    save_spec(spec, fs, posixpath.join(root, "web.json"))  # last: its presence marks a complete web
    return out_uri
