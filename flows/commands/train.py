"""`clip-pipeline train` and `python -m flows.train`: options and handler.

One flat set of options (and a --config file of the same keys) fills two frozen configs: the
recipe (clip_core.train.TrainConfig) and where and how the run executes (flows.train's
RunSettings). The command line wins over the file, the file over the defaults. Ray, Prefect
and MLflow load only when the handler runs: `clip-pipeline --help` builds this parser too.
"""
from __future__ import annotations

import argparse
import json
import sys

from clip_core.errors import BAD_INPUT_ERRORS, EXIT_BAD_INPUT, EXIT_FAILED, EXIT_OK, InputError
from clip_core.train.config import PRECISIONS, TrainConfig, read_config_file


def add_train_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The options of `clip-pipeline train CORPUS OUT`; unset options keep file/default values."""
    S = argparse.SUPPRESS
    opt = parser.add_argument
    opt("corpus", help="WebDataset shards: a folder, glob or .tar (local, file://, s3://)")
    opt("output", help="output folder or URI (s3://bucket/run): final model, metrics, mlflow.db, Ray checkpoints")
    opt("--config", default=None, help="JSON/YAML file with the same keys; the command line wins")
    opt("--preset", default=S, help="model preset (see `clip-pipeline models`)")
    opt("--image-size", type=int, default=S, help="override the preset's image resolution")
    opt("--context-length", type=int, default=S,
        help="override the preset's text context in tokens (captions are cut to it; the demo's are short)")
    opt("--steps", type=int, default=S, help="optimizer steps")
    opt("--samples", type=int, default=S, help="samples seen in all (instead of --steps)")
    opt("--batch-size", type=int, default=S, help="global batch size (all workers, all micro-batches)")
    opt("--lr", type=float, default=S)
    opt("--warmup", type=int, default=S, help="linear warmup steps before the cosine decay")
    opt("--weight-decay", type=float, default=S)
    opt("--precision", choices=PRECISIONS, default=S,
        help="auto (default): bf16 on CUDA with bf16 or a CPU with AMX/AVX512-BF16, else fp32; the choice is logged")
    opt("--grad-checkpointing", action=argparse.BooleanOptionalAction, default=S)
    opt("--accum-steps", type=int, default=S, help="micro-batches per step; every negative is kept")
    opt("--local-loss", action=argparse.BooleanOptionalAction, default=S,
        help="each worker scores its own rows against all gathered features")
    opt("--compile", action=argparse.BooleanOptionalAction, default=S, help="torch.compile the model")
    opt("--seed", type=int, default=S)
    opt("--workers", type=int, default=S, help="Ray Train workers (data-parallel ranks)")
    opt("--gpus-per-worker", type=float, default=S)
    opt("--cpus-per-worker", type=float, default=S, help="logical CPUs per worker (0.5 on a laptop)")
    opt("--data-workers", type=int, default=S, help="DataLoader processes per worker")
    opt("--shuffle-buffer", type=int, default=S)
    opt("--resampled", action=argparse.BooleanOptionalAction, default=S,
        help="draw shards with replacement (virtual epochs)")
    opt("--checkpoint-every", type=int, default=S, help="steps between checkpoints")
    opt("--checkpoint-minutes", type=float, default=S,
        help="also checkpoint when this many minutes have passed since the last one (checked at log steps)")
    opt("--num-to-keep", type=int, default=S, help="checkpoints Ray keeps")
    opt("--max-failures", type=int, default=S, help="worker failures Ray recovers from")
    opt("--resume", default=S, help="auto (continue this run), never, or a checkpoint folder")
    opt("--storage-path", default=S, help="Ray storage for checkpoints (a folder or any fsspec URI: s3://); "
        "default OUT/ray. A multi-node cluster needs a URI or --shared-storage")
    opt("--shared-storage", action=argparse.BooleanOptionalAction, default=S,
        help="OUT and --storage-path are local paths every node mounts (NFS): allowed on a multi-node cluster")
    opt("--name", default=S, help="run name under the storage path")
    opt("--ray-address", default=S, help="Ray cluster address; default RAY_ADDRESS or a local cluster")
    opt("--mlflow-uri", default=S, help="tracking URI; default MLFLOW_TRACKING_URI or sqlite:///OUT/mlflow.db "
        "(./mlflow.db for a remote OUT)")
    opt("--experiment", default=S, help="MLflow experiment name")
    opt("--log-every", type=int, default=S, help="steps between progress lines and MLflow rows")
    opt("--ray-logs", action=argparse.BooleanOptionalAction, default=S,
        help="show Ray's and the workers' own log lines (default: only the progress lines)")
    opt("--exclude", default=S, metavar="KEYS",
        help="leave these samples out: dedup's matches.parquet (column key) or a text file of keys")
    opt("--eval", nargs="+", default=S, metavar="EVALDIR", help="eval sets for periodic zero-shot accuracy")
    opt("--eval-every", type=int, default=S, help="steps between zero-shot evaluations (0: at the end)")
    opt("--peak-tflops", type=float, default=S, help="peak FLOP/s per device (TFLOP/s) for MFU")
    return parser


def options_from_args(args: argparse.Namespace):
    """(TrainConfig, RunSettings) from parsed arguments: defaults < --config file < the command line.

    Raises ValueError (unknown keys in the file, options that cannot train) and FileNotFoundError.
    """
    from flows.train import RunSettings  # Ray loads here, not when the parser is built

    recipe, run = TrainConfig.field_names(), RunSettings.field_names()
    given = {k: v for k, v in vars(args).items() if k in recipe | run}  # other parsers' options are not ours
    options = {**(read_config_file(args.config) if getattr(args, "config", None) else {}), **given}
    unknown = sorted(set(options) - recipe - run)
    if unknown:
        raise ValueError(f"unknown training options: {unknown}")
    config = TrainConfig(**{k: v for k, v in options.items() if k in recipe})
    settings = RunSettings(**{k: v for k, v in options.items() if k in run})
    config.check_workers(settings.workers)
    config.total_steps  # --steps or --samples given
    return config, settings


def summary_json(summary) -> str:
    """What `train` prints: the summary without the step history, with the final loss."""
    out = summary.to_dict()
    out.pop("history")
    return json.dumps({**out, "final_loss": summary.final_loss}, indent=2, default=str)


def _error(e: Exception) -> None:
    print(f"clip-pipeline train: error: {e}", file=sys.stderr)


def run_train_command(args: argparse.Namespace) -> int:
    """`clip-pipeline train`: run Ray Train and print where the model went; 0 done, 1 failed, 2 bad input."""
    from flows.train import TrainingError, train  # Ray and MLflow load only when training runs

    try:
        config, run = options_from_args(args)
    except BAD_INPUT_ERRORS as e:
        _error(e)
        return EXIT_BAD_INPUT
    try:
        summary = train(config, run)
    except InputError as e:  # found by the checks train() makes before Ray starts
        _error(e)
        return EXIT_BAD_INPUT
    except (TrainingError, ConnectionError, ValueError, OSError) as e:  # the run started, then failed
        _error(e)
        return EXIT_FAILED
    print(summary_json(summary))
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    """`python -m flows.commands.train CORPUS OUT [options]`: what `make train-cluster` and Ray Jobs run."""
    parser = argparse.ArgumentParser(prog="python -m flows.commands.train", description="CLIP contrastive training on Ray Train")
    return run_train_command(add_train_arguments(parser).parse_args(argv))


if __name__ == "__main__":  # `python -m flows.commands.train CORPUS OUT [options]`: what `make train-cluster` and Ray Jobs run
    sys.exit(main())
