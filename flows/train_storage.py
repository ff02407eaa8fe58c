"""Where a training writes: local folders or fsspec URIs (s3://...), as Ray Train and fsspec see them."""
from __future__ import annotations

import os
import time
from pathlib import Path

import fsspec
import pyarrow.fs
import ray.train

from clip_core.errors import InputError
from clip_core.weights import is_uri


def join(base: str, *names: str) -> str:
    """`base`/name/...: a URI stays a URI (Path would fold s3:// into s3:/)."""
    return "/".join([base.rstrip("/"), *names]) if is_uri(base) else str(Path(base, *names))


def storage_filesystem(uri: str) -> tuple[pyarrow.fs.FileSystem, str]:
    """(pyarrow filesystem, path on it) for Ray Train: any fsspec URI, credentials and endpoint as fsspec finds them."""
    fs, path = fsspec.core.url_to_fs(uri)
    return pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(fs)), path


def _as_uri(storage_path: str, path: str) -> str:
    """A path Ray reports on a storage filesystem, as the URI a user can give back (--resume)."""
    return f"{storage_path.split('://', 1)[0]}://{path}" if is_uri(storage_path) and "://" not in path else path


def _checkpoint_at(folder: str) -> ray.train.Checkpoint:
    """A Ray checkpoint for a local folder or an fsspec URI."""
    if not is_uri(folder):
        return ray.train.Checkpoint(folder)
    fs, path = storage_filesystem(folder)
    return ray.train.Checkpoint(path, filesystem=fs)


def _local(path: str | None) -> str | None:
    """A file:// URI as the local path it names: local storage is handled as local paths."""
    return path[len("file://"):] if path and path.startswith("file://") else path


def _check_writable(uri: str, what: str) -> None:
    """A remote OUT or storage path is a folder this process can write: InputError naming it and the fix."""
    try:
        fs, path = fsspec.core.url_to_fs(uri)
    except (ImportError, ValueError) as e:  # an unknown protocol, or its package (s3fs) is missing
        raise InputError(f"{what} {uri}", f"no filesystem for this URI ({e})",
                         "install the fsspec package for it (s3fs for s3://) or give a local folder") from None
    probe = f"{path.rstrip('/')}/.clip-write-check-{os.getpid()}-{time.time_ns()}"
    try:
        if fs.isfile(path):
            raise InputError(f"{what} {uri}", "a file, not a folder", "give a folder (a prefix) for the training's outputs")
        fs.pipe_file(probe, b"")  # the one way to know a bucket exists and the credentials may write
        fs.rm_file(probe)
    except InputError:
        raise
    except Exception as e:  # noqa: BLE001 -- any client error (no bucket, denied, no credentials) means unusable storage
        raise InputError(f"{what} {uri}", f"cannot be written ({type(e).__name__}: {e})",
                         "check that the bucket exists and that the credentials (AWS_* variables, the profile, "
                         "AWS_ENDPOINT_URL for another S3 service) allow writing") from None


def _exists(uri: str) -> bool:
    fs, path = fsspec.core.url_to_fs(uri)
    return fs.exists(path)
