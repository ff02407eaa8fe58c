"""The `build-corpus` flow: queries -> curate -> crawl -> dedup (DESIGN.md, the DAG).

Each task is a few lines: URIs in, one library call, URIs out. A stage whose marker (the
stats JSON it writes last) exists is skipped, so a re-run redoes only what is missing; the
report reads each stage's typed stats back from its folder (`CurationStats.read(OUT)`, ...).
With no sources given, the flow builds on the embedded default: the synthetic web,
generated under the storage URI and served on 127.0.0.1 by the flow itself.

`ray_address` sends the stages to a Ray cluster: one RayExecutor, opened once per flow run and
shut down at its end, maps every stage's shards (extract, queries, curate, crawl, dedup) as Ray tasks
over the nodes, while each stage stays a Prefect task with its retries, artifacts and MLflow
run. prefect-ray's RayTaskRunner is not used: it would place a whole Prefect task on one Ray
worker, and the stages already spread their own shards over every node (and the stages run one
after another, so there is nothing for a task runner to run side by side). The synthetic web is
served on the flow's 127.0.0.1: on a cluster of several machines, give real sources.
"""
from __future__ import annotations

import contextlib
import functools
import os

from prefect import flow, get_run_logger, task
from pydantic import BaseModel, Field, field_validator

from flows.common import (check_ray_address, exists, free_port, join, markdown_artifact, retry_unless_bad_input,
                          table_artifact)
from flows.data_card import CARD_NAME, write_data_card_apart
from flows.pipeline_runs import log_stage, start_parent, tracking_uri
from flows.tracking import Tracker

WORDNET = "/usr/share/wordnet"


class CorpusConfig(BaseModel):
    """Parameters of build-corpus; every URI may be a local path or s3://."""

    storage: str = Field("runs/demo", description="root URI every stage writes under")
    pairs: list[str] = Field(default_factory=list, description="candidate pairs Parquet; empty: the synthetic web")
    wat: list[str] = Field(default_factory=list, description="Common Crawl WAT files to extract pairs from")
    web_pairs: int = Field(3000, description="size of the synthetic web when it is the source")
    web_image_size: int = 64
    eval_size: int = Field(100, description="images per split of the synthetic eval sets")
    seed: int = 0
    query_corpus: list[str] = Field(default_factory=list, description="text for the query list; empty: the captions")
    text_column: str = "caption"
    min_count: int = Field(5, description="unigram count threshold (WIT: 100 on Wikipedia)")
    min_pmi: float = 8.0
    wordnet: str | None = Field(WORDNET if os.path.isdir(WORDNET) else None, description="WordNet 3.0 folder")
    queries: str | None = Field(None, description="a ready query list; skips the queries stage")
    max_per_query: int = Field(20000, description="t: at most this many pairs per query")
    target_size: int | None = None
    curate_shard_rows: int = Field(250_000, description="candidate rows per curate task")
    eval_dirs: list[str] = Field(default_factory=list, description="eval sets to dedup against; empty: the web's")
    allow_networks: list[str] = Field(default_factory=lambda: ["127.0.0.1/32"])
    image_size: int = 64
    processes: int = 1
    threads: int = 16
    timeout: int = 10
    samples_per_shard: int = Field(10_000, description="images per corpus shard (a crawl and a dedup task each)")
    user_agent: str | None = Field(None, description="the crawler's User-Agent; null: clip-pipeline-crawler's")
    per_host_rps: float | None = Field(None, description="request starts per second per host; null: 2.0, "
                                                         "or no limit on the synthetic web (ours)")
    per_host_concurrency: int | None = Field(None, description="requests in flight per host; null: 2, "
                                                                "or no limit on the synthetic web")
    descriptor: str = "default"
    precision: float = 0.99
    dedup_within: bool = Field(False, description="dedup also removes copies inside the corpus (exact bytes, "
                                                  "near pHash), one of each group kept")
    ray_address: str | None = Field(None, description='Ray cluster for every stage ("auto" or HOST:PORT); '
                                                      "null or empty: local executors")

    @field_validator("ray_address")
    @classmethod
    def _blank_is_local(cls, address: str | None) -> str | None:
        return (address or "").strip() or None  # an unset Prefect variable renders as ""


@task
def synthetic_web(cfg: CorpusConfig) -> str:
    from synthweb.generator import generate_web

    root = join(cfg.storage, "web")
    if not exists(join(root, "web.json")):
        generate_web(root, n_pairs=cfg.web_pairs, seed=cfg.seed, image_size=cfg.web_image_size,
                     base_url=f"http://127.0.0.1:{free_port()}", eval_sizes=cfg.eval_size)
    return root


@task(retries=2, retry_delay_seconds=5, retry_condition_fn=retry_unless_bad_input)
def extract_pairs(wat: list[str], out: str, executor=None) -> str:
    from clip_core.extract import extract

    if not exists(join(out, "extract_stats.json")):
        extract(wat, out, executor=executor)
    return out


@task
def build_query_list(cfg: CorpusConfig, corpus: list[str], out: str, executor=None) -> str:
    from clip_core.curation.queries import build_queries

    if not exists(out):
        build_queries(corpus, out, min_count=cfg.min_count, min_pmi=cfg.min_pmi,
                      wordnet_dir=cfg.wordnet, text_column=cfg.text_column, executor=executor)
    return out


@task
def curate_pairs(cfg: CorpusConfig, pairs: list[str], queries: str, out: str, executor=None) -> str:
    from clip_core.curation.curate import curate

    if not exists(join(out, "curation_stats.json")):
        curate(pairs, queries, out, max_per_query=cfg.max_per_query, target_size=cfg.target_size, seed=cfg.seed,
               shard_rows=cfg.curate_shard_rows, executor=executor)
    return out


@task(retries=2, retry_delay_seconds=5, retry_condition_fn=retry_unless_bad_input)
def crawl_pairs(cfg: CorpusConfig, curated: str, out: str, web: str | None, executor=None) -> str:
    from clip_core.crawl import CrawlStats, crawl

    if exists(join(out, "crawl_stats.json")) and not CrawlStats.read(out).incomplete_shards:
        return out
    with serving(web):  # a retry resumes: finished shards are kept, unfinished ones fetched again
        stats = crawl(curated, out, image_size=cfg.image_size, processes=cfg.processes, threads=cfg.threads,
                      number_sample_per_shard=cfg.samples_per_shard, allow_networks=cfg.allow_networks,
                      timeout=cfg.timeout, executor=executor, **crawl_manners(cfg, ours=web is not None))
    if stats.incomplete_shards:
        raise RuntimeError(f"crawl left {stats.incomplete_shards} incomplete shard(s) in {out}")
    return out


def crawl_manners(cfg: CorpusConfig, ours: bool) -> dict:
    """crawl's politeness keywords from cfg: unset limits are the crawler's defaults, none on our own web."""
    from clip_core.crawl.politeness import DEFAULT_CONCURRENCY, DEFAULT_RPS, DEFAULT_USER_AGENT

    rps = cfg.per_host_rps if cfg.per_host_rps is not None else (0.0 if ours else DEFAULT_RPS)
    slots = cfg.per_host_concurrency if cfg.per_host_concurrency is not None else (0 if ours else DEFAULT_CONCURRENCY)
    return {"user_agent": cfg.user_agent or DEFAULT_USER_AGENT, "per_host_rps": rps, "per_host_concurrency": slots}


@task
def dedup_corpus(cfg: CorpusConfig, shards: str, eval_dirs: list[str], out: str, executor=None) -> str:
    from dedup.near_dup import dedup

    if not exists(join(out, "dedup_stats.json")):
        dedup(shards, out, eval_dirs, descriptor=cfg.descriptor, precision=cfg.precision, seed=cfg.seed,
              within=cfg.dedup_within, executor=executor)
    return out


@contextlib.contextmanager
def cluster_executor(address: str | None):
    """One RayExecutor on the cluster at address for every stage of a flow run, shut down at the end;
    None: each stage's own local executor, as on a laptop."""
    if not address:
        yield None
        return
    from flows.executors import RayExecutor  # Ray is imported only when a cluster is asked for

    with RayExecutor(address=address) as executor:
        yield executor


@contextlib.contextmanager
def serving(web: str | None):
    """Serve the synthetic web at its base URL for the crawl; nothing for a real source."""
    if web is None:
        yield
        return
    from synthweb.server import serve_web_process, spec_port

    with serve_web_process(web, port=spec_port(web)):
        yield


def web_eval_dirs(web: str) -> list[str]:
    """The synthetic web's classification and retrieval eval sets."""
    return [join(web, "eval", name) for name in ("shapes", "colors", "counts", "digits", "words", "retrieval")]


def corpus_metrics(uris: dict) -> dict:
    """The numbers a person checks first, with the same names in every run."""
    from clip_core.crawl import CrawlStats
    from clip_core.curation.curate import CurationStats

    cur, crawl = CurationStats.read(uris["curated"]), CrawlStats.read(uris["shards"])
    metrics = {
        "curate": {"candidates": cur.input_rows, "matched": cur.matched, "kept": cur.kept, "t": cur.t,
                   "queries_matched": cur.queries_matched},
        "crawl": {"queued": crawl.queued, "success": crawl.success, "success_rate": crawl.success_rate,
                  "refused": sum(crawl.refused.values()), "images_per_second": crawl.images_per_second},
    }
    if uris["dedup"]:
        from dedup.near_dup import DedupStats

        dd = DedupStats.read(uris["dedup"])
        metrics["dedup"] = {"corpus_images": dd.corpus_images, "removed": dd.removed, "kept": dd.kept,
                            "unreadable": dd.unreadable}
        metrics["dedup"] |= {f"overlap_pct.{name}": pct for name, pct in dd.overlap_pct.items()}
        if dd.within:
            metrics["dedup"] |= {f"within.{k}": dd.within[k] for k in ("groups", "exact_removed", "near_removed")}
    return metrics


def report_corpus(uris: dict, mlflow_uri: str, cfg: CorpusConfig, parent_run_id: str | None = None) -> dict:
    """The data card, Prefect artifacts (counts, the card) and an MLflow parent run with a child per stage."""
    metrics = corpus_metrics(uris)
    for stage, numbers in metrics.items():
        table_artifact(f"{stage}-counts", [{"metric": k, "value": v} for k, v in numbers.items()],
                       f"{stage} counts for {cfg.storage}")
    card = write_data_card_apart(uris["shards"], uris["curated"], uris["dedup"], seed=cfg.seed)
    markdown_artifact("data-card", card.markdown, f"the data card of {uris['shards']}: {CARD_NAME} there "
                      "and in the MLflow run's artifacts")
    pictures = [join(uris["curated"], "curation_counts.png"), join(uris["dedup"] or "", "contact_sheet.png")]
    parent = Tracker(mlflow_uri, run_id=parent_run_id) if parent_run_id else start_parent(
        mlflow_uri, "build-corpus", cfg.model_dump())
    parent.log_text(card.html, CARD_NAME)
    files = {"curate": [join(uris["curated"], "curation_stats.json"), pictures[0]],
             "crawl": [join(uris["shards"], "crawl_stats.json"), card.uri],
             "dedup": [join(uris["dedup"] or "", "dedup_stats.json"), pictures[-1]]}
    for stage, numbers in metrics.items():
        named = {f"{stage}/{k}": v for k, v in numbers.items()}
        log_stage(parent, stage, {"storage": cfg.storage}, named, files[stage], stage_inputs(uris, stage))
    if not parent_run_id:
        parent.end()
    return metrics


def stage_inputs(uris: dict, stage: str) -> list:
    """The datasets a stage read, for its MLflow run (flows.lineage): crawl the curated pairs,
    dedup the corpus shards and the eval sets."""
    from flows.lineage import corpus_dataset, eval_dataset, pairs_dataset

    if stage == "crawl":
        return [(functools.partial(pairs_dataset, uris["curated"]), "crawl")]
    if stage == "dedup":
        return [(functools.partial(corpus_dataset, uris["shards"]), "dedup"),
                *((functools.partial(eval_dataset, d), "evaluation") for d in uris.get("eval_dirs") or ())]
    return []


def corpus_nodes(uris: dict, built_queries: bool) -> list[dict]:
    """Where each stage's work ran: a row per stage and node, from the stats' `nodes` ({node: items})."""
    from clip_core.crawl import CrawlStats
    from clip_core.curation.curate import CurationStats
    from clip_core.curation.queries import QueryStats

    nodes = {"queries": QueryStats.read(uris["queries"]).nodes} if built_queries else {}
    nodes["curate"] = CurationStats.read(uris["curated"]).nodes
    nodes["crawl"] = CrawlStats.read(uris["shards"]).nodes  # shards crawled in its last run
    if uris["dedup"]:
        from dedup.near_dup import DedupStats

        nodes["dedup"] = DedupStats.read(uris["dedup"]).nodes
    return [{"stage": stage, "node": node, "items": n} for stage, counts in nodes.items() for node, n in counts.items()]


def run_stages(cfg: CorpusConfig, executor) -> dict:
    """The DAG: extract or the synthetic web -> queries -> curate -> crawl -> dedup; the URIs of each output."""
    web = None
    if cfg.wat:
        pairs = [extract_pairs(cfg.wat, join(cfg.storage, "candidates"), executor)]
    elif cfg.pairs:
        pairs = cfg.pairs
    else:
        web = synthetic_web(cfg)
        pairs = [join(web, "pairs.parquet")]
    eval_dirs = cfg.eval_dirs or (web_eval_dirs(web) if web else [])
    queries = cfg.queries or build_query_list(cfg, cfg.query_corpus or pairs, join(cfg.storage, "queries.parquet"),
                                              executor)
    curated = curate_pairs(cfg, pairs, queries, join(cfg.storage, "curated"), executor)
    shards = crawl_pairs(cfg, curated, join(cfg.storage, "shards"), web, executor)
    deduped = dedup_corpus(cfg, shards, eval_dirs, join(cfg.storage, "dedup"), executor) if eval_dirs else None
    return {"web": web, "pairs": pairs, "queries": queries, "curated": curated, "shards": shards,
            "dedup": deduped, "eval_dirs": eval_dirs}


@flow(name="build-corpus", log_prints=True)
def build_corpus(cfg: CorpusConfig = CorpusConfig(), mlflow_uri: str | None = None,
                 parent_run_id: str | None = None) -> dict:
    """queries -> curate -> crawl -> dedup (on cfg.ray_address's cluster if set); the URIs of every output."""
    log = get_run_logger()
    if cfg.ray_address:  # before any work: a wrong address fails now, not after the web is built
        check_ray_address("build-corpus cfg.ray_address", cfg.ray_address)
    with cluster_executor(cfg.ray_address) as executor:
        uris = run_stages(cfg, executor)
    report_corpus(uris, mlflow_uri or tracking_uri(cfg.storage), cfg, parent_run_id)
    table_artifact("corpus-nodes", corpus_nodes(uris, built_queries=not cfg.queries),
                   f"where each stage ran (Ray node ids, or the host name locally) for {cfg.storage}")
    log.info("corpus ready: %s", uris)
    return uris
