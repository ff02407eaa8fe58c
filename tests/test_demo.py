"""The demo DAG end to end at a small size, and its MLflow runs read back through the REST API."""
import json
import os
import re
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
from conftest import browse, chromium, wait_until_answering

from flows.common import free_port

CLI = str(Path(sys.executable).parent / "clip-pipeline")
MLFLOW = str(Path(sys.executable).parent / "mlflow")


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    env = {**os.environ, "PREFECT_HOME": str(root / "prefect"), "MLFLOW_TRACKING_URI": ""}
    env.pop("MLFLOW_TRACKING_URI")
    out = subprocess.run([CLI, "demo", "--storage", str(root / "run"), "--pairs", "500", "--steps", "12",
                          "--batch-size", "16", "--max-per-query", "100"],
                         env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-5000:]
    return root / "run", out.stdout


@pytest.mark.slow
def test_demo_runs_every_stage_and_prints_the_summary(demo):
    run, stdout = demo
    for path in ("web/web.json", "queries.parquet", "curated/curation_stats.json", "curated/curation_counts.png",
                 "shards/crawl_stats.json", "dedup/dedup_stats.json", "dedup/matches.parquet",
                 "train/model/model.safetensors", "eval/results.md", "overlap/overlap.md", "overlap/overlap.json"):
        assert (run / path).exists(), path
    assert "corpus:" in stdout and "dedup:" in stdout and "make mlflow-ui" in stdout
    assert "training: 12 steps, final loss " in stdout  # from the train flow's TrainSummary
    assert "shapes" in stdout and "| shapes" in stdout  # accuracy line and overlap table row
    assert "(chance 12.5%)" in stdout  # the shapes line: 8 classes
    stats = json.loads((run / "dedup" / "dedup_stats.json").read_text())
    assert stats["removed"] > 0  # the web plants copies of eval images: some reach the corpus
    card = (run / "shards" / "data_card.html").read_text()
    saved = json.loads((run / "shards" / "crawl_stats.json").read_text())["success"]
    assert f"<td>downloaded</td><td class=\"n\">{saved:,}</td>" in card and "<td>shapes</td>" in card


def _get(url: str, body: dict) -> dict:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


@pytest.mark.slow
def test_mlflow_rest_api_shows_parent_and_stage_runs(demo):
    run, _ = demo
    port = free_port()
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    server = subprocess.Popen([MLFLOW, "server", "--host", "127.0.0.1", "--port", str(port),
                               "--backend-store-uri", f"sqlite:///{run / 'mlflow.db'}"],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    base = f"http://127.0.0.1:{port}/api/2.0/mlflow"
    try:
        wait_until_answering(f"http://127.0.0.1:{port}/health", server)
        experiments = _get(f"{base}/experiments/search", {"max_results": 100})["experiments"]
        ids = [e["experiment_id"] for e in experiments]
        runs = _get(f"{base}/runs/search", {"experiment_ids": ids, "max_results": 1000})["runs"]
        pipeline = next(r["info"]["run_id"] for r in runs if r["info"]["run_name"] == "clip-pipeline")
        with urllib.request.urlopen(f"{base}/artifacts/list?run_id={pipeline}", timeout=30) as response:
            logged = {f["path"] for f in json.loads(response.read()).get("files", [])}
    finally:
        os.killpg(server.pid, 15)
        server.wait(timeout=30)
    kinds = {e["name"]: {t["key"]: t["value"] for t in e.get("tags", [])}.get("mlflow.experimentKind")
             for e in experiments if e["name"] != "Default"}  # MLflow's own empty experiment
    assert kinds and set(kinds.values()) == {"custom_model_development"}, kinds  # the UI opens on the runs
    tags = [{t["key"]: t["value"] for t in r["data"].get("tags", [])} for r in runs]
    parents = [r for r, t in zip(runs, tags) if t.get("kind") == "pipeline"]
    children = {t.get("stage") for t in tags if "mlflow.parentRunId" in t}
    assert parents and {"curate", "crawl", "dedup"} <= children
    assert "data_card.html" in logged  # the corpus' data card on the pipeline run
    metric_names = {m["key"] for r in runs for m in r["data"].get("metrics", [])}
    assert {"crawl/success_rate", "curate/kept", "dedup/removed"} <= metric_names
    assert any(name.startswith("loss") or name == "train/loss" for name in metric_names)
    # lineage (issue 20 item 2): which data made the model, from the runs alone
    inputs = {t.get("stage"): [(i["dataset"]["name"], i["dataset"]["digest"], json.loads(i["dataset"]["profile"]),
                                {x["key"]: x["value"] for x in i.get("tags", [])}["mlflow.data.context"])
                               for i in r.get("inputs", {}).get("dataset_inputs", [])]
              for r, t in zip(runs, tags) if t.get("stage")}
    train_tags = next(t for t in tags if t.get("stage") == "train")
    (corpus,) = [i for i in inputs["train"] if i[0] == "corpus"]
    saved = json.loads((run / "shards" / "crawl_stats.json").read_text())["success"]
    assert corpus[1] == train_tags["corpus.digest"] and corpus[3] == "training" and corpus[2]["num_rows"] == saved
    assert {n for n, *_ in inputs["evaluate"]} >= {"eval/shapes", "eval/colors", "eval/retrieval"}
    assert {n for n, *_ in inputs["dedup"]} >= {"corpus", "eval/shapes"} and inputs["crawl"][0][0] == "curated-pairs"
    assert next(i for i in inputs["dedup"] if i[0] == "corpus")[1] == corpus[1]  # the corpus dedup read trained it


@pytest.fixture(scope="module")
def compared(demo):
    """`clip-pipeline compare` on the demo's corpus: two batch sizes, 3 steps each on one Ray Train worker."""
    run, _ = demo
    crawled = (run / "shards" / "crawl_stats.json").stat().st_mtime_ns
    env = {**os.environ, "PREFECT_HOME": str(run.parent / "prefect")}
    env.pop("MLFLOW_TRACKING_URI", None)
    out = subprocess.run([CLI, "compare", "--storage", str(run), "--vary", "batch_size=8,16", "--steps", "3",
                          "--workers", "1"],
                         env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-5000:]
    assert (run / "shards" / "crawl_stats.json").stat().st_mtime_ns == crawled  # the demo's corpus, not a new one
    return out.stdout


@pytest.mark.slow
def test_compare_trains_one_nested_run_per_value(demo, compared):
    import mlflow

    run, _ = demo
    client = mlflow.MlflowClient(f"sqlite:///{run / 'mlflow.db'}")
    (parent,) = client.search_runs([e.experiment_id for e in client.search_experiments()], "tags.kind = 'compare'")
    children = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert sorted(r.info.run_name for r in children) == ["batch_size=16", "batch_size=8"]
    for child in children:
        assert child.data.params["batch_size"] == child.info.run_name.split("=")[1]  # the one value varied
        assert child.data.params["steps"] == "3" and child.data.tags["stage"] == "train"
        assert "loss" in child.data.metrics and "eval/shapes/zeroshot_classification/acc1" in child.data.metrics
        assert [i.dataset.name for i in child.inputs.dataset_inputs if i.dataset.name == "corpus"]
    assert "batch_size=8" in compared and "/#/compare-runs?runs=" in compared


@pytest.mark.slow
def test_a_real_browser_finds_the_runs_their_datasets_and_zero_shot_metrics(demo, compared, tmp_path):
    """Issue 20 item 6: the MLflow UI on the demo's store, in Debian's chromium, headless."""
    browser = chromium()
    run, _ = demo
    port = free_port()
    server = subprocess.Popen([MLFLOW, "server", "--host", "127.0.0.1", "--port", str(port),
                               "--backend-store-uri", f"sqlite:///{run / 'mlflow.db'}"],
                              env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    ui = f"http://127.0.0.1:{port}"
    try:
        wait_until_answering(f"{ui}/health", server)
        runs = _get(f"{ui}/api/2.0/mlflow/runs/search", {"experiment_ids": ["1"], "max_results": 1000})["runs"]
        by_stage = {({t["key"]: t["value"] for t in r["data"]["tags"]}).get("stage"): r["info"]["run_id"]
                    for r in runs if r["info"]["run_name"] in ("clip-train", "evaluate")}
        ml = "workflowType=machine_learning"  # the Model training view
        table = browse(browser, f"{ui}/#/experiments/1/runs?{ml}", tmp_path / "runs.png",
                        ["clip-pipeline", "compare batch_size", "corpus"])
        train = browse(browser, f"{ui}/#/experiments/1/runs/{by_stage['train']}?{ml}", tmp_path / "train.png",
                        ["Datasets", "corpus"])
        evaluate = browse(browser, f"{ui}/#/experiments/1/runs/{by_stage['evaluate']}?{ml}", tmp_path / "eval.png",
                           ["eval/shapes/zeroshot_classification/acc1"])
        compare_link = re.search(r"(/#/compare-runs\?\S+)", compared).group(1)
        side_by_side = browse(browser, ui + compare_link, tmp_path / "compare.png", ["Comparing 2 Runs"])
    finally:
        os.killpg(server.pid, 15)
        server.wait(timeout=30)
    for page in (table, train, evaluate, side_by_side):  # the Model training view, not GenAI's
        assert "Model registry" in page and "Judges" not in page
    assert "Dataset" in table  # the runs table, with its Dataset column
    assert "clip-pipeline" in table and "compare batch_size" in table and "corpus" in table
    assert "Datasets" in train and "corpus" in train and "training" in train  # which data made the model
    accuracy = json.loads(next((run / "eval").glob("*shapes*zeroshot*.json")).read_text())["metrics"]["acc1"]
    assert re.search(rf"eval/shapes/zeroshot_classification/acc1 {re.escape(str(accuracy)[:4])}", evaluate)
    assert "batch_size=8" in side_by_side and "batch_size=16" in side_by_side
    card = browse(browser, (run / "shards" / "data_card.html").as_uri(), tmp_path / "card.png",
                   ["Counts at each stage"])
    assert "Counts at each stage" in card and "Samples" in card and "Dedup against the eval sets" in card


def _demo_defaults() -> dict:
    import argparse

    from flows.demo import add_demo_arguments

    parser = argparse.ArgumentParser()
    add_demo_arguments(parser)
    return vars(parser.parse_args([]))


def test_demo_defaults_are_the_pipeline_defaults():
    """`clip-pipeline demo` and the clip-pipeline flow (its Prefect deployment) run one recipe."""
    import inspect

    from flows.pipeline import clip_pipeline

    flow_defaults = {name: p.default for name, p in inspect.signature(clip_pipeline.fn).parameters.items()}
    demo = _demo_defaults()
    renamed = {"pairs": "web_pairs"}
    for option in ("storage", "pairs", "max_per_query", "preset", "image_size", "context_length", "steps",
                   "batch_size", "lr", "warmup", "workers", "seed"):
        assert demo[option] == flow_defaults[renamed.get(option, option)], option


def test_demo_recipe_is_a_valid_training_config():
    """The demo's preset exists and its global batch splits evenly over its Ray workers."""
    from clip_core.train.config import TrainConfig

    demo = _demo_defaults()
    cfg = TrainConfig(preset=demo["preset"], image_size=demo["image_size"], context_length=demo["context_length"],
                      steps=demo["steps"], batch_size=demo["batch_size"], lr=demo["lr"], warmup=demo["warmup"])
    cfg.check_workers(demo["workers"])  # raises InputError otherwise
    assert 0 < cfg.warmup < cfg.total_steps


def test_chance_accuracies_are_one_over_the_class_count(tmp_path):
    from flows.demo import chance_accuracies

    for name, n in (("shapes", 8), ("digits", 10)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "classnames.txt").write_text("".join(f"class{i}\n" for i in range(n)))
    (tmp_path / "retrieval").mkdir()  # no class names: no chance level
    dirs = [str(tmp_path / n) for n in ("shapes", "digits", "retrieval")]
    assert chance_accuracies(dirs) == {"shapes": 1 / 8, "digits": 1 / 10}
