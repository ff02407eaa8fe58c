"""The evaluate driver: checkpoint resolution, JSON + Markdown output, the CLI hooks, the flow."""
import argparse
import importlib.util
import io
import json
import os
import shutil
import tarfile
from pathlib import Path

import pytest
from PIL import Image

from clip_core.errors import InputError

from flows.commands.evaluate import add_evaluate_arguments, run_evaluate_command
from clip_core.eval.run import (
    default_model_name, evaluate, markdown_table,
)
from clip_core.model import create_model
from clip_core.weights import save_checkpoint


def image(k: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (20, 16), (60 * k % 256, 90, 30 * k % 256)).save(buf, "JPEG")
    return buf.getvalue()


def write_split(folder, samples) -> None:
    folder.mkdir(parents=True)
    with tarfile.open(folder / "000000.tar", "w") as tar:
        for key, fields in samples:
            for ext, data in fields.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A tiny checkpoint, a classification set (train + test) and a retrieval set."""
    root = tmp_path_factory.mktemp("eval")
    save_checkpoint(create_model("tiny"), root / "ckpt")
    shapes = root / "shapes"
    for split, n in (("train", 12), ("test", 6)):
        write_split(shapes / split, [(f"{i:03d}", {"jpg": image(i), "cls": b"%d" % (i % 3)}) for i in range(n)])
    (shapes / "classnames.txt").write_text("circle\nsquare\ntriangle\n")
    (shapes / "templates.txt").write_text("a photo of a {c}.\na drawing of a {c}.\n")
    captions = [{"jpg": image(i), "txt": f"picture {i}\nimage number {i}".encode()} for i in range(4)]
    write_split(root / "flickr" / "test", [(f"r{i}", c) for i, c in enumerate(captions)])
    return root


@pytest.mark.slow
def test_driver_writes_json_and_markdown(workdir, tmp_path):
    out = tmp_path / "results"
    records = evaluate(workdir / "ckpt", [workdir / "shapes", workdir / "flickr"],
                       ("zeroshot", "retrieval", "linear-probe"), out, batch_size=4, progress=False)
    assert [(r["dataset"], r["task"]) for r in records] == [
        ("shapes", "zeroshot_classification"), ("shapes", "linear_probe"), ("flickr", "zeroshot_retrieval")]
    files = sorted(p.name for p in out.iterdir())
    assert files == ["flickr_ckpt_zeroshot_retrieval.json", "results.md", "shapes_ckpt_linear_probe.json",
                     "shapes_ckpt_zeroshot_classification.json"]
    zs = json.loads((out / "shapes_ckpt_zeroshot_classification.json").read_text())
    assert set(zs) == {"dataset", "model", "pretrained", "task", "metrics", "language"}
    assert zs["model"] == "ckpt" and zs["pretrained"] == str(workdir / "ckpt")
    assert set(zs["metrics"]) == {"acc1", "acc5", "mean_per_class_recall"} and zs["metrics"]["acc5"] is None
    ret = json.loads((out / "flickr_ckpt_zeroshot_retrieval.json").read_text())["metrics"]
    assert set(ret) == {f"{d}_retrieval_recall@{k}" for d in ("image", "text") for k in (1, 5, 10)}
    assert ret["image_retrieval_recall@5"] == 1.0  # only 4 images: top 5 holds them all
    lp = json.loads((out / "shapes_ckpt_linear_probe.json").read_text())["metrics"]
    assert 0.0 <= lp["acc1"] <= 1.0 and lp["C"] > 0
    md = (out / "results.md").read_text()
    assert "## zeroshot_classification" in md and "| ckpt | shapes |" in md and "text_retrieval_recall@1" in md


def test_markdown_table_over_all_results():
    records = [{"dataset": "d", "model": "m", "task": "linear_probe", "metrics": {"acc1": 0.5, "C": 3.16}},
               {"dataset": "e", "model": "m", "task": "linear_probe", "metrics": {"acc1": 0.25, "C": 100.0}}]
    table = markdown_table(records)
    assert "| m | d | 50.00 | 3.16 |" in table and "| m | e | 25.00 | 100 |" in table


def _touch_checkpoint(folder, model=None):
    save_checkpoint(model or create_model("tiny"), folder)
    return folder


def test_default_model_name_names_the_checkpoint_picked(tmp_path):
    """Which checkpoint a CKPT folder means is clip_core.weights.resolve_checkpoint (tests/test_weights.py)."""
    run, out = tmp_path / "run", tmp_path / "out"
    assert default_model_name(run, run / "step_000010") == "run-step_000010"
    assert default_model_name(out, out / "ray" / "train" / "step_00000008") == "out-step_00000008"
    assert default_model_name(out, out / "model") == "out-model"


def test_weights_that_disagree_with_config(workdir, tmp_path):
    bad = _touch_checkpoint(tmp_path / "bad")
    config = json.loads((bad / "config.json").read_text())
    config["text_cfg"]["layers"] += 1
    (bad / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="model.safetensors does not match config.json.*missing keys"):
        evaluate(bad, [workdir / "shapes"], out_dir=tmp_path / "out")


def test_driver_input_errors(workdir, tmp_path):
    with pytest.raises(ValueError, match="unknown task"):
        evaluate(workdir / "ckpt", [workdir / "shapes"], ("zero-shot",), tmp_path)
    with pytest.raises(ValueError, match="no task among"):
        evaluate(workdir / "ckpt", [workdir / "shapes"], ("retrieval",), tmp_path)
    with pytest.raises(ValueError, match="2 dataset names for 1"):
        evaluate(workdir / "ckpt", [workdir / "shapes"], dataset_names=["a", "b"], out_dir=tmp_path)
    with pytest.raises(ValueError, match="no 'train' split for the linear probe"):
        evaluate(workdir / "ckpt", [_no_train(workdir, tmp_path)], ("linear-probe",), tmp_path)
    with pytest.raises(ValueError, match="share a name"):
        evaluate(workdir / "ckpt", [workdir / "shapes", _no_train(workdir, tmp_path)], out_dir=tmp_path,
                 dataset_names=["same"])


def _no_train(workdir, tmp_path):
    """The shapes set without its train split."""
    copy = tmp_path / "shapes-test-only"
    if not copy.exists():
        shutil.copytree(workdir / "shapes", copy, ignore=shutil.ignore_patterns("train"))
    return copy


def test_cli_handler(workdir, tmp_path, capsys):
    parser = add_evaluate_arguments(argparse.ArgumentParser(prog="clip-pipeline evaluate"))
    args = parser.parse_args([str(workdir / "ckpt"), str(workdir / "shapes"), "--task", "zeroshot",
                              "--out", str(tmp_path / "o"), "--batch-size", "3", "--dataset-name", "toy",
                              "--model-name", "tiny-test", "--no-progress"])
    assert args.handler is run_evaluate_command
    assert args.handler(args) == 0
    assert "| tiny-test | toy |" in capsys.readouterr().out
    assert (tmp_path / "o" / "toy_tiny-test_zeroshot_classification.json").is_file()


def test_mlflow_metric_names():
    from flows.evaluate import mlflow_metrics

    records = [{"dataset": "flickr", "task": "zeroshot_retrieval",
                "metrics": {"image_retrieval_recall@1": 0.5, "acc5": None, "bad": float("nan")}}]
    assert mlflow_metrics(records) == {"eval/flickr/zeroshot_retrieval/image_retrieval_recall_at_1": 0.5}


@pytest.mark.slow
def test_log_results_into_an_existing_run(tmp_path):
    from mlflow import MlflowClient

    from flows.evaluate import log_results_to_mlflow

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run_id = client.create_run(client.create_experiment("train")).info.run_id
    records = [{"dataset": "d", "model": "m", "task": "linear_probe", "metrics": {"acc1": 0.75, "C": 10.0}}]
    assert log_results_to_mlflow(records, tracking_uri=client.tracking_uri, run_id=run_id) == run_id
    assert client.get_run(run_id).data.metrics == {"eval/d/linear_probe/acc1": 0.75, "eval/d/linear_probe/C": 10.0}
    assert client.get_run(run_id).data.tags["eval.datasets"] == "d"
    with pytest.raises(InputError, match=r"--mlflow-run-id: MLflow at .* has no run 0123abc"):
        log_results_to_mlflow(records, tracking_uri=client.tracking_uri, run_id="0123abc")


def test_logging_to_a_tracking_server_that_is_down_warns_and_goes_on(tmp_path):
    """Before: MLflow's client raised (after its retries) and the evaluate flow failed with its results on disk."""
    from flows.common import free_port
    from flows.evaluate import log_results_to_mlflow

    records = [{"dataset": "d", "model": "m", "task": "linear_probe", "metrics": {"acc1": 0.75}}]
    (tmp_path / "results.md").write_text("# Evaluation results\n")
    down = f"http://127.0.0.1:{free_port()}"
    with pytest.warns(UserWarning, match=f"MLflow at {down} is unreachable; the results are on disk only"):
        assert log_results_to_mlflow(records, tmp_path, tracking_uri=down) is None
    with pytest.warns(UserWarning, match="unreachable"):
        assert log_results_to_mlflow(records, tmp_path, tracking_uri=down, run_id="abc") == "abc"


def _prefect_server_can_start() -> bool:
    """False where the `dataclasses` 0.6 backport sits beside prefect: its ephemeral server runs
    uvicorn with --app-dir on that folder, the backport shadows the stdlib and the server exits."""
    spec = importlib.util.find_spec("prefect")
    return spec is not None and not (Path(spec.origin).parents[1] / "dataclasses.py").exists()


@pytest.mark.slow
def test_flow_logs_to_mlflow(workdir, tmp_path, monkeypatch):
    assert _prefect_server_can_start(), "the dataclasses==0.6 backport breaks Prefect's server: `make setup` removes it"
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "prefect"))
    monkeypatch.setenv("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "")
    from prefect.testing.utilities import prefect_test_harness

    from flows.evaluate import evaluate as evaluate_flow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with prefect_test_harness():
        records = evaluate_flow(str(workdir / "ckpt"), [str(workdir / "flickr")], ["retrieval"],
                                str(tmp_path / "out"), batch_size=4, mlflow_uri=uri)
    assert records[0]["task"] == "zeroshot_retrieval"
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    run = client.search_runs([client.get_experiment_by_name("clip-eval").experiment_id])[0]
    assert run.data.metrics["eval/flickr/zeroshot_retrieval/image_retrieval_recall_at_5"] == 1.0
    assert {a.path for a in client.list_artifacts(run.info.run_id, "eval")} >= {"eval/results.md"}


# ----- issue 14: bad input is exit 2 with one line, before the model runs or anything is written -----

BAD_EVALUATE = [
    (["--batch-size", "0"], "--batch-size"),
    (["--batch-size", "-4"], "--batch-size"),
    (["--workers", "-1"], "--workers"),
    (["--device", "gpu"], "--device"),
    (["--device", "cuda:99"], "--device"),
]


@pytest.mark.parametrize("extra,named", BAD_EVALUATE, ids=[" ".join(e) for e, _ in BAD_EVALUATE])
def test_evaluate_refuses_bad_options(workdir, tmp_path, capsys, extra, named):
    from flows.cli import main
    out = tmp_path / "out"
    assert main(["evaluate", str(workdir / "ckpt"), str(workdir / "shapes"), "--out", str(out), *extra]) == 2
    err = capsys.readouterr().err
    assert named in err and len(err.strip().splitlines()) == 1 and not out.exists()


def test_evaluate_refuses_bad_folders_and_checkpoints(workdir, tmp_path, capsys):
    from flows.cli import main
    (tmp_path / "afile").write_text("mine")
    (tmp_path / "random.safetensors").write_bytes(os.urandom(3000))
    rand_dir = _touch_checkpoint(tmp_path / "randdir")
    (rand_dir / "model.safetensors").write_bytes(os.urandom(5000))
    (tmp_path / "not-a-pickle.pt").write_bytes(b"PK\x03\x04" + os.urandom(300))
    ckpt, shapes, out = str(workdir / "ckpt"), str(workdir / "shapes"), str(tmp_path / "out")
    cases = [
        ([ckpt, str(tmp_path / "noeval"), "--out", out], "noeval: no eval set folder"),
        ([ckpt, str(tmp_path / "afile"), "--out", out], "afile: is a file, not an eval set folder"),
        ([ckpt, shapes, "--out", str(tmp_path / "afile")], "--out"),
        ([ckpt, shapes, "--out", str(tmp_path / "afile" / "sub")], "--out"),
        ([str(tmp_path / "random.safetensors"), shapes, "--out", out], "random.safetensors"),
        ([str(rand_dir), shapes, "--out", out], "randdir"),
        ([str(tmp_path / "not-a-pickle.pt"), shapes, "--out", out], "not-a-pickle.pt"),
        ([str(tmp_path / "nockpt"), shapes, "--out", out], "nockpt"),
    ]
    for argv, named in cases:
        assert main(["evaluate", *argv]) == 2, argv
        err = capsys.readouterr().err
        assert named in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err, (argv, err)
    assert (tmp_path / "afile").read_text() == "mine" and not (tmp_path / "out").exists()


def test_evaluate_names_a_truncated_eval_shard(workdir, tmp_path):
    """Before: `split 'test' is empty (no samples)` for a set whose shard was cut after 3 samples."""
    cut = tmp_path / "cut"
    shutil.copytree(workdir / "shapes", cut)
    shard = cut / "test" / "000000.tar"
    with tarfile.open(shard) as tar:
        offset = tar.getmembers()[8].offset  # the header of sample 4's first member
    shard.write_bytes(shard.read_bytes()[:offset])
    with pytest.raises(ValueError, match=r"cut/test/000000.tar: shard is truncated after 3 complete samples"):
        evaluate(workdir / "ckpt", [cut], out_dir=tmp_path / "out", batch_size=64, progress=False)
    assert not (tmp_path / "out").exists()
