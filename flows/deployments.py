"""Serve every deployment of the pipeline on the Prefect server at PREFECT_API_URL.

`python -m flows.deployments` registers build-corpus/default, train/default,
evaluate/default, overlap-analysis/default, clip-pipeline/default and compare/default, all on the embedded
default (the synthetic web, local Ray, SQLite MLflow, local disk under runs/demo, or
$CLIP_PIPELINE_DEMO_DIR), and runs
their flow runs in subprocesses until stopped. `--check` exits 0 once all are registered.
`--ray-address ADDR` ("auto" or HOST:PORT) makes build-corpus/default and clip-pipeline/default
send every stage to that Ray cluster, and train/default and compare/default train there (their `ray_address`
parameter, which a run can also override: `--param`/`--params` of `prefect deployment run`).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import os

ROOT = Path(__file__).resolve().parents[1]
DEMO = Path(os.environ.get("CLIP_PIPELINE_DEMO_DIR", ROOT / "runs" / "demo")).resolve()
NAMES = ("build-corpus", "train", "evaluate", "overlap-analysis", "clip-pipeline", "compare")


def deployments(ray_address: str | None = None) -> list:
    """RunnerDeployments named `default`, with parameters on the embedded default (on ray_address's cluster)."""
    from flows.build_corpus import CorpusConfig, build_corpus, web_eval_dirs
    from flows.compare import compare
    from flows.evaluate import evaluate
    from flows.pipeline import clip_pipeline, overlap_analysis, train_model

    storage = str(DEMO)
    evals = web_eval_dirs(str(DEMO / "web"))
    return [
        build_corpus.to_deployment(name="default", parameters={
            "cfg": CorpusConfig(storage=storage, ray_address=ray_address).model_dump()}),
        train_model.to_deployment(name="default", parameters={"corpus": str(DEMO / "shards"),
                                                              "output": str(DEMO / "train"),
                                                              "exclude": str(DEMO / "dedup" / "matches.parquet"),
                                                              "ray_address": ray_address}),
        evaluate.to_deployment(name="default", parameters={"checkpoint": str(DEMO / "train"), "eval_dirs": evals,
                                                           "out_dir": str(DEMO / "eval")}),
        overlap_analysis.to_deployment(name="default", parameters={
            "checkpoint": str(DEMO / "train"), "eval_dirs": evals[:-1],
            "matches": str(DEMO / "dedup" / "matches.parquet"), "out_dir": str(DEMO / "overlap")}),
        clip_pipeline.to_deployment(name="default", parameters={"storage": storage, "ray_address": ray_address}),
        compare.to_deployment(name="default", parameters={"storage": storage, "ray_address": ray_address}),
    ]


def registered() -> bool:
    """Whether every deployment exists on the server."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        names = {f"{client.read_flow(d.flow_id).name}/{d.name}" for d in client.read_deployments()}
    return all(f"{name}/default" in names for name in NAMES)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 0 when every deployment is registered")
    parser.add_argument("--ray-address", metavar="ADDR", default=None,
                        help='Ray cluster ("auto" or HOST:PORT) for build-corpus, train and clip-pipeline; '
                             "default: local executors")
    args = parser.parse_args(argv)
    if args.check:
        return 0 if registered() else 1
    from prefect import serve

    serve(*deployments(args.ray_address), pause_on_shutdown=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
