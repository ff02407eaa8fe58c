"""Human-readable dedup and overlap reports: contact sheets, Markdown tables, plots.

CLIP (Radford et al. 2021), Appendix C, set thresholds by inspecting matches; the contact
sheet puts each corpus image beside the eval image it matched, with the similarity, so a
person can check the calibrated threshold. The Markdown table and plot follow the paper's
overlap report (Figure 17 and Table 7: overlap %, All - Clean, binomial p, 99.5% CI).
"""
from __future__ import annotations

import io
import math
import posixpath
from collections.abc import Sequence

import fsspec
from PIL import Image, ImageDraw, ImageFont

from dedup.descriptors import decode_all

THUMB = 128


def _fmt(x: float, spec: str = ".1f", scale: float = 1.0) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x * scale, spec)


def markdown_table(stats: Sequence, confidence: float = 0.995) -> str:
    """The overlap table: one row per eval set, accuracies in %, the paper's columns."""
    ci = f"{100 * confidence:g}% CI (Overlap)"
    head = ["Dataset", "N", "Overlap", "Overlap %", "All", "Clean", "Overlap acc", "All - Clean", "p (1-tailed)", ci]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for s in stats:
        interval = "-" if math.isnan(s.ci_low) else f"[{100 * s.ci_low:.1f}, {100 * s.ci_high:.1f}]"
        row = [s.eval_set, str(s.n), str(s.n_overlap), _fmt(s.overlap_pct), _fmt(s.acc_all, scale=100),
               _fmt(s.acc_clean, scale=100), _fmt(s.acc_overlap, scale=100), _fmt(s.all_minus_clean, "+.2f", 100),
               _fmt(s.p_value, ".3g"), interval]
        lines.append("| " + " | ".join(row) + " |")
    note = ("\nAccuracies in %. p: one-tailed binomial test of the Overlap accuracy with the Clean accuracy "
            "as the null (CLIP Section 5, Appendix C).\n")
    return "\n".join(lines) + "\n" + note


def _figure_png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return buf.getvalue()


def overlap_plot(stats: Sequence, confidence: float = 0.995) -> bytes:
    """PNG: All - Clean against overlap % per set, and Overlap accuracy with its CI vs Clean."""
    import matplotlib
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for s in stats:
        left.scatter(s.overlap_pct, 100 * s.all_minus_clean, color="C0")
        left.annotate(s.eval_set, (s.overlap_pct, 100 * s.all_minus_clean), fontsize=7)
    left.axhline(0, color="grey", lw=0.8)
    left.set(xlabel="overlap (%)", ylabel="All - Clean accuracy (points)", title="Accuracy change from overlap")
    names = [s.eval_set for s in stats]
    for i, s in enumerate(stats):
        right.scatter(i, 100 * s.acc_clean, marker="_", s=200, color="grey")
        if not math.isnan(s.acc_overlap):
            err = [[100 * (s.acc_overlap - s.ci_low)], [100 * (s.ci_high - s.acc_overlap)]]
            right.errorbar(i, 100 * s.acc_overlap, yerr=err, fmt="o", color="C1", capsize=3)
    right.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=7)
    right.set(ylabel="zero-shot accuracy (%)", title=f"Overlap acc. ({100 * confidence:g}% CI) vs Clean (bar)")
    png = _figure_png(fig)
    plt.close(fig)
    return png


def _thumb(img: Image.Image | None) -> Image.Image:
    canvas = Image.new("RGB", (THUMB, THUMB), (40, 40, 40))
    if img is not None:
        img = img.convert("RGB").copy()
        img.thumbnail((THUMB, THUMB))
        canvas.paste(img, ((THUMB - img.width) // 2, (THUMB - img.height) // 2))
    return canvas


def contact_sheet(rows: Sequence[tuple], title: str = "", columns: int = 2) -> bytes:
    """PNG of (corpus image, eval image, caption) rows: each pair side by side, caption below."""
    font = ImageFont.load_default(size=11)
    cell_w, cell_h, top = 2 * THUMB + 16, THUMB + 34, 24
    n_rows = max(1, math.ceil(len(rows) / columns))
    sheet = Image.new("RGB", (columns * cell_w, top + n_rows * cell_h), "white")
    draw = ImageDraw.Draw(sheet)
    draw.text((6, 5), title or f"{len(rows)} closest matches: corpus (left) | eval (right)", fill="black", font=font)
    if not rows:
        draw.text((6, top + 10), "no matches", fill="black", font=font)
    for i, (corpus_img, eval_img, caption) in enumerate(rows):
        x, y = (i % columns) * cell_w, top + (i // columns) * cell_h
        sheet.paste(_thumb(corpus_img), (x + 4, y))
        sheet.paste(_thumb(eval_img), (x + 8 + THUMB, y))
        for j, line in enumerate(str(caption).split("\n")[:2]):
            draw.text((x + 4, y + THUMB + 2 + 13 * j), line[:48], fill="black", font=font)
    buf = io.BytesIO()
    sheet.save(buf, "PNG")
    return buf.getvalue()


def _eval_images(refs, wanted: dict) -> dict:
    """{(eval set, index): PIL image} for the wanted indexes, reading each split once."""
    from clip_core.eval.datasets import iter_samples
    out = {}
    for ref in refs:
        need = wanted.get(ref.name, set())
        for sample in iter_samples(ref.root, ref.split) if need else ():
            if sample.index in need:
                images = decode_all([sample.image_bytes], [sample.key])[0]
                out[(ref.name, sample.index)] = images[0] if images else None
                need = need - {sample.index}
                if not need:
                    break
    return out


def _sheet_rows(items, eval_images) -> list[tuple]:
    rows = []
    for margin, key, (eval_set, index, sim, descriptor), blob in sorted(items, reverse=True):
        caption = f"{key} ~ {eval_set}[{index}]\n{descriptor} {sim:.3f} (threshold {sim - margin:.3f})"
        corpus_img = decode_all([blob], [key])[0]
        rows.append((corpus_img[0] if corpus_img else None, eval_images.get((eval_set, index)), caption))
    return rows


def _unique_pairs(items, size: int, skip=frozenset()) -> list:
    """The best `size` items, one per (corpus key, eval set), leaving out pairs in `skip`."""
    out, seen = [], set(skip)
    for item in sorted(items, reverse=True):
        pair = (item[1], item[2][0])
        if pair not in seen:
            seen.add(pair)
            out.append(item)
        if len(out) == size:
            break
    return out


def write_contact_sheets(out_uri: str, results, refs, size: int, storage_options: dict | None = None) -> None:
    """contact_sheet.png: the closest matches; near_misses.png: the best pairs below threshold."""
    matched = {(m["key"], m["eval_set"]) for r in results for m in r.matches}
    closest = _unique_pairs((c for r in results for c in r.closest), size)
    near = _unique_pairs((c for r in results for c in r.near_misses), size, matched)
    wanted: dict = {}
    for _, _, (eval_set, index, _, _), _ in closest + near:
        wanted.setdefault(eval_set, set()).add(index)
    eval_images = _eval_images(refs, wanted)
    for name, items, title in (("contact_sheet.png", closest, "closest matches"),
                               ("near_misses.png", near, "closest pairs below the threshold")):
        png = contact_sheet(_sheet_rows(items, eval_images), f"{len(items)} {title}: corpus (left) | eval (right)")
        with fsspec.open(posixpath.join(out_uri, name), "wb", **(storage_options or {})) as f:
            f.write(png)


def write_within_sheet(out_uri: str, rows, images: dict, storage_options: dict | None = None) -> None:
    """within_sheet.png: corpus copies (left) beside the image of theirs that was kept (right);
    rows are (key, (kept key, kind)), images {key: PIL image}."""
    sheet_rows = [(images.get(key), images.get(kept), f"{key} ({kind})\nsame as kept {kept}")
                  for key, (kept, kind) in rows]
    png = contact_sheet(sheet_rows, f"{len(rows)} copies inside the corpus: removed (left) | kept (right)")
    with fsspec.open(posixpath.join(out_uri, "within_sheet.png"), "wb", **(storage_options or {})) as f:
        f.write(png)
