"""Training on shared storage: OUT and Ray's checkpoints on S3 (a moto server on 127.0.0.1), and a
multi-node Ray cluster (two raylets on loopback) refused when its storage is a local folder."""
import argparse
import contextlib
import json
import os
import time
import uuid
from pathlib import Path

import pytest
import torch

from clip_core.errors import InputError
from clip_core.model import create_model
from clip_core.train import TrainConfig
from clip_core.weights import export_model, latest_checkpoint, load_checkpoint, write_checkpoint
from flows.commands.train import add_train_arguments, run_train_command
from flows.train import RunSettings
from test_train_data import make_shards
from test_train_ray import config

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    folder, _ = make_shards(tmp_path_factory.mktemp("corpus"), 2, 48)
    return str(folder)


# ----- a multi-node cluster with local storage: refused before any worker starts -----

@contextlib.contextmanager
def two_node_cluster(cpus: int):
    """Two raylets on 127.0.0.1 (Ray's single-machine mode, set by conftest); the driver joins through train()."""
    import ray
    from ray.cluster_utils import Cluster

    ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": cpus, "include_dashboard": False})
    cluster.add_node(num_cpus=cpus)
    cluster.wait_for_nodes()
    try:
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()


@pytest.fixture
def two_nodes():
    with two_node_cluster(cpus=1) as cluster:
        yield cluster


@pytest.mark.slow
def test_a_multi_node_cluster_with_a_local_storage_path_is_refused_before_any_worker_starts(
        tmp_path, corpus, two_nodes, capsys):
    import ray

    from flows.train import check_shared_storage, train

    started = tmp_path / "a-worker-started"

    class Started:
        def on_train_start(self, trainer):
            started.touch()

    cfg, settings = config(tmp_path, corpus, workers=1, ray_address=two_nodes.address)
    with pytest.raises(InputError, match=r"--storage-path .*/out/ray: a local folder, and the Ray cluster has 2 nodes"
                                         r".*s3://.*--shared-storage"):
        train(cfg, settings, callbacks=[Started()])
    assert sum(node["Alive"] for node in ray.nodes()) == 2  # the driver did see both nodes
    assert not started.exists() and not (tmp_path / "out").exists()  # no worker, no OUT, no MLflow run
    # the command line: exit 2, one line naming the option and the fix
    args = add_train_arguments(argparse.ArgumentParser()).parse_args(
        [corpus, str(tmp_path / "out"), "--steps", "2", "--ray-address", two_nodes.address])
    assert run_train_command(args) == 2
    err = capsys.readouterr().err
    assert "--storage-path" in err and "--shared-storage" in err and not (tmp_path / "out").exists()
    # what passes: S3 for both, or local folders every node mounts
    check_shared_storage(RunSettings(output="s3://bucket/run", storage_path="s3://bucket/run/ray"))
    check_shared_storage(RunSettings(output=str(tmp_path / "out"), storage_path=str(tmp_path / "ray"),
                                     shared_storage=True))
    with pytest.raises(InputError, match="OUT .*a local folder"):  # rank 0 writes metrics.jsonl to OUT
        check_shared_storage(RunSettings(output=str(tmp_path / "out"), storage_path="s3://bucket/ray"))


def test_out_and_storage_uris_and_shared_storage_come_from_the_command_line():
    from flows.commands.train import options_from_args

    args = add_train_arguments(argparse.ArgumentParser()).parse_args(
        ["C", "s3://bucket/run", "--steps", "1", "--storage-path", "s3://other/ray", "--shared-storage"])
    _, run = options_from_args(args)
    assert (run.output, run.storage_path, run.shared_storage) == ("s3://bucket/run", "s3://other/ray", True)


# ----- S3 on a moto server -----

@pytest.fixture
def fs(s3):
    import fsspec

    return fsspec.filesystem("s3", skip_instance_cache=True)


def test_the_model_exports_to_s3_and_the_newest_step_folder_is_found_there(tmp_path, s3, fs):
    model = create_model("tiny")
    for step in (2, 4):
        write_checkpoint(model, tmp_path / f"step_{step:08d}", {"step": step})
        fs.put(str(tmp_path / f"step_{step:08d}"), f"{s3}/export/ray/run/", recursive=True)
    fs.pipe_file(f"{s3}/export/ray/run/step_00000006/model.safetensors", b"")  # being written: no train_state.pt
    assert latest_checkpoint(f"s3://{s3}/export/ray/run") == f"s3://{s3}/export/ray/run/step_00000004"
    assert latest_checkpoint(f"s3://{s3}/export/ray/none") is None
    assert export_model(tmp_path / "step_00000004", f"s3://{s3}/export/model") == f"s3://{s3}/export/model"
    assert sorted(p.rsplit("/", 1)[1] for p in fs.ls(f"{s3}/export/model")) == ["config.json", "model.safetensors"]
    fs.get(f"{s3}/export/model", str(tmp_path / "back"), recursive=True)
    assert torch.equal(load_checkpoint(tmp_path / "back").logit_scale, model.logit_scale)


def test_remote_metrics_are_uploaded_at_checkpoints_and_the_end_and_trimmed_on_resume(tmp_path, s3, fs):
    from flows.tracking import MetricsCallback, Tracker

    uri = f"s3://{s3}/metrics/metrics.jsonl"

    class Trainer:
        step, metrics = 0, {"loss": 1.0, "samples_per_s": 8.0}

    def run(start: int, stop: int) -> MetricsCallback:
        callback, trainer = MetricsCallback(Tracker(None), uri, log_every=1, world_size=1, checkpoint_every=4), Trainer()
        trainer.step = start
        callback.on_train_start(trainer)
        for trainer.step in range(start + 1, stop + 1):
            callback.on_step_end(trainer)
        return callback

    def steps() -> list[int]:
        return [json.loads(line)["step"] for line in fs.cat_file(uri).decode().splitlines()]

    run(0, 6)  # a worker that dies after step 6: the upload at checkpoint step 4 is what S3 has
    assert steps() == [1, 2, 3, 4]
    run(4, 5).on_train_end(Trainer())  # the restarted worker continues from checkpoint 4
    assert steps() == [1, 2, 3, 4, 5]
    run(2, 2)  # a rerun from step 2 drops the rows after it at once
    assert steps() == [1, 2]


def test_a_remote_out_is_checked_and_its_storage_defaults_under_it(tmp_path, corpus, s3, fs, monkeypatch):
    from flows.tracking import default_tracking_uri
    from flows.train import _auto_resume, _checked

    monkeypatch.chdir(tmp_path)
    cfg = TrainConfig(corpus=corpus, steps=2)
    run, _ = _checked(cfg, RunSettings(output=f"s3://{s3}/checked"))
    assert (run.output, run.storage_path) == (f"s3://{s3}/checked", f"s3://{s3}/checked/ray")
    assert not Path("s3:").exists() and not fs.exists(f"{s3}/checked")  # the write probe is removed
    with pytest.raises(InputError, match=r"OUT s3://no-such-bucket-\w+/run: cannot be written"):
        _checked(cfg, RunSettings(output=f"s3://no-such-bucket-{uuid.uuid4().hex[:6]}/run"))
    with pytest.warns(UserWarning, match="remote and MLFLOW_TRACKING_URI is unset"):
        assert default_tracking_uri(f"s3://{s3}/checked") == f"sqlite:///{tmp_path / 'mlflow.db'}"
    # --resume auto after a kill before Ray recorded the run: the newest whole step folder on S3
    write_checkpoint(create_model("tiny"), tmp_path / "step_00000003", {"step": 3})
    fs.put(str(tmp_path / "step_00000003"), f"{s3}/checked/ray/clip-train/", recursive=True)
    assert _auto_resume(run).resume == f"s3://{s3}/checked/ray/clip-train/step_00000003"
    with pytest.raises(InputError, match="another model than --preset tiny-rn"):  # checked on S3 before Ray starts
        _checked(cfg.replace(preset="tiny-rn"), RunSettings(output=f"s3://{s3}/checked"))


@pytest.fixture
def two_nodes_on_s3(s3):
    """Two nodes of 2 logical CPUs, started after the S3 variables are set: their workers inherit them."""
    with two_node_cluster(cpus=2) as cluster:
        yield cluster


@pytest.mark.slow
def test_training_on_two_nodes_and_s3_survives_a_worker_kill_and_resumes_from_s3(
        tmp_path, corpus, s3, fs, two_nodes_on_s3, monkeypatch):
    import ray.train
    from mlflow import MlflowClient

    from flows.train import train

    monkeypatch.chdir(tmp_path)  # a local path wrongly made of the URI would appear here
    marker, out, nodes = str(tmp_path / "killed-once"), f"s3://{s3}/run", str(tmp_path / "nodes")

    class KillRank1Once:
        def on_train_start(self, trainer):
            with open(nodes, "a") as f:  # where each rank of each attempt ran
                f.write(f"{ray.get_runtime_context().get_node_id()}\n")

        def on_step_end(self, trainer):
            if trainer.step == 6 and ray.train.get_context().get_world_rank() == 1 and not os.path.exists(marker):
                open(marker, "w").close()
                time.sleep(8)  # Ray registers the step-4 report at its next health-check poll (every 2 s)
                os._exit(1)

    # 1.5 of each node's 2 CPUs per worker: one worker per node
    cfg, settings = config(tmp_path, corpus, steps=10, max_failures=1, output=out, cpus_per_worker=1.5,
                           ray_address=two_nodes_on_s3.address, mlflow_uri=f"sqlite:///{tmp_path}/mlflow.db")
    summary = train(cfg, settings, callbacks=[KillRank1Once()])
    assert os.path.exists(marker) and summary.steps == 10
    assert len(set(Path(nodes).read_text().split())) == 2  # the ranks ran on both nodes
    assert [r["step"] for r in summary.history] == list(range(5, 11))  # resumed from step_00000004 on S3
    assert summary.model == f"{out}/model" and summary.checkpoint == f"{out}/ray/clip-train/step_00000010"
    assert sorted(p.rsplit("/", 1)[1] for p in fs.ls(f"{s3}/run/ray/clip-train") if "step_" in p) == \
        ["step_00000008", "step_00000010"]
    fs.get(f"{s3}/run/model", str(tmp_path / "model"), recursive=True)
    fs.get(f"{s3}/run/ray/clip-train/step_00000010", str(tmp_path / "step10"), recursive=True)
    assert torch.equal(load_checkpoint(tmp_path / "model").logit_scale, load_checkpoint(tmp_path / "step10").logit_scale)
    rows = [json.loads(line) for line in fs.cat_file(f"{s3}/run/metrics.jsonl").decode().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 11))  # each step once, the killed attempt's extra rows gone
    client = MlflowClient(summary.tracking_uri)
    run = client.get_run(summary.mlflow_run_id)
    assert run.info.status == "FINISHED" and run.info.artifact_uri.startswith(f"{out}/mlartifacts/")
    assert {a.path for a in client.list_artifacts(run.info.run_id, "model")} == {"model/model.safetensors",
                                                                                "model/config.json"}
    assert fs.isfile(f"{run.info.artifact_uri}/model/model.safetensors".split("://", 1)[1])
    assert not any(Path(tmp_path).glob("s3*")) and not Path("s3:").exists()

    # --resume auto: the same command with more steps continues from Ray's record on S3
    resumed = train(cfg.replace(steps=12), settings)
    assert [r["step"] for r in resumed.history] == [11, 12]
    rows = [json.loads(line) for line in fs.cat_file(f"{s3}/run/metrics.jsonl").decode().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 13))
