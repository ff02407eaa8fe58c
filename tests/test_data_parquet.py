"""Parquet files, URIs and atomic writes (clip_core.data.parquet): listings, column checks, whole-or-nothing writes."""
import json

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from fsspec.implementations.local import LocalFileSystem

from clip_core.data.parquet import (
    as_uri, atomic_open, atomic_parquet, check_column, expand_uris, list_files, list_parquet, parquet_metadata,
    write_json, write_parquet,
)
from clip_core.errors import InputError

FS = LocalFileSystem()


def _names(folder):
    return sorted(p.name for p in folder.iterdir())


def test_check_column_names_file_column_type_and_fix(tmp_path):
    schema = pa.schema([("caption", pa.int64()), ("url", pa.dictionary(pa.int32(), pa.string())),
                        ("uid", pa.list_(pa.int64()))])
    with pytest.raises(InputError, match=r"^p.parquet: column 'caption' is int64, it must be a string .* \(fix\)$"):
        check_column("p.parquet", schema, "caption", "text", "fix")
    check_column("p.parquet", schema, "url", "string", "fix")  # dictionary-encoded strings are strings
    with pytest.raises(InputError, match="column 'uid' is list<item: int64>, it must be an integer or string"):
        check_column("p.parquet", schema, "uid", "key", "fix")
    with pytest.raises(InputError, match=r"has no 'text' column \(columns: \['caption', 'url', 'uid'\]\)"):
        check_column("p.parquet", schema, "text", "string", "fix")
    check_column("p.parquet", schema, "text", "string", "fix", required=False)


def test_unreadable_parquet_is_named(tmp_path):
    (tmp_path / "junk.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(InputError, match=r"junk.parquet: is not a readable Parquet file: Parquet magic bytes"):
        parquet_metadata(str(tmp_path / "junk.parquet"), "fix")
    with pytest.raises(InputError, match=r"gone.parquet: does not exist"):
        parquet_metadata(str(tmp_path / "gone.parquet"), "fix")


def test_list_parquet_skips_hidden_names_and_searches_folders(tmp_path):
    table = pa.table({"x": [1]})
    for name in ("part-00001.parquet", "part-00000.parquet", "sub/part-00002.parquet", "_query_stats.parquet",
                 ".part-00003.parquet.0123.tmp", ".hidden.parquet", "_curate_staging-ab/part-00000.parquet"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(table, tmp_path / name)
    (tmp_path / "notes.txt").write_text("not Parquet")
    visible = ("part-00000.parquet", "part-00001.parquet", "sub/part-00002.parquet")
    assert list_parquet(str(tmp_path), "fix") == [str(tmp_path / n) for n in visible]
    assert list_files(str(tmp_path / "sub"), "fix") == [str(tmp_path / "sub" / "part-00002.parquet")]
    assert str(tmp_path / "notes.txt") in list_files(str(tmp_path), "fix")  # no suffix: every visible file
    assert list_files(str(tmp_path / "notes.txt"), "fix", ".parquet") == [str(tmp_path / "notes.txt")]  # as named
    one = str(tmp_path / "part-00001.parquet")
    assert list_parquet([one, str(tmp_path / "sub")], "fix") == [one, str(tmp_path / "sub" / "part-00002.parquet")]
    with pytest.raises(InputError, match=r"gone: does not exist \(give pairs\)$"):
        list_parquet(str(tmp_path / "gone"), "give pairs")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match=r"empty: holds no Parquet files \(give pairs\)$"):
        list_parquet(str(tmp_path / "empty"), "give pairs")


def test_expand_uris_and_as_uri(tmp_path):
    for name in ("b.wat.gz", "a.wat.gz", "c.txt"):
        (tmp_path / name).write_bytes(b"")
    plain = str(tmp_path / "c.txt")
    assert expand_uris([str(tmp_path / "*.wat.gz"), plain]) == [str(tmp_path / "a.wat.gz"),
                                                                str(tmp_path / "b.wat.gz"), plain]
    with pytest.raises(FileNotFoundError, match=r"no WAT file matches .*\*\.warc"):
        expand_uris([str(tmp_path / "*.warc")], what="WAT file")
    memory = fsspec.filesystem("memory")
    assert as_uri(FS, "/a/b") == "/a/b" and as_uri(memory, "/a/b") == "memory:///a/b"


def test_atomic_open_writes_beside_the_target_and_renames(tmp_path):
    target = tmp_path / "stats.json"
    target.write_text("old")
    with atomic_open(FS, str(target), "w") as f:
        f.write("new")
        (tmp,) = [n for n in _names(tmp_path) if n != "stats.json"]
        assert tmp.startswith(".stats.json.") and tmp.endswith(".tmp")  # hidden: listings skip it
        assert target.read_text() == "old"  # a reader still sees the whole old file
    assert target.read_text() == "new" and _names(tmp_path) == ["stats.json"]


def test_a_failed_write_leaves_the_previous_file_and_no_temporary(tmp_path):
    target = tmp_path / "part-00000.parquet"
    write_parquet(FS, str(target), pa.table({"x": [1, 2]}))
    with pytest.raises(RuntimeError, match="disk full"):
        with atomic_parquet(str(target), pa.schema([("x", pa.int64())])) as writer:
            writer.write_table(pa.table({"x": [3]}))
            raise RuntimeError("disk full")
    with pytest.raises(ValueError, match="Out of range float values"):
        write_json(FS, str(tmp_path / "stats.json"), {"x": float("nan")}, allow_nan=False)
    assert pq.read_table(target).to_pydict() == {"x": [1, 2]} and _names(tmp_path) == ["part-00000.parquet"]


def test_writers_round_trip(tmp_path):
    with atomic_parquet(str(tmp_path / "a.parquet"), pa.schema([("x", pa.int64())]), compression="zstd") as writer:
        writer.write_table(pa.table({"x": [1]}))
        writer.write_table(pa.table({"x": [2]}))
    assert pq.read_table(tmp_path / "a.parquet").to_pydict() == {"x": [1, 2]}
    assert pq.ParquetFile(tmp_path / "a.parquet").metadata.row_group(0).column(0).compression == "ZSTD"
    doc = {"totals": {"kept": 3}, "parts": ["part-00000.parquet"]}
    write_json(FS, str(tmp_path / "s.json"), doc)
    assert (tmp_path / "s.json").read_text() == json.dumps(doc, indent=2)
    memory = fsspec.filesystem("memory")
    write_parquet(memory, "/t/b.parquet", pa.table({"y": ["a"]}))
    with memory.open("/t/b.parquet", "rb") as f:
        assert pq.read_table(f).to_pydict() == {"y": ["a"]}
    assert memory.ls("/t", detail=False) == ["/t/b.parquet"]
