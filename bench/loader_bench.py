"""Does the training loader keep up? JPEG decode and crop per CPU-second, PIL against simplejpeg.

CLIP (Radford et al. 2021), Section 2.3: a random square crop is the only augmentation, so
a loader worker's work per sample is: decode the JPEG, crop and resize it, tokenise the
caption (clip_core/train/data.py). This times each part per CPU-second (time.process_time,
one process, torch and PIL on one thread), so other jobs on a shared machine change the
wall time but not the figures, and turns the full path's rate into the cores a GPU needs.

Images: photographs bundled with scikit-image (skimage.data), random crops of them resized
to 256 px on the short side, JPEG quality 90: mostly 256 x 256 (the crawl's default
resize_mode "center_crop"), some wider or taller (its "keep_ratio"), a few greyscale.

Variants, each over the same N images, best of --repeats (the least CPU time):
  decode PIL         clip_core.transforms.load_image (PIL, libjpeg-turbo inside Pillow's wheel)
  decode simplejpeg  simplejpeg.decode_jpeg -> PIL image of the same mode
  (a) PIL + crop     load_image + image_transform(224, train=True, normalize=False), seeded per sample
  (b) PIL draft      the same after Image.draft("RGB", (224, 224)): libjpeg's DCT scaling
  (c) simplejpeg     simplejpeg decode + the same crop
  (d) full sample    (a) or (c) plus the caption's UTF-8 decode, tokenising per batch, torch.stack
  (e) ShardLoader    the real loader, 0 workers (in this process), over tar shards of the same
                     samples: tar reading and the shuffle buffer too
  (f) 1 worker       the real loader with one spawned DataLoader worker: the marginal CPU time
                     (this process + the worker) between two run lengths, so start-up drops out
                     and the batches' trip between processes counts (PIL only: a spawned
                     worker does not see this script's decoder swap)
  (g) torch resize   not the project's path, for comparison: PIL decode, then the same crop box
                     resized by torch's uint8 bicubic antialias kernel instead of PIL's
  tokenise only      the captions alone, per batch of 256 (BPE cache warm after the warm-up pass)

    .venv/bin/python bench/loader_bench.py [--n 500] [--repeats 3] [--step-rate 8900]
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import random
import sys
import tarfile
import tempfile
import time
from importlib.resources import files
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from clip_core.tokenizer import tokenize
from clip_core.train import data as train_data
from clip_core.transforms import image_transform, load_image, random_resized_crop_params, to_rgb

RGB_PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry",
              "retina", "stereo_motorcycle")
GREY_PHOTOS = ("camera", "coins", "moon", "clock", "cell")
SHAPES = ((256, 256),) * 8 + ((341, 256), (256, 341), (384, 256), (455, 256))  # (w, h); 256 x 256 most often
BATCH = 256  # samples tokenised together, as a loader worker does per batch


def photos() -> list[np.ndarray]:
    """The bundled skimage photographs that load offline, RGB first then greyscale."""
    import skimage.data

    out = []
    for name in RGB_PHOTOS + GREY_PHOTOS:
        arr = getattr(skimage.data, name)()
        out.append(arr[0] if isinstance(arr, tuple) else arr)  # stereo_motorcycle: (left, right, disparity)
    return out


def make_jpegs(n: int, quality: int = 90, seed: int = 0) -> list[bytes]:
    """`n` JPEGs: random crops of the photographs, 256 px on the short side; about 1 in 10 grey."""
    rng = random.Random(seed)
    rgb, grey = photos()[:len(RGB_PHOTOS)], photos()[len(RGB_PHOTOS):]
    out = []
    for _ in range(n):
        src = Image.fromarray(rng.choice(grey if rng.random() < 0.1 else rgb))
        w, h = rng.choice(SHAPES)
        scale = min(src.width / w, src.height / h) * rng.uniform(0.5, 1.0)  # crop box in source pixels
        cw, ch = int(w * scale), int(h * scale)
        left, top = rng.randint(0, src.width - cw), rng.randint(0, src.height - ch)
        img = src.crop((left, top, left + cw, top + ch)).resize((w, h), Image.BICUBIC)
        if rng.random() < 0.5:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=quality)
        out.append(buf.getvalue())
    return out


def make_captions(n: int, seed: int = 0) -> list[bytes]:
    """Alt-text-like captions: a zero-shot template filled with a class name, and a few words around it."""
    rng = random.Random(seed)
    prompts = json.loads(files("clip_core").joinpath("assets/clip_prompts.json").read_text())
    sets = [v for v in prompts.values() if v.get("templates")]
    filler = "photo stock image of the best new old view at in near sunset city beach HD 2019 free download".split()
    out = []
    for _ in range(n):
        s = rng.choice(sets)
        text = rng.choice(s["templates"]).format(rng.choice(s["classes"]))
        words = rng.sample(filler, rng.randint(0, 6))
        out.append(" ".join(words[:len(words) // 2] + [text] + words[len(words) // 2:]).encode())
    return out


def simplejpeg_image(data: bytes) -> Image.Image:
    """simplejpeg decode to a PIL image of the mode PIL would give (L for grey, RGB for colour)."""
    import simplejpeg

    grey = simplejpeg.decode_jpeg_header(data)[2] == "Gray"
    arr = simplejpeg.decode_jpeg(data, colorspace="GRAY" if grey else "RGB")
    return Image.fromarray(arr[:, :, 0] if grey else arr)


def draft_image(data: bytes) -> Image.Image:
    """PIL decode after asking libjpeg for the smallest DCT scale still at least 224 x 224."""
    img = Image.open(io.BytesIO(data))
    img.draft(img.mode if img.mode == "L" else "RGB", (224, 224))
    img.load()
    return img


def crop_loop(decode, jpegs, captions=None):
    """Decode and crop every image as data.py's _Stream._decode does (with the caption when given)."""
    images, texts = [], []
    for i, jpeg in enumerate(jpegs):
        img = decode(jpeg)
        images.append(image_transform(224, train=True, generator=i, normalize=False)(img))
        if captions is not None:
            texts.append(captions[i].decode("utf-8").strip())
            if len(texts) == BATCH or i == len(jpegs) - 1:  # one worker batch: tokenise and stack
                tokenize(texts, 77, truncate=True)
                torch.stack(images)
                images, texts = [], []


def write_shards(folder: Path, jpegs, captions, per_shard: int = 250) -> str:
    """img2dataset-style tar shards (KEY.jpg, KEY.txt) of the same samples."""
    folder.mkdir(parents=True, exist_ok=True)
    for s in range(0, len(jpegs), per_shard):
        with tarfile.open(folder / f"{s // per_shard:05d}.tar", "w") as tar:
            for i in range(s, min(s + per_shard, len(jpegs))):
                for ext, blob in (("jpg", jpegs[i]), ("txt", captions[i])):
                    info = tarfile.TarInfo(f"{i:09d}.{ext}")
                    info.size = len(blob)
                    tar.addfile(info, io.BytesIO(blob))
    return str(folder)


@contextlib.contextmanager
def loader_decoder(decode):
    """Swap the decoder the training loader calls (clip_core.train.data.load_image) for a while."""
    saved = train_data.load_image
    train_data.load_image = lambda data, name=None: decode(data)
    try:
        yield
    finally:
        train_data.load_image = saved


def shard_loader_loop(corpus: str, n: int, decode):
    """`n` samples (rounded down to batches) through ShardLoader with 0 workers, one epoch."""
    cfg = train_data.DataConfig(corpus=corpus, batch_size=BATCH // 4, image_size=224, shuffle_buffer=BATCH,
                                num_workers=0, normalize=False)
    with loader_decoder(decode):
        it = iter(train_data.ShardLoader(cfg))
        for _ in range(n // cfg.batch_size):
            next(it)


def torch_crop(img: Image.Image, seed: int) -> torch.Tensor:
    """The same crop box as image_transform(train=True, generator=seed), resized by torch (uint8 in and out)."""
    top, left, h, w = random_resized_crop_params(*img.size, (0.9, 1.0), (3 / 4, 4 / 3), torch.Generator().manual_seed(seed))
    x = torch.from_numpy(np.array(to_rgb(img))).permute(2, 0, 1)[None, :, top:top + h, left:left + w]
    return F.interpolate(x, size=(224, 224), mode="bicubic", antialias=True)[0].contiguous()


def torch_crop_loop(jpegs):
    for i, jpeg in enumerate(jpegs):
        torch_crop(load_image(jpeg), i)


def torch_vs_pil_crop(jpegs) -> tuple[int, float]:
    """Largest |torch resize - PIL resize| over the crops, and the share of values more than 1 apart."""
    worst, far, total = 0, 0, 0
    for i, jpeg in enumerate(jpegs):
        img = load_image(jpeg)
        d = (torch_crop(img, i).int() - image_transform(224, train=True, generator=i, normalize=False)(img).int()).abs()
        worst, far, total = max(worst, int(d.max())), far + int((d > 1).sum()), total + d.numel()
    return worst, far / total


def worker_cpu_per_sample(corpus: str, short: int, long: int, repeats: int = 2) -> float:
    """CPU seconds per sample of ShardLoader with 1 spawned worker (this process + the worker's): the
    difference between runs of `short` and `long` batches (least of `repeats` each), so start-up cancels."""
    cfg = train_data.DataConfig(corpus=corpus, batch_size=BATCH // 4, image_size=224, shuffle_buffer=BATCH,
                                num_workers=1, normalize=False)

    def spent(count: int) -> float:
        before = os.times()
        loader = iter(train_data.ShardLoader(cfg))
        for _ in range(count):
            next(loader)
        loader.close()  # ends the DataLoader; its worker is waited for, so its CPU time lands in os.times
        after = os.times()
        return sum(after[:4]) - sum(before[:4])  # user, system, children's user, children's system

    return (min(spent(long) for _ in range(repeats)) - min(spent(short) for _ in range(repeats))) / (
        (long - short) * cfg.batch_size)


def cpu_seconds(fn, repeats: int) -> float:
    """Least CPU time of `repeats` calls of fn() (after one warm-up call on the caller's side)."""
    best = float("inf")
    for _ in range(repeats):
        start = time.process_time()
        fn()
        best = min(best, time.process_time() - start)
    return best


def max_abs_difference(jpegs) -> tuple[int, float]:
    """Largest |simplejpeg - PIL| over all pixels of all images, and the share of pixels that differ."""
    worst, differ, total = 0, 0, 0
    for jpeg in jpegs:
        a = np.asarray(load_image(jpeg), dtype=np.int16)
        b = np.asarray(simplejpeg_image(jpeg), dtype=np.int16)
        assert a.shape == b.shape, (a.shape, b.shape)
        d = np.abs(a - b)
        worst, differ, total = max(worst, int(d.max())), differ + int((d > 0).sum()), total + d.size
    return worst, differ / total


def timed_variants(jpegs, captions, corpus: str, n: int, fast) -> dict:
    """name: (kind, samples, function); `kind` names the PIL row each is compared with."""
    loaded = (n // (BATCH // 4)) * (BATCH // 4)
    texts = [c.decode("utf-8") for c in captions]
    v = {"decode PIL": ("decode", n, lambda: [load_image(j) for j in jpegs]),
         "(a) PIL + crop": ("crop", n, lambda: crop_loop(load_image, jpegs)),
         "(b) PIL draft + crop": ("crop", n, lambda: crop_loop(draft_image, jpegs)),
         "(d) full sample, PIL": ("full", n, lambda: crop_loop(load_image, jpegs, captions)),
         "(e) ShardLoader 0 workers, PIL": ("loader", loaded, lambda: shard_loader_loop(corpus, n, load_image)),
         "(g) PIL decode + torch resize": ("crop", n, lambda: torch_crop_loop(jpegs)),
         "tokenise only": ("tokenise", n, lambda: [tokenize(texts[i:i + BATCH], 77, truncate=True)
                                                  for i in range(0, n, BATCH)])}
    if fast:
        v.update({"decode simplejpeg": ("decode", n, lambda: [fast(j) for j in jpegs]),
                  "(c) simplejpeg + crop": ("crop", n, lambda: crop_loop(fast, jpegs)),
                  "(d) full sample, simplejpeg": ("full", n, lambda: crop_loop(fast, jpegs, captions)),
                  "(e) ShardLoader 0 workers, simplejpeg": ("loader", loaded,
                                                            lambda: shard_loader_loop(corpus, n, fast))})
    return v


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=500, help="images (and captions)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--quality", type=int, default=90)
    p.add_argument("--step-rate", type=float, default=8900, help="samples/s one GPU's step needs (docs/scale.md)")
    p.add_argument("--no-worker", action="store_true", help="skip (f), the spawned-worker runs")
    args = p.parse_args()
    torch.set_num_threads(1)
    load_before = os.getloadavg()[0]
    jpegs, captions = make_jpegs(args.n, args.quality), make_captions(args.n)
    try:
        import simplejpeg  # noqa: F401
        fast = simplejpeg_image
    except ImportError:
        fast = None
    with tempfile.TemporaryDirectory(prefix="loader-bench-") as tmp:
        rate, names = measure(jpegs, captions, write_shards(Path(tmp) / "corpus", jpegs, captions), args, fast)
    report(jpegs, rate, names, args, load_before, fast)
    return 0


def measure(jpegs, captions, corpus: str, args, fast) -> tuple[dict, dict]:
    """images per CPU-second of every variant, and each variant's kind."""
    tokenize([""])  # load the BPE once, as ShardLoader does before its workers start
    variants = timed_variants(jpegs, captions, corpus, args.n, fast)
    for _, _, fn in variants.values():  # warm-up: imports, BPE cache, first allocations
        fn()
    best = dict.fromkeys(variants, float("inf"))
    for _ in range(args.repeats):  # interleaved: a load change on a shared machine touches every variant alike
        for name, (_, _, fn) in variants.items():
            best[name] = min(best[name], cpu_seconds(fn, 1))
    rate = {name: variants[name][1] / best[name] for name in variants}
    if not args.no_worker:
        variants["(f) ShardLoader 1 worker, PIL"] = ("loader", 1, None)
        rate["(f) ShardLoader 1 worker, PIL"] = 1 / worker_cpu_per_sample(corpus, 3, 3 + 2 * args.n // (BATCH // 4))
    return rate, {name: kind for name, (kind, _, _) in variants.items()}


def report(jpegs, rate: dict, names: dict, args, load_before: float, fast) -> None:
    """Print the table, the draft count and the pixel differences."""
    ref = {"decode": "decode PIL", "crop": "(a) PIL + crop", "full": "(d) full sample, PIL",
           "loader": "(e) ShardLoader 0 workers, PIL", "tokenise": "tokenise only"}
    sizes = [len(j) for j in jpegs]
    modes = [Image.open(io.BytesIO(j)) for j in jpegs]
    print(f"{args.n} JPEGs (quality {args.quality}, mean {np.mean(sizes) / 1024:.1f} KiB, "
          f"{sum(m.mode == 'L' for m in modes)} grey, {sum(m.size == (256, 256) for m in modes)} at 256x256); "
          f"crop to 224; CPU time, 1 process, 1 thread, best of {args.repeats}; {os.cpu_count()} cores, "
          f"load average {load_before:.1f} at start, {os.getloadavg()[0]:.1f} at end")
    print(f"Pillow {Image.__version__} (libjpeg-turbo: {pil_turbo()}), simplejpeg {_version('simplejpeg')}, "
          f"PyTurboJPEG: {turbojpeg_status()}")
    print(f"{'variant':40s} {'images/CPU-s':>12s} {'ms/image':>9s} {'vs PIL':>7s} {'cores/GPU':>9s}")
    for name, kind in names.items():
        print(f"{name:40s} {rate[name]:12.0f} {1000 / rate[name]:9.3f} {rate[name] / rate[ref[kind]]:7.2f} "
              f"{args.step_rate / rate[name]:9.1f}")
    print(f"vs PIL: against the PIL row of the same kind (decode, crop, full sample, loader); "
          f"cores/GPU = {args.step_rate:.0f} samples/s / images per CPU-second")
    drafted = sum(draft_image(j).size != Image.open(io.BytesIO(j)).size for j in jpegs)
    print(f"(b) draft: libjpeg scales by 1/2, 1/4 or 1/8 only and 1/2 of 256 px is 128 < 224, so draft reduced "
          f"{drafted} of {args.n} images: no gain at 256 -> 224 (it pays from about 448 px up)")
    if fast:
        worst, share = max_abs_difference(jpegs)
        print(f"simplejpeg vs PIL decode: max |difference| {worst} (0-255), {share:.2%} of pixel values differ")
    worst, far = torch_vs_pil_crop(jpegs)
    print(f"(g) torch vs PIL bicubic resize of the same crop: max |difference| {worst}, {far:.3%} of values > 1 apart")


def _version(module: str) -> str:
    try:
        return __import__(module).__version__
    except ImportError:
        return "not installed"


def pil_turbo() -> str:
    from PIL import features

    return str(features.version("libjpeg_turbo") or "yes") if features.check_feature("libjpeg_turbo") else "no"


def turbojpeg_status() -> str:
    """PyTurboJPEG needs the system's libturbojpeg; say why it is left out when it is."""
    try:
        from turbojpeg import TurboJPEG

        TurboJPEG()
        return "available but not timed"
    except ImportError:
        return "not installed"
    except (RuntimeError, OSError):
        return "installed, libturbojpeg missing (not in ldconfig -p): skipped"


if __name__ == "__main__":
    sys.exit(main())
