"""Checks at the door (STYLE 15): the numbers, paths and devices every stage validates before any work.

Each raises `InputError(where, problem, fix)`: `where` names the option or file as the user wrote
it, `problem` says what is wrong with the value given, and `fix` what to pass instead; the command
line prints it as one line and exits 2. The number checks return the value, so they read inline.
Checks that belong to one stage (a WAT file's first bytes, dedup's or crawl's option sets) live
with the stage, built on these.
"""
from __future__ import annotations

import math
import os
from pathlib import Path

import fsspec

from clip_core.errors import InputError, check


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)  # True is no count: a typo


def whole_number(where: str, value, minimum: int = 1, maximum: int | None = None, fix: str | None = None) -> int:
    """value, an int (not a bool or a float) in [minimum, maximum]."""
    ok = isinstance(value, int) and not isinstance(value, bool) and value >= minimum
    ok = ok and (maximum is None or value <= maximum)
    bound = f">= {minimum}" + (f" and <= {maximum}" if maximum is not None else "")
    default = f"pass {where} {minimum} or more" if maximum is None else f"pass {where} from {minimum} to {maximum}"
    check(ok, where, f"must be a whole number {bound}, got {value!r}", fix or default)
    return value


def finite_number(where: str, value, fix: str | None = None, above: float | None = None) -> float:
    """value as a float: a finite int or float (not a bool), and > above when given."""
    ok = _is_number(value) and math.isfinite(value) and (above is None or value > above)
    bound = "" if above is None else f" > {above:g}"
    check(ok, where, f"must be a finite number{bound}, got {value!r}", fix)
    return float(value)


def fraction(where: str, value, fix: str | None = None) -> float:
    """value as a float in (0, 1]."""
    ok = _is_number(value) and 0 < value <= 1
    check(ok, where, f"must be in (0, 1], got {value!r}", fix or f"pass a value such as {where} 0.99")
    return float(value)


def _nearest_existing(path: Path) -> Path:
    for folder in (path, *path.parents):
        if folder.exists():
            return folder
    return Path(".")


def check_out_folder(where: str, uri: str) -> None:
    """An output folder: not a file, and (on the local disk) inside a writable folder."""
    fs, root = fsspec.core.url_to_fs(str(uri))
    check(not fs.isfile(root), where, f"{uri} is a file, not a folder", "pass a folder path; it is created if missing")
    if "file" not in fs.protocol and "local" not in fs.protocol:
        return  # object stores: permissions show on the first write
    existing = _nearest_existing(Path(root))
    check(existing.is_dir(), where, f"{existing} is a file, so {uri} cannot be a folder", "pass another path")
    check(os.access(existing, os.W_OK | os.X_OK), where, f"cannot write in {existing}", "pass a writable folder")


def check_folder(where: str, uri: str, what: str = "folder") -> None:
    """An input folder that exists."""
    fs, root = fsspec.core.url_to_fs(str(uri))
    if fs.isfile(root):
        raise InputError(where, f"{uri} is a file, not a {what}", f"pass the {what}")
    check(fs.isdir(root), where, f"no {what} at {uri}", "check the path")


def check_file(where: str, uri: str, what: str = "file") -> None:
    """An input file that exists."""
    fs, root = fsspec.core.url_to_fs(str(uri))
    check(not fs.isdir(root), where, f"{uri} is a folder, not a {what}", f"pass the {what} itself")
    check(fs.isfile(root), where, f"no {what} at {uri}", "check the path")


def check_device(where: str, device: str | None) -> str | None:
    """cpu, cuda, cuda:N (present on this machine) or mps; None means the stage's default."""
    if device is None:
        return None
    import torch  # here, not at the top: the corpus stages check numbers without loading torch
    kind, _, index = str(device).partition(":")
    fix = "pass cpu, cuda or cuda:N"
    check(kind in ("cpu", "cuda", "mps") and (not index or index.isdigit()), where, f"unknown device {device!r}", fix)
    if kind == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        check(count > int(index or 0), where, f"{device} is not available here ({count} CUDA devices)", "pass cpu")
    if kind == "mps":
        check(torch.backends.mps.is_available(), where, "mps is not available here", "pass cpu")
    return str(device)
