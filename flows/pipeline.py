"""The `train`, `overlap-analysis` and `clip-pipeline` flows (the whole DAG of DESIGN.md).

`clip-pipeline` = build-corpus -> train -> evaluate -> overlap-analysis, each a subflow, all
under one MLflow parent run per pipeline run with a child run per stage.
"""
from __future__ import annotations

import functools
from typing import TYPE_CHECKING

from prefect import flow, get_run_logger

from flows.build_corpus import CorpusConfig, build_corpus, web_eval_dirs
from flows.common import check_ray_address, join
from flows.evaluate import evaluate
from flows.lineage import corpus_dataset
from flows.pipeline_runs import EXPERIMENT, log_stage, start_child, start_parent, tracking_uri

if TYPE_CHECKING:  # flows.train loads Ray: only when the train flow runs
    from flows.train import TrainSummary


@flow(name="train", log_prints=True)
def train_model(corpus: str, output: str, preset: str = "tiny", steps: int = 300, batch_size: int = 64,
                lr: float = 1e-3, warmup: int = 30, image_size: int | None = None, context_length: int | None = None,
                workers: int = 2, cpus_per_worker: float = 0.5,
                gpus_per_worker: float = 0.0,
                data_workers: int = 1, precision: str = "auto",
                exclude: str | None = None, eval_dirs: list[str] | None = None, mlflow_uri: str | None = None,
                checkpoint_every: int = 50, max_failures: int = 2, seed: int = 0,
                mlflow_parent_run_id: str | None = None,
                experiment: str = "clip", ray_address: str | None = None, run_name: str = "clip-train") -> TrainSummary:
    """Ray Train contrastive training of `preset` on the corpus shards; returns the summary.

    An `exclude` file is passed on as given: one that does not exist is refused before training
    starts (training on the samples it should leave out would be a silent mistake). `ray_address`
    None: RAY_ADDRESS, else a local cluster on 127.0.0.1.
    """
    from clip_core.train.config import TrainConfig
    from flows.train import RunSettings, train

    config = TrainConfig(corpus=corpus, preset=preset, steps=steps, batch_size=batch_size, lr=lr, warmup=warmup,
                         image_size=image_size, context_length=context_length, data_workers=data_workers,
                         precision=precision, seed=seed, exclude=exclude, eval=tuple(eval_dirs or ()))
    run = RunSettings(output=output, workers=workers, cpus_per_worker=cpus_per_worker,
                      gpus_per_worker=gpus_per_worker, checkpoint_every=checkpoint_every, max_failures=max_failures,
                      mlflow_uri=mlflow_uri, experiment=experiment, mlflow_parent_run_id=mlflow_parent_run_id,
                      ray_address=ray_address or None, name=run_name)
    return train(config, run)


@flow(name="overlap-analysis", log_prints=True)
def overlap_analysis(checkpoint: str, eval_dirs: list[str], matches: str, out_dir: str) -> list[dict]:
    """CLIP Sec. 5: zero-shot accuracy on All / Clean / Overlap per eval set."""
    from dataclasses import asdict

    from dedup.analysis import run_overlap_analysis

    return [asdict(s) for s in run_overlap_analysis(checkpoint, eval_dirs, matches, out_dir)]


@flow(name="clip-pipeline", log_prints=True)
def clip_pipeline(storage: str = "runs/demo", web_pairs: int = 8_000, max_per_query: int = 500, steps: int = 260,
                  batch_size: int = 256, lr: float = 2e-3, warmup: int = 30, workers: int = 2,
                  preset: str = "tiny-rn", image_size: int | None = 32, context_length: int | None = 32, seed: int = 0,
                  ray_address: str | None = None) -> dict:
    """The whole DAG on the embedded default: corpus, training, evaluation, overlap analysis.

    ray_address ("auto" or HOST:PORT) sends the corpus stages and the training to that cluster;
    None: local executors for the corpus, and RAY_ADDRESS or a local Ray for the training.
    """
    ray_address = (ray_address or "").strip() or None  # an unset Prefect variable renders as ""
    if ray_address:  # before the MLflow parent run: a wrong address leaves nothing behind
        check_ray_address("clip-pipeline ray_address", ray_address)
    log = get_run_logger()
    uri = tracking_uri(storage)
    parent = start_parent(uri, "clip-pipeline", {"storage": storage, "web_pairs": web_pairs, "steps": steps,
                                                 "batch_size": batch_size, "lr": lr, "warmup": warmup,
                                                 "image_size": image_size, "context_length": context_length,
                                                 "max_per_query": max_per_query, "preset": preset, "seed": seed})
    cfg = CorpusConfig(storage=storage, web_pairs=web_pairs, max_per_query=max_per_query, seed=seed,
                       ray_address=ray_address)
    corpus = build_corpus(cfg, mlflow_uri=uri, parent_run_id=parent.run_id)
    parent.log_inputs([(functools.partial(corpus_dataset, corpus["shards"]), "training")])  # the runs table's Dataset
    evals = corpus["eval_dirs"] or web_eval_dirs(corpus["web"])
    matches = join(corpus["dedup"], "matches.parquet") if corpus["dedup"] else None
    output = join(storage, "train")
    summary = train_model(corpus["shards"], output, preset=preset, steps=steps, batch_size=batch_size, lr=lr,
                          warmup=warmup, image_size=image_size, context_length=context_length, workers=workers,
                          exclude=matches, mlflow_uri=uri, seed=seed,
                          mlflow_parent_run_id=parent.run_id, experiment=EXPERIMENT, ray_address=ray_address)
    child = start_child(parent, "evaluate", {"checkpoint": output})
    records = evaluate(output, evals, ["zeroshot", "retrieval"], join(storage, "eval"), mlflow_uri=uri,
                       mlflow_run_id=child.run_id)
    child.end()
    classification = [d for d in evals if not d.rstrip("/").endswith("retrieval")]
    overlap = overlap_analysis(output, classification, matches, join(storage, "overlap")) if matches else []
    log_stage(parent, "overlap", {"checkpoint": output},
              {f"overlap/{o['eval_set']}/overlap_pct": o["overlap_pct"] for o in overlap},
              [join(storage, "overlap", "overlap.md"), join(storage, "overlap", "overlap.png")])
    parent.end()
    log.info("pipeline done under %s", storage)
    return {"corpus": corpus, "train": summary, "eval": records, "overlap": overlap}
