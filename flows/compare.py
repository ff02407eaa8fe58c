"""`clip-pipeline compare` / `make compare`: small training variants side by side in MLflow.

On the demo's corpus (built first when it is missing), one training per value of one recipe
setting (default: the batch size, 64 against 256), each evaluated zero-shot and by retrieval
into its own training run, all nested under one `compare` parent run in the demo's
experiment. The MLflow compare view then lines up the loss curves and the accuracies per eval
set; the command prints the table and the compare view's address.

Why batch size by default: the contrastive loss scores each image against the other captions
of its batch. At 64 the synthetic web's colour and count alone tell almost every image from
the rest, and the model learns colour only; at 256 many images share both, so shape pays.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import urllib.parse

from prefect import flow

from clip_core.errors import InputError, check
from flows.common import check_ray_address, exists, join
from flows.lineage import corpus_dataset

VARIED = {"batch_size": int, "lr": float, "steps": int, "warmup": int, "seed": int, "preset": str,
          "image_size": int, "context_length": int}  # the training settings a variant may change
DEFAULT_VARY = "batch_size=64,256"


def parse_vary(text: str) -> tuple[str, list]:
    """"NAME=V1,V2[,...]" -> (NAME, [V1, V2, ...]) typed; InputError for anything else."""
    name, _, values = text.partition("=")
    name = name.strip().replace("-", "_")
    check(name in VARIED, "--vary", f"cannot vary {name!r}", f"one of {', '.join(VARIED)}")
    try:
        parsed = [VARIED[name](v.strip()) for v in values.split(",") if v.strip()]
    except ValueError as err:
        raise InputError("--vary", f"{text!r}: {err}", f"{name} takes {VARIED[name].__name__} values") from None
    check(len(parsed) >= 2 and len(set(parsed)) == len(parsed), "--vary", f"{text!r} names fewer than two "
          "different values", "give two or three, e.g. batch_size=64,256")
    return name, parsed


def compare_url(ui: str, experiment_id: str, run_ids: list[str]) -> str:
    """The MLflow UI's compare view of the runs (Model training view)."""
    query = urllib.parse.urlencode({"runs": json.dumps(run_ids, separators=(",", ":")),
                                   "experiments": json.dumps([experiment_id], separators=(",", ":"))})
    return f"{ui.rstrip('/')}/#/compare-runs?{query}&workflowType=machine_learning"


def ensure_corpus(storage: str, recipe: dict) -> dict:
    """The demo corpus under storage: its URIs, built (by build-corpus) only when it is missing."""
    from flows.build_corpus import CorpusConfig, build_corpus, web_eval_dirs

    web, shards, dedup = join(storage, "web"), join(storage, "shards"), join(storage, "dedup")
    if exists(join(shards, "crawl_stats.json")) and exists(join(dedup, "dedup_stats.json")):
        return {"shards": shards, "dedup": dedup, "eval_dirs": web_eval_dirs(web)}
    cfg = CorpusConfig(storage=storage, web_pairs=recipe["web_pairs"], max_per_query=recipe["max_per_query"],
                       seed=recipe["seed"], ray_address=recipe["ray_address"])
    return build_corpus(cfg)


@flow(name="compare", log_prints=True)
def compare(storage: str = "runs/demo", vary: str = DEFAULT_VARY, steps: int = 260, batch_size: int = 256,
            lr: float = 2e-3, warmup: int = 30, preset: str = "tiny-rn", image_size: int | None = 32,
            context_length: int | None = 32, workers: int = 2, seed: int = 0, web_pairs: int = 8_000,
            max_per_query: int = 500, ray_address: str | None = None) -> dict:
    """One training + evaluation per value of `vary`, nested under a `compare` MLflow run; the runs' ids.
    ray_address: the cluster the trainings (and a missing corpus's stages) run on; None: RAY_ADDRESS or local."""
    from flows.evaluate import evaluate
    from flows.pipeline import train_model
    from flows.pipeline_runs import EXPERIMENT, start_parent, tracking_uri

    name, values = parse_vary(vary)
    recipe = {"steps": steps, "batch_size": batch_size, "lr": lr, "warmup": warmup, "preset": preset,
              "image_size": image_size, "context_length": context_length, "seed": seed}
    ray_address = (ray_address or "").strip() or None  # an unset Prefect variable renders as ""
    corpus = ensure_corpus(storage, {"web_pairs": web_pairs, "max_per_query": max_per_query, "seed": seed,
                                     "ray_address": ray_address})
    uri = tracking_uri(storage)
    parent = start_parent(uri, f"compare {name}", {**recipe, "vary": vary, "storage": storage})
    parent.set_tags({"kind": "compare", "compare.setting": name})
    parent.log_inputs([(functools.partial(corpus_dataset, corpus["shards"]), "training")])  # its Dataset column
    variants = []
    for value in values:
        label = f"{name}={value}"
        output = join(storage, "compare", label.replace("=", "-"))
        summary = train_model(corpus["shards"], output, **(recipe | {name: value}), workers=workers,
                              exclude=join(corpus["dedup"], "matches.parquet"), mlflow_uri=uri,
                              mlflow_parent_run_id=parent.run_id, experiment=EXPERIMENT, run_name=label,
                              ray_address=ray_address)
        records = evaluate(output, corpus["eval_dirs"], ["zeroshot", "retrieval"], join(output, "eval"),
                           mlflow_uri=uri, mlflow_run_id=summary.mlflow_run_id)
        variants.append({"variant": label, "run_id": summary.mlflow_run_id, "final_loss": summary.final_loss,
                         "metrics": {r["dataset"]: r["metrics"] for r in records}})
    parent.end()
    experiment = parent.client.get_run(parent.run_id).info.experiment_id if parent.live else None
    return {"setting": name, "variants": variants, "experiment_id": experiment, "parent_run_id": parent.run_id}


def summary_table(result: dict) -> str:
    """Variant, final loss and the headline metric per eval set, as aligned text."""
    sets = sorted({s for v in result["variants"] for s in v["metrics"]})
    header = ["variant", "final loss", *sets]
    rows = [[v["variant"], f"{v['final_loss']:.3f}" if v["final_loss"] is not None else "-",
             *(_headline(v["metrics"].get(s, {})) for s in sets)] for v in result["variants"]]
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(r, widths)) for r in [header, *rows])


def _headline(metrics: dict) -> str:
    if "acc1" in metrics:
        return f"{metrics['acc1']:.1%}"
    if "image_retrieval_recall@1" in metrics:
        return f"R@1 {metrics['image_retrieval_recall@1']:.1%}"
    return "-"


def add_compare_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--storage", default="runs/demo", help="the demo's storage: its corpus and MLflow store "
                        "(the corpus is built first when missing)")
    parser.add_argument("--vary", default=DEFAULT_VARY,
                        help=f"NAME=V1,V2[,V3]: the training setting to vary (default {DEFAULT_VARY}); "
                             f"one of {', '.join(VARIED)}")
    parser.add_argument("--steps", type=int, default=260, help="training steps of every variant")
    parser.add_argument("--batch-size", type=int, default=256, help="global batch size where not varied")
    parser.add_argument("--lr", type=float, default=2e-3, help="peak learning rate where not varied")
    parser.add_argument("--preset", default="tiny-rn", help="model preset where not varied")
    parser.add_argument("--workers", type=int, default=2, help="Ray Train workers")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ray-address", default=None, help="Ray cluster for the trainings (default RAY_ADDRESS, "
                        "else a local one)")
    tracking = os.environ.get("MLFLOW_TRACKING_URI", "")
    parser.add_argument("--ui", default=tracking if tracking.startswith(("http://", "https://")) else
                        "http://127.0.0.1:5000", help="the MLflow UI the printed link points at (default: "
                        "MLFLOW_TRACKING_URI when it is a server, else make mlflow-ui's address)")
    parser.set_defaults(handler=run_compare_command)


def run_compare_command(args: argparse.Namespace) -> int:
    parse_vary(args.vary)  # bad input: before any corpus or training starts
    if args.ray_address:
        check_ray_address("--ray-address", args.ray_address)
    result = compare(storage=args.storage, vary=args.vary, steps=args.steps, batch_size=args.batch_size,
                     lr=args.lr, preset=args.preset, workers=args.workers, seed=args.seed,
                     ray_address=args.ray_address)
    print(summary_table(result))
    if result["experiment_id"]:
        ids = [v["run_id"] for v in result["variants"] if v["run_id"]]
        print(f"compare them in the MLflow UI (make mlflow-ui): {compare_url(args.ui, result['experiment_id'], ids)}")
    return 0
