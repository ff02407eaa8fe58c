"""The evaluate stage: a checkpoint and eval sets in, CLIP_benchmark-shaped JSON out.

CLIP (Radford et al. 2021), Section 3: zero-shot classification, zero-shot retrieval and
linear probes. One JSON per (model, dataset, task), shaped as CLIP_benchmark writes them:
{"dataset", "model", "pretrained", "task", "metrics", "language"}, with task
"zeroshot_classification" | "zeroshot_retrieval" | "linear_probe"; beside them `results.md`,
a Markdown table over every result JSON in the output folder (so runs can be compared).
Nothing here logs to a tracker: flows/evaluate.py logs the returned records to MLflow.

Which checkpoint CKPT means (a weights file, a model folder, or a training output folder's
newest checkpoint) is clip_core.weights' `resolve_checkpoint`; `load_model` reads it.
"""
from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from pathlib import Path

import torch
from fsspec.implementations.local import LocalFileSystem

from clip_core.checks import check_device, check_out_folder, whole_number
from clip_core.data.parquet import atomic_open
from clip_core.eval.datasets import EvalSet, load_eval_set
from clip_core.eval.linear_probe import evaluate_linear_probe
from clip_core.eval.retrieval import evaluate_retrieval
from clip_core.eval.zeroshot import evaluate_zeroshot
from clip_core.weights import load_model, resolve_checkpoint

__all__ = ["TASKS", "evaluate", "resolve_checkpoint", "load_model", "default_model_name", "result_record",
           "write_result", "read_results", "markdown_table", "write_markdown"]

# command-line task name -> (CLIP_benchmark task name, eval set kind it needs)
TASKS = {
    "zeroshot": ("zeroshot_classification", "classification"),
    "retrieval": ("zeroshot_retrieval", "retrieval"),
    "linear-probe": ("linear_probe", "classification"),
}
_NOT_PERCENT = {"C"}


# ----- checkpoints -----

def default_model_name(checkpoint: str | Path, resolved: Path) -> str:
    """A readable model id: the CKPT name, plus the name of the checkpoint picked inside it."""
    checkpoint = Path(checkpoint)
    if resolved == checkpoint:
        return checkpoint.stem if checkpoint.is_file() else checkpoint.name
    leaf = resolved.parent if resolved.is_file() and resolved.stem == "model" else resolved
    return checkpoint.name if leaf == checkpoint else f"{checkpoint.name}-{leaf.name.split('.')[0]}"


# ----- results -----

def result_record(dataset: str, model: str, pretrained: str, task: str, metrics: dict) -> dict:
    """One result in CLIP_benchmark's shape."""
    return {"dataset": dataset, "model": model, "pretrained": pretrained, "task": task,
            "metrics": metrics, "language": "en"}


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-") or "x"


def write_result(record: dict, out_dir: str | Path) -> Path:
    """Write `{dataset}_{model}_{task}.json` under out_dir."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{_slug(record['dataset'])}_{_slug(record['model'])}_{record['task']}.json"
    _write_atomic(path, json.dumps(record, indent=2) + "\n")
    return path


def _write_atomic(path: Path, text: str) -> None:
    """Write beside `path`, then rename: a reader never sees half a file."""
    with atomic_open(LocalFileSystem(), str(path), "w") as f:
        f.write(text)


def read_results(out_dir: str | Path) -> list[dict]:
    """Every result JSON in out_dir (files of another shape are ignored)."""
    records = []
    for path in sorted(Path(out_dir).glob("*.json")):
        try:
            record = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            continue
        if isinstance(record, dict) and {"dataset", "model", "task", "metrics"} <= record.keys():
            records.append(record)
    return records


def _cell(name: str, value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if name in _NOT_PERCENT:
        return f"{value:.3g}"
    return f"{100 * value:.2f}"


def markdown_table(records: Sequence[dict]) -> str:
    """One Markdown table per task: rows (model, dataset), metric columns in % (C as is)."""
    lines = ["# Evaluation results", "",
             "Accuracies and recalls in %; `n/a`: not defined (e.g. top-5 of < 5 classes)."]
    order = [name for name, _ in TASKS.values()]
    tasks = sorted({r["task"] for r in records}, key=lambda t: (order.index(t) if t in order else len(order), t))
    for task in tasks:
        rows = sorted((r for r in records if r["task"] == task), key=lambda r: (r["model"], r["dataset"]))
        names = list(dict.fromkeys(k for r in rows for k in r["metrics"]))
        lines += ["", f"## {task}", "", "| model | dataset | " + " | ".join(names) + " |",
                  "|---|---|" + "---:|" * len(names)]
        for r in rows:
            cells = [_cell(n, r["metrics"].get(n)) for n in names]
            lines.append(f"| {r['model']} | {r['dataset']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_markdown(out_dir: str | Path) -> Path:
    """Rewrite out_dir/results.md from every result JSON in out_dir."""
    path = Path(out_dir) / "results.md"
    _write_atomic(path, markdown_table(read_results(out_dir)))
    return path


# ----- the driver -----

def _dataset_names(eval_dirs: Sequence[str], dataset_names) -> list[str | None]:
    if dataset_names is None or isinstance(dataset_names, str):
        dataset_names = [dataset_names] if dataset_names else []
    names = [n or None for n in dataset_names]
    if not names:
        return [None] * len(eval_dirs)
    if len(names) == 1:
        return names * len(eval_dirs)
    if len(names) != len(eval_dirs):
        raise ValueError(f"{len(names)} dataset names for {len(eval_dirs)} eval sets: give one, or one per set")
    return names


def _check_tasks(tasks: Sequence[str]) -> list[str]:
    tasks = list(dict.fromkeys(t.replace("_", "-") for t in ([tasks] if isinstance(tasks, str) else tasks)))
    unknown = [t for t in tasks if t not in TASKS]
    if unknown or not tasks:
        raise ValueError(f"unknown task(s) {unknown or tasks}; choose from {', '.join(TASKS)}")
    return tasks


def _open_sets(eval_dirs, dataset_names, paper_prompts: bool) -> list[EvalSet]:
    if isinstance(eval_dirs, (str, Path)):
        eval_dirs = [eval_dirs]
    if not eval_dirs:
        raise ValueError("no eval sets given")
    names = _dataset_names(eval_dirs, dataset_names)
    sets = [load_eval_set(str(d), "test", n, use_paper_prompts=paper_prompts) for d, n in zip(eval_dirs, names)]
    seen = [s.name for s in sets]
    if len(set(seen)) != len(seen):
        raise ValueError(f"two eval sets share a name ({seen}); pass distinct --dataset-name values")
    return sets


def _pairs(tasks: list[str], sets: list[EvalSet]) -> list[tuple[str, EvalSet]]:
    """(task, set) for every task that fits the set's kind; fails before any model is loaded."""
    pairs = [(t, s) for s in sets for t in tasks if TASKS[t][1] == s.kind]
    if not pairs:
        kinds = ", ".join(f"{s.name}: {s.kind}" for s in sets)
        raise ValueError(f"no task among {tasks} applies to these eval sets ({kinds})")
    for task, s in pairs:
        if task == "linear-probe" and "train" not in s.splits:
            raise ValueError(f"eval set {s.name} has no 'train' split for the linear probe ({s.root})")
    return pairs


def _run_task(task: str, model, eval_set: EvalSet, **kwargs) -> dict:
    if task == "zeroshot":
        return evaluate_zeroshot(model, eval_set, **kwargs).metrics
    if task == "retrieval":
        return evaluate_retrieval(model, eval_set, **kwargs)
    result = evaluate_linear_probe(model, eval_set, **kwargs)
    return {**result.metrics, "C": result.C}


def evaluate(checkpoint: str | Path, eval_dirs: Sequence[str | Path], tasks: Sequence[str] = ("zeroshot",),
             out_dir: str | Path = "eval_results", *, batch_size: int = 64, dataset_names=None,
             model_name: str | None = None, paper_prompts: bool = False, device: str | None = None,
             progress: bool | None = None, num_workers: int = 0) -> list[dict]:
    """Run each task on each eval set of its kind; write the JSONs and results.md; return the records."""
    whole_number("--batch-size", batch_size)
    whole_number("--workers", num_workers, 0)
    check_out_folder("--out", out_dir)
    check_device("--device", device)
    tasks = _check_tasks(tasks)
    pairs = _pairs(tasks, _open_sets(eval_dirs, dataset_names, paper_prompts))
    model, resolved = load_model(checkpoint)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = model.to(device)
    name = model_name or default_model_name(checkpoint, resolved)
    records = []
    for task, eval_set in pairs:
        metrics = _run_task(task, model, eval_set, batch_size=batch_size, device=device, progress=progress,
                            num_workers=num_workers)
        record = result_record(eval_set.name, name, str(resolved.resolve()), TASKS[task][0], metrics)
        write_result(record, out_dir)
        records.append(record)
    write_markdown(out_dir)
    return records


# ----- command line -----
