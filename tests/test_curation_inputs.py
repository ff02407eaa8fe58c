"""The door checks (inputs.py) and build-aside-then-swap outputs (staging.py) the corpus stages share."""
import gzip
import json
import pickle

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from clip_core.curation.curate import LocalExecutor
from clip_core.curation.inputs import (
    check_column, check_wat, parquet_metadata, whole_number,
)
from clip_core.curation.staging import StagedOutput
from clip_core.errors import InputError
from synthweb.wat_writer import write_wat_file


def _raise_worker_input_error(i):
    raise InputError(f"shard-{i}.parquet", "is not a readable Parquet file", "rewrite it")


@pytest.mark.parametrize("value, ok", [(1, True), (7, True), (0, False), (-5, False), (2.0, False),
                                       (True, False), (None, False), ("3", False)])
def test_whole_number(value, ok):
    if ok:
        whole_number("--n", value)
    else:
        with pytest.raises(InputError, match=rf"^--n: must be a whole number >= 1, got {value!r}"):
            whole_number("--n", value)


def test_worker_input_error_survives_a_process_pool():
    err = pickle.loads(pickle.dumps(InputError("f.parquet", "is bad", "fix it")))
    assert (err.where, err.problem, err.fix) == ("f.parquet", "is bad", "fix it") and isinstance(err, InputError)
    with LocalExecutor(2) as pool, pytest.raises(InputError, match=r"shard-\d\.parquet: is not a readable"):
        pool.map(_raise_worker_input_error, [0, 1])


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


def test_check_wat_by_first_bytes(tmp_path):
    good = write_wat_file(str(tmp_path / "good.warc.wat.gz"), [("https://x.example/", [("a.jpg", "a")])])
    check_wat(good)
    (tmp_path / "plain.warc").write_bytes(b"WARC/1.0\r\nWARC-Type: warcinfo\r\n\r\n")
    check_wat(str(tmp_path / "plain.warc"))
    (tmp_path / "nothing.wat.gz").write_bytes(gzip.compress(b""))
    check_wat(str(tmp_path / "nothing.wat.gz"))  # valid and empty: read, counted and warned about
    bad = {"empty.wat.gz": (b"", "is empty"), "text.wat.gz": (b"hello, not a WARC", "is neither gzip nor WARC"),
           "gzipped.wat.gz": (gzip.compress(b"hello"), "is gzip but holds no WARC records"),
           "broken.wat.gz": (b"\x1f\x8b\x08\x00" + b"\xff" * 40, "is not valid gzip")}
    for name, (data, problem) in bad.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(InputError, match=rf"{name}: {problem}"):
            check_wat(str(tmp_path / name))
    with pytest.raises(InputError, match="is a folder"):
        check_wat(str(tmp_path))


def _staged(out, files, marker_doc=None):
    """Stage files (name -> bytes) and a marker; commit."""
    output = StagedOutput(str(out), "demo", "demo_stats.json")
    output.check()
    with output:
        for name, data in files.items():
            (out / output.path.rsplit("/", 1)[1] / name).write_bytes(data)
        (out / output.path.rsplit("/", 1)[1] / "demo_stats.json").write_text(
            json.dumps(marker_doc or {"parts": sorted(files)}))
        output.commit()


def _tree(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_commit_swaps_and_removes_only_its_own_old_parts(tmp_path):
    out = tmp_path / "out"
    _staged(out, {f"part-{i:05d}.parquet": b"old" for i in range(3)} | {"legacy.parquet": b"old"},
            {"parts": ["part-00000.parquet", "legacy.parquet"]})
    (out / "notes.txt").write_text("mine")  # a user's files beside the result
    (out / "part-1.parquet").write_bytes(b"mine")
    (out / "_demo_staging-deadbeef").mkdir()  # a killed run's leftover
    (out / "_demo_staging-deadbeef" / "part-00000.parquet").write_bytes(b"half")
    _staged(out, {"part-00000.parquet": b"new"})
    assert _tree(out) == {"part-00000.parquet": b"new", "notes.txt": b"mine", "part-1.parquet": b"mine",
                          "demo_stats.json": b'{"parts": ["part-00000.parquet"]}'}


def test_a_failed_run_leaves_the_previous_result_whole(tmp_path):
    out = tmp_path / "out"
    _staged(out, {"part-00000.parquet": b"old", "part-00001.parquet": b"old"})
    before = _tree(out)
    output = StagedOutput(str(out), "demo", "demo_stats.json")
    with pytest.raises(RuntimeError, match="worker died"), output:
        (out / output.path.rsplit("/", 1)[1] / "part-00000.parquet").write_bytes(b"new")
        raise RuntimeError("worker died")
    assert _tree(out) == before
    with pytest.raises(RuntimeError, match="staged no demo_stats.json"):
        with StagedOutput(str(out), "demo", "demo_stats.json") as forgetful:
            forgetful.commit()  # a stage that forgot its marker swaps nothing
    assert _tree(out) == before


def test_out_holding_files_the_stage_did_not_write_is_refused(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    pq.write_table(pa.table({"x": [1]}), out / "part-00000.parquet")
    with pytest.raises(InputError, match=r"out: holds part-00000.parquet but no demo_stats.json"):
        StagedOutput(str(out), "demo", "demo_stats.json").check()
    (tmp_path / "file").write_text("x")
    with pytest.raises(InputError, match="file: is a file, not a folder"):
        StagedOutput(str(tmp_path / "file"), "demo", "demo_stats.json").check()
    StagedOutput(str(tmp_path / "new"), "demo", "demo_stats.json").check()  # a new folder is fine
    assert not (tmp_path / "new").exists()
