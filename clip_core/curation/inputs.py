"""Checks at the door for the corpus stages (STYLE 15): numbers, Parquet files and their columns,
WAT files by their first bytes.

Every check raises `InputError` naming the file or option, what is wrong and the fix, before any
work starts; the command line turns it into one line on stderr and exit code 2.
InputError pickles with its fields, so one raised in a worker process reaches the driver whole.
"""
from __future__ import annotations

import contextlib
import lzma
import math
import zlib

import fsspec
from fsspec.implementations.local import LocalFileSystem
import pyarrow as pa
import pyarrow.parquet as pq

from clip_core.errors import InputError, check

PAIRS_FIX = "give candidate pairs Parquet: a string column caption (and url), one row a pair"
WAT_FIX = "give Common Crawl WAT files: .warc.wat.gz, gzipped WARC metadata records"




def whole_number(where: str, value, minimum: int = 1, why: str = "", maximum: int | None = None) -> None:
    """InputError unless value is an int (not a bool) in [minimum, maximum]."""
    ok = isinstance(value, int) and not isinstance(value, bool) and value >= minimum
    ok = ok and (maximum is None or value <= maximum)
    bound = f">= {minimum}" + (f" and <= {maximum}" if maximum is not None else "")
    check(ok, where, f"must be a whole number {bound}, got {value!r}", why or None)


def finite_number(where: str, value, why: str = "") -> None:
    """InputError unless value is a finite int or float."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    check(ok, where, f"must be a finite number, got {value!r}", why or None)


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


def check_wat(uri: str, storage_options: dict | None = None) -> None:
    """InputError unless uri is a file that opens as a WARC: gzip whose first member starts with
    "WARC/" (or holds nothing), or plain "WARC/". One read of its first 64 KiB."""
    fs, path = fsspec.core.url_to_fs(uri, **(storage_options or {}))
    check(fs.exists(path), uri, "does not exist", WAT_FIX)
    check(not fs.isdir(path), uri, "is a folder", "give WAT files, or a glob such as 'wat/*.warc.wat.gz'")
    with fs.open(path, "rb") as f:
        head = f.read(1 << 16)
    check(bool(head), uri, "is empty (0 bytes), not a WAT file", WAT_FIX)
    if head[:2] != b"\x1f\x8b":
        check(head.startswith(b"WARC/"), uri, "is neither gzip nor WARC, not a WAT file", WAT_FIX)
        return
    inflate = zlib.decompressobj(16 + zlib.MAX_WBITS)
    try:
        text = inflate.decompress(head, 64)
    except zlib.error as err:
        raise InputError(uri, f"is not valid gzip ({err}), not a WAT file", WAT_FIX) from None
    check(text.startswith(b"WARC/") or (not text and inflate.eof), uri,
          "is gzip but holds no WARC records, not a WAT file", WAT_FIX)
