"""`clip-pipeline evaluate` and `clip-pipeline overlap`: options and handlers.

evaluate runs `clip_core.eval.run.evaluate` and, when asked, logs the records to MLflow
(flows/evaluate.py); overlap runs `dedup.analysis.run_overlap_analysis` (CLIP Sec. 5).
"""
from __future__ import annotations

import argparse

from clip_core.eval.run import TASKS, evaluate, markdown_table
from dedup.analysis import run_overlap_analysis
from dedup.report import markdown_table as overlap_table


def add_evaluate_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Options of `clip-pipeline evaluate` (sets handler=run_evaluate_command)."""
    parser.add_argument("checkpoint", metavar="CKPT",
                        help="checkpoint file, checkpoint folder, or training output folder (newest checkpoint)")
    parser.add_argument("eval_dirs", metavar="EVALDIR", nargs="+", help="eval set folders")
    parser.add_argument("--task", dest="tasks", action="append", choices=list(TASKS),
                        help="repeatable; default zeroshot. Each runs on the eval sets of its kind")
    parser.add_argument("--out", default="eval_results", help="folder for the result JSONs and results.md")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--dataset-name", dest="dataset_names", action="append",
                        help="paper dataset name (e.g. cifar10) for prompts; once, or once per EVALDIR")
    parser.add_argument("--paper-prompts", action="store_true",
                        help="use the paper's class names and templates even where the folder has its own")
    parser.add_argument("--model-name", help="model id in the results (default: from CKPT)")
    parser.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    parser.add_argument("--workers", type=int, default=0, help="threads decoding images (default 0: inline)")
    parser.add_argument("--no-progress", dest="progress", action="store_false", default=None,
                        help="no progress bars (default: shown on a terminal)")
    parser.add_argument("--mlflow-uri", help="log the results to this MLflow tracking URI")
    parser.add_argument("--mlflow-run-id", help="log into this existing MLflow run (e.g. the training run)")
    parser.add_argument("--mlflow-experiment", default="clip-eval", help="experiment of a new MLflow run")
    parser.set_defaults(handler=run_evaluate_command)
    return parser


def run_evaluate_command(args: argparse.Namespace) -> int:
    """Handler of `clip-pipeline evaluate`: run, print the table, optionally log to MLflow."""
    records = evaluate(args.checkpoint, args.eval_dirs, args.tasks or ("zeroshot",), args.out,
                       batch_size=args.batch_size, dataset_names=args.dataset_names, model_name=args.model_name,
                       paper_prompts=args.paper_prompts, device=args.device, progress=args.progress,
                       num_workers=args.workers)
    print(markdown_table(records), end="")
    print(f"wrote {len(records)} result(s) and results.md to {args.out}")
    if args.mlflow_uri or args.mlflow_run_id:
        from flows.evaluate import log_results_to_mlflow  # Prefect and MLflow load only when asked for

        run_id = log_results_to_mlflow(records, args.out, tracking_uri=args.mlflow_uri, run_id=args.mlflow_run_id,
                                       experiment=args.mlflow_experiment)
        if run_id:
            print(f"logged to MLflow run {run_id}")
        else:  # the tracker has warned: the results are in OUT all the same
            print(f"not logged to MLflow (tracking server unreachable); the results are in {args.out}")
    return 0


def run_overlap_command(args: argparse.Namespace) -> int:
    stats = run_overlap_analysis(args.checkpoint, args.eval, args.matches, args.out, batch_size=args.batch_size)
    print(overlap_table(stats))
    print(f"wrote overlap.json, overlap.md and overlap.png to {args.out}")
    return 0


def add_overlap_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="checkpoint file or folder, or a training output folder (latest checkpoint)")
    p.add_argument("--matches", required=True, help="matches.parquet written by `clip-pipeline dedup`")
    p.add_argument("--eval", nargs="+", required=True, metavar="EVALDIR", help="classification eval sets")
    p.add_argument("--out", required=True, help="folder for overlap.json, overlap.md, overlap.png")
    p.add_argument("--batch-size", type=int, default=64)
