"""Command-line wiring for `clip-pipeline dedup` and `clip-pipeline dedup train-detector`.

Thin over the library (DESIGN.md, "Three ways in"): `near_dup.dedup` and
`copy_detector.train_copy_detector` do the work. CLIP (Radford et al. 2021), Section 5 and
Appendix C. `dedup` takes CORPUS OUT; when CORPUS is the word `train-detector` the same
parser trains a copy detector into OUT instead, so one subcommand serves both forms:

    clip-pipeline dedup CORPUS OUT --eval EVALDIR [EVALDIR ...]
    clip-pipeline dedup train-detector OUT [--steps N] [--images URI]
"""
from __future__ import annotations

import argparse
import json
import sys

from clip_core.checks import check_device
from clip_core.errors import InputError, check
from clip_core.crawl.download import STATS_NAME as CRAWL_STATS
from flows.commands.corpus import add_executor_arguments, stage_executor
from flows.commands.report import refresh_data_card
from flows.common import exists, join

TRAIN_WORD = "train-detector"


def _train_options(parser) -> None:
    """Options of train-detector that `dedup` does not have."""
    parser.add_argument("--steps", type=int, default=500, help="training steps (default 500)")
    parser.add_argument("--lr", type=float, default=2e-3, help="peak learning rate (one-cycle)")
    parser.add_argument("--image-size", type=int, default=64, help="detector input side in pixels")
    parser.add_argument("--images", default=None, help="folder of images or WebDataset shards to train on "
                        "(default: procedural images + scikit-image's sample photos)")
    parser.add_argument("--max-images", type=int, default=20000, help="at most this many --images")
    parser.add_argument("--workers", type=int, default=1, help="DataLoader workers drawing augmentations")
    parser.add_argument("--init", default=None, help="start from this detector folder")


def _shared_options(parser, batch_size: int | None) -> None:
    parser.add_argument("--batch-size", type=int, default=batch_size, help="images per batch")
    parser.add_argument("--device", default="cpu",
                        help="cpu, cuda[:N], or auto: cuda where CUDA is present, else cpu (dedup with "
                             "--executor ray: cuda or auto gives each shard task one of the cluster's GPUs, "
                             "the driver encoding the eval sets on cuda if it has CUDA, else on cpu)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")


def add_train_detector_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `train-detector OUT` (for registering it as its own subcommand)."""
    parser.add_argument("out", metavar="OUT", help="folder to write model.safetensors and config.json")
    _train_options(parser)
    _shared_options(parser, 96)


def add_dedup_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `dedup CORPUS OUT --eval DIR...` (CORPUS may be the word train-detector)."""
    parser.add_argument("corpus", metavar="CORPUS", help=f"WebDataset shard folder, or the word {TRAIN_WORD}")
    parser.add_argument("out", metavar="OUT", help="output folder (or detector folder for train-detector)")
    parser.add_argument("--eval", dest="eval_dirs", nargs="+", action="extend", default=[], metavar="EVALDIR",
                        help="eval set folders (classnames.txt, templates.txt, test/ shards)")
    parser.add_argument("--descriptor", default="default",
                        help="default | phash | detector | combined | clip:CHECKPOINT | a '+' join")
    parser.add_argument("--precision", type=float, default=0.99, help="precision target of the calibration")
    parser.add_argument("--detector", default=None, help="copy detector folder (default: the shipped one)")
    parser.add_argument("--split", dest="splits", action="append", default=None,
                        help="eval split to dedup against (repeatable; default test)")
    parser.add_argument("--threshold", action="append", default=[], metavar="NAME=VALUE",
                        help="fix a descriptor's threshold instead of calibrating (repeat per descriptor)")
    parser.add_argument("--calibration-samples", type=int, default=500, help="eval images copied per set")
    parser.add_argument("-k", type=int, default=1, help="neighbours checked per corpus image and eval set")
    parser.add_argument("--sheet-size", type=int, default=12, help="pairs on each contact sheet (0: none)")
    parser.add_argument("--pool-negatives", type=int, default=None,
                        help="shared calibration negatives: crops of other real photos and scenes (default 1000)")
    parser.add_argument("--within", action="store_true",
                        help="also remove copies inside the corpus (same bytes, or pHash256 within --near-bits), "
                             "keeping one of each group")
    parser.add_argument("--near-bits", type=int, default=None,
                        help="--within: bits of 256 that may differ for a near copy (0-15, default 12)")
    parser.add_argument("--buckets", type=int, default=None,
                        help="--within: bucket tasks of the reduce (default 16; about one per 10M images)")
    add_executor_arguments(parser)
    _shared_options(parser, None)
    _train_options(parser.add_argument_group(f"{TRAIN_WORD} (when CORPUS is {TRAIN_WORD})"))


def dedup_placement(device: str, cluster_gpus: float | None, driver_cuda: bool) -> tuple[str, str, float]:
    """(driver device, shard device, GPUs each Ray shard task asks for); cluster_gpus None: no Ray.

    The driver encodes and calibrates the eval sets; the shard tasks encode and search the
    corpus. Without Ray both run here on one device (auto: cuda where CUDA is). On Ray, cuda or
    auto puts every shard task on one of the cluster's GPUs (seen there as cuda:0) whatever the
    driver has, the driver on cuda if it has CUDA, else on cpu (the usual CPU-only head); a
    cluster without GPUs runs auto on cpu everywhere and refuses cuda."""
    kind, _, index = device.partition(":")
    if cluster_gpus is None:
        device = ("cuda" if driver_cuda else "cpu") if kind == "auto" else device
        return device, device, 0.0
    if kind == "auto":
        if not cluster_gpus > 0:
            return "cpu", "cpu", 0.0
        device = "cuda"
    elif kind != "cuda":
        return device, device, 0.0
    check(cluster_gpus > 0, "--device", f"{device} with --executor ray, but the Ray cluster declares no GPU",
          "pass --device cpu or auto, or add GPU nodes to the cluster")
    check(index in ("", "0"), "--device", f"{device} with --executor ray: a shard task sees only the GPU Ray "
          "gives it, as cuda:0", "pass --device cuda or auto")
    return (device if driver_cuda else "cpu"), device, 1.0


def _local_device(device: str) -> str:
    """--device as this machine runs it: auto is cuda where torch sees CUDA, else cpu."""
    if device != "auto":
        return device
    import torch
    return "cuda" if torch.cuda.is_available() else "cpu"


def _set_threads(n: int | None) -> None:
    if n is not None:
        check(n >= 1, "--threads", f"must be >= 1, got {n}", "pass --threads 1 or more, or leave it out")
        import torch
        torch.set_num_threads(n)


def _thresholds(items: list[str]) -> dict | None:
    out = {}
    for item in items:
        name, sep, value = item.partition("=")
        check(bool(sep and name), "--threshold", f"expects NAME=VALUE, got {item!r}", "e.g. --threshold phash=0.9")
        try:
            out[name] = float(value)
        except ValueError:
            raise InputError("--threshold", f"{item!r}: {value!r} is not a number",
                             "e.g. --threshold phash=0.9") from None
    return out or None


def _batch_size(value: int | None, default: int) -> int:
    """The default only when the option is absent: --batch-size 0 is an error, not the default."""
    return default if value is None else value


def _warn_damaged(stats) -> None:
    """One stderr line per truncated or corrupt shard of a DedupStats: its samples are lost, and counted."""
    for d in stats.damaged_shards:
        lost = d["samples_lost"] if d["samples_lost"] is not None else "an unknown number of"
        print(f"clip-pipeline dedup: warning: shard {d['shard']} is {d['reason']}: read {d['samples_read']} "
              f"samples, {lost} lost ({d['error']})", file=sys.stderr)


def run_dedup_command(args: argparse.Namespace) -> int:
    """Run `dedup` (or `dedup train-detector`) from parsed arguments."""
    _set_threads(args.threads)
    if args.corpus == TRAIN_WORD:
        check(not args.eval_dirs, "--eval", f"{TRAIN_WORD} takes no --eval", "drop --eval, or name a corpus")
        return run_train_detector_command(args)
    check(bool(args.eval_dirs), "--eval", "dedup needs at least one eval set folder", "pass --eval EVALDIR")
    from dedup.checks import check_device_name
    from dedup.near_dup import dedup
    thresholds = _thresholds(args.threshold)
    if args.device != "auto":  # before any cluster starts
        on_cluster = args.executor == "ray" and args.device.startswith("cuda")  # the cluster's GPUs: placement
        (check_device_name if on_cluster else check_device)("--device", args.device)
    with stage_executor(args.executor, args.ray_address, None) as executor:  # None: shards one by one, here
        if args.executor == "ray":
            device, shard_device = _place_shards(executor, args.device)
        else:
            device = shard_device = _local_device(args.device)
        stats = dedup(args.corpus, args.out, args.eval_dirs, descriptor=args.descriptor, precision=args.precision,
                      detector_path=args.detector, splits=tuple(args.splits or ("test",)), thresholds=thresholds,
                      calibration_samples=args.calibration_samples, batch_size=_batch_size(args.batch_size, 128),
                      k=args.k, device=device, shard_device=shard_device, seed=args.seed,
                      sheet_size=args.sheet_size, executor=executor, within=args.within,
                      **_given(pool_negatives=args.pool_negatives, near_bits=args.near_bits, buckets=args.buckets))
    _warn_damaged(stats)
    summary = {"corpus_images": stats.corpus_images, "unreadable": stats.unreadable, "dropped": stats.dropped,
               "removed": stats.removed, "kept": stats.kept,
               "eval_sets": {name: {"matches": s.matches, "overlap": s.overlap, "thresholds": s.thresholds}
                             for name, s in stats.eval_sets.items()},
               **({"within": stats.within} if stats.within else {})}
    print(json.dumps(summary, indent=2))
    if exists(join(args.corpus, CRAWL_STATS)):  # a crawled corpus (not a folder of shards made otherwise)
        refresh_data_card("dedup", args.corpus, dedup=args.out)
    return 0


def _given(**options) -> dict:
    """The options set on the command line (None: the library's default)."""
    return {k: v for k, v in options.items() if v is not None}


def _place_shards(executor, device: str) -> tuple[str, str]:
    """Set the Ray executor's GPUs per shard task for `device` (`dedup_placement`); (driver, shard) devices."""
    import torch
    driver, shard, executor.gpus_per_task = dedup_placement(device, executor.cluster_gpus(),
                                                            torch.cuda.is_available())
    return driver, shard


def _training_images(uri: str, limit: int) -> list[bytes]:
    """Image bytes from a folder of WebDataset shards or of image files."""
    import fsspec
    from clip_core.data.webdataset import IMAGE_EXTS
    from dedup.near_dup import iter_shard_images
    fs, root = fsspec.core.url_to_fs(uri)
    paths = sorted(fs.find(root))
    out = []
    for path in paths:
        if path.endswith(".tar"):
            out += [blob for _, blob in iter_shard_images(fs, path) if blob is not None]
        elif path.rsplit(".", 1)[-1].lower() in IMAGE_EXTS:
            out.append(fs.cat_file(path))
        if len(out) >= limit:
            break
    check(len(out) >= 2, f"--images {uri}", f"found {len(out)} images; need at least 2",
          "pass a folder of image files or WebDataset shards")
    return out[:limit]


def run_train_detector_command(args: argparse.Namespace) -> int:
    """Train a copy detector from parsed arguments and write it to OUT."""
    from dedup.augment import image_source, sample_photos
    from dedup.checks import check_train_detector_options
    from dedup.copy_detector import DetectorConfig, train_copy_detector
    batch_size, device = _batch_size(args.batch_size, 96), _local_device(args.device)
    check_train_detector_options(args.out, steps=args.steps, batch_size=batch_size, lr=args.lr,
                                 image_size=args.image_size, max_images=args.max_images, workers=args.workers,
                                 device=device, images=args.images, init=args.init)
    _set_threads(args.threads)
    source = _training_images(args.images, args.max_images) if args.images else image_source(sample_photos())
    every = max(1, args.steps // 20)

    def log(step: int, loss: float) -> None:
        if step % every == 0 or step == args.steps - 1:
            print(f"step {step:5d}  loss {loss:.4f}", flush=True)

    train_copy_detector(source, args.out, args.steps, batch_size=batch_size, lr=args.lr,
                        config=DetectorConfig(image_size=args.image_size), device=device, seed=args.seed,
                        init=args.init, num_workers=args.workers, log=log)
    print(f"wrote {args.out}")
    return 0
