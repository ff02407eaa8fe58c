"""Nothing lost, nothing overwritten, bad input refused at the door: shard reading and `clip-pipeline dedup`.

Issue 14's probes made tests: a shard cut at any byte is reported (tarfile ends quietly at a
cut header), dedup counts what a damaged shard cost, every bad option is exit 2 before any
work, and a failed re-run leaves the previous complete result in place.
"""
import gzip
import io
import json
import subprocess
import sys
import tarfile

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from flows.cli import main
from clip_core.data.webdataset import DamagedShardError, iter_shard, write_shards
from clip_core.errors import InputError
from dedup.augment import procedural_image
from dedup.near_dup import OUTPUT_NAMES, STATS_NAME, dedup

pytestmark = pytest.mark.usefixtures("one_thread")
FS = fsspec.filesystem("file")


def _jpeg(img) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _samples(n: int, seed: int = 0, size: int = 48) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [{"__key__": f"{i:09d}", "jpg": _jpeg(procedural_image(rng, size)), "txt": f"caption {i}", "json": {"i": i}}
            for i in range(n)]


def _member_offsets(path) -> list[tuple[int, str]]:
    with tarfile.open(path) as tar:
        return [(m.offset, m.name) for m in tar.getmembers()]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A corpus of two shards (40 + 20 samples; the eval set's first 6 images planted) and an eval set."""
    base = tmp_path_factory.mktemp("inputs")
    eval_samples = [{"__key__": f"{i:05d}", "jpg": s["jpg"], "cls": i % 2} for i, s in enumerate(_samples(16, 1))]
    write_shards(str(base / "eval" / "test"), eval_samples)
    (base / "eval" / "classnames.txt").write_text("a\nb\n")
    (base / "eval" / "templates.txt").write_text("a photo of a {c}.\n")
    corpus = _samples(60, 2)
    for i in range(6):
        corpus[i]["jpg"] = eval_samples[i]["jpg"]
    write_shards(str(base / "corpus"), corpus, maxcount=40)
    return {"base": base, "corpus": str(base / "corpus"), "eval": str(base / "eval")}


def _args(data, out, *extra) -> list[str]:
    return ["dedup", data["corpus"], str(out), "--eval", data["eval"], "--descriptor", "phash",
            "--threshold", "phash=0.95", "--sheet-size", "0", *extra]


# ----- reading shards: a cut anywhere is reported, never a shorter valid shard -----

@pytest.fixture(scope="module")
def shard(tmp_path_factory):
    path = tmp_path_factory.mktemp("shard") / "000000.tar"
    write_shards(str(path.parent), _samples(6, size=40))
    return path


def _read_cut(shard, tmp_path, cut: int):
    cut_path = tmp_path / "cut.tar"
    cut_path.write_bytes(shard.read_bytes()[:cut])
    damaged = []
    keys = [s["__key__"] for s in iter_shard(FS, str(cut_path), damaged=damaged)]
    return keys, damaged


def test_a_shard_cut_at_a_member_boundary_is_truncated_not_shorter(shard, tmp_path):
    offsets = dict((name, off) for off, name in _member_offsets(shard))
    keys, damaged = _read_cut(shard, tmp_path, offsets["000000003.jpg"])  # tarfile alone reads 3 samples, no error
    assert keys == ["000000000", "000000001"]  # sample 2 may lack fields: dropped and named
    (err,) = damaged
    assert err.reason == "truncated" and err.samples_read == 2 and err.lost_key == "000000002"


@pytest.mark.parametrize("where", ["inside_header", "inside_data", "inside_padding"])
def test_a_shard_cut_inside_a_member_is_truncated(shard, tmp_path, where):
    offsets = dict((name, off) for off, name in _member_offsets(shard))
    start = offsets["000000003.jpg"]
    cut = {"inside_header": start + 100, "inside_data": start + 700, "inside_padding": offsets["000000003.txt"] - 1}
    keys, (err,) = _read_cut(shard, tmp_path, cut[where])
    assert err.reason == "truncated" and len(keys) == err.samples_read
    assert err.lost_key == ("000000002" if where == "inside_header" else "000000003")


def test_a_whole_shard_reads_whole_and_a_cut_one_raises_without_a_list(shard, tmp_path):
    data = shard.read_bytes()
    assert _read_cut(shard, tmp_path, len(data)) == ([f"{i:09d}" for i in range(6)], [])
    (tmp_path / "cut.tar").write_bytes(data[:_member_offsets(shard)[-1][0]])  # the last member's header is gone
    read = []
    with pytest.raises(DamagedShardError, match="cut.tar: shard is truncated after 5 complete samples"):
        read += iter_shard(FS, str(tmp_path / "cut.tar"))
    assert len(read) == 0 or len(read) == 5
    assert isinstance(DamagedShardError("p", 0, "truncated", "x"), InputError)  # exit 2 on the command line


def test_empty_garbage_and_cut_gzip_shards(shard, tmp_path):
    for name, payload, reason in (("empty.tar", b"", "truncated"), ("junk.tar", b"x" * 3000, "corrupt"),
                                  ("cut.tar.gz", gzip.compress(shard.read_bytes())[:2000], "truncated")):
        (tmp_path / name).write_bytes(payload)
        damaged = []
        list(iter_shard(FS, str(tmp_path / name), damaged=damaged))
        assert [d.reason for d in damaged] == [reason], name
    (tmp_path / "whole.tar.gz").write_bytes(gzip.compress(shard.read_bytes()))
    assert len(list(iter_shard(FS, str(tmp_path / "whole.tar.gz")))) == 6


# ----- dedup counts what a damaged shard cost -----

def _cut_corpus(data, tmp_path, cut_at: str, manifest: bool) -> str:
    """The corpus with shard 1 cut at a member offset (or its middle byte); img2dataset's manifest optional."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "000000.tar").write_bytes((data["base"] / "corpus" / "000000.tar").read_bytes())
    whole = (data["base"] / "corpus" / "000001.tar").read_bytes()
    cut = dict((n, o) for o, n in _member_offsets(data["base"] / "corpus" / "000001.tar")).get(cut_at, len(whole) // 2)
    (corpus / "000001.tar").write_bytes(whole[:cut])
    if manifest:  # img2dataset's per-shard parquet: one row per sample it stored
        keys = [f"{i:09d}" for i in range(40, 60)] + ["failed0"]
        pq.write_table(pa.table({"key": keys, "status": ["success"] * 20 + ["failed_to_download"]}),
                       corpus / "000001.parquet")
    return str(corpus)


def test_dedup_reports_a_shard_cut_at_a_member_boundary(data, tmp_path, capsys):
    """The issue's probe: a cut shard read as a shorter one, `0 unreadable`."""
    corpus = _cut_corpus(data, tmp_path, cut_at="000000050.jpg", manifest=True)
    assert main(["dedup", corpus, str(tmp_path / "out"), *_args(data, "x")[3:]]) == 0
    stats = json.loads((tmp_path / "out" / STATS_NAME).read_text())
    assert stats["corpus_images"] == 49  # 40 + samples 40..48; sample 49 may be incomplete
    (shard,) = stats["damaged_shards"]
    assert shard["shard"] == "000001.tar" and shard["reason"] == "truncated"
    assert shard["samples_read"] == 9 and shard["samples_lost"] == 11 and shard["first_lost"] == "000000049"
    assert stats["dropped"]["truncated"] == 11 and stats["unreadable"] == 11
    assert stats["kept"] + stats["removed"] == 49
    assert "000001.tar\ttruncated" in (tmp_path / "out" / "unreadable.txt").read_text()
    assert "warning: shard 000001.tar is truncated" in capsys.readouterr().err


def test_dedup_reports_a_shard_cut_in_the_middle_without_a_manifest(data, tmp_path):
    corpus = _cut_corpus(data, tmp_path, cut_at="", manifest=False)
    stats = dedup(corpus, str(tmp_path / "out"), [data["eval"]], descriptor="phash", thresholds={"phash": 0.95},
                  sheet_size=0, batch_size=4)
    (shard,) = stats.damaged_shards
    assert shard["reason"] == "truncated" and shard["samples_lost"] is None  # unknown without img2dataset's parquet
    assert 40 < stats.corpus_images == 40 + shard["samples_read"] < 60
    assert stats.dropped["truncated"] == 1 and stats.unreadable == 1  # the sample being read, at least
    assert stats.removed == 6  # the samples read before the cut were all checked


# ----- bad input: exit 2, one line, before any work -----

BAD_DEDUP = [
    (["--batch-size", "0"], "--batch-size"),
    (["-k", "0"], "-k"),
    (["-k", "-1"], "-k"),
    (["--precision", "0"], "--precision"),
    (["--precision", "1.5"], "--precision"),
    (["--precision", "nan"], "--precision"),
    (["--sheet-size", "-1"], "--sheet-size"),
    (["--threads", "0"], "--threads"),
    (["--threads", "-2"], "--threads"),
    (["--device", "gpu"], "--device"),
    (["--device", "cuda:99"], "--device"),
    (["--threshold", "phash"], "--threshold"),
    (["--threshold", "phash=abc"], "--threshold"),
    (["--threshold", "phash=nan"], "--threshold phash"),
    (["--threshold", "detector=0.5"], "--threshold"),
    (["--split", "val"], "no split 'val'"),
    (["--descriptor", "sift"], "--descriptor"),
]


@pytest.mark.parametrize("extra,named", BAD_DEDUP, ids=[" ".join(e) for e, _ in BAD_DEDUP])
def test_dedup_refuses_bad_options_at_the_door(data, tmp_path, capsys, extra, named):
    out = tmp_path / "out"
    assert main(_args(data, out, *extra)) == 2
    err = capsys.readouterr().err
    assert named in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not out.exists()  # nothing written


def test_dedup_refuses_missing_or_wrong_folders(data, tmp_path, capsys):
    (tmp_path / "afile").write_text("mine")
    cases = [
        (["dedup", str(tmp_path / "nowhere"), str(tmp_path / "o"), "--eval", data["eval"]], "no such folder"),
        (["dedup", str(tmp_path / "afile"), str(tmp_path / "o"), "--eval", data["eval"]], "is a file"),
        (["dedup", data["corpus"], str(tmp_path / "o"), "--eval", str(tmp_path / "noeval")], "--eval"),
        (["dedup", data["corpus"], str(tmp_path / "o"), "--eval", data["eval"], str(tmp_path / "noeval")], "noeval"),
        (["dedup", data["corpus"], str(tmp_path / "afile"), "--eval", data["eval"]], "is a file, not a folder"),
        (["dedup", data["corpus"], str(tmp_path / "afile" / "sub"), "--eval", data["eval"]], "is a file"),
        (["dedup", data["corpus"], str(tmp_path / "o")], "--eval"),
        (["dedup", data["corpus"], str(tmp_path / "o"), "--eval", data["eval"], "--descriptor", "phash",
          "--calibration-samples", "0"], "--calibration-samples"),
    ]
    for argv, named in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert named in err and len(err.strip().splitlines()) == 1, (argv, err)
    assert (tmp_path / "afile").read_text() == "mine" and not (tmp_path / "o").exists()


def test_dedup_refuses_a_bad_clip_checkpoint_descriptor(data, tmp_path, capsys):
    (tmp_path / "model.safetensors").write_bytes(np.random.default_rng(0).bytes(3000))
    argv = _args(data, tmp_path / "out")
    argv[argv.index("phash")] = f"clip:{tmp_path / 'model.safetensors'}"
    argv[argv.index("phash=0.95")] = f"clip:{tmp_path / 'model.safetensors'}=0.9"
    assert main(argv) == 2
    assert "model.safetensors" in capsys.readouterr().err


def test_train_detector_refuses_bad_options(tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    det = str(tmp_path / "det")
    for extra, named in ((["--steps", "0"], "--steps"), (["--batch-size", "0"], "--batch-size"),
                         (["--lr", "-1"], "--lr"), (["--image-size", "0"], "--image-size"),
                         (["--workers", "-1"], "--workers"), (["--images", str(tmp_path / "no")], "--images"),
                         (["--init", str(tmp_path / "no")], "--init"), (["--eval", "x"], "--eval")):
        assert main(["dedup", "train-detector", det, *extra]) == 2, extra
        assert named in capsys.readouterr().err
    assert main(["dedup", "train-detector", str(tmp_path / "afile")]) == 2
    assert not (tmp_path / "det").exists()


@pytest.mark.slow
def test_the_real_command_exits_2_with_one_line(data, tmp_path):
    """What a user sees: the console entry point, a bad option, no traceback."""
    code = "from flows.cli import console_main; console_main()"
    proc = subprocess.run([sys.executable, "-c", code, *_args(data, tmp_path / "out", "-k", "0")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip() == "clip-pipeline dedup: error: -k: must be a whole " \
                                                           "number >= 1, got 0 (pass -k 1 or more)"


# ----- outputs: a failed re-run leaves the previous complete result -----

def _snapshot(folder) -> dict:
    return {p.name: p.read_bytes() for p in folder.iterdir()}


def test_a_failed_rerun_leaves_the_previous_result(data, tmp_path, monkeypatch):
    out = tmp_path / "out"
    assert main(_args(data, out, "--sheet-size", "2")) == 0
    before = _snapshot(out)
    assert set(before) == {*OUTPUT_NAMES, STATS_NAME} - {"within_duplicates.parquet", "within_sheet.png"}  # no --within

    def broken(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr("dedup.report.write_contact_sheets", broken)  # fails after matches and kept keys are written
    with pytest.raises(RuntimeError, match="disk full"):
        dedup(data["corpus"], str(out), [data["eval"]], descriptor="phash", thresholds={"phash": 0.5}, sheet_size=2)
    assert _snapshot(out) == before  # nothing replaced, no temporary folder left


def test_a_failed_first_run_leaves_no_folder(data, tmp_path, monkeypatch):
    monkeypatch.setattr("dedup.near_dup.write_outputs", lambda *a, **k: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        dedup(data["corpus"], str(tmp_path / "out"), [data["eval"]], descriptor="phash", thresholds={"phash": 0.9})
    assert not (tmp_path / "out").exists()


def test_out_holding_dedup_names_it_did_not_write_is_refused(data, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "matches.parquet").write_text("someone else's")  # no dedup_stats.json: not dedup's
    with pytest.raises(InputError, match=r"out: holds matches.parquet but no dedup_stats.json: dedup did not"):
        dedup(data["corpus"], str(out), [data["eval"]], descriptor="phash", thresholds={"phash": 0.9})
    assert sorted(p.name for p in out.iterdir()) == ["matches.parquet"]
    assert (out / "matches.parquet").read_text() == "someone else's"


def test_a_rerun_replaces_only_what_dedup_wrote(data, tmp_path):
    out = tmp_path / "out"
    assert main(_args(data, out, "--sheet-size", "2")) == 0
    (out / "notes.txt").write_text("mine")
    assert main(_args(data, out)) == 0  # no sheets this time: the old ones, listed as ours, go
    stats = json.loads((out / STATS_NAME).read_text())
    assert sorted(p.name for p in out.iterdir()) == sorted([*stats["outputs"], "notes.txt"])
    assert "contact_sheet.png" not in stats["outputs"] and (out / "notes.txt").read_text() == "mine"
    (out / "contact_sheet.png").write_text("a user's file of the same name, not listed by the last run")
    assert main(_args(data, out)) == 0
    assert (out / "contact_sheet.png").exists()
