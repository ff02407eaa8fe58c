"""MLflow tracking for CLIP training runs (Radford et al. 2021, Section 2.5), rank 0 only.

The driver opens the run (every option and the preset as params; git commit, corpus URI
and its crawl stats as tags), rank 0 logs per-step metrics and periodic zero-shot accuracy
(Section 3.1) into that run through `MetricsCallback` and `ZeroShotEval`, and the driver
closes it with the final checkpoint as an artifact and a registered model version.
Tracking never stops training: a server that is down, or goes down, is warned about, and
every row is also written to OUT/metrics.jsonl. `Tracker` is the one writer to MLflow in
flows/ (training, evaluation, the pipeline's parent and stage runs).

A remote OUT (s3:// or any fsspec URI): metrics.jsonl is kept in a local file and uploaded
whole (an object store cannot append) at every checkpoint step, at log steps at most once a
minute, and at the end; MLflow's default store is ./mlflow.db on the driver (with a warning),
and a SQLite store puts new experiments' artifacts under OUT/mlartifacts.
"""
from __future__ import annotations

import json
import os
import subprocess
import tempfile
import time
import urllib.request
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import fsspec
import torch
from torch.utils.flop_counter import FlopCounterMode

from clip_core.crawl import CrawlStats
from clip_core.train.optim import unwrap as _unwrap
from clip_core.weights import is_uri

PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L4": 121.0, "V100": 125.0, "A10": 125.0}

# MLflow 3's UI opens an experiment by its kind; without the tag it guessed GenAI and showed traces.
KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = {KIND_TAG: "custom_model_development"}  # model training: the runs table first


def default_tracking_uri(output: str) -> str:
    """MLFLOW_TRACKING_URI, else a SQLite file in the output folder (./mlflow.db, with a warning, for a remote one)."""
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    if is_uri(output):  # SQLite cannot live on an object store
        db = Path("mlflow.db").resolve()
        warnings.warn(f"OUT {output} is remote and MLFLOW_TRACKING_URI is unset: MLflow runs are recorded in {db} "
                      f"on this machine (artifacts under {output}/mlartifacts); set MLFLOW_TRACKING_URI (or "
                      "--mlflow-uri) to a tracking server to share them")
        return f"sqlite:///{db}"
    return f"sqlite:///{Path(output).resolve()}/mlflow.db"


def reachable(uri: str, timeout: float = 3.0) -> bool:
    """Whether an http(s) tracking server answers /health; other URIs are local and count as reachable."""
    if not uri.startswith(("http://", "https://")):
        return True
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout) as response:
            return response.status == 200
    except OSError:
        return False


def local_artifact_location(uri: str, output: str | None = None) -> str | None:
    """For a SQLite store, artifacts beside the database (not ./mlruns of whatever the cwd is), or in a remote OUT."""
    if not uri.startswith("sqlite:///"):
        return None  # a tracking server decides
    if output and is_uri(output):  # a remote OUT: the artifacts land there with the model
        return f"{output.rstrip('/')}/mlartifacts"
    return (Path(uri[len("sqlite:///"):]).parent / "mlartifacts").as_uri()


def flatten(d: dict, prefix: str = "") -> dict:
    """{"a": {"b": 1}} -> {"a.b": 1}."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


class Tracker:
    """An MLflow client that warns instead of raising; a no-op when the server is down.

    `uri` None is offline (nothing logged); `elsewhere` says in the warning where the numbers still go;
    `output` (OUT) decides where a SQLite store's new experiments keep their artifacts.
    """

    def __init__(self, uri: str | None, run_id: str | None = None, elsewhere: str = "metrics go to metrics.jsonl only",
                 output: str | None = None):
        self.output = output
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")  # a dead server must not stall steps
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
        self.uri, self.run_id, self.client = uri, run_id, None
        if uri is None:  # offline: metrics.jsonl only
            return
        if reachable(uri):
            from mlflow import MlflowClient

            self.client = MlflowClient(tracking_uri=uri)
        else:
            warnings.warn(f"MLflow at {uri} is unreachable; {elsewhere}")

    def _call(self, what: str, fn: Callable, *args, **kwargs):
        if self.client is None:
            return None
        try:
            return fn(*args, **kwargs)
        except Exception as e:  # tracking is best effort: any client or server error is a warning
            warnings.warn(f"MLflow {what} failed ({type(e).__name__}: {e}); going on without it")
            return None

    @property
    def live(self) -> bool:
        """Whether there is a run to log into and a server that answered."""
        return self.client is not None and self.run_id is not None

    def run_exists(self, run_id: str) -> bool | None:
        """Whether the server knows `run_id`; None when it cannot be asked (offline, down, an error)."""
        if self.client is None:
            return None
        from mlflow.exceptions import MlflowException

        try:
            self.client.get_run(run_id)
            return True
        except MlflowException as e:
            if e.error_code == "RESOURCE_DOES_NOT_EXIST":
                return False
            warnings.warn(f"MLflow get run failed ({e}); going on without it")
        except Exception as e:  # a server that went down: as any other call, a warning
            warnings.warn(f"MLflow get run failed ({type(e).__name__}: {e}); going on without it")
        return None

    def start(self, experiment: str, run_name: str, params: dict, tags: dict) -> str | None:
        """Open a run with params and tags; returns its id (None when MLflow is down)."""
        run = self._call("start", self._start, experiment, run_name, tags)
        self.run_id = run.info.run_id if run else None
        items = [(k, str(v)[:6000]) for k, v in flatten(params).items()]
        for i in range(0, len(items), 100):
            self.log_params(dict(items[i:i + 100]))
        return self.run_id

    def _start(self, experiment: str, run_name: str, tags: dict):
        found = self.client.get_experiment_by_name(experiment)
        if found is None:
            experiment_id = self.client.create_experiment(
                experiment, artifact_location=local_artifact_location(self.uri, self.output), tags=EXPERIMENT_KIND)
        else:
            experiment_id = found.experiment_id
            if KIND_TAG not in found.tags:  # made before this tag, or by hand: say what it holds
                self.client.set_experiment_tag(experiment_id, KIND_TAG, EXPERIMENT_KIND[KIND_TAG])
        return self.client.create_run(experiment_id, run_name=run_name, tags={k: str(v) for k, v in tags.items()})

    def log_params(self, params: dict) -> None:
        from mlflow.entities import Param

        if self.live:
            rows = [Param(k, v) for k, v in params.items()]
            self._call("log params", self.client.log_batch, self.run_id, params=rows)

    def log_metrics(self, metrics: dict, step: int) -> None:
        from mlflow.entities import Metric

        if self.live:
            now = int(time.time() * 1000)
            rows = [Metric(k, float(v), now, step) for k, v in metrics.items() if isinstance(v, (int, float))]
            self._call("log metrics", self.client.log_batch, self.run_id, metrics=rows)

    def set_tags(self, tags: dict) -> None:
        from mlflow.entities import RunTag

        if self.live:
            rows = [RunTag(k, str(v)) for k, v in tags.items()]
            self._call("set tags", self.client.log_batch, self.run_id, tags=rows)

    def log_inputs(self, datasets: list[tuple[Callable, str]]) -> None:
        """Log datasets as this run's inputs: (a function making the flows.lineage dataset, its
        context: training, evaluation, ...). Made here, so a listing that fails only warns."""
        if self.live and datasets:
            self._call("log dataset inputs", self._log_inputs, datasets)

    def _log_inputs(self, datasets: list[tuple[Callable, str]]) -> None:
        from mlflow.entities import DatasetInput, InputTag

        inputs = [DatasetInput(make()._to_mlflow_entity(), [InputTag("mlflow.data.context", context)])
                  for make, context in datasets]
        self.client.log_inputs(self.run_id, datasets=inputs)

    def log_artifacts(self, folder: str, artifact_path: str) -> None:
        if self.live:
            self._call("log artifacts", self.client.log_artifacts, self.run_id, folder, artifact_path)

    def log_artifact(self, file: str, artifact_path: str) -> None:
        if self.live:
            self._call("log artifact", self.client.log_artifact, self.run_id, file, artifact_path)

    def log_text(self, text: str, artifact_file: str) -> None:
        """A text artifact (an HTML page, ...) written from memory: the file may live on S3."""
        if self.live:
            self._call("log text", self.client.log_text, self.run_id, text, artifact_file)

    def register(self, name: str, artifact_path: str):
        """A new version of registered model `name` from this run's artifact."""
        if not self.run_id:
            return None
        return self._call("register model", self._register, name, artifact_path)

    def _register(self, name: str, artifact_path: str):
        from mlflow.exceptions import MlflowException

        try:
            self.client.create_registered_model(name)
        except MlflowException as e:
            if "RESOURCE_ALREADY_EXISTS" not in str(e) and "already exists" not in str(e).lower():
                raise
        source = f"{self.client.get_run(self.run_id).info.artifact_uri}/{artifact_path}"
        return self.client.create_model_version(name, source, self.run_id)

    def end(self, status: str = "FINISHED") -> None:
        if self.live:
            self._call("end run", self.client.set_terminated, self.run_id, status)

    def end_stale(self, experiment: str, run_name: str, tags: dict, status: str = "KILLED") -> list[str]:
        """End the RUNNING runs named `run_name` with `tags` that a killed driver left open; returns their ids."""
        return self._call("end stale runs", self._end_stale, experiment, run_name, tags, status) or []

    def _end_stale(self, experiment: str, run_name: str, tags: dict, status: str) -> list[str]:
        found = self.client.get_experiment_by_name(experiment)
        if found is None:
            return []
        # tags are compared here, not in the filter string: paths may hold quotes
        running = self.client.search_runs([found.experiment_id], "attributes.status = 'RUNNING'")
        stale = [r.info.run_id for r in running
                 if r.info.run_name == run_name and all(r.data.tags.get(k) == str(v) for k, v in tags.items())]
        for run_id in stale:
            self.client.set_terminated(run_id, status)
        if stale:
            warnings.warn(f"MLflow runs {stale} of {run_name!r} were left RUNNING by a killed training; marked {status}")
        return stale


def git_commit(cwd: str | None = None) -> str:
    """HEAD's commit (with "-dirty" when the tree has changes), or "unknown"."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=cwd, capture_output=True, text=True)
        return head.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def corpus_tags(corpus: str, n_shards: int) -> dict:
    """Tags naming the corpus and its crawl_stats.json scalars, if the file is there."""
    tags = {"corpus": corpus, "corpus.shards": n_shards}
    try:
        from flows.lineage import files_digest

        tags["corpus.digest"] = files_digest(corpus)[0][:12]  # the digest of its MLflow dataset input
    except OSError:
        pass
    try:
        stats = CrawlStats.read(corpus).to_dict()  # TypeError: a stats file of another version
        tags.update({f"corpus.{k}": v for k, v in flatten(stats).items() if isinstance(v, (int, float, str))})
    except (OSError, ValueError, TypeError):
        pass
    return tags


def flops_per_sample(meta: torch.nn.Module, image_size: int, context_length: int) -> float:
    """Forward + backward FLOPs of one sample of a model built on the meta device."""
    image = torch.zeros(2, 3, image_size, image_size, device="meta")
    text = torch.zeros(2, context_length, dtype=torch.long, device="meta")
    with FlopCounterMode(display=False) as counter:
        outputs = meta(image, text)
        sum(o.sum() for o in outputs).backward()
    return counter.get_total_flops() / 2


def peak_flops(peak_tflops: float | None, device: torch.device) -> float | None:
    """Peak FLOP/s per device: the option, else a known GPU's dense bf16 figure, else None."""
    if peak_tflops:
        return peak_tflops * 1e12
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        return next((v * 1e12 for k, v in PEAK_TFLOPS.items() if k in name), None)
    return None


def _plain(value):
    """A metric as JSON can hold it: 0-dim tensors read as floats."""
    return value.item() if torch.is_tensor(value) else value


def _step_of(line: str) -> float:
    """The step of a metrics.jsonl row; a line cut by a crash counts as after every step."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return float("inf")


class MetricsCallback:
    """Rank 0: per-step metrics (+ throughput, MFU, extras) to metrics.jsonl and MLflow.

    A remote `log_path` (an fsspec URI) is mirrored in a local file and uploaded whole at every
    `checkpoint_every` step (so a resumed run finds every row up to its checkpoint), at log steps
    when `sync_seconds` have passed since the last upload, and at the end.
    """

    def __init__(self, tracker: Tracker, log_path: str | Path, log_every: int, world_size: int,
                 flops: float | None = None, peak: float | None = None, extras: Callable | None = None,
                 checkpoint_every: int | None = None, sync_seconds: float = 60.0):
        self.remote = str(log_path) if is_uri(log_path) else None
        if self.remote:  # an object store cannot append: rows go to a local mirror, uploaded whole
            log_path = Path(tempfile.mkdtemp(prefix="clip-metrics-")) / Path(self.remote).name
        self.tracker, self.log_path, self.log_every = tracker, Path(log_path), log_every
        self.world_size, self.flops, self.peak, self.extras = world_size, flops, peak, extras
        self.checkpoint_every, self.sync_seconds, self.synced = checkpoint_every, sync_seconds, time.monotonic()
        self.pending: list[tuple[int, dict]] = []  # rows not yet written (a GPU run reads them at log steps)
        self.last_row: dict = {}
        self._sender = ThreadPoolExecutor(1, thread_name_prefix="mlflow-metrics")  # MLflow off the step's path
        self._sent: list = []
        self.log_path.parent.mkdir(parents=True, exist_ok=True)

    def _download(self) -> None:
        """The remote file's rows into the local mirror (a resumed run continues them)."""
        fs, path = fsspec.core.url_to_fs(self.remote)
        if fs.isfile(path):
            fs.get_file(path, str(self.log_path))

    def flush(self) -> None:
        """Write the pending rows, then upload the local mirror whole to the remote metrics.jsonl (one object
        write); local: nothing more to do."""
        self._write_pending()
        for future in self._sent:
            future.result()
        self._sent.clear()
        if self.remote and self.log_path.exists():
            fs, path = fsspec.core.url_to_fs(self.remote)
            fs.put_file(str(self.log_path), path)
        self.synced = time.monotonic()

    def _maybe_flush(self, step: int) -> None:
        if not self.remote:
            return
        at_checkpoint = bool(self.checkpoint_every) and step % self.checkpoint_every == 0
        due = step % self.log_every == 0 and time.monotonic() - self.synced >= self.sync_seconds
        if at_checkpoint or due:
            self.flush()

    def row(self, trainer) -> dict:
        m = dict(trainer.metrics)
        m["samples_per_s_worker"] = m.pop("samples_per_s")
        m["samples_per_s"] = m["samples_per_s_worker"] * self.world_size
        if self.flops and self.peak:
            m["mfu"] = self.flops * m["samples_per_s"] / (self.peak * self.world_size)
        return {**m, **(self.extras(trainer) if self.extras else {})}

    def on_train_start(self, trainer) -> None:
        """Drop rows after the step training starts from: a resumed run logs those steps again."""
        if self.remote:
            self.log_path.unlink(missing_ok=True)  # a restarted worker: the remote file is the record
            self._download()
        if not self.log_path.exists():
            return
        rows = self.log_path.read_text().splitlines(keepends=True)
        kept = [r for r in rows if _step_of(r) <= trainer.step]
        if len(kept) == len(rows):
            return
        tmp = self.log_path.with_name(f".{self.log_path.name}.tmp")
        tmp.write_text("".join(kept))
        os.replace(tmp, self.log_path)  # whole or not at all
        self.flush()

    def on_step_end(self, trainer) -> None:
        """Every step's row to metrics.jsonl; on a GPU (values still on the device) written at log steps,
        checkpoint steps and the end, when they are read in one go."""
        self.pending.append((trainer.step, self.row(trainer)))
        step = trainer.step
        due = step % self.log_every == 0 or step == 1 or (self.checkpoint_every and step % self.checkpoint_every == 0)
        if getattr(trainer, "check_every", 1) > 1 and not due:
            return
        self._write_pending()
        if step % self.log_every == 0 or step == 1:
            self._send(self.last_row, step)
        self._maybe_flush(step)

    def _send(self, metrics: dict, step: int) -> None:
        """Log to MLflow from a background thread, in order; `flush` waits for what was sent."""
        self._sent = [f for f in self._sent if not f.done()]
        self._sent.append(self._sender.submit(self.tracker.log_metrics, dict(metrics), step))

    def _write_pending(self) -> None:
        lines = []
        for step, row in self.pending:
            row = {k: _plain(v) for k, v in row.items()}
            lines.append(json.dumps({"step": step, **row}) + "\n")
            self.last_row = row
        self.pending.clear()
        if lines:
            with self.log_path.open("a") as f:
                f.writelines(lines)

    def on_train_end(self, trainer) -> None:
        self._write_pending()
        self.flush()

    def log(self, metrics: dict, step: int) -> None:
        """Other metrics (evaluation) to both sinks."""
        self._write_pending()  # the steps before it first
        with self.log_path.open("a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")
        self._send(metrics, step)
        self.flush()  # evaluations are rare, and may come after on_train_end's upload


class ZeroShotEval:
    """Rank 0: zero-shot accuracy on eval sets every `every` steps (0: only at the end)."""

    def __init__(self, eval_dirs: list[str], every: int, sink: MetricsCallback, device):
        self.eval_dirs, self.every, self.sink, self.device = eval_dirs, every, sink, device

    def on_step_end(self, trainer) -> None:
        if self.every and trainer.step % self.every == 0:
            self.run(trainer)

    def on_train_end(self, trainer) -> None:
        if not self.every or trainer.step % self.every:
            self.run(trainer)

    def run(self, trainer) -> None:
        try:
            from clip_core.eval.zeroshot import evaluate_zeroshot
        except ImportError:  # the evaluator is optional: training does not depend on it
            return
        for path in self.eval_dirs:
            try:
                result = evaluate_zeroshot(_unwrap(trainer.model), path, device=self.device, progress=False)
            except (OSError, ValueError) as e:
                warnings.warn(f"zero-shot evaluation of {path} failed: {e}")
                continue
            name = Path(path.rstrip("/")).name
            self.sink.log({f"zeroshot.{name}.{k}": v for k, v in result.metrics.items() if v is not None}, trainer.step)
