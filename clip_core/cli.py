"""`clip-pipeline`: the command line, thin over the library.

Each subcommand parses its options and calls one library function; nothing here holds
logic a Python user or a Prefect flow could not reach the same way.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence

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


SUBCOMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [_add_models, _add_tokenize]


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
    """Entry point of the `clip-pipeline` console script."""
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except (ValueError, FileNotFoundError) as err:
        print(f"clip-pipeline {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
