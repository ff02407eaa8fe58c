"""The demo DAG end to end at a small size, and its MLflow runs read back through the REST API."""
import json
import os
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
from conftest import wait_until_answering

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
