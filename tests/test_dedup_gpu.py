"""Dedup on GPU nodes: the search backend per device, GPU Ray tasks, and how `dedup` places its shards.

The CPU tests run a real 2-node Ray cluster on 127.0.0.1 whose second node declares one logical
GPU (Ray accepts GPUs with no hardware behind them): a task that asks for a GPU must run there
and be given it. The `gpu` tests compare the CUDA search with the CPU flat search; they run only
where CUDA is present (conftest).
"""
import shutil
import tempfile

import faiss
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from test_near_dup import _eval_set, _jpeg, _write_tar

from clip_core.errors import InputError
from dedup import index as index_module
from dedup import near_dup
from dedup.augment import copy_of, procedural_image
from dedup.checks import check_dedup_options
from dedup.copy_detector import load_detector
from dedup.descriptors import DetectorDescriptor, PHashDescriptor
from dedup.index import FlatIndex, brute_force_search, build_index, faiss_gpus, search_backend
from dedup.near_dup import DedupStats, dedup
from flows.cli import main
from flows.commands.dedup import _local_device, _place_shards, dedup_placement
from flows.executors import RayExecutor


@pytest.mark.parametrize("device, gpus, backend", [
    ("cpu", 0, "faiss"), ("cpu", 2, "faiss"), ("cuda", 0, "torch"), ("cuda:1", 0, "torch"),
    ("cuda", 1, "faiss-gpu"), ("cuda:0", 4, "faiss-gpu")])
def test_search_backend_per_device(device, gpus, backend):
    assert search_backend(device, gpus) == backend


def test_faiss_cpu_reports_no_gpu_and_the_cpu_index_stays_faiss():
    if not hasattr(faiss, "StandardGpuResources"):  # faiss-cpu, as `make setup` installs it
        assert faiss_gpus() == 0
    assert build_index(np.eye(4, dtype=np.float32), binary=False, device="cpu").backend == "faiss"


def test_faiss_gpu_without_gpu_support_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(index_module, "faiss_gpus", lambda: 0)
    with pytest.raises(ValueError, match="make setup-gpu"):
        FlatIndex(np.eye(4, dtype=np.float32), backend="faiss-gpu", device="cuda")


@pytest.mark.parametrize("device, cluster_gpus, driver_cuda, want", [  # want: (driver, shards, GPUs per task)
    ("cpu", 2, True, ("cpu", "cpu", 0)),  # cpu asked for: no GPU requested even where there are some
    ("cuda", 2, True, ("cuda", "cuda", 1)),
    ("cuda:0", 2, True, ("cuda:0", "cuda:0", 1)),
    ("auto", 2, True, ("cuda", "cuda", 1)),
    ("auto", 2, False, ("cpu", "cuda", 1)),  # a CPU-only head: references on its CPU, shards on the GPUs
    ("cuda", 2, False, ("cpu", "cuda", 1)),
    ("cuda:0", 1, False, ("cpu", "cuda:0", 1)),
    ("auto", 0, True, ("cpu", "cpu", 0)),  # a cluster without GPUs: CPU tasks, the driver too
    ("auto", 0, False, ("cpu", "cpu", 0)),
    ("auto", None, True, ("cuda", "cuda", 0)),  # no Ray: this machine's CUDA
    ("auto", None, False, ("cpu", "cpu", 0)),
    ("cuda", None, True, ("cuda", "cuda", 0)),
])
def test_dedup_placement(device, cluster_gpus, driver_cuda, want):
    assert dedup_placement(device, cluster_gpus, driver_cuda) == want


@pytest.mark.parametrize("cuda", [False, True])
def test_auto_on_one_machine_is_cuda_where_cuda_is(cuda, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    assert _local_device("auto") == ("cuda" if cuda else "cpu")
    assert _local_device("cpu") == "cpu" and _local_device("cuda:1") == "cuda:1"  # anything else as given


@pytest.mark.parametrize("driver_cuda", [False, True])
@pytest.mark.parametrize("device, problem", [("cuda", "declares no GPU"), ("cuda:1", "as cuda:0")])
def test_dedup_placement_refuses_what_ray_cannot_place(device, problem, driver_cuda):
    with pytest.raises(InputError, match=problem):
        dedup_placement(device, 0 if problem == "declares no GPU" else 2, driver_cuda)


def _cli(tmp_path, *extra):
    return ["dedup", str(tmp_path), str(tmp_path / "out"), "--eval", str(tmp_path), *extra]


def test_cuda_without_cuda_exits_2_before_any_work(tmp_path, capsys, monkeypatch):
    """--device cuda on one machine without CUDA: bad input at the door."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(_cli(tmp_path, "--device", "cuda")) == 2
    assert "--device: cuda is not available here" in capsys.readouterr().err


def test_on_ray_cuda_is_the_clusters_not_the_drivers(tmp_path, capsys, monkeypatch):
    """With --executor ray, a driver without CUDA may ask for cuda: the command goes on to the cluster
    (here a stand-in that stops there), whose GPUs the placement checks; a name that is no device
    is still refused before any cluster."""
    import flows.commands.dedup as command

    def cluster_reached(*args):
        raise InputError("--ray-address", "the stand-in cluster was reached", "none")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(command, "stage_executor", cluster_reached)
    assert main(_cli(tmp_path, "--device", "cuda", "--executor", "ray")) == 2
    err = capsys.readouterr().err
    assert "not available here" not in err and "the stand-in cluster was reached" in err
    assert main(_cli(tmp_path, "--device", "gpu", "--executor", "ray")) == 2
    assert "--device: unknown device 'gpu'" in capsys.readouterr().err


def _toy_corpus(root):
    """An eval set of 8 images and 2 corpus shards, each holding one rescaled copy (copy0, copy1) and 3 others."""
    rng = np.random.default_rng(0)
    eval_images = [procedural_image(rng, 96) for _ in range(8)]
    eval_dir = _eval_set(root / "toyset", eval_images)
    (root / "corpus").mkdir()
    for s in range(2):
        copy = (f"copy{s}", {"jpg": _jpeg(copy_of(eval_images[s], rng, ["rescale"])), "txt": b"c"})
        other = [(f"other{s}{j}", {"jpg": _jpeg(procedural_image(rng, 96)), "txt": b"d"}) for j in range(3)]
        _write_tar(root / "corpus" / f"{s:05d}.tar", [copy, *other])
    return eval_dir


def test_a_descriptor_moves_a_copy_of_its_model_and_keeps_its_own():
    """to(device): the same descriptor where the model is already there, else one holding a moved copy
    (the meta device stands in for cuda: a device this machine has, other than the model's)."""
    detector = DetectorDescriptor(load_detector())
    moved = detector.to("meta")
    assert moved.model is not detector.model and moved.name == detector.name
    assert {p.device.type for p in moved.model.parameters()} == {"meta"}
    assert {p.device.type for p in detector.model.parameters()} == {"cpu"}  # the driver's copy stays put
    assert detector.to("cpu") is detector
    phash = PHashDescriptor()
    assert phash.to("meta") is phash  # numpy: no model to move


def test_shard_device_is_checked_by_name_only(tmp_path):
    """The driver's device must be here; the shard device is the cluster's, so only its name is checked."""
    options = {"precision": 0.99, "thresholds": None, "calibration_samples": 8, "batch_size": 8, "k": 1,
               "sheet_size": 0, "splits": ("test",)}
    out = str(tmp_path / "out")
    check_dedup_options([str(tmp_path)], out, device="cpu", shard_device="cuda", **options)  # no CUDA here: fine
    check_dedup_options([str(tmp_path)], out, device="cpu", shard_device="cuda:3", **options)
    if not torch.cuda.is_available():
        with pytest.raises(InputError, match="cuda is not available here"):
            check_dedup_options([str(tmp_path)], out, device="cuda", shard_device="cpu", **options)
    with pytest.raises(InputError, match="unknown device 'gpu'"):
        check_dedup_options([str(tmp_path)], out, device="cpu", shard_device="gpu", **options)


def test_shard_device_runs_the_shards_and_device_the_references(tmp_path, monkeypatch, one_thread):
    """dedup(device, shard_device): the references are indexed on `device`, each shard moves the
    descriptors and indexes on `shard_device`; the matches are the plain run's, byte for byte.
    cpu:0 stands in for a second device (it is this CPU, under another name)."""
    eval_dir = _toy_corpus(tmp_path)
    options = {"descriptor": "phash+detector", "calibration_samples": 8, "sheet_size": 0}
    corpus = str(tmp_path / "corpus")
    plain = dedup(corpus, str(tmp_path / "plain"), [eval_dir], device="cpu", **options)
    same = dedup(corpus, str(tmp_path / "same"), [eval_dir], device="cpu", shard_device="cpu", **options)
    indexed, moved = [], []
    monkeypatch.setattr(near_dup, "build_index",
                        lambda codes, binary, device: indexed.append(device) or build_index(codes, binary, device))
    monkeypatch.setattr(near_dup, "descriptors_on",
                        lambda descriptors, device: moved.append(device) or [d.to(device) for d in descriptors])
    split = dedup(corpus, str(tmp_path / "split"), [eval_dir], device="cpu", shard_device="cpu:0", **options)
    assert sorted(indexed) == ["cpu", "cpu", "cpu:0", "cpu:0"]  # per descriptor: calibration here, then shards
    assert moved == ["cpu:0", "cpu:0"]  # once per shard
    for name in ("matches.parquet", "kept_keys.parquet"):
        want = (tmp_path / "plain" / name).read_bytes()
        assert (tmp_path / "same" / name).read_bytes() == want == (tmp_path / "split" / name).read_bytes()
    assert (plain.removed, plain.kept) == (same.removed, same.kept) == (split.removed, split.kept) == (2, 6)


@pytest.fixture(scope="module")
def gpu_cluster():
    """Head (1 CPU, no GPU) and a worker (1 CPU, 1 logical GPU) on 127.0.0.1: (cluster, head id, GPU node id)."""
    from ray.cluster_utils import Cluster

    temp = tempfile.mkdtemp(prefix="rg", dir="/tmp")  # Ray's socket paths must stay under 108 bytes
    with pytest.MonkeyPatch.context() as env:
        env.setenv("RAY_TMPDIR", temp)
        cluster = Cluster(initialize_head=True,
                          head_node_args={"num_cpus": 1, "num_gpus": 0, "include_dashboard": False})
        try:
            gpu_node = cluster.add_node(num_cpus=1, num_gpus=1)
            cluster.wait_for_nodes()
            yield cluster, cluster.head_node.node_id, gpu_node.node_id
        finally:
            cluster.shutdown()
            shutil.rmtree(temp, ignore_errors=True)


def test_gpu_tasks_run_on_the_gpu_node_with_their_gpu(gpu_cluster):
    cluster, _, gpu_node = gpu_cluster

    def _where(item):  # nested: pickled by value (Ray workers cannot import this test module)
        """In a Ray task: (item, node id, GPU ids Ray gave the task, CUDA_VISIBLE_DEVICES, process id)."""
        import os

        import ray
        return (item, ray.get_runtime_context().get_node_id(), [str(g) for g in ray.get_gpu_ids()],
                os.environ.get("CUDA_VISIBLE_DEVICES"), os.getpid())

    with RayExecutor(address=cluster.address, gpus_per_task=1) as executor:
        assert executor.cluster_gpus() == 1.0
        rows = executor.map(_where, range(3))
        cpu_rows = RayExecutor(address=cluster.address).map(_where, range(4))  # the same connection
    assert [r[0] for r in rows] == [0, 1, 2]  # item order
    assert {r[1] for r in rows} == {gpu_node}  # never the head: it has no GPU
    assert all(r[2] == ["0"] and r[3] == "0" for r in rows)  # the node's one GPU, visible as cuda:0
    assert len({r[4] for r in rows}) == 3  # a fresh worker process per GPU task
    assert [r[0] for r in cpu_rows] == [0, 1, 2, 3] and all(r[2] == [] for r in cpu_rows)  # no GPU asked, none given


def test_any_driver_asks_the_gpu_cluster_for_a_gpu_per_shard_task(gpu_cluster, monkeypatch):
    cluster, _, _ = gpu_cluster
    with RayExecutor(address=cluster.address) as executor:
        assert _place_shards(executor, "cpu") == ("cpu", "cpu") and executor.gpus_per_task == 0
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # a driver without CUDA
        assert _place_shards(executor, "auto") == ("cpu", "cuda") and executor.gpus_per_task == 1
        executor.gpus_per_task = 0
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a driver with CUDA
        assert _place_shards(executor, "auto") == ("cuda", "cuda") and executor.gpus_per_task == 1


def test_a_cpu_driver_maps_dedup_onto_the_clusters_gpu(gpu_cluster, tmp_path, monkeypatch, one_thread):
    """`dedup --device auto --executor ray` from a driver without CUDA: every shard task asks for the GPU
    and runs on the GPU node; the output is the local run's. phash runs in numpy, so the tasks
    need no real CUDA (this machine has none); the shard device itself is test_dedup_placement's."""
    cluster, _, gpu_node = gpu_cluster
    eval_dir = _toy_corpus(tmp_path)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    options = ("--descriptor", "phash", "--calibration-samples", "8", "--sheet-size", "0")
    assert main(["dedup", str(tmp_path / "corpus"), str(tmp_path / "local"), "--eval", eval_dir, *options]) == 0
    assert main(["dedup", str(tmp_path / "corpus"), str(tmp_path / "ray"), "--eval", eval_dir, *options,
                 "--device", "auto", "--executor", "ray", "--ray-address", cluster.address]) == 0
    assert DedupStats.read(str(tmp_path / "ray")).nodes == {gpu_node: 2}
    for name in ("matches.parquet", "kept_keys.parquet"):
        assert (tmp_path / "ray" / name).read_bytes() == (tmp_path / "local" / name).read_bytes()


def test_dedup_as_gpu_tasks_gives_the_local_matches(gpu_cluster, tmp_path, one_thread):
    """dedup's shard tasks asking for a GPU all run on the GPU node; the output is the local run's."""
    cluster, _, gpu_node = gpu_cluster
    eval_dir = _toy_corpus(tmp_path)
    options = {"descriptor": "phash", "calibration_samples": 8, "sheet_size": 0}
    local = dedup(str(tmp_path / "corpus"), str(tmp_path / "local"), [eval_dir], **options)
    with RayExecutor(address=cluster.address, gpus_per_task=1) as executor:
        remote = dedup(str(tmp_path / "corpus"), str(tmp_path / "ray"), [eval_dir], executor=executor, **options)
    assert remote.nodes == {gpu_node: 2}
    assert {"copy0", "copy1"} <= set(pq.read_table(tmp_path / "ray" / "matches.parquet")["key"].to_pylist())
    for name in ("matches.parquet", "kept_keys.parquet"):
        assert (tmp_path / "ray" / name).read_bytes() == (tmp_path / "local" / name).read_bytes()
    assert (remote.removed, remote.kept) == (local.removed, local.kept) == (2, 6)


@pytest.fixture
def vectors():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((397, 64)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x[:300], x[300:]  # database, queries


@pytest.mark.gpu
def test_cuda_index_gives_the_cpu_flat_search(vectors):
    """build_index on cuda (faiss-gpu where installed, else torch): the CPU FAISS flat search's ids and scores."""
    database, queries = vectors
    index = build_index(database, binary=False, device="cuda")
    assert index.backend == search_backend("cuda", faiss_gpus())
    scores, ids = index.search(queries, k=5, chunk_size=16)
    want_scores, want_ids = FlatIndex(database, backend="faiss").search(queries, k=5)
    np.testing.assert_array_equal(ids, want_ids)
    np.testing.assert_allclose(scores, want_scores, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not hasattr(faiss, "StandardGpuResources"), reason="faiss-cpu installed: run make setup-gpu")
def test_faiss_gpu_flat_and_ivf_give_the_brute_force(vectors):
    database, queries = vectors
    want_scores, want_ids = brute_force_search(queries, database, k=3)
    for kind, extra in (("flat", {}), ("ivf", {"nlist": 4, "nprobe": 4})):  # every list probed: exact
        scores, ids = FlatIndex(database, backend="faiss-gpu", device="cuda", kind=kind, **extra).search(queries, 3)
        np.testing.assert_array_equal(ids, want_ids)
        np.testing.assert_allclose(scores, want_scores, atol=1e-5)
