"""`clip-pipeline demo`: the whole DAG on the embedded default, then a short summary.

Local Prefect (no server to start), a local Ray cluster with 2 workers, SQLite MLflow under
the storage folder, local disk, and the synthetic web served on 127.0.0.1 by the flow.

The recipe: 8,000 pairs, the tiny-rn preset at 32 px with a 32-token text context, batch 256,
lr 2e-3, 260 steps. At batch 64, colour and count alone tell almost every image in a batch from
the others, so the contrastive loss is nearly met without shapes or digits and the model
learns colour only; at 256 many images share both, and shape and count pay. The small ResNet
learns shapes in fewer steps than the patch-8 ViT (`tiny`). The text tower at 77 tokens was
half of the step (0.91 s against 0.43 s at 32 tokens, batch 256, 2 threads); the synthetic
captions are 22 tokens or fewer at the 95th percentile (the longer are keyword spam, cut as
CLIP cuts at 77). At 32 px and 32 tokens a step takes 0.55-0.6 s with 2 Ray workers, against
1.5 s with the preset's 64 px and 77 tokens. Measured on 2 cores (`time make demo`): 4.6 min,
zero-shot colours 100%, counts 49-52%, shapes 24-28%, digits 14-21%, words 3-5% over two runs
(chance 11.1, 16.7, 12.5, 10, 4.2%): three sets at twice chance or more in each. 10,000 pairs
and 280 steps took 5.3-5.8 min for shapes 26-30%; fewer pairs barely shorten the crawl (its
start-up and the slow hosts' timeouts stay) but shorten dedup and leave the accuracy alone.
"""
from __future__ import annotations

import argparse
import time

from flows.common import join


def add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--storage", default="runs/demo", help="where every stage writes (default runs/demo)")
    parser.add_argument("--pairs", type=int, default=8_000, help="candidate pairs of the synthetic web")
    parser.add_argument("--max-per-query", type=int, default=500,
                        help="t of the balancing (WIT: 20000 at 400M pairs; small here so heads are cut)")
    parser.add_argument("--preset", default="tiny-rn", help="model preset (see `clip-pipeline models`)")
    parser.add_argument("--image-size", type=int, default=32, help="the model's resolution (the web's images are 64 px)")
    parser.add_argument("--context-length", type=int, default=32, help="text context in tokens (captions are short)")
    parser.add_argument("--steps", type=int, default=260, help="training steps")
    parser.add_argument("--batch-size", type=int, default=256, help="global batch size (all workers)")
    parser.add_argument("--lr", type=float, default=2e-3, help="peak learning rate")
    parser.add_argument("--warmup", type=int, default=30, help="linear warmup steps before the cosine decay")
    parser.add_argument("--workers", type=int, default=2, help="Ray Train workers")
    parser.add_argument("--seed", type=int, default=0)
    parser.set_defaults(handler=run_demo_command)


def chance_accuracies(eval_dirs: list[str]) -> dict[str, float]:
    """Top-1 accuracy of guessing, 1 / number of classes, per classification eval set (by folder name)."""
    import fsspec

    chance = {}
    for folder in eval_dirs:
        fs, root = fsspec.core.url_to_fs(join(folder, "classnames.txt"))
        if fs.exists(root):
            with fs.open(root, "r") as f:
                n = sum(1 for line in f if line.strip())
            chance[folder.rstrip("/").rsplit("/", 1)[-1]] = 1 / n if n else None
    return chance


def summary_text(result: dict, storage: str, seconds: float) -> str:
    """Corpus and dedup counts, the training, zero-shot accuracy per eval set, the overlap table, the MLflow UI."""
    from clip_core.crawl import CrawlStats
    from clip_core.curation.curate import CurationStats

    corpus = result["corpus"]
    cur, crawl = CurationStats.read(corpus["curated"]), CrawlStats.read(corpus["shards"])
    lines = [f"demo finished in {seconds / 60:.1f} min; outputs under {storage}",
             f"corpus: {cur.input_rows} candidates -> {cur.matched} matched -> {cur.kept} curated -> "
             f"{crawl.success} downloaded ({crawl.success_rate:.0%})"]
    if corpus["dedup"]:
        from dedup.near_dup import DedupStats

        dd = DedupStats.read(corpus["dedup"])
        lines.append(f"dedup: {dd.removed} of {dd.corpus_images} images near-duplicate an eval image "
                     f"(left out of training)")
    chance_levels = chance_accuracies(corpus["eval_dirs"])
    train = result["train"]  # a flows.train.TrainSummary
    loss = f", final loss {train.final_loss:.3f}" if train.final_loss is not None else ""
    lines.append(f"training: {train.steps} steps{loss}; model in {train.model}")
    lines.append("zero-shot / retrieval:")
    for r in result["eval"]:
        m = r["metrics"]
        shown = (f"acc1 {m['acc1']:.1%}" if "acc1" in m
                 else f"image R@1 {m['image_retrieval_recall@1']:.1%}, text R@1 {m['text_retrieval_recall@1']:.1%}")
        chance = chance_levels.get(r["dataset"])
        lines.append(f"  {r['dataset']:<10} {shown}" + (f" (chance {chance:.1%})" if "acc1" in m and chance else ""))
    overlap_md = join(storage, "overlap", "overlap.md")
    if result["overlap"]:
        import fsspec

        with fsspec.open(overlap_md, "r") as f:
            lines += ["overlap analysis (CLIP Sec. 5):", f.read().rstrip()]
    lines.append(f"data card: {join(corpus['shards'], 'data_card.html')}")
    lines.append(f"runs in the MLflow UI: make mlflow-ui, then open {runs_url(train)}")
    return "\n".join(lines)


def runs_url(train, ui: str = "http://127.0.0.1:5000") -> str:
    """The experiment's runs table in MLflow's "Model training" view (its UI opens on GenAI otherwise),
    on the tracking server itself when runs went to one (MLFLOW_TRACKING_URI=http...)."""
    experiment = "1"  # a fresh store's first experiment
    if train.mlflow_run_id and train.tracking_uri:
        import mlflow

        experiment = mlflow.MlflowClient(train.tracking_uri).get_run(train.mlflow_run_id).info.experiment_id
        ui = train.tracking_uri.rstrip("/") if train.tracking_uri.startswith(("http://", "https://")) else ui
    return f"{ui}/#/experiments/{experiment}/runs?workflowType=machine_learning"


def run_demo_command(args: argparse.Namespace) -> int:
    from flows.pipeline import clip_pipeline

    start = time.time()
    result = clip_pipeline(storage=args.storage, web_pairs=args.pairs, max_per_query=args.max_per_query,
                           preset=args.preset, image_size=args.image_size, context_length=args.context_length,
                           steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                           warmup=args.warmup, workers=args.workers, seed=args.seed)
    print(summary_text(result, args.storage, time.time() - start))
    return 0
