"""Checks at the door for `dedup` and `dedup train-detector` (STYLE.md 15).

Every option and input folder is checked before a descriptor is built or an image decoded;
a failure is one `InputError` naming the option or file, the problem and the fix (exit 2).
"""
from __future__ import annotations

from collections.abc import Sequence

from clip_core.checks import (
    check_device, check_folder, check_out_folder, finite_number, fraction, whole_number,
)
from clip_core.errors import check

CORPUS_FIX = "pass the folder of WebDataset shards that `clip-pipeline crawl` wrote"


def check_thresholds(thresholds: dict | None) -> dict | None:
    """Manual thresholds {descriptor name: finite similarity}."""
    for name, value in (thresholds or {}).items():
        finite_number(f"--threshold {name}", value)
    return thresholds or None


def check_dedup_options(eval_dirs: Sequence[str], out_uri: str, *, precision: float, thresholds: dict | None,
                        calibration_samples: int, batch_size: int, k: int, device: str, sheet_size: int,
                        splits: Sequence[str], shard_device: str | None = None) -> None:
    """Every option of `dedup`, and the eval and output folders exist as they should.

    `device` runs here and must be present; `shard_device` runs in the shard tasks, on
    whatever node they land on, so only its name is checked here."""
    check(len(eval_dirs) > 0, "--eval", "dedup needs at least one eval set folder", "pass --eval EVALDIR")
    for root in eval_dirs:
        check_folder(f"--eval {root}", root, "eval set folder")
    check(len(splits) > 0 and all(splits), "--split", f"no split names in {list(splits)}", "pass --split test")
    check_out_folder(f"OUT {out_uri}", out_uri)
    fraction("--precision", precision)
    check_thresholds(thresholds)
    whole_number("--calibration-samples", calibration_samples, 0 if thresholds else 1)
    whole_number("--batch-size", batch_size)
    whole_number("-k", k)
    whole_number("--sheet-size", sheet_size, 0)
    check_device("--device", device)
    check_device_name("--device", shard_device)


def check_device_name(where: str, device: str | None) -> str | None:
    """cpu, cuda, cuda:N or mps by name only, for a device on other machines (None: the default)."""
    if device is None:
        return None
    kind, _, index = str(device).partition(":")
    check(kind in ("cpu", "cuda", "mps") and (not index or index.isdigit()), where, f"unknown device {device!r}",
          "pass cpu, cuda or cuda:N")
    return str(device)


def check_train_detector_options(out: str, *, steps: int, batch_size: int, lr: float, image_size: int,
                                 max_images: int, workers: int, device: str, images: str | None,
                                 init: str | None) -> None:
    """Every option of `dedup train-detector`."""
    check_out_folder(f"OUT {out}", out)
    whole_number("--steps", steps)
    whole_number("--batch-size", batch_size, 2)  # InfoNCE needs a negative
    finite_number("--lr", lr, "pass --lr 2e-3", above=0)
    whole_number("--image-size", image_size, 16)
    whole_number("--max-images", max_images, 2)
    whole_number("--workers", workers, 0)
    check_device("--device", device)
    if images:
        check_folder(f"--images {images}", images, "folder of images or shards")
    if init:
        check_folder(f"--init {init}", init, "detector folder")
