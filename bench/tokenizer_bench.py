"""Throughput of clip_core.tokenizer against OpenAI's reference `clip.tokenize`, same run.

Captions are class names filled into the zero-shot templates of clip_core/assets/clip_prompts.json
with a few random words around them (fixed seed); a small share carries HTML entities,
mojibake or non-Latin words so the ftfy path is exercised too. Each tokenizer is timed cold
(freshly built, empty BPE cache) and warm (second pass over the same captions); the best of
--repeats runs is reported, and both must give the same ids.

    .venv/bin/python bench/tokenizer_bench.py [--n 20000] [--seed 0] [--repeats 3]
"""
import argparse
import json
import random
import sys
import time
from importlib.resources import files
from pathlib import Path

import torch

from clip_core.tokenizer import SimpleTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from openai_reference import openai_clip_module  # noqa: E402

FILLER = (
    "photo image picture close-up of the a my our old new small large beautiful blurry bright dark "
    "view at in on with near during sunset morning night street park beach city 2019 HD 4k stock"
).split()
UNUSUAL = ["caf\u00c3\u00a9", "&amp;", "Tom &amp; Jerry", "\u732b", "\u041c\u043e\u0441\u043a\u0432\u0430", "\u0645\u0631\u062d\u0628\u0627", "\U0001f600", "na\u00efve", "\u2019s"]


def make_captions(n: int, seed: int) -> list[str]:
    """n captions: template(class) with random filler words; ~10% carry unusual text."""
    rng = random.Random(seed)
    prompts = json.loads((files("clip_core") / "assets" / "clip_prompts.json").read_text())
    pairs = [(t, c) for d in prompts.values() for t in d["templates"] for c in d["classes"]]
    captions = []
    for _ in range(n):
        template, classname = rng.choice(pairs)
        words = [*rng.sample(FILLER, rng.randint(0, 6)), template.format(classname), *rng.sample(FILLER, rng.randint(0, 6))]
        if rng.random() < 0.1:
            words.insert(rng.randrange(len(words) + 1), rng.choice(UNUSUAL))
        caption = " ".join(words)
        captions.append(caption.capitalize() if rng.random() < 0.5 else caption)
    return captions


def texts_per_s(fn, texts: list[str]) -> tuple[float, torch.Tensor]:
    """Throughput of fn(texts, truncate=True) and its output."""
    start = time.perf_counter()
    out = fn(texts, truncate=True)
    return len(texts) / (time.perf_counter() - start), out


def best_rates(captions: list[str], repeats: int) -> dict[str, float]:
    """Best texts/s over repeats for ours and OpenAI's, cold (fresh tokenizer) and warm."""
    reference = openai_clip_module()
    best = {}
    for _ in range(repeats):
        tokenizers = {"ours": SimpleTokenizer()}
        reference._tokenizer = reference._Tokenizer()  # fresh reference tokenizer: empty cache
        tokenizers["openai"] = reference.tokenize
        for phase in ("cold", "warm"):
            outputs = []
            for name, fn in tokenizers.items():
                rate, ids = texts_per_s(fn, captions)
                best[name, phase] = max(rate, best.get((name, phase), 0.0))
                outputs.append(ids)
            assert torch.equal(*outputs), "ids differ from OpenAI's"
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=20_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    captions = make_captions(args.n, args.seed)
    start = time.perf_counter()
    SimpleTokenizer()
    print(f"{args.n} captions, e.g. {captions[0]!r}; tokenizer built in {(time.perf_counter() - start) * 1e3:.0f} ms")
    best = best_rates(captions, args.repeats)
    for phase in ("cold", "warm"):
        ours, openai = best["ours", phase], best["openai", phase]
        print(f"{phase}: ours {ours:,.0f} texts/s, openai {openai:,.0f} texts/s, ratio {ours / openai:.1f}x")


if __name__ == "__main__":
    main()
