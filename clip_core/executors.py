"""Executors: how a stage maps a function over its shards (DESIGN.md, Laptop to cluster).

A stage asks only for `map(fn, items)` giving fn's results in item order (the `Executor`
protocol), so its output does not depend on where the work ran or on the worker count.
`LocalExecutor` is the local one; flows/executors.py's RayExecutor runs the same top-level
function as Ray tasks. fn and the items cross to worker processes by pickle: fn must be a
top-level function, and an `InputError` raised in a worker reaches the caller whole.

Where the work ran: an executor's `node_id` is a top-level function that, called in a worker,
names the node it runs on (LocalExecutor: the host name; RayExecutor: the Ray node id).
`map_counting_nodes` wraps fn with it, so a stage's stats can say which node ran how many items
without the library knowing what a cluster is.
"""
from __future__ import annotations

import functools
import itertools
import multiprocessing
import os
import socket
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from typing import Protocol, TypeVar, runtime_checkable

from clip_core.checks import whole_number

T = TypeVar("T")
R = TypeVar("R")


@runtime_checkable
class Executor(Protocol):
    """What a stage maps its shards with: results in item order (a list or a lazy iterator)."""

    def map(self, fn: Callable[[T], R], items: Iterable[T]) -> Iterable[R]:
        """fn over items; results in item order."""
        ...

    @staticmethod
    def node_id() -> str:
        """Called in a worker: the name of the node it runs on."""
        ...


def host_name() -> str:
    """This machine's name: the node of every item a local executor runs."""
    return socket.gethostname()


class _Located:
    """fn(item) with the node it ran on: (node, result). Picklable when fn and node_id are."""

    def __init__(self, fn: Callable, node_id: Callable[[], str]):
        self.fn, self.node_id = fn, node_id
        functools.update_wrapper(self, fn)  # an executor that looks at fn.__name__ sees the stage's function

    def __call__(self, item):
        return self.node_id(), self.fn(item)


def map_counting_nodes(executor: Executor, fn: Callable[[T], R], items: Iterable[T],
                       nodes: Counter) -> Iterator[R]:
    """executor.map(fn, items)'s results in item order, adding 1 to nodes[node] per item where it ran."""
    node_id = getattr(executor, "node_id", host_name)  # an executor without one: the worker's host name
    for node, result in executor.map(_Located(fn, node_id), items):
        nodes[node] += 1
        yield result


class LocalExecutor:
    """map(fn, items) on spawn worker processes, or in this process for one worker or one item.

    `map` is lazy: items are submitted as results are consumed, at most `window` of them in
    flight, so memory follows the window and not the input (callers that want a list call
    list()). The pool starts on first use and is kept across maps (a second pass reuses the
    first pass's processes and their caches) until close() or the end of `with`. Spawn, not
    fork: no copy of a process that holds Arrow's or torch's threads; a script that maps at top
    level needs an `if __name__ == "__main__":` guard.
    """

    def __init__(self, workers: int | None = None, window: int | None = None):
        if workers is not None:
            whole_number("--workers", workers, fix="worker processes; leave it out for all cores")
        if window is not None:
            whole_number("window", window, fix="items in flight at once; leave it out for twice the workers")
        self.workers = workers or os.cpu_count() or 1
        self.window = window or 2 * self.workers
        self._pool: ProcessPoolExecutor | None = None

    node_id = staticmethod(host_name)  # every worker runs on this host

    def parallelism(self) -> int:
        """Items that can run at once: the worker count."""
        return self.workers

    def map(self, fn: Callable[[T], R], items: Iterable[T]) -> Iterator[R]:
        """fn over items; results in item order, computed as they are consumed."""
        return self._results(fn, iter(items))

    def _results(self, fn: Callable[[T], R], items: Iterator[T]) -> Iterator[R]:
        head = list(itertools.islice(items, 2))
        if self.workers <= 1 or len(head) <= 1:  # nothing to run in parallel: no process to start
            yield from map(fn, itertools.chain(head, items))
            return
        pool, pending = self._started(), deque()
        try:
            for item in itertools.chain(head, items):
                pending.append(pool.submit(fn, item))
                if len(pending) >= self.window:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:  # a failed item or an abandoned map: what has not started never runs
            _cancel(pending)

    def _started(self) -> ProcessPoolExecutor:
        if self._pool is None:
            self._pool = ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("spawn"))
        return self._pool

    def close(self) -> None:
        """Shut the worker processes down (queued items are dropped)."""
        if self._pool is not None:
            self._pool.shutdown(cancel_futures=True)
            self._pool = None

    def __enter__(self) -> LocalExecutor:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _cancel(pending: Iterable[Future]) -> None:
    for future in pending:
        future.cancel()
