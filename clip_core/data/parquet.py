"""Parquet files, URIs and atomic writes: how every corpus stage lists, checks and writes its files.

Paths are fsspec URIs (local, file://, s3://). A folder listing skips names starting with "_" or
"." (markers, reports, the staging folders of runs in progress or killed). A write goes to a hidden
temporary name beside its target and is renamed into place when complete (STYLE 14): a reader
never sees half a file, and a write that fails leaves the previous file as it was. Reading errors
(not Parquet, truncated, a column of the wrong type) are `InputError`s naming the file, the column
and the fix (exit 2).
"""
from __future__ import annotations

import contextlib
import json
import lzma
import posixpath
import uuid
import zlib
from collections.abc import Iterator, Sequence

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem

from clip_core.errors import InputError, check

# ----- URIs and listings -----

def as_uri(fs, path: str) -> str:
    """A path of fs as a URI any process can open; local paths stay plain (and read as the user wrote them)."""
    return path if isinstance(fs, LocalFileSystem) else fs.unstrip_protocol(path)


def hidden(relative: str) -> bool:
    """A path under a listed folder that a listing skips: any part named "_..." or "..."."""
    return any(part.startswith((".", "_")) for part in relative.split("/") if part)


def check_exists(uri: str, fix: str, storage_options: dict | None = None) -> None:
    """InputError unless uri names an existing file or folder."""
    fs, path = fsspec.core.url_to_fs(uri, **(storage_options or {}))
    check(fs.exists(path), uri, "does not exist", fix)


def expand_uris(uris: Sequence[str], storage_options: dict | None = None, what: str = "file") -> list[str]:
    """The URIs with glob patterns (`*`, `?`, `[`) replaced by their sorted matches."""
    out = []
    for uri in uris:
        if not any(c in uri for c in "*?["):
            out.append(uri)
            continue
        fs, pattern = fsspec.core.url_to_fs(uri, **(storage_options or {}))
        matches = sorted(fs.glob(pattern))
        if not matches:
            raise FileNotFoundError(f"no {what} matches {uri}")
        out.extend(as_uri(fs, m) for m in matches)
    return out


def list_files(uri: str, fix: str, suffix: str = "") -> list[str]:
    """The file uri names, or the files under the folder it names (any depth, hidden names skipped,
    names ending in suffix), sorted, as URIs; InputError naming uri when it does not exist."""
    check_exists(uri, fix)
    fs, path = fsspec.core.url_to_fs(uri)
    if not fs.isdir(path):
        return [uri]
    root = path.rstrip("/")
    return [as_uri(fs, p) for p in sorted(fs.find(root)) if p.endswith(suffix) and not hidden(p[len(root):])]


def list_parquet(uris: str | Sequence[str], fix: str) -> list[str]:
    """Parquet files named by URIs (files, or folders searched to any depth), sorted per folder;
    hidden names skipped, so curating or crawling a curated folder works. InputError naming a
    missing path, or URIs that hold no Parquet file."""
    uris = [uris] if isinstance(uris, str) else list(uris)
    files = [file for uri in uris for file in list_files(uri, fix, ".parquet")]
    check(bool(files), " ".join(uris), "holds no Parquet files", fix)
    return files


# ----- reading: errors and column types -----

@contextlib.contextmanager
def read_errors(uri: str, fix: str, what: str = "Parquet file"):
    """Turn errors on reading uri (not Parquet, bad gzip, truncated, corrupt) into one naming the file."""
    try:
        yield
    except (FileNotFoundError, PermissionError, IsADirectoryError):
        raise
    except (pa.ArrowException, OSError, EOFError, zlib.error, lzma.LZMAError) as err:
        raise InputError(uri, f"is not a readable {what}: {' '.join(str(err).split())}", fix) from None


def parquet_errors(uri: str, fix: str):
    """read_errors for a Parquet file."""
    return read_errors(uri, fix, "Parquet file")


def parquet_metadata(uri: str, fix: str) -> pq.FileMetaData:
    """The footer of a Parquet file; InputError naming it when missing or unreadable."""
    check_exists(uri, fix)
    with parquet_errors(uri, fix), fsspec.open(uri, "rb") as f:
        return pq.ParquetFile(f).metadata


def _decoded(dtype: pa.DataType) -> pa.DataType:
    return dtype.value_type if pa.types.is_dictionary(dtype) else dtype


def is_text(dtype: pa.DataType) -> bool:
    """string, large_string, binary or large_binary (dictionary-encoded too)."""
    dtype = _decoded(dtype)
    return any(f(dtype) for f in (pa.types.is_string, pa.types.is_large_string,
                                  pa.types.is_binary, pa.types.is_large_binary))


def is_string(dtype: pa.DataType) -> bool:
    """string or large_string (dictionary-encoded too)."""
    dtype = _decoded(dtype)
    return pa.types.is_string(dtype) or pa.types.is_large_string(dtype)


def is_key(dtype: pa.DataType) -> bool:
    """What a uid may be: an integer, a float (integers that met a NULL in pandas) or text."""
    return is_text(dtype) or pa.types.is_integer(_decoded(dtype)) or pa.types.is_floating(_decoded(dtype))


KINDS = {"text": (is_text, "a string or binary column"), "string": (is_string, "a string column"),
         "key": (is_key, "an integer or string column")}


def check_column(uri: str, schema: pa.Schema, name: str, kind: str, fix: str, required: bool = True) -> None:
    """InputError unless schema's column name (when required, or present) is of the kind."""
    if name not in schema.names:
        check(not required, uri, f"has no {name!r} column (columns: {schema.names})", fix)
        return
    accepts, wanted = KINDS[kind]
    dtype = schema.field(name).type
    check(accepts(dtype), uri, f"column {name!r} is {dtype}, it must be {wanted}", fix)


# ----- atomic writes -----

@contextlib.contextmanager
def atomic_open(fs, path: str, mode: str = "wb") -> Iterator:
    """`path` opened for writing under a hidden temporary name beside it; renamed into place on
    success, removed on failure (the previous file, if any, stays as it was)."""
    folder, name = posixpath.split(path)
    tmp = posixpath.join(folder, f".{name}.{uuid.uuid4().hex[:12]}.tmp")
    try:
        with fs.open(tmp, mode) as f:
            yield f
        fs.mv(tmp, path)
    finally:
        if fs.exists(tmp):
            fs.rm(tmp)


@contextlib.contextmanager
def atomic_parquet(uri: str, schema: pa.Schema, storage_options: dict | None = None, **options):
    """A ParquetWriter (options: compression, ...) whose file appears at uri whole, or not at all."""
    fs, path = fsspec.core.url_to_fs(uri, **(storage_options or {}))
    with atomic_open(fs, path) as f, pq.ParquetWriter(f, schema, **options) as writer:
        yield writer


def write_parquet(fs, path: str, table: pa.Table, **options) -> None:
    """Write a Parquet file atomically (options: pq.write_table's)."""
    with atomic_open(fs, path) as f:
        pq.write_table(table, f, **options)


def write_json(fs, path: str, obj, **options) -> None:
    """Write a JSON file atomically, indented by 2 (options: json.dumps's)."""
    text = json.dumps(obj, **{"indent": 2, **options})
    with atomic_open(fs, path) as f:
        f.write(text.encode())
