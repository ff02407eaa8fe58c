"""Which data made a model: the pipeline's datasets as MLflow dataset inputs (issue 20 item 2).

Each dataset is logged by reference, never copied: its name, source URI, a digest of its files
(name and size of every data file under the folder, so a re-crawl or a changed eval set gets a
new digest while reading nothing but the listing), its row count and its schema. The curated
pairs go on the crawl run, the corpus shards on the dedup and training runs, each eval set on
the dedup and evaluation runs; the training run's `corpus.digest` tag names the corpus that
trained it, and the registered model version links back to that run.
"""
from __future__ import annotations

import hashlib
import json
import posixpath
import warnings
from pathlib import Path

import fsspec

DATA_SUFFIXES = (".tar", ".parquet")


def files_digest(uri: str, suffixes=DATA_SUFFIXES) -> tuple[str, int]:
    """(sha256 of the sorted "relative path size" lines of the data files under uri, their count)."""
    fs, root = fsspec.core.url_to_fs(uri)
    root = root.rstrip("/")
    sizes = {p: info.get("size", 0) for p, info in fs.find(root, detail=True).items()
             if p.endswith(suffixes) and not posixpath.basename(posixpath.dirname(p)).startswith("_")}
    lines = "".join(f"{posixpath.relpath(p, root)} {sizes[p]}\n" for p in sorted(sizes))
    return hashlib.sha256(lines.encode()).hexdigest(), len(sizes)


def _schema(columns: dict[str, str]):
    from mlflow.types import ColSpec, DataType, Schema

    return Schema([ColSpec(getattr(DataType, kind), name) for name, kind in columns.items()])


def dataset(uri: str, name: str, rows: int | None, columns: dict[str, str]):
    """A MetaDataset of `uri` (its digest from the file listing) that reports its row count."""
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset

    class CountedDataset(MetaDataset):
        @property
        def profile(self):
            return {"num_rows": rows} if rows is not None else None

        def to_dict(self) -> dict[str, str]:
            return {**super().to_dict(), **({"profile": json.dumps(self.profile)} if self.profile else {})}

    digest, _ = files_digest(uri)
    source = uri if "://" in uri else Path(uri).resolve().as_uri()  # the UI shows where it lives, not a relative path
    with warnings.catch_warnings():  # a local folder matches two source kinds; the first (local) is right
        warnings.simplefilter("ignore")
        resolved = resolve_dataset_source(source)
    return CountedDataset(resolved, name=name, digest=digest[:12], schema=_schema(columns))


def corpus_dataset(shards: str):
    """The crawled corpus: WebDataset shards of image, caption and metadata (rows: images saved)."""
    from clip_core.crawl import CrawlStats

    try:
        rows = CrawlStats.read(shards).success
    except (OSError, ValueError, TypeError):
        rows = None
    return dataset(shards, "corpus", rows, {"key": "string", "jpg": "binary", "txt": "string", "json": "string"})


def pairs_dataset(curated: str):
    """The curated (query-balanced) pairs: Parquet of url, caption and the queries matched."""
    from clip_core.curation.curate import CurationStats

    try:
        rows = CurationStats.read(curated).kept
    except (OSError, ValueError, TypeError):
        rows = None
    return dataset(curated, "curated-pairs", rows, {"url": "string", "caption": "string"})


def eval_dataset(eval_dir: str, split: str = "test"):
    """One eval set's split: images and labels (rows: the samples of the split)."""
    from clip_core.eval.datasets import iter_samples

    rows = sum(1 for _ in iter_samples(eval_dir, split))
    name = f"eval/{eval_dir.rstrip('/').rsplit('/', 1)[-1]}"
    return dataset(eval_dir, name, rows, {"image": "binary", "label": "long"})
