"""Query-list counting: clip_core.curation.queries.build_queries against a plain in-memory count.

The first stage of the WIT recipe counts the words and bigrams of a Wikipedia dump (CLIP
Sec. 2.2). Ours is a map-reduce whose memory is bounded by `max_keys` per worker (spills
hashed into partitions); the anchor is the straightforward script: one process, one
Counter of every word, then one Counter of every bigram between vocabulary words, all in
memory. Both must find the same unigrams and bigrams. Text: WordNet 3.0 glosses and
examples (real English), recombined into lines whose words follow the glosses' Zipf law so
the vocabulary keeps growing with the corpus as Wikipedia's does. Reported: tokens per
CPU-second and peak RSS at two corpus sizes. Every configuration runs in a child process.

    .venv/bin/python bench/queries_bench.py [--tokens 5000000 20000000] [--workers 1 2]
"""
from __future__ import annotations

import argparse
import json
import os
import random
import re
import resource
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from clip_core.curation.wordnet import read_synsets

MIN_COUNT, MIN_PMI = 20, 8.0


def write_corpus(path: Path, tokens: int, seed: int = 0) -> int:
    """A text file of about `tokens` word tokens, one paragraph a line; returns its token count."""
    from clip_core.curation.queries import words

    synsets = list(read_synsets())
    sentences = [part.strip().strip('"') for s in synsets for part in s.gloss.split("; ") if part.strip()]
    vocab = [w for w, _ in Counter(w for s in sentences for w in words(s)).most_common()]
    rng, written = random.Random(seed), 0
    with open(path, "w") as f:
        while written < tokens:
            parts = []
            for _ in range(rng.randint(3, 8)):
                if rng.random() < 0.6:
                    parts.append(rng.choice(sentences))
                else:
                    n = rng.randint(5, 20)
                    parts.append(" ".join(vocab[min(int(rng.paretovariate(0.8)) - 1, len(vocab) - 1)] for _ in range(n)))
            line = ". ".join(parts) + ".\n"
            written += len(words(line))
            f.write(line)
    return written


def anchor(path: str) -> dict:
    """Everything in memory: Counter of words, then Counter of vocabulary bigrams, then PMI."""
    import math

    word, token = re.compile(r"\w+(?:['’\-]\w+)*"), re.compile(r"\w+(?:['’\-]\w+)*|\S")
    unigrams = Counter()
    with open(path) as f:
        for line in f:
            unigrams.update(word.findall(line))
    n = sum(unigrams.values())
    vocab = {w for w, c in unigrams.items() if c >= MIN_COUNT}
    pairs = Counter()
    with open(path) as f:
        for line in f:
            t = token.findall(line)
            pairs.update(f"{a} {b}" for a, b in zip(t, t[1:]) if a in vocab and b in vocab)
    kept = sorted(p for p, c in pairs.items() if c >= MIN_COUNT and
                  math.log2(c * n / (unigrams[p.split(" ")[0]] * unigrams[p.split(" ")[1]])) >= MIN_PMI)
    return {"tokens": n, "unigrams": len(vocab), "bigrams": len(kept), "digest": hash(tuple(sorted(vocab)) + tuple(kept))}


def ours(path: str, workers: int, out: str) -> dict:
    import pyarrow.parquet as pq

    from clip_core.executors import LocalExecutor
    from clip_core.curation.queries import build_queries

    with LocalExecutor(workers) as executor:
        stats = build_queries(path, f"{out}/queries.parquet", min_count=MIN_COUNT, min_pmi=MIN_PMI,
                              chunk_bytes=16 << 20, max_keys=1 << 18, executor=executor)
    table = pq.read_table(f"{out}/queries.parquet").to_pydict()
    uni = sorted(q for q, k in zip(table["query"], table["kind"]) if k == "unigram")
    bi = sorted(q for q, k in zip(table["query"], table["kind"]) if k == "bigram")
    return {"tokens": stats.tokens, "unigrams": len(uni), "bigrams": len(bi), "digest": hash(tuple(uni) + tuple(bi))}


def run_child(config: dict) -> dict:
    start = time.perf_counter()
    out = subprocess.run([sys.executable, __file__, "--child", json.dumps(config)], capture_output=True, text=True,
                         env={**os.environ, "PYTHONHASHSEED": "0"})
    if out.returncode:
        raise RuntimeError(f"{config['kind']} failed:\n{out.stderr[-3000:]}")
    return {**json.loads(out.stdout.strip().splitlines()[-1]), "wall_s": time.perf_counter() - start}


def child(config: dict) -> None:
    with tempfile.TemporaryDirectory() as out:
        result = anchor(config["path"]) if config["kind"] == "anchor" else ours(config["path"], config["workers"], out)
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    result["cpu_s"] = own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime
    result["max_rss_mb"] = max(own.ru_maxrss, kids.ru_maxrss) // 1024
    print(json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[5_000_000, 20_000_000])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(json.loads(args.child))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.tokens:
            path = Path(tmp) / f"text-{size}.txt"
            n = write_corpus(path, size)
            base = run_child({"kind": "anchor", "path": str(path)})
            rows.append(("anchor: Counter in memory, 1 process", n, path.stat().st_size, base))
            for w in args.workers:
                r = run_child({"kind": "ours", "path": str(path), "workers": w})
                if any(r[k] != base[k] for k in ("tokens", "unigrams", "bigrams", "digest")):
                    raise AssertionError(f"build_queries and the anchor disagree: {r} vs {base}")
                rows.append((f"build_queries, {w} worker(s)", n, path.stat().st_size, r))
    print(f"\nmin_count {MIN_COUNT}, min_pmi {MIN_PMI}; ours: 16 MiB chunks, spill at 262,144 keys\n")
    print("| pipeline | tokens | text MB | wall s | CPU s | tokens/s | tokens/CPU-s | peak RSS MB | unigrams | bigrams |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, n, size, r in rows:
        print(f"| {name} | {n:,} | {size / 2**20:,.0f} | {r['wall_s']:.1f} | {r['cpu_s']:.1f} | {n / r['wall_s']:,.0f} "
              f"| {n / r['cpu_s']:,.0f} | {r['max_rss_mb']:,} | {r['unigrams']:,} | {r['bigrams']:,} |")


if __name__ == "__main__":
    main()
