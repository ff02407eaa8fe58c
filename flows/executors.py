"""Executors that run the library's per-shard maps on Ray (the one place curation talks to Ray).

The library only asks for an object with `map(fn, items) -> list` (results in item order);
`clip_core.executors.LocalExecutor` is the process-pool one (the `Executor` protocol). Here the same top-level
function becomes a Ray task per item, so a shard's work runs wherever the cluster has a CPU.
Ray worker processes are reused across tasks, so the per-process matcher cache still pays
its build once per worker. fn is put in the object store once per map (dedup's carries the
eval index and the descriptors), and tasks are spread over the nodes ("SPREAD") so that a
cluster's every node takes a share; `node_id` names the Ray node a task ran on.
With `gpus_per_task` a task also asks Ray for that many GPUs: it then runs only on a node with
a free GPU, Ray sets its CUDA_VISIBLE_DEVICES to the GPU(s) it was given (cuda:0 in the task),
and each GPU task gets a fresh worker process (Ray's default for GPU tasks).
"""
from __future__ import annotations

import shutil
import tempfile

import ray

from flows.common import loopback_ray


def ray_node_id() -> str:
    """Called in a Ray task: the id of the node it runs on."""
    return ray.get_runtime_context().get_node_id()


def _apply(fn, item):
    """The Ray task: fn (resolved from the object store) on one item."""
    return fn(item)


class RayExecutor:
    """map(fn, items) as one Ray task per item on the cluster at `address` (or a local one)."""

    node_id = staticmethod(ray_node_id)

    def __init__(self, address: str | None = None, num_cpus: int | None = None, cpus_per_task: float = 1.0,
                 max_in_flight: int | None = None, scheduling_strategy: str | None = "SPREAD",
                 gpus_per_task: float = 0.0, **init_kwargs):
        if gpus_per_task < 0:
            raise ValueError(f"gpus_per_task must be >= 0, got {gpus_per_task}")
        self.address, self.num_cpus, self.cpus_per_task = address, num_cpus, cpus_per_task
        self.gpus_per_task = gpus_per_task
        self.max_in_flight, self.scheduling_strategy, self.init_kwargs = max_in_flight, scheduling_strategy, init_kwargs
        self._started, self._temp_dir = False, None

    def _connect(self) -> None:
        if ray.is_initialized():
            return
        kwargs = {"include_dashboard": False, "log_to_driver": False, **self.init_kwargs}
        if self.address:
            ray.init(address=self.address, **kwargs)
        else:  # a local cluster (ENVIRONMENT.md): no auth, a temp folder we own, >= 2 logical CPUs
            if "_temp_dir" not in kwargs:
                kwargs["_temp_dir"] = self._temp_dir = tempfile.mkdtemp(prefix="ray-curate-")
            with loopback_ray():
                ray.init(num_cpus=max(self.num_cpus, 2) if self.num_cpus else None, **kwargs)  # 1 CPU times out
        self._started = True

    def cluster_gpus(self) -> float:
        """GPUs the cluster declares in all (0 without GPU nodes); connects first."""
        self._connect()
        return float(ray.cluster_resources().get("GPU", 0))

    def parallelism(self) -> int:
        """Tasks that can run at once: the cluster's CPUs over cpus_per_task (the crawl divides per-host limits by it)."""
        self._connect()
        return max(int(ray.cluster_resources().get("CPU", 1) // (self.cpus_per_task or 1)), 1)

    def map(self, fn, items) -> list:
        """fn over items as Ray tasks; results in item order; at most max_in_flight pending."""
        self._connect()
        options = {"num_cpus": self.cpus_per_task}
        if self.gpus_per_task:
            options["num_gpus"] = self.gpus_per_task
        if self.scheduling_strategy:
            options["scheduling_strategy"] = self.scheduling_strategy
        # options at decoration, not .options(): Ray then runs each GPU task in a fresh worker process
        # (max_calls=1), so no reused process keeps a CUDA context on the GPU an earlier task was given
        task = ray.remote(**options)(_apply)
        fn_ref, refs, pending = ray.put(fn), [], []  # fn crosses once, not once per item
        for item in items:
            if self.max_in_flight and len(pending) >= self.max_in_flight:
                _, pending = ray.wait(pending, num_returns=1)  # bound the driver's queued work
            refs.append(task.remote(fn_ref, item))
            pending.append(refs[-1])
        return ray.get(refs)

    def shutdown(self) -> None:
        """Stop the Ray runtime if this executor started it."""
        if self._started and ray.is_initialized():
            ray.shutdown()
        if self._temp_dir:
            shutil.rmtree(self._temp_dir, ignore_errors=True)
        self._started, self._temp_dir = False, None

    def __enter__(self) -> "RayExecutor":
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()
