"""dedup/overlap.py: CLIP Section 5 overlap statistics against scipy on known numbers."""
import json
import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from scipy.stats import binomtest

from dedup.near_dup import MATCH_SCHEMA
from dedup.overlap import overlap_from_matches, overlap_report, overlap_stats, read_overlaps


def _known():
    """100 examples: 10 overlap (9 correct), 90 clean (60 correct)."""
    correct = np.zeros(100, bool)
    overlap = np.arange(0, 100, 10)  # 0, 10, ..., 90
    correct[overlap[:9]] = True
    clean = np.setdiff1d(np.arange(100), overlap)
    correct[clean[:60]] = True
    return correct, overlap


def test_stats_on_known_numbers_match_scipy():
    correct, overlap = _known()
    s = overlap_stats("toy", correct, overlap)
    assert (s.n, s.n_overlap, s.overlap_pct) == (100, 10, 10.0)
    assert s.acc_all == pytest.approx(0.69)
    assert s.acc_clean == pytest.approx(60 / 90)
    assert s.acc_overlap == pytest.approx(0.9)
    assert s.all_minus_clean == pytest.approx(0.69 - 60 / 90)
    assert s.p_value == pytest.approx(binomtest(9, 10, 60 / 90, alternative="greater").pvalue)
    ci = binomtest(9, 10).proportion_ci(confidence_level=0.995, method="exact")
    assert (s.ci_low, s.ci_high) == pytest.approx((ci.low, ci.high))


def test_p_value_is_the_upper_binomial_tail():
    correct, overlap = _known()
    s = overlap_stats("toy", correct, overlap)
    p0 = 60 / 90
    tail = sum(math.comb(10, k) * p0 ** k * (1 - p0) ** (10 - k) for k in (9, 10))
    assert s.p_value == pytest.approx(tail)


def test_duplicate_indexes_count_once_and_no_overlap_gives_nans():
    correct, overlap = _known()
    assert overlap_stats("toy", correct, list(overlap) * 3).n_overlap == 10
    s = overlap_stats("none", correct, [])
    assert s.n_overlap == 0 and s.all_minus_clean == 0.0
    assert math.isnan(s.acc_overlap) and math.isnan(s.p_value) and math.isnan(s.ci_low)


def test_out_of_range_overlap_index_is_an_error():
    with pytest.raises(ValueError, match="out of range"):
        overlap_stats("toy", np.ones(5, bool), [7])


def test_report_files(tmp_path):
    correct, overlap = _known()
    stats = overlap_report({"toy": correct, "clean": correct}, {"toy": overlap}, str(tmp_path))
    assert [s.eval_set for s in stats] == ["toy", "clean"]
    doc = json.loads((tmp_path / "overlap.json").read_text())  # standard JSON: NaN written as null
    assert doc["eval_sets"][1]["p_value"] is None
    assert doc["summary"]["sets_without_overlap"] == 1
    table = (tmp_path / "overlap.md").read_text()
    assert "| toy | 100 | 10 | 10.0 | 69.0 | 66.7 | 90.0 | +2.33 |" in table
    assert (tmp_path / "overlap.png").read_bytes()[:4] == b"\x89PNG"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["overlap.json", "overlap.md", "overlap.png"]  # no temp files


def test_overlap_from_matches(tmp_path):
    correct, overlap = _known()
    rows = [{"key": f"k{i}", "eval_set": "toy", "eval_index": int(i), "similarity": 0.9, "descriptor": "phash"}
            for i in overlap] + [{"key": "x", "eval_set": "other", "eval_index": 3, "similarity": 1.0,
                                  "descriptor": "phash"}]
    pq.write_table(pa.Table.from_pylist(rows, schema=MATCH_SCHEMA), tmp_path / "matches.parquet")
    assert read_overlaps(str(tmp_path / "matches.parquet"))["toy"] == set(overlap.tolist())
    stats = overlap_from_matches(str(tmp_path / "matches.parquet"), {"toy": correct}, str(tmp_path / "report"))
    assert stats[0].n_overlap == 10
    assert (tmp_path / "report" / "overlap.md").exists()


# ----- issue 14: `clip-pipeline overlap` checks every input before the model runs -----

@pytest.fixture(scope="module")
def overlap_inputs(tmp_path_factory):
    """A tiny checkpoint, a classification set, a retrieval set, matches.parquet and a Parquet without its columns."""
    import io
    import tarfile

    from PIL import Image

    from clip_core.model import create_model
    from clip_core.weights import save_checkpoint

    root = tmp_path_factory.mktemp("overlap")
    save_checkpoint(create_model("tiny"), root / "ckpt")

    def split(folder, fields):
        folder.mkdir(parents=True)
        with tarfile.open(folder / "000000.tar", "w") as tar:
            for i in range(4):
                buf = io.BytesIO()
                Image.new("RGB", (16, 16), (60 * i, 20, 90)).save(buf, "PNG")
                for ext, data in (("png", buf.getvalue()), *fields(i)):
                    info = tarfile.TarInfo(f"{i:03d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))

    split(root / "toy" / "test", lambda i: [("cls", b"%d" % (i % 2))])
    (root / "toy" / "classnames.txt").write_text("red\nblue\n")
    split(root / "captions" / "test", lambda i: [("txt", b"a caption")])
    rows = [{"key": "k", "eval_set": "toy", "eval_index": 1, "similarity": 0.9, "descriptor": "phash"}]
    pq.write_table(pa.Table.from_pylist(rows, schema=MATCH_SCHEMA), root / "matches.parquet")
    pq.write_table(pa.table({"key": ["k"], "shard": ["00000.tar"]}), root / "kept_keys.parquet")
    (root / "afile").write_text("mine")
    (root / "random.safetensors").write_bytes(np.random.default_rng(0).bytes(3000))
    return root


def _overlap_argv(root, out, ckpt="ckpt", matches="matches.parquet", evals=("toy",), *extra):
    return ["overlap", str(root / ckpt), "--matches", str(root / matches), "--eval", *[str(root / e) for e in evals],
            "--out", str(out), *extra]


def test_overlap_command_runs(overlap_inputs, tmp_path, capsys):
    from flows.cli import main
    assert main(_overlap_argv(overlap_inputs, tmp_path / "out", "ckpt", "matches.parquet", ("toy",),
                              "--batch-size", "3")) == 0
    doc = json.loads((tmp_path / "out" / "overlap.json").read_text())
    assert doc["eval_sets"][0]["n"] == 4 and doc["eval_sets"][0]["n_overlap"] == 1


BAD_OVERLAP = [
    ({"ckpt": "random.safetensors"}, "random.safetensors"),
    ({"ckpt": "nockpt"}, "nockpt"),
    ({"matches": "nothere.parquet"}, "--matches"),
    ({"matches": "afile"}, "not a Parquet file"),
    ({"matches": "kept_keys.parquet"}, "no column(s) ['eval_set', 'eval_index']"),
    ({"matches": "toy"}, "is a folder"),
    ({"evals": ("noeval",)}, "no eval set folder"),
    ({"evals": ("captions",)}, "is a retrieval set"),
    ({"evals": ("toy", "toy")}, "share a name"),
    ({"out": "afile"}, "--out"),
    ({"extra": ("--batch-size", "0")}, "--batch-size"),
]


@pytest.mark.parametrize("change,named", BAD_OVERLAP, ids=[str(c) for c, _ in BAD_OVERLAP])
def test_overlap_command_refuses_bad_input(overlap_inputs, tmp_path, capsys, change, named):
    from flows.cli import main
    out = overlap_inputs / change["out"] if "out" in change else tmp_path / "out"
    argv = _overlap_argv(overlap_inputs, out, change.get("ckpt", "ckpt"), change.get("matches", "matches.parquet"),
                         change.get("evals", ("toy",)), *change.get("extra", ()))
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert named in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "out").exists() and (overlap_inputs / "afile").read_text() == "mine"
