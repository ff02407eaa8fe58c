"""Ray Train wiring and MLflow tracking: 2 gloo workers, failures, NaN, bad inputs, a down server."""
import argparse
import io
import json
import os
import tarfile
import tempfile
import time

import numpy as np
import pytest
import torch

from clip_core.loss import ClipLoss
from clip_core.train import TrainConfig, build_model_for, build_training, data_config
from clip_core.train.accum import forward_backward
from clip_core.train.data import ShardLoader
from clip_core.train.loop import NormalizeImages
from clip_core.weights import load_checkpoint
from flows.commands.train import add_train_arguments, options_from_args, run_train_command
from flows.common import free_port, loopback_ray
from flows.train import RunSettings
from test_train_data import make_shards, shape_image


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def ray_cluster():
    import ray

    with loopback_ray():
        ray.init(num_cpus=3, include_dashboard=False, _temp_dir=tempfile.mkdtemp(prefix="ray", dir="/tmp"))
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    folder, _ = make_shards(tmp_path_factory.mktemp("corpus"), 2, 48)
    return str(folder)


def write_eval_set(root, classnames, templates, images) -> str:
    """A zero-shot set in the eval layout from (label, JPEG bytes) pairs."""
    (root / "test").mkdir(parents=True)
    (root / "classnames.txt").write_text("\n".join(classnames) + "\n")
    (root / "templates.txt").write_text("\n".join(templates) + "\n")
    with tarfile.open(root / "test" / "000000.tar", "w") as tar:
        for i, (label, jpeg) in enumerate(images):
            for name, data in ((f"{i:04d}.jpg", jpeg), (f"{i:04d}.cls", str(label).encode())):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return str(root)


@pytest.fixture(scope="module")
def eval_sets(tmp_path_factory):
    """Two zero-shot sets over the same 48 held-out images (4 per colour and shape): colours
    (4 classes, prompts ensembled over the shapes) and shapes (3 classes, over the colours)."""
    import random

    from test_train_data import COLOURS, SHAPES

    root, rng = tmp_path_factory.mktemp("evalsets"), random.Random(5)
    drawn = [(c, s, shape_image(c, s, rng)) for c in COLOURS for s in SHAPES for _ in range(4)]
    colours = write_eval_set(root / "colours", list(COLOURS), [f"a photo of a {{c}} {s}" for s in SHAPES],
                             [(list(COLOURS).index(c), jpeg) for c, s, jpeg in drawn])
    shapes = write_eval_set(root / "shapes", list(SHAPES), [f"a photo of a {c} {{c}}" for c in COLOURS],
                            [(SHAPES.index(s), jpeg) for c, s, jpeg in drawn])
    return {"colours": colours, "shapes": shapes}


def config(tmp_path, corpus, **kw) -> tuple[TrainConfig, RunSettings]:
    """(recipe, run settings) of a small 2-worker run; `kw` may hold options of either."""
    base = dict(corpus=corpus, output=str(tmp_path / "out"), preset="tiny", image_size=32, steps=12, batch_size=16,
                lr=1e-3, warmup=2, precision="fp32", workers=2, cpus_per_worker=0.5, data_workers=0,
                shuffle_buffer=16, checkpoint_every=4, num_to_keep=2, log_every=1)
    base.update(kw)
    recipe = {k: v for k, v in base.items() if k in TrainConfig.field_names()}
    return TrainConfig(**recipe), RunSettings(**{k: v for k, v in base.items() if k not in recipe})


def single_process_grad_norm(cfg) -> float:
    """Step 1's gradient norm in one process on the union of both ranks' first batches."""
    model = build_model_for(cfg)
    batches = [next(iter(ShardLoader(data_config(cfg, model, rank, 2, torch.device("cpu"))))) for rank in range(2)]
    inputs = NormalizeImages()(tuple(torch.cat(parts) for parts in zip(*batches)))  # uint8 -> the model's input
    forward_backward(model, ClipLoss(), inputs)
    return torch.nn.utils.get_total_norm([p.grad for p in model.parameters()]).item()


@pytest.mark.slow
def test_two_workers_train_checkpoint_and_track(tmp_path, corpus, eval_sets, ray_cluster, capsys):
    from mlflow import MlflowClient

    from flows.train import train

    cfg, settings = config(tmp_path, corpus, steps=14, data_workers=1, checkpoint_every=5,
                           eval=[eval_sets["colours"]], eval_every=7)
    summary = train(cfg, settings)
    losses = [r["loss"] for r in summary.history]
    assert summary.steps == 14 and len(losses) == 14 and summary.final_loss == losses[-1]
    # progress a person reads: the precision once, step of total with the loss; no Ray log line
    shown = capsys.readouterr().out
    assert "train: precision fp32 (as given)" in shown and f"train: step 14/14  loss {losses[-1]:.3f}" in shown
    assert "RayTrainWorker" not in shown and "pid=" not in shown
    assert sum(losses[-4:]) / 4 < sum(losses[:3]) / 3 - 0.3, losses
    assert summary.data.good >= 14 * 8 and summary.data.skipped == 0  # rank 0's half of every batch
    # the distributed gradient (local loss, gather with grad, DDP mean) is the one-process gradient
    assert summary.history[0]["grad_norm"] == pytest.approx(single_process_grad_norm(cfg), rel=1e-4)
    kept = sorted(p.name for p in (tmp_path / "out" / "ray" / "clip-train").glob("step_*"))
    assert kept == ["step_00000010", "step_00000014"]
    final = load_checkpoint(summary.model)
    assert torch.equal(final.logit_scale, load_checkpoint(summary.checkpoint).logit_scale)

    client = MlflowClient(summary.tracking_uri)
    run = client.get_run(summary.mlflow_run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["batch_size"] == "16" and run.data.params["preset_config.vision_cfg.width"] == "128"
    assert run.data.params["preset_config.vision_cfg.image_size"] == "32"  # the model trained, override applied
    assert run.data.tags["corpus"] == corpus and run.data.tags["git_commit"]
    for name in ("loss", "lr", "logit_scale", "grad_norm", "samples_per_s", "samples_per_s_worker", "data_wait",
                 "step_time", "zeroshot.colours.acc1"):
        assert name in run.data.metrics, name
    assert [m.step for m in client.get_metric_history(run.info.run_id, "zeroshot.colours.acc1")] == [7, 14]
    assert len(client.get_metric_history(run.info.run_id, "loss")) == 14
    assert {a.path for a in client.list_artifacts(run.info.run_id, "model")} == {"model/model.safetensors",
                                                                                "model/config.json"}
    (version,) = client.search_model_versions("name = 'clip-tiny'")
    assert version.run_id == run.info.run_id  # the registered model links back to its run
    # which data made it: the corpus as a dataset input whose digest the run's tag names (issue 20)
    (corpus_input,) = [i for i in run.inputs.dataset_inputs if i.dataset.name == "corpus"]
    assert corpus_input.dataset.digest == run.data.tags["corpus.digest"]
    assert {t.key: t.value for t in corpus_input.tags} == {"mlflow.data.context": "training"}
    assert {i.dataset.name for i in run.inputs.dataset_inputs} == {"corpus", "eval/colours"}
    # the registered version is a pyfunc: texts in, unit-norm embeddings out
    import mlflow.pyfunc
    import pandas as pd

    # the version's own artifact URI: mlflow.set_tracking_uri would also set MLFLOW_TRACKING_URI for
    # every later test and child process of this worker
    embedder = mlflow.pyfunc.load_model(client.get_model_version_download_uri("clip-tiny", version.version))
    vectors = embedder.predict(pd.DataFrame({"text": ["a red circle", "two blue squares"]}))
    assert vectors.shape == (2, final.config.embed_dim) and np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-5)


@pytest.mark.slow
def test_ray_learns_as_well_as_a_plain_loop(tmp_path, tmp_path_factory, eval_sets, ray_cluster):
    """Same data, global batch, steps and seed: 2 Ray workers against one plain process.

    Noise, measured with the plain loop over seeds 0-3 at this size: colours 0.98-1.00,
    shapes 0.40-0.54 (chance 0.25 and 0.33); the margins are about three seed standard deviations.
    """
    from clip_core.eval.zeroshot import evaluate_zeroshot
    from clip_core.train.optim import unwrap
    from flows.train import train

    folder, _ = make_shards(tmp_path_factory.mktemp("learn"), 2, 96, seed=3)
    cfg, settings = config(tmp_path, str(folder), steps=60, batch_size=32, warmup=5, shuffle_buffer=64,
                           checkpoint_every=60)
    plain, loader = build_training(cfg)  # one process: the whole global batch
    plain.fit(loader, cfg.total_steps)
    ray_model = load_checkpoint(train(cfg, settings).model)

    def accuracy(model):
        return {name: evaluate_zeroshot(model, path, progress=False).metrics["acc1"] for name, path in eval_sets.items()}

    ours, reference = accuracy(ray_model), accuracy(unwrap(plain.model))
    print(f"zero-shot acc1, Ray: {ours}; plain: {reference}")
    assert reference["colours"] >= 0.9 and reference["shapes"] > 0.34, reference  # the plain loop learned
    assert ours["colours"] >= reference["colours"] - 0.1, (ours, reference)
    assert ours["shapes"] >= reference["shapes"] - 0.2, (ours, reference)


@pytest.mark.slow
def test_a_killed_worker_is_restarted_from_its_checkpoint(tmp_path, corpus, ray_cluster):
    import ray.train

    from flows.train import train

    marker, losses = str(tmp_path / "killed-once"), str(tmp_path / "losses.jsonl")

    class KillRank1Once:
        def on_step_end(self, trainer):
            if ray.train.get_context().get_world_rank() == 0:  # every attempt's losses, repeats included
                with open(losses, "a") as f:
                    f.write(json.dumps([trainer.step, trainer.metrics["loss"]]) + "\n")
            if trainer.step == 6 and ray.train.get_context().get_world_rank() == 1 and not os.path.exists(marker):
                open(marker, "w").close()
                time.sleep(8)  # Ray registers the step-4 report at its next health-check poll (every 2 s)
                os._exit(1)

    cfg, settings = config(tmp_path, corpus, steps=10, max_failures=1, mlflow_uri=f"http://127.0.0.1:{free_port()}")
    summary = train(cfg, settings, callbacks=[KillRank1Once()])
    assert os.path.exists(marker) and summary.steps == 10
    assert [r["step"] for r in summary.history] == list(range(5, 11))  # resumed from step_00000004
    first, second = {}, {}
    for step, loss in map(json.loads, open(losses).read().splitlines()):  # attempt one: 1..6 (or 7), two: 5..10
        (second if step in first and step not in second else first)[step] = loss
    assert 5 in second and all(second[s] == pytest.approx(first[s], rel=1e-5) for s in second)
    # metrics.jsonl holds each step once: the resumed attempt dropped the rows after its checkpoint
    rows = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 11))
    assert all(r["loss"] == pytest.approx(first.get(r["step"], second.get(r["step"])), rel=1e-5) for r in rows)


@pytest.mark.slow
def test_a_local_run_listens_on_loopback_only(tmp_path, corpus, ray_cluster):
    """Every listening TCP socket of this process tree (Ray, its workers, torch.distributed) is on loopback."""
    import ipaddress
    import threading

    import psutil  # comes with Ray (imported by the ray_cluster fixture)
    import ray.train

    from flows.train import train

    listening, done, pids = set(), threading.Event(), str(tmp_path / "pids")

    def watch():
        me = psutil.Process()
        while not done.is_set():
            for proc in [me, *me.children(recursive=True)]:
                try:
                    sockets = proc.net_connections(kind="tcp")
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    continue
                listening.update((proc.pid, c.laddr.ip, c.laddr.port) for c in sockets if c.status == psutil.CONN_LISTEN)
            time.sleep(0.2)

    class RecordPid:
        def on_train_start(self, trainer):
            with open(pids, "a") as f:
                f.write(f"{os.getpid()}\n")

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        summary = train(*config(tmp_path, corpus, steps=6, checkpoint_every=3), callbacks=[RecordPid()])
    finally:
        done.set()
        watcher.join()
    assert summary.steps == 6

    def loopback(ip: str) -> bool:
        address = ipaddress.ip_address(ip.split("%")[0])
        return (getattr(address, "ipv4_mapped", None) or address).is_loopback

    workers = {int(p) for p in open(pids).read().split()}
    assert len(workers) == 2 and workers & {pid for pid, _, _ in listening}  # the watcher saw the workers' sockets
    assert [s for s in listening if not loopback(s[1])] == []


@pytest.mark.slow
def test_a_terminated_training_closes_its_mlflow_run_and_resumes(tmp_path, corpus, ray_cluster):
    """SIGTERM to `python -m flows.commands.train`: the MLflow run ends KILLED; `--resume auto` continues it."""
    import signal
    import subprocess
    import sys

    from mlflow import MlflowClient

    from clip_core.weights import latest_checkpoint
    from flows.train import train

    out = tmp_path / "out"
    cfg, settings = config(tmp_path, corpus, steps=400, workers=1, checkpoint_every=2)  # the child's options
    argv = [sys.executable, "-m", "flows.commands.train", corpus, str(out), "--preset", "tiny", "--image-size", "32",
            "--steps", "400", "--batch-size", "16", "--lr", "1e-3", "--warmup", "2", "--precision", "fp32",
            "--workers", "1", "--cpus-per-worker", "0.5", "--data-workers", "0", "--shuffle-buffer", "16",
            "--checkpoint-every", "2", "--num-to-keep", "2", "--log-every", "1"]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # its own local cluster, not the fixture's
    child = subprocess.Popen(argv, cwd=os.path.dirname(os.path.dirname(__file__)), env=env, start_new_session=True,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 240
        while not (out / "ray" / "clip-train" / "step_00000004").is_dir():
            assert child.poll() is None and time.time() < deadline, child.communicate()[0][-3000:]
            time.sleep(0.5)
        child.send_signal(signal.SIGTERM)
        log = child.communicate(timeout=120)[0]
    finally:
        if child.poll() is None:
            os.killpg(child.pid, signal.SIGKILL)
    assert child.returncode == 128 + signal.SIGTERM, log[-3000:]
    client = MlflowClient(f"sqlite:///{out}/mlflow.db")
    (killed,) = client.search_runs([client.get_experiment_by_name("clip").experiment_id])
    assert killed.info.status == "KILLED"

    # What --resume auto continues from: Ray's record of the run or, when the kill came before Ray
    # wrote it, the newest whole step folder (either way no finished checkpoint is lost)
    record = out / "ray" / "clip-train" / "checkpoint_manager_snapshot.json"
    if record.exists():
        last = int(json.loads(record.read_text())["latest_checkpoint_result"]["checkpoint_dir_name"].split("_")[1])
    else:
        last = int(latest_checkpoint(out / "ray" / "clip-train").name.split("_")[1])
    assert last >= 2  # checkpoints every 2 steps; step_00000004 was on disk when the kill came
    summary = train(cfg.replace(steps=last + 2), settings)  # --resume auto: from the killed run's newest checkpoint
    assert [r["step"] for r in summary.history] == [last + 1, last + 2]
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, last + 3))  # the killed run's rows after its checkpoint are gone
    assert client.get_run(summary.mlflow_run_id).info.status == "FINISHED"


@pytest.mark.slow
def test_nan_loss_stops_clearly_keeps_the_checkpoint_and_a_rerun_continues(tmp_path, corpus, ray_cluster):
    from flows.train import TrainingError, train

    class PoisonAtStep3:
        def on_step_end(self, trainer):
            if trainer.step == 3:
                with torch.no_grad():
                    trainer.model.module.ln_final.weight.fill_(float("nan"))

    cfg, settings = config(tmp_path, corpus, steps=8, checkpoint_every=2)
    with pytest.raises(TrainingError, match=r"loss is nan at step 3.*last good checkpoint: .*step_00000002"):
        train(cfg, settings, callbacks=[PoisonAtStep3()])
    assert (tmp_path / "out" / "ray" / "clip-train" / "step_00000002" / "model.safetensors").is_file()
    assert not (tmp_path / "out" / "model").exists()
    summary = train(cfg.replace(steps=5), settings)  # the same command again continues from step 2
    assert [r["step"] for r in summary.history] == [3, 4, 5]


def test_an_unreachable_ray_address_fails_fast(tmp_path, corpus):
    from flows.train import train

    from clip_core.errors import InputError

    with pytest.raises(InputError, match="--ray-address: nothing answers at 127.0.0.1:"):
        train(*config(tmp_path, corpus, ray_address=f"127.0.0.1:{free_port()}"))


def test_a_down_tracking_server_does_not_stop_training(tmp_path, corpus):
    from flows.tracking import MetricsCallback, Tracker

    with pytest.warns(UserWarning, match="unreachable"):
        tracker = Tracker(f"http://127.0.0.1:{free_port()}")
    assert tracker.start("clip", "run", {"lr": 1}, {}) is None
    metrics = MetricsCallback(tracker, tmp_path / "metrics.jsonl", log_every=1, world_size=1)
    trainer, loader = build_training(config(tmp_path, corpus, batch_size=8)[0], callbacks=[metrics])
    trainer.fit(loader, 3)
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 3


def test_a_tracking_server_that_goes_down_only_warns():
    from flows.tracking import Tracker

    class DeadClient:
        def log_batch(self, *args, **kwargs):
            raise ConnectionError("connection refused")

    tracker = Tracker(None, run_id="abc")
    tracker.client = DeadClient()
    with pytest.warns(UserWarning, match="log metrics failed"):
        tracker.log_metrics({"loss": 1.0}, step=1)


def test_a_run_whose_server_is_down_when_a_worker_starts_logs_nothing_and_goes_on(tmp_path):
    """Rank 0 gets the driver's run id; before, a server gone down by then raised AttributeError on None."""
    from flows.tracking import Tracker

    with pytest.warns(UserWarning, match="unreachable"):
        tracker = Tracker(f"http://127.0.0.1:{free_port()}", run_id="abc")
    tracker.log_metrics({"loss": 1.0}, step=1)
    tracker.log_params({"lr": "0.1"})
    tracker.set_tags({"stage": "train"})
    tracker.log_artifacts(str(tmp_path), "model")
    tracker.log_artifact(str(tmp_path), "model")
    tracker.end("FINISHED")
    assert tracker.register("clip-tiny", "model") is None and tracker.run_exists("abc") is None


def test_command_line_overrides_the_config_file(tmp_path):
    (tmp_path / "train.json").write_text(json.dumps({"steps": 50, "lr": 0.01, "preset": "tiny-rn", "num-to-keep": 5,
                                                     "workers": 4}))
    parser = add_train_arguments(argparse.ArgumentParser())
    args = parser.parse_args(["C", "OUT", "--config", str(tmp_path / "train.json"), "--steps", "7", "--no-local-loss",
                              "--workers", "2"])
    cfg, run = options_from_args(args)
    assert (cfg.steps, cfg.lr, cfg.preset, cfg.local_loss, cfg.batch_size) == (7, 0.01, "tiny-rn", False, 256)
    assert (run.workers, run.num_to_keep, run.output, run.resume) == (2, 5, os.path.abspath("OUT"), "auto")
    assert cfg.corpus == os.path.abspath("C")


def test_a_config_file_with_an_unknown_option_is_bad_input(tmp_path, capsys):
    (tmp_path / "train.yaml").write_text("steps: 5\nlearning_rate: 0.1\n")
    args = add_train_arguments(argparse.ArgumentParser()).parse_args(["C", "OUT", "--config", str(tmp_path / "train.yaml")])
    assert run_train_command(args) == 2
    assert "unknown training options: ['learning_rate']" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--preset", "ViT-Z-99"], "unknown model"),
    ([], "does not exist"),
    (["--batch-size", "10", "--workers", "3"], "not divisible"),
])
def test_bad_input_gives_a_clear_error(tmp_path, capsys, argv, message):
    parser = add_train_arguments(argparse.ArgumentParser())
    args = parser.parse_args([str(tmp_path / "missing"), str(tmp_path / "out"), "--steps", "2", *argv])
    assert run_train_command(args) == 2  # bad input: the same exit code as every other command
    assert message in capsys.readouterr().err


@pytest.mark.slow
def test_checkpoint_minutes_adds_time_based_checkpoints_at_log_steps(tmp_path, corpus, ray_cluster):
    """Every rank hears rank 0's clock at log steps, so all report together: checkpoints at 2, 4 and the end."""
    from flows.train import train

    cfg, settings = config(tmp_path, corpus, steps=5, checkpoint_every=1000, checkpoint_minutes=1e-9, log_every=2,
                           num_to_keep=5)
    train(cfg, settings)
    kept = sorted(p.name for p in (tmp_path / "out" / "ray" / "clip-train").glob("step_*"))
    assert kept == ["step_00000002", "step_00000004", "step_00000005"]
