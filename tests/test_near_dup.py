"""dedup/near_dup.py and dedup/calibrate.py: planted copies are found, distinct images kept."""
import io
import json
import pickle
import re
import socket
import tarfile

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from dedup.augment import copy_of, procedural_image
from dedup.calibrate import calibrate, precision_recall
from dedup.descriptors import make_descriptors
from dedup.near_dup import DedupStats, build_references, dedup, dedup_shard

KINDS = (["rescale"], ["jpeg"], ["crop"], ["color"], ["rescale", "color"], ["crop", "jpeg"])


pytestmark = pytest.mark.usefixtures("one_thread")


def _jpeg(img, quality=90) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def _write_tar(path, samples) -> None:
    """samples: [(key, {ext: bytes})] as a WebDataset shard."""
    with tarfile.open(path, "w") as tar:
        for key, fields in samples:
            for ext, data in fields.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def _eval_set(root, images, classnames=True, train=()):
    root.mkdir(parents=True)
    if classnames:
        (root / "classnames.txt").write_text("a\nb\n")
        (root / "templates.txt").write_text("a photo of a {c}.\n")
    for split, imgs in (("test", images), ("train", train)):
        if len(imgs):
            (root / split).mkdir()
            _write_tar(root / split / "000000.tar", [(f"{i:05d}", {"jpg": _jpeg(im, 95), "cls": str(i % 2).encode()})
                                                     for i, im in enumerate(imgs)])
    return str(root)


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """An eval set of 24 images, a corpus of 12 planted copies + 30 distinct + 2 broken samples."""
    rng = np.random.default_rng(0)
    base = tmp_path_factory.mktemp("planted")
    eval_images = [procedural_image(rng, 128) for _ in range(24)]
    train_images = [procedural_image(rng, 128) for _ in range(24)]
    eval_dir = _eval_set(base / "toyset", eval_images, train=train_images)
    truth = {f"copy{j:03d}": 2 * j for j in range(12)}  # corpus key -> eval index
    copies = [(key, {"jpg": _jpeg(copy_of(eval_images[i], rng, KINDS[j % len(KINDS)])), "txt": b"c"})
              for j, (key, i) in enumerate(truth.items())]
    distinct = [(f"other{j:03d}", {"jpg": _jpeg(procedural_image(rng, 128)), "txt": b"d"}) for j in range(30)]
    broken = [("broken000", {"jpg": b"not an image", "txt": b"x"}), ("noimage00", {"txt": b"y", "json": b"{}"})]
    corpus = base / "corpus"
    corpus.mkdir()
    _write_tar(corpus / "00000.tar", copies[:6] + distinct[:15] + broken)
    _write_tar(corpus / "00001.tar", copies[6:] + distinct[15:])
    return {"eval": eval_dir, "corpus": str(corpus), "truth": truth, "base": base}


@pytest.mark.slow
@pytest.mark.parametrize("descriptor", ["default", "detector"])
def test_planted_copies_are_found_and_distinct_images_kept(planted, tmp_path, descriptor):
    stats = dedup(planted["corpus"], str(tmp_path), [planted["eval"]], descriptor=descriptor, precision=0.99,
                  calibration_samples=24)
    matches = pq.read_table(tmp_path / "matches.parquet").to_pylist()
    found = {m["key"]: m["eval_index"] for m in matches}
    assert found == planted["truth"]  # every copy, its right source, nothing else
    kept = set(pq.read_table(tmp_path / "kept_keys.parquet")["key"].to_pylist())
    assert kept == {f"other{j:03d}" for j in range(30)}
    assert stats.corpus_images == 44 and stats.unreadable == 2 and stats.removed == 12
    assert {u["key"] for u in stats.unreadable_samples} == {"broken000", "noimage00"}
    toy = stats.eval_sets["toyset"]
    assert toy.overlap == 12 and toy.calibration["recall"] > 0.9 and toy.calibration["precision"] >= 0.99
    assert stats.overlap_pct == {"toyset": 50.0}
    assert json.loads((tmp_path / "dedup_stats.json").read_text())["removed"] == 12
    assert (tmp_path / "contact_sheet.png").read_bytes()[:4] == b"\x89PNG"


def test_phash_finds_exact_and_jpeg_copies(planted, tmp_path):
    dedup(planted["corpus"], str(tmp_path), [planted["eval"]], descriptor="phash", calibration_samples=24,
          sheet_size=0)
    found = {m["key"]: m["eval_index"] for m in pq.read_table(tmp_path / "matches.parquet").to_pylist()}
    assert set(found) <= set(planted["truth"])  # no false matches
    assert {"copy001", "copy007"} <= set(found)  # jpeg copies
    assert all(planted["truth"][k] == v for k, v in found.items())
    assert not (tmp_path / "contact_sheet.png").exists()


def test_stats_read_back_equal_what_dedup_returned(planted, tmp_path):
    """A flow that skips a finished dedup reads the same typed stats; the file keeps its format."""
    stats = dedup(planted["corpus"], str(tmp_path), [planted["eval"]], descriptor="phash", calibration_samples=24,
                  sheet_size=0)
    text = (tmp_path / "dedup_stats.json").read_text()
    assert DedupStats.read(str(tmp_path)) == stats and json.dumps(stats.to_dict(), indent=2) == text
    assert list(json.loads(text)) == [
        "corpus", "descriptor", "descriptors", "precision_target", "splits", "k", "seed", "corpus_shards",
        "corpus_images", "unreadable", "dropped", "damaged_shards", "unreadable_samples", "removed", "kept",
        "eval_sets", "seconds", "outputs", "nodes", "pool_negatives", "within"]
    assert stats.nodes == {socket.gethostname(): stats.corpus_shards}  # every shard checked on this host
    toy = stats.eval_sets["toyset"]
    assert list(json.loads(text)["eval_sets"]["toyset"]) == [
        "root", "split", "n", "eval_unreadable", "matches", "matched_corpus_images", "overlap", "overlap_pct",
        "thresholds", "calibration"]
    assert toy.n == 24 and stats.overlap_pct == {"toyset": 100.0 * toy.overlap / 24}
    assert stats.unreadable == sum(stats.dropped.values()) == 2 and stats.kept + stats.removed == 42


@pytest.mark.slow
def test_shards_mapped_on_worker_processes_give_the_same_result(planted, tmp_path):
    """dedup maps its shards with any executor; two spawn workers write what one process writes."""
    from clip_core.executors import LocalExecutor

    options = {"descriptor": "phash", "thresholds": {"phash": 0.9}, "sheet_size": 2}
    inline = dedup(planted["corpus"], str(tmp_path / "inline"), [planted["eval"]], **options)
    with LocalExecutor(2) as pool:
        pooled = dedup(planted["corpus"], str(tmp_path / "pooled"), [planted["eval"]], executor=pool, **options)
    # PIL's decode error names a BytesIO by its address: compare the stats without it
    same = [json.loads(re.sub(r" at 0x[0-9a-f]+", "", json.dumps({**stats.to_dict(), "seconds": 0})))
            for stats in (inline, pooled)]
    assert same[0] == same[1] and inline.removed > 0 and inline.unreadable == 2
    for name in ("matches.parquet", "kept_keys.parquet"):
        assert pq.read_table(tmp_path / "pooled" / name).equals(pq.read_table(tmp_path / "inline" / name))


def test_manual_thresholds_and_per_shard_map(planted):
    descriptors = make_descriptors("phash")
    refs = build_references([planted["eval"]], descriptors, thresholds={"phash": 0.0})
    assert refs[0].calibration == {"manual": True} and refs[0].n == 24
    result = dedup_shard(planted["corpus"] + "/00001.tar", refs, descriptors)
    assert result.n_images == 21 and result.kept == []  # threshold 0 matches everything
    assert pickle.loads(pickle.dumps(refs[0])).n == 24  # references travel to workers
    with pytest.raises(ValueError, match="lack descriptors"):
        build_references([planted["eval"]], make_descriptors("combined"), thresholds={"phash": 0.9})
    with pytest.raises(ValueError, match="no descriptor"):  # a threshold for a descriptor not in use: a typo
        build_references([planted["eval"]], descriptors, thresholds={"phash": 0.9, "phsh": 0.9})


def test_bad_inputs_give_clear_errors(planted, tmp_path):
    no_classes = _eval_set(tmp_path / "nocls", [procedural_image(np.random.default_rng(1))], classnames=False)
    with pytest.raises(ValueError, match="classnames"):
        dedup(planted["corpus"], str(tmp_path / "o1"), [no_classes], descriptor="phash")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no .tar shards"):
        dedup(str(tmp_path / "empty"), str(tmp_path / "o2"), [planted["eval"]], descriptor="phash")
    with pytest.raises(ValueError, match="at least one eval"):
        dedup(planted["corpus"], str(tmp_path / "o3"), [], descriptor="phash")
    with pytest.raises(ValueError, match="unknown descriptor"):
        make_descriptors("sift")


def test_corpus_of_empty_shards(planted, tmp_path):
    (tmp_path / "corpus").mkdir()
    _write_tar(tmp_path / "corpus" / "00000.tar", [])
    stats = dedup(str(tmp_path / "corpus"), str(tmp_path / "out"), [planted["eval"]], descriptor="phash",
                  calibration_samples=24)
    assert stats.corpus_images == 0 and stats.removed == 0
    assert pq.read_table(tmp_path / "out" / "matches.parquet").num_rows == 0


# ----- calibration on constructed score distributions -----

def test_calibration_picks_the_lowest_threshold_meeting_precision():
    pos, neg = np.array([0.9, 0.8, 0.7, 0.6]), np.array([0.65, 0.5, 0.4, 0.3])
    strict = calibrate(pos, neg, precision=1.0)
    assert strict.thresholds == (0.7,) and strict.recall == 0.75 and strict.precision == 1.0
    loose = calibrate(pos, neg, precision=0.8)
    assert loose.thresholds == (0.6,) and loose.recall == 1.0 and loose.precision == 0.8


def test_calibration_equals_a_brute_force_scan():
    rng = np.random.default_rng(0)
    pos, neg = rng.normal(0.8, 0.1, 300), rng.normal(0.5, 0.1, 3000)
    result = calibrate(pos, neg, precision=0.95)
    best = max((t for t in np.r_[pos, neg] if precision_recall(pos, neg, [t])[0] >= 0.95),
               key=lambda t: precision_recall(pos, neg, [t])[1])
    assert result.recall == pytest.approx(precision_recall(pos, neg, [best])[1])
    assert result.precision >= 0.95


def test_or_calibration_equals_a_brute_force_grid():
    rng = np.random.default_rng(1)
    pos = np.c_[rng.normal(0.8, 0.15, 40), rng.normal(0.8, 0.15, 40)]
    neg = np.c_[rng.normal(0.5, 0.15, 80), rng.normal(0.5, 0.15, 80)]
    result = calibrate(pos, neg, precision=0.9)
    grid_a, grid_b = np.r_[np.unique(pos[:, 0]), 9.0], np.r_[np.unique(np.r_[pos[:, 1], neg[:, 1]]), 9.0]
    best = max(precision_recall(pos, neg, [a, b])[1] for a in grid_a for b in grid_b
               if precision_recall(pos, neg, [a, b])[0] >= 0.9)
    assert result.recall == pytest.approx(best)
    assert precision_recall(pos, neg, result.thresholds) == pytest.approx((result.precision, result.recall))


def test_calibration_without_a_feasible_threshold_matches_nothing():
    result = calibrate(np.array([0.5, 0.4]), np.array([0.9, 0.8]), precision=0.99)
    assert not result.feasible and result.recall == 0.0 and result.thresholds[0] > 0.9


@pytest.mark.slow
def test_cli_runs_dedup_and_train_detector(planted, tmp_path):
    import argparse
    from flows.commands.dedup import add_dedup_arguments, run_dedup_command
    parser = argparse.ArgumentParser()
    add_dedup_arguments(parser)
    args = parser.parse_args([planted["corpus"], str(tmp_path / "out"), "--eval", planted["eval"],
                              "--descriptor", "phash", "--calibration-samples", "24", "--threshold", "phash=0.95"])
    assert run_dedup_command(args) == 0
    assert (tmp_path / "out" / "matches.parquet").exists() and (tmp_path / "out" / "unreadable.txt").exists()
    args = parser.parse_args(["train-detector", str(tmp_path / "det"), "--steps", "2", "--batch-size", "4",
                              "--image-size", "32", "--workers", "0"])
    assert run_dedup_command(args) == 0
    assert (tmp_path / "det" / "config.json").exists()
    with pytest.raises(ValueError, match="--eval"):
        run_dedup_command(parser.parse_args([planted["corpus"], str(tmp_path / "o")]))


def test_eval_internal_duplicates_are_not_false_matches(tmp_path):
    rng = np.random.default_rng(5)
    images = [procedural_image(rng, 128) for _ in range(12)]
    images[5] = images[4].copy()  # the eval set holds one image twice
    eval_dir = _eval_set(tmp_path / "twins", images)
    (ref,) = build_references([eval_dir], make_descriptors("phash"), calibration_samples=12, precision=0.99)
    assert ref.calibration["feasible"] and ref.calibration["eval_internal_duplicates"] >= 2
    assert ref.calibration["recall"] > 0.5


@pytest.mark.parametrize("batch_size", [4, 128])
def test_truncated_shard_is_reported_not_fatal(planted, tmp_path, batch_size):
    data = open(planted["corpus"] + "/00001.tar", "rb").read()
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "00000.tar").write_bytes(data[: len(data) // 3])  # cut inside a member
    with tarfile.open(planted["corpus"] + "/00001.tar") as tar:
        started = [m.name.split(".")[0] for m in tar.getmembers() if m.offset_data <= len(data) // 3]
    descriptors = make_descriptors("phash")
    refs = build_references([planted["eval"]], descriptors, thresholds={"phash": 0.9})
    result = dedup_shard(str(tmp_path / "corpus" / "00000.tar"), refs, descriptors, batch_size=batch_size)
    # every sample before the cut is checked, even in a batch the cut left unfilled; the one cut is named
    assert result.n_images == len(set(started)) - 1 and result.unreadable == []
    assert result.damaged["reason"] == "truncated" and result.damaged["samples_read"] == result.n_images
    assert result.damaged["first_lost"] == started[-1] and result.damaged["samples_lost"] is None
