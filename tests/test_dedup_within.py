"""dedup --within: exact and near copies inside the corpus, one of each group kept, shard by shard."""
import io
import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image
from test_near_dup import _eval_set, _jpeg, _write_tar

from clip_core.errors import InputError
from clip_core.executors import LocalExecutor
from dedup.augment import procedural_image
from dedup.descriptors import phash
from dedup.near_dup import dedup
from dedup.within import NEAR_BITS, groups

pytestmark = pytest.mark.usefixtures("one_thread")


def _bits(a: Image.Image, b: Image.Image) -> int:
    return int(np.unpackbits(np.bitwise_xor(phash([a], 16), phash([b], 16))).sum())


def within_corpus(base):
    """3 shards: 24 distinct scenes; scene A's bytes 3 times (shards 0, 1, 2); scene B re-encoded
    (JPEG 70, 90% size) in shard 2; an eval set of 4 other scenes, one planted in shard 1.
    Returns paths and the expected {removed key: (kept key, kind)}."""
    rng = np.random.default_rng(11)
    scenes = [procedural_image(rng, 128) for _ in range(24)]
    eval_images = [procedural_image(rng, 128) for _ in range(4)]
    a, b = _jpeg(scenes[0]), scenes[1]
    b_copy = Image.open(io.BytesIO(_jpeg(b.resize((115, 115), Image.BICUBIC), 70))).convert("RGB")
    assert _bits(b, b_copy) <= NEAR_BITS  # a near copy by construction
    shards = [[(f"s0-{i:02d}", {"jpg": _jpeg(scenes[i]), "txt": b"x"}) for i in range(0, 8)],
              [(f"s1-{i:02d}", {"jpg": _jpeg(scenes[i]), "txt": b"x"}) for i in range(8, 16)],
              [(f"s2-{i:02d}", {"jpg": _jpeg(scenes[i]), "txt": b"x"}) for i in range(16, 24)]]
    shards[1].append(("s1-dupA", {"jpg": a, "txt": b"x"}))
    shards[2].append(("s2-dupA", {"jpg": a, "txt": b"x"}))
    shards[2].append(("s2-nearB", {"jpg": _jpeg(b_copy, 95), "txt": b"x"}))
    shards[1].append(("s1-eval0", {"jpg": _jpeg(eval_images[0], 95), "txt": b"x"}))  # an eval copy: removed first
    (base / "corpus").mkdir()
    for n, samples in enumerate(shards):
        _write_tar(base / "corpus" / f"{n:05d}.tar", samples)
    expected = {"s1-dupA": ("s0-00", "exact"), "s2-dupA": ("s0-00", "exact"), "s2-nearB": ("s0-01", "near")}
    return {"corpus": str(base / "corpus"), "eval": _eval_set(base / "ev", eval_images), "expected": expected,
            "distinct": {f"s{i // 8}-{i:02d}" for i in range(24)}}


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    return within_corpus(tmp_path_factory.mktemp("within"))


def _removed(out) -> dict:
    rows = pq.read_table(out / "within_duplicates.parquet").to_pylist()
    return {r["key"]: (r["kept_key"], r["kind"]) for r in rows}


@pytest.mark.slow
def test_copies_inside_the_corpus_are_removed_one_kept(case, tmp_path):
    stats = dedup(case["corpus"], str(tmp_path / "out"), [case["eval"]], descriptor="phash256", within=True)
    assert _removed(tmp_path / "out") == case["expected"]
    kept = set(pq.read_table(tmp_path / "out" / "kept_keys.parquet")["key"].to_pylist())
    assert kept == case["distinct"]  # every distinct scene once, no copy, not the eval copy
    assert stats.removed == 1 and stats.kept == 24
    assert stats.within == {"near_bits": NEAR_BITS, "buckets": 16, "checked": 27, "groups": 2,
                            "exact_removed": 2, "near_removed": 1}
    on_disk = json.loads((tmp_path / "out" / "dedup_stats.json").read_text())
    assert on_disk["within"] == stats.within and "within_sheet.png" in on_disk["outputs"]
    assert (tmp_path / "out" / "within_sheet.png").read_bytes()[:4] == b"\x89PNG"
    assert not (tmp_path / "out" / "_within").exists()  # the bucket files go with the staging folder


@pytest.mark.slow
def test_the_same_groups_whatever_the_workers_or_buckets(case, tmp_path):
    runs = {}
    for name, kw in {"one": {"buckets": 1}, "two": {"executor": LocalExecutor(2), "buckets": 7}}.items():
        dedup(case["corpus"], str(tmp_path / name), [case["eval"]], descriptor="phash256", within=True,
              sheet_size=0, **kw)
        runs[name] = ((tmp_path / name / "within_duplicates.parquet").read_bytes(),
                      (tmp_path / name / "kept_keys.parquet").read_bytes())
    assert runs["one"] == runs["two"]


def test_without_within_nothing_changes(case, tmp_path):
    stats = dedup(case["corpus"], str(tmp_path / "out"), [case["eval"]], descriptor="phash256", sheet_size=0)
    assert stats.within == {} and stats.kept == 27 and not (tmp_path / "out" / "within_duplicates.parquet").exists()


@pytest.mark.parametrize("kw", [{"near_bits": 16}, {"near_bits": -1}, {"buckets": 0}])
def test_bad_within_options_are_refused(case, tmp_path, kw):
    with pytest.raises(InputError):
        dedup(case["corpus"], str(tmp_path / "out"), [case["eval"]], descriptor="phash256", within=True, **kw)
    assert not (tmp_path / "out").exists()


def test_union_find_keeps_the_smallest_key_of_a_chain():
    links = [("c", "b", "near"), ("b", "a", "near"), ("e", "d", "exact"), ("d", "c", "near")]
    assert groups(links) == {"b": ("a", "near"), "c": ("a", "near"), "d": ("a", "near"), "e": ("a", "exact")}


@pytest.mark.slow
def test_the_command_line_runs_within(case, tmp_path, capsys):
    from flows.cli import main

    rc = main(["dedup", case["corpus"], str(tmp_path / "out"), "--eval", case["eval"], "--descriptor", "phash256",
               "--within", "--near-bits", "5", "--buckets", "3", "--pool-negatives", "200"])
    summary = json.loads(capsys.readouterr().out)
    assert rc == 0 and summary["within"]["near_bits"] == 5 and summary["within"]["buckets"] == 3
    assert summary["within"]["exact_removed"] == 2 and summary["kept"] <= 25
    assert _removed(tmp_path / "out").items() >= {"s1-dupA": ("s0-00", "exact")}.items()
    assert main(["dedup", case["corpus"], str(tmp_path / "bad"), "--eval", case["eval"], "--within",
                 "--near-bits", "16"]) == 2


@pytest.mark.slow
def test_the_same_matches_whatever_the_thread_count(case, tmp_path):
    """Issue 19 item 4: the detector's codes, the calibration and the groups do not depend on torch's threads."""
    import torch

    outputs = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        out = tmp_path / f"t{threads}"
        stats = dedup(case["corpus"], str(out), [case["eval"]], within=True, sheet_size=0)
        outputs.append({name: (out / name).read_bytes()
                        for name in ("matches.parquet", "kept_keys.parquet", "within_duplicates.parquet")}
                       | {"thresholds": stats.eval_sets["ev"].thresholds})
    torch.set_num_threads(1)
    assert outputs[0] == outputs[1]
