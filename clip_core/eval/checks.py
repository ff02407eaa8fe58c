"""Checks at the door for the evaluate, dedup and overlap stages (STYLE.md 15).

Each raises `InputError` naming the option or file, the problem and the fix, before any
model is loaded or image decoded; the command line turns it into one line and exit 2.
"""
from __future__ import annotations

import math
import os
from pathlib import Path

import fsspec

from clip_core.errors import InputError, check

__all__ = ["check_int", "check_fraction", "check_finite", "check_out_folder", "check_folder", "check_file",
           "check_device"]


def check_int(value, where: str, minimum: int) -> int:
    """`value` as an int >= minimum (bools and floats are refused: they are typos)."""
    ok = isinstance(value, int) and not isinstance(value, bool) and value >= minimum
    check(ok, where, f"must be an integer >= {minimum}, got {value!r}", f"pass {where} {minimum} or more")
    return value


def check_fraction(value, where: str) -> float:
    """`value` as a float in (0, 1]."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value <= 1
    check(ok, where, f"must be in (0, 1], got {value!r}", f"pass a value such as {where} 0.99")
    return float(value)


def check_finite(value, where: str) -> float:
    """`value` as a finite float."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    check(ok, where, f"must be a finite number, got {value!r}")
    return float(value)


def _nearest_existing(path: Path) -> Path:
    for folder in (path, *path.parents):
        if folder.exists():
            return folder
    return Path(".")


def check_out_folder(uri: str, where: str) -> None:
    """An output folder: not a file, and (on the local disk) inside a writable folder."""
    fs, root = fsspec.core.url_to_fs(str(uri))
    check(not fs.isfile(root), where, f"{uri} is a file, not a folder", "pass a folder path; it is created if missing")
    if "file" not in fs.protocol and "local" not in fs.protocol:
        return  # object stores: permissions show on the first write
    existing = _nearest_existing(Path(root))
    check(existing.is_dir(), where, f"{existing} is a file, so {uri} cannot be a folder", "pass another path")
    check(os.access(existing, os.W_OK | os.X_OK), where, f"cannot write in {existing}", "pass a writable folder")


def check_folder(uri: str, where: str, what: str = "folder") -> None:
    """An input folder that exists."""
    fs, root = fsspec.core.url_to_fs(str(uri))
    if fs.isfile(root):
        raise InputError(where, f"{uri} is a file, not a {what}", f"pass the {what}")
    check(fs.isdir(root), where, f"no {what} at {uri}", "check the path")


def check_file(uri: str, where: str, what: str = "file") -> None:
    """An input file that exists."""
    fs, root = fsspec.core.url_to_fs(str(uri))
    check(not fs.isdir(root), where, f"{uri} is a folder, not a {what}", f"pass the {what} itself")
    check(fs.isfile(root), where, f"no {what} at {uri}", "check the path")


def check_device(device: str | None, where: str = "--device") -> str | None:
    """cpu, cuda, cuda:N (present on this machine) or mps; None means the stage's default."""
    if device is None:
        return None
    import torch
    kind, _, index = str(device).partition(":")
    fix = "pass cpu, cuda or cuda:N"
    check(kind in ("cpu", "cuda", "mps") and (not index or index.isdigit()), where, f"unknown device {device!r}", fix)
    if kind == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        check(count > int(index or 0), where, f"{device} is not available here ({count} CUDA devices)", "pass cpu")
    if kind == "mps":
        check(torch.backends.mps.is_available(), where, "mps is not available here", "pass cpu")
    return str(device)
