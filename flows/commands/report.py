"""`clip-pipeline data-card`: (re)write a corpus' data_card.html; crawl and dedup call it too."""
from __future__ import annotations

import argparse
import sys

from clip_core.errors import BAD_INPUT_ERRORS


def add_data_card_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("shards", help="the corpus shards folder (crawl's OUT); the card is written there")
    parser.add_argument("--curated", default=None,
                        help="curate's OUT (default: the folder the crawl read, when it holds curation stats)")
    parser.add_argument("--dedup", default=None, help="dedup's OUT, for the overlap by eval set")
    parser.add_argument("--seed", type=int, default=0, help="which samples the contact sheet shows")
    parser.set_defaults(handler=run_data_card_command)


def run_data_card_command(args: argparse.Namespace) -> int:
    from flows.data_card import write_data_card

    card = write_data_card(args.shards, args.curated, args.dedup, seed=args.seed)
    print(f"wrote {card.uri}")
    return 0


def refresh_data_card(command: str, shards: str, dedup: str | None = None) -> None:
    """After crawl or dedup: the corpus' card, rewritten. The stage's output is already complete, so
    a card that cannot be written (a read-only corpus folder, ...) is a warning, not a failure."""
    from flows.data_card import write_data_card

    try:
        card = write_data_card(shards, dedup=dedup)
    except (*BAD_INPUT_ERRORS, OSError) as err:
        print(f"clip-pipeline {command}: warning: no data card written: {err}", file=sys.stderr)
        return
    print(f"data card: {card.uri}")
