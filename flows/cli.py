"""`clip-pipeline`: the command line, thin over the library.

Each subcommand parses its options and calls one library function; nothing here holds
logic a Python user or a Prefect flow could not reach the same way.
"""
from __future__ import annotations

import argparse
import functools
import importlib
import json
import os
import sys
import traceback
from collections.abc import Callable, Sequence

from clip_core.errors import BAD_INPUT_ERRORS, EXIT_BAD_INPUT, EXIT_FAILED

Handler = Callable[[argparse.Namespace], int]


def _cmd_models(args: argparse.Namespace) -> int:
    import torch

    from clip_core.config import load_preset
    from clip_core.model import available_models, create_model

    rows = []
    for name in available_models():
        cfg = load_preset(name)
        row = {"name": name, "embed_dim": cfg.embed_dim, "image_size": cfg.vision.image_size,
               "vision": "ViT" if cfg.vision.patch_size else "ModifiedResNet"}
        if args.params:
            with torch.device("meta"):  # shapes only, no memory
                model = create_model(name)
            row["params_M"] = round(sum(p.numel() for p in model.parameters()) / 1e6, 2)
        rows.append(row)
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        for row in rows:
            print("  ".join(f"{k}={v}" for k, v in row.items()))
    return 0


def _cmd_tokenize(args: argparse.Namespace) -> int:
    from clip_core.tokenizer import tokenize

    ids = tokenize(args.texts, context_length=args.context_length, truncate=args.truncate)
    for row in ids.tolist():
        print(" ".join(str(i) for i in row if i) if not args.pad else " ".join(map(str, row)))
    return 0


def _cmd_web_generate(args: argparse.Namespace) -> int:
    from synthweb.generator import generate_web

    out = generate_web(args.out, n_pairs=args.pairs, seed=args.seed, base_url=args.base_url,
                       image_size=args.image_size, eval_sizes=args.eval_size)
    print(f"wrote a synthetic web of {args.pairs} pairs to {out} (pairs.parquet, eval/, web.json)")
    if args.wat:
        from synthweb.wat_export import write_web_wat

        files = write_web_wat(out, out.rstrip("/") + "/wat")
        print(f"wrote its pages as {len(files)} WAT file(s) under {out.rstrip('/')}/wat")
    return 0


def _cmd_web_serve(args: argparse.Namespace) -> int:
    from synthweb.server import run_web_server

    return run_web_server(args.root, host=args.host, port=args.port, extra_hosts=args.extra_host)


def _add_web(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("web", help="the synthetic web: generate pairs and eval sets, serve images on 127.0.0.1")
    web = p.add_subparsers(dest="web_command", metavar="{generate,serve}", required=True)
    g = web.add_parser("generate", help="write pairs.parquet, truth.parquet, eval sets and web.json to OUT")
    g.add_argument("out", help="output folder or fsspec URI")
    g.add_argument("--pairs", type=int, default=10_000, help="candidate pairs to generate (default 10000)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--base-url", default="http://127.0.0.1:8000",
                   help="where `web serve` will answer; image URLs start with it")
    g.add_argument("--image-size", type=int, default=128, help="side of the rendered web images")
    g.add_argument("--eval-size", type=int, default=None, help="images per eval split (default 300)")
    g.add_argument("--wat", action="store_true", help="also write its pages as Common Crawl WAT files (OUT/wat/)")
    g.set_defaults(handler=_cmd_web_generate)
    s = web.add_parser("serve", help="serve a generated web until Ctrl-C (loopback addresses only)")
    s.add_argument("root", help="folder written by `web generate`")
    s.add_argument("--host", default="127.0.0.1", help="a 127.0.0.0/8 address (default 127.0.0.1)")
    s.add_argument("--port", type=int, default=None, help="default: the port of the web's base URL")
    s.add_argument("--extra-host", action="append", default=[], help="serve on another loopback address too")
    s.set_defaults(handler=_cmd_web_serve)


# Stage commands: each flows/commands module owns its options (add_*_arguments) and handlers
# (run_*_command); modules are imported when the parser is built.
STAGES = [  # (command, module, add-arguments function, handler or None when the add sets it, help)
    ("extract", "flows.commands.corpus", "add_extract_arguments", "run_extract_command",
     "candidate pairs (image URL, alt text) from Common Crawl WAT files"),
    ("queries", "flows.commands.corpus", "add_queries_arguments", "run_queries_command",
     "build the query list (WIT recipe: unigrams, PMI bigrams, titles, WordNet)"),
    ("curate", "flows.commands.corpus", "add_curate_arguments", "run_curate_command",
     "match captions to queries and balance: at most t pairs per query"),
    ("crawl", "flows.commands.corpus", "add_crawl_arguments", "run_crawl_command",
     "download pairs with img2dataset into WebDataset shards (URL-safe, resumable)"),
    ("dedup", "flows.commands.dedup", "add_dedup_arguments", "run_dedup_command",
     "remove corpus images that near-duplicate eval images (`dedup train-detector OUT` trains the detector)"),
    ("train", "flows.commands.train", "add_train_arguments", "run_train_command",
     "contrastive training on Ray Train (local cluster or RAY_ADDRESS), MLflow-logged"),
    ("evaluate", "flows.commands.evaluate", "add_evaluate_arguments", None,
     "zero-shot, retrieval and linear-probe evaluation of a checkpoint"),
    ("overlap", "flows.commands.evaluate", "add_overlap_arguments", "run_overlap_command",
     "CLIP Sec. 5 overlap analysis: zero-shot accuracy on All / Clean / Overlap"),
    ("data-card", "flows.commands.report", "add_data_card_arguments", None,
     "write a corpus' data_card.html: counts, queries, captions, hosts, failures, dedup, samples"),
    ("demo", "flows.demo", "add_demo_arguments", None, "the whole DAG on the embedded default, then a summary"),
    ("compare", "flows.compare", "add_compare_arguments", None,
     "training variants on the demo's corpus (default batch_size=64,256), side by side in MLflow"),
]


def _add_stage(sub: argparse._SubParsersAction, name: str, module: str, add: str, run: str | None, help: str) -> None:
    """Register one stage command from its module's add/run functions."""
    mod = importlib.import_module(module)
    parser = sub.add_parser(name, help=help)
    getattr(mod, add)(parser)
    if run:
        parser.set_defaults(handler=getattr(mod, run))


def _add_models(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help="list the model presets (OpenAI's architectures and tiny ones)")
    p.add_argument("--params", action="store_true", help="also count parameters (builds each on the meta device)")
    p.add_argument("--json", action="store_true", help="print JSON instead of one line per preset")
    p.set_defaults(handler=_cmd_models)


def _add_tokenize(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("tokenize", help="print CLIP BPE token ids of texts (as OpenAI's clip.tokenize)")
    p.add_argument("texts", nargs="+", help="texts to tokenize, one per argument")
    p.add_argument("--context-length", type=int, default=77)
    p.add_argument("--truncate", action="store_true", help="cut long texts, keeping <|endoftext|> last")
    p.add_argument("--pad", action="store_true", help="print the zero padding too")
    p.set_defaults(handler=_cmd_tokenize)


SUBCOMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [
    _add_web, *(functools.partial(_add_stage, name=n, module=m, add=a, run=r, help=h) for n, m, a, r, h in STAGES),
    _add_models, _add_tokenize,
]


def build_parser() -> argparse.ArgumentParser:
    """The `clip-pipeline` parser with every subcommand registered."""
    parser = argparse.ArgumentParser(
        prog="clip-pipeline",
        description="CLIP as a pipeline: build a WIT-style corpus, train contrastively, evaluate.",
        epilog="Run `clip-pipeline COMMAND --help` for a command's options.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add in SUBCOMMANDS:
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one subcommand: 0 done, 1 the run failed, 2 bad input (one line on stderr)."""
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except BAD_INPUT_ERRORS as err:
        print(f"clip-pipeline {args.command}: error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT


def console_main() -> None:
    """The console script: exits without native teardown after a failure.

    After an error, threads of native libraries (Arrow's I/O pool, gRPC) may still be alive
    when the interpreter finalises, and their C++ destructors then abort the process
    ("terminate called without an active exception", exit 134 instead of 2). Once the
    message is printed nothing is left to do, so a failed command leaves with os._exit.
    """
    try:
        code = main()
    except KeyboardInterrupt:
        code = 130
    except Exception:  # a defect, not bad input: show where, still without the abort
        traceback.print_exc()
        code = EXIT_FAILED
    if code:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    console_main()
