"""Outputs that appear whole or not at all (clip_core.data.staging): build aside, swap at the end,
delete only what the stage wrote."""
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from clip_core.data.staging import StagedOutput
from clip_core.errors import InputError


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


FIXED = ("matches.parquet", "kept_keys.parquet", "contact_sheet.png")


def _fixed(out, files):
    """A stage with fixed output names and no part files (as dedup): stage files and a marker listing them."""
    output = StagedOutput(str(out), "demo", "demo_stats.json", listed_key="outputs", outputs=FIXED, parts=None)
    output.check()
    with output:
        staging = out / output.path.rsplit("/", 1)[1]
        for name, data in files.items():
            (staging / name).write_bytes(data)
        (staging / "demo_stats.json").write_text(json.dumps({"outputs": [*sorted(files), "demo_stats.json"]}))
        output.commit()


def test_a_stage_of_fixed_names_removes_only_the_listed_ones(tmp_path):
    out = tmp_path / "out"
    _fixed(out, {"matches.parquet": b"1", "kept_keys.parquet": b"1", "contact_sheet.png": b"1"})
    (out / "part-00000.parquet").write_bytes(b"mine")  # not this stage's naming: never touched
    _fixed(out, {"matches.parquet": b"2", "kept_keys.parquet": b"2"})  # no sheet this time: the listed old one goes
    marker = {"outputs": ["kept_keys.parquet", "matches.parquet", "demo_stats.json"]}
    assert _tree(out) == {"matches.parquet": b"2", "kept_keys.parquet": b"2", "part-00000.parquet": b"mine",
                          "demo_stats.json": json.dumps(marker).encode()}
    (out / "contact_sheet.png").write_bytes(b"a user's file of the same name, not listed by the last run")
    _fixed(out, {"matches.parquet": b"3", "kept_keys.parquet": b"3"})
    assert (out / "contact_sheet.png").read_bytes().startswith(b"a user's file")


def test_a_stage_of_fixed_names_refuses_them_without_its_marker(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "matches.parquet").write_bytes(b"someone else's")
    with pytest.raises(InputError, match=r"out: holds matches.parquet but no demo_stats.json: demo did not write"):
        StagedOutput(str(out), "demo", "demo_stats.json", outputs=FIXED, parts=None).check()


def test_a_failed_first_run_leaves_no_folder_and_a_failed_rerun_keeps_out(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="worker died"), StagedOutput(str(out), "demo", "demo_stats.json"):
        raise RuntimeError("worker died")
    assert not out.exists()
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(RuntimeError, match="worker died"), StagedOutput(str(out), "demo", "demo_stats.json"):
        raise RuntimeError("worker died")
    assert _tree(out) == {"notes.txt": b"mine"}
