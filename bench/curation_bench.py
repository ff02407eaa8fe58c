"""Curation throughput: clip_core.curation.curate against a straightforward pyahocorasick
pipeline (MetaCLIP's way: per caption spacing + automaton.iter, count, sample, write), same run.

Queries: every WordNet 3.0 lemma plus the words (count >= 2) and bigrams (count >= 3) of the
glosses, about 250k. Captions: WordNet glosses and examples, and generated alt-text-like lines
that mix Zipf-drawn lemmas and gloss words with punctuation, case and file names (fixed seed).
Every configuration runs in a child process; CPU seconds and peak RSS come from
getrusage(RUSAGE_CHILDREN), so pool workers count too. Both pipelines must keep the same
number of matched captions.

    .venv/bin/python bench/curation_bench.py [--captions 1000000] [--big 3] [--workers 1 2]
"""
import argparse
import collections
import json
import random
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from clip_core.curation.wordnet import read_synsets

TEMPLATES = ["{a}", "{a} {b}", "photo of a {a}", "{A} on a {b}, {y}", "IMG_{n}.jpg", "{a} and {b} in {c}",
             "Close-up of {a} with {b}.", "{A}: {b} - {c} | stock photo", "{w}", "{a} {w}!", "the {a} of {b}; {w}"]


def build_inputs(folder: Path, n: int, seed: int) -> tuple[str, list[str]]:
    """The query list Parquet and caption Parquet files (250k rows each) under folder."""
    synsets = list(read_synsets())
    lemmas = list(dict.fromkeys(l for s in synsets for l in s.lemmas))
    words, pairs = collections.Counter(), collections.Counter()
    for s in synsets:
        tokens = re.findall(r"\w+(?:['-]\w+)*|\S", s.gloss)
        words.update(t for t in tokens if t[0].isalnum())
        pairs.update(f"{a} {b}" for a, b in zip(tokens, tokens[1:]) if a[0].isalnum() and b[0].isalnum())
    frequent = [w for w, c in words.items() if c >= 2] + [p for p, c in pairs.items() if c >= 3]
    queries = list(dict.fromkeys(lemmas + frequent))
    pq.write_table(pa.table({"query": queries}), folder / "queries.parquet")
    glosses = [part.strip().strip('"') for s in synsets for part in s.gloss.split("; ")]
    vocab = [w for w, _ in words.most_common()]
    rng, files = random.Random(seed), []
    zipf = lambda items: items[min(int(rng.paretovariate(0.9)) - 1, len(items) - 1)]  # noqa: E731
    for start in range(0, n, 250_000):
        captions = []
        for _ in range(min(250_000, n - start)):
            if rng.random() < 0.45:
                captions.append(rng.choice(glosses))
                continue
            a, b, c = zipf(lemmas), zipf(vocab), rng.choice(lemmas)
            w = " ".join(zipf(vocab) for _ in range(rng.randint(2, 9)))
            fill = {"a": a, "A": a.capitalize(), "b": b, "c": c, "w": w, "y": rng.randint(1950, 2024), "n": rng.randint(0, 9999)}
            captions.append(rng.choice(TEMPLATES).format(**fill))
        uids = np.arange(start, start + len(captions))
        table = pa.table({"url": [f"https://img.example/{u}.jpg" for u in uids], "caption": captions, "uid": uids})
        files.append(str(folder / f"pairs-{start // 250_000:03d}.parquet"))
        pq.write_table(table, files[-1], row_group_size=50_000)
    return str(folder / "queries.parquet"), files


def anchor(files: list[str], queries_uri: str, out: str, t: int) -> dict:
    """Single process, per caption: MetaCLIP spacing + automaton.iter, then sample and write."""
    import ahocorasick

    from clip_core.curation.matching import spacing
    queries = pq.read_table(queries_uri).column("query").to_pylist()
    automaton = ahocorasick.Automaton()
    for i, q in enumerate(queries):
        automaton.add_word(f" {q} ", i)
    automaton.make_automaton()
    counts, matches = np.zeros(len(queries), np.uint64), []
    for f in files:
        captions = pq.read_table(f, columns=["caption"]).column(0).to_pylist()
        ids = [sorted({i for _, i in automaton.iter(spacing(c or ""))}) for c in captions]
        for x in ids:
            counts[x] += 1
        matches.append(ids)
    probs, rng, kept = np.minimum(1.0, t / np.maximum(counts, 1)), random.Random(0), 0
    for i, (f, ids) in enumerate(zip(files, matches)):
        keep = [bool(x) and rng.random() < 1 - np.prod(1 - probs[x]) for x in ids]
        table = pq.read_table(f).filter(pa.array(keep))
        lists = pa.array([x for x, k in zip(ids, keep) if k], pa.list_(pa.int32()))
        pq.write_table(table.append_column("query_ids", lists), f"{out}/part-{i:05d}.parquet")
        kept += sum(keep)
    return {"matched": int(sum(len(x) > 0 for m in matches for x in m)), "kept": int(kept)}


def ours(files: list[str], queries_uri: str, out: str, t: int, workers: int) -> dict:
    """clip_core.curation.curate with a LocalExecutor; pass times from a timing executor."""
    from clip_core.curation.curate import curate
    from clip_core.executors import LocalExecutor

    class Timed(LocalExecutor):
        def map(self, fn, items):
            start = time.perf_counter()
            result = list(super().map(fn, items))  # map is lazy: time the whole pass
            passes[fn.__name__] = round(time.perf_counter() - start, 2)
            return result

    passes = {}
    with Timed(workers) as executor:
        stats = curate(files, queries_uri, out, max_per_query=t, executor=executor)
    return {"matched": stats.matched, "kept": stats.kept, "passes": passes}


def matchers(file: str, queries_uri: str) -> list[tuple[str, float, float, int]]:
    """Matching alone on one file: (name, build CPU s, match CPU s, pairs) per matcher; all must agree."""
    import itertools

    import ahocorasick

    from clip_core.curation.matching import QueryMatcher, spacing
    queries = pq.read_table(queries_uri).column("query").to_pylist()
    captions = pq.read_table(file, columns=["caption"]).column(0)
    texts, rows = captions.to_pylist(), []
    start = time.process_time()
    automaton = ahocorasick.Automaton()
    for i, q in enumerate(queries):
        automaton.add_word(f" {q} ", i)
    automaton.make_automaton()
    built = time.process_time() - start

    def per_caption():
        return {(r, i) for r, c in enumerate(texts) for _, i in automaton.iter(spacing(c or ""))}

    def joined():  # the batch design: one automaton pass over all spaced captions joined by "\n"
        spaced = [spacing(c or "") for c in texts]
        ends = np.cumsum([len(s) + 1 for s in spaced]) - 1
        found = np.fromiter(itertools.chain.from_iterable(automaton.iter("\n".join(spaced))), np.int64).reshape(-1, 2)
        key = np.sort(np.searchsorted(ends, found[:, 0]) << 32 | found[:, 1])
        return set(zip((key >> 32).tolist(), (key & 0xFFFFFFFF).tolist()))

    for name, fn in (("pyahocorasick, per caption", per_caption), ("pyahocorasick, batch joined", joined)):
        start = time.process_time()
        pairs = fn()
        rows.append((name, built, time.process_time() - start, len(pairs)))
    start = time.process_time()
    matcher = QueryMatcher(queries)
    built = time.process_time() - start
    start = time.process_time()
    found = matcher.match(captions)
    rows.append(("numpy token-range hashing (ours)", built, time.process_time() - start, len(found[0])))
    assert set(zip(found[0].tolist(), found[1].tolist())) == pairs, "matchers disagree"
    return rows


def run_child(config: dict) -> dict:
    """Run one configuration in a child process; it reports its result, CPU and peak RSS."""
    start = time.perf_counter()
    out = subprocess.run([sys.executable, __file__, "--child", json.dumps(config)], capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"{config['kind']} failed:\n{out.stderr[-3000:]}")
    return {**json.loads(out.stdout.strip().splitlines()[-1]), "wall_s": round(time.perf_counter() - start, 1)}


def child(config: dict) -> None:
    """Inside the child: run, then add CPU seconds and peak RSS of this process and its workers."""
    with tempfile.TemporaryDirectory() as out:
        if config["kind"] == "anchor":
            result = anchor(config["files"], config["queries"], out, config["t"])
        else:
            result = ours(config["files"], config["queries"], out, config["t"], config["workers"])
    own, workers = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    result["cpu_s"] = round(own.ru_utime + own.ru_stime + workers.ru_utime + workers.ru_stime, 1)
    result["max_rss_mb"] = max(own.ru_maxrss, workers.ru_maxrss) // 1024
    print(json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--captions", type=int, default=1_000_000)
    parser.add_argument("--big", type=int, default=3, help="memory check: the caption files repeated this many times")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--t", type=int, default=20_000)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(json.loads(args.child))
    with tempfile.TemporaryDirectory() as tmp:
        queries, files = build_inputs(Path(tmp), args.captions, 0)
        config = {"files": files, "queries": queries, "t": args.t}
        anchor_row = run_child({**config, "kind": "anchor"})
        rows = [("anchor: pyahocorasick per caption, 1 process", args.captions, anchor_row)]
        for w in args.workers:
            rows.append((f"curate, {w} worker(s)", args.captions, run_child({**config, "kind": "ours", "workers": w})))
        if args.big > 1:
            big = {**config, "files": files * args.big, "kind": "ours", "workers": 1}
            rows.append((f"curate, 1 worker, input x{args.big}", args.captions * args.big, run_child(big)))
        matching = matchers(files[0], queries)
        n_queries, n_first = pq.read_metadata(queries).num_rows, pq.read_metadata(files[0]).num_rows
    print(f"\n{n_queries:,} queries; {args.captions:,} captions; t = {args.t:,}\n")
    print("| pipeline | captions | wall s | CPU s | captions/s | captions/CPU-s | peak RSS MB | matched | kept "
          "| pass wall s (match, sample) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, n, r in rows:
        passes = r.get("passes", {})
        print(f"| {name} | {n:,} | {r['wall_s']} | {r['cpu_s']} | {n / r['wall_s']:,.0f} | {n / r['cpu_s']:,.0f} "
              f"| {r['max_rss_mb']:,} | {r['matched']:,} | {r['kept']:,} "
              f"| {passes.get('match_shard', '')}, {passes.get('sample_shard', '')} |")
    print(f"\nmatching alone on {n_first:,} captions, CPU seconds:\n")
    print("| matcher | build s | match s | captions/CPU-s | (caption, query) pairs |")
    print("|---|---|---|---|---|")
    for name, build, spent, pairs in matching:
        print(f"| {name} | {build:.2f} | {spent:.2f} | {n_first / spent:,.0f} | {pairs:,} |")


if __name__ == "__main__":
    main()
