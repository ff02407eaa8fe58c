"""The Executor protocol and LocalExecutor: results in item order, a bounded window, errors whole."""
import os
import pickle
import socket
import time
from collections import Counter

import pytest

from clip_core.errors import InputError
from clip_core.executors import Executor, LocalExecutor, map_counting_nodes


def _square(i):
    return i * i


def _late_if_early(i):
    time.sleep(0.05 * (6 - i))  # the first items finish last
    return i


def _pid(_):
    return os.getpid()


def _raise_worker_input_error(i):
    raise InputError(f"shard-{i}.parquet", "is not a readable Parquet file", "rewrite it")


@pytest.fixture(scope="module")
def pool():
    """Two spawn workers, at most three items in flight (one pool start for the module)."""
    with LocalExecutor(2, window=3) as executor:
        yield executor


def test_results_come_in_item_order_whatever_finishes_first(pool):
    assert list(pool.map(_late_if_early, range(6))) == list(range(6))


def test_map_is_lazy_and_bounds_the_items_in_flight(pool):
    pulled = []

    def items():
        for i in range(20):
            pulled.append(i)
            yield i

    results = pool.map(_square, items())
    assert pulled == []  # nothing submitted before a result is asked for
    assert next(results) == 0 and len(pulled) == 3  # the window, not the input
    for n, result in enumerate(results, start=1):
        assert result == n * n and len(pulled) == min(n + 3, 20)


def test_the_pool_is_kept_across_maps(pool):
    first, second = set(pool.map(_pid, range(6))), set(pool.map(_pid, range(6)))
    assert os.getpid() not in first | second and len(first | second) <= 2


def test_one_worker_or_one_item_runs_in_this_process(pool):
    assert list(LocalExecutor(1).map(lambda i: i + 1, range(3))) == [1, 2, 3]  # a lambda: nothing pickled
    assert list(LocalExecutor(1).map(_pid, range(3))) == [os.getpid()] * 3
    assert list(pool.map(_pid, [0])) == [os.getpid()]  # no process is worth starting for one item
    assert list(pool.map(_pid, [])) == []


def test_an_input_error_raised_in_a_worker_arrives_whole(pool):
    err = pickle.loads(pickle.dumps(InputError("f.parquet", "is bad", "fix it")))
    assert (err.where, err.problem, err.fix) == ("f.parquet", "is bad", "fix it") and isinstance(err, InputError)
    whole = r"^shard-0\.parquet: is not a readable Parquet file \(rewrite it\)$"
    with pytest.raises(InputError, match=whole) as caught:
        list(pool.map(_raise_worker_input_error, range(5)))  # the first item's error, as items come in order
    assert (caught.value.where, caught.value.problem, caught.value.fix) == (
        "shard-0.parquet", "is not a readable Parquet file", "rewrite it")
    assert list(pool.map(_square, range(4))) == [0, 1, 4, 9]  # the pool survives a failed map


def test_bad_sizes_are_refused():
    with pytest.raises(InputError, match=r"^--workers: must be a whole number >= 1, got 0"):
        LocalExecutor(0)
    with pytest.raises(InputError, match=r"^window: must be a whole number >= 1, got 0"):
        LocalExecutor(2, window=0)
    assert LocalExecutor(3).window == 6 and LocalExecutor().workers == (os.cpu_count() or 1)


def test_the_protocol_fits_the_local_and_the_ray_executor():
    from flows.executors import RayExecutor  # its map returns a list: an ordered Iterable

    assert isinstance(LocalExecutor(1), Executor) and isinstance(RayExecutor(), Executor)
    assert not isinstance(object(), Executor)


def test_map_counting_nodes_counts_each_item_where_it_ran(pool):
    nodes = Counter()
    assert list(map_counting_nodes(pool, _square, range(5), nodes)) == [0, 1, 4, 9, 16]
    assert nodes == {socket.gethostname(): 5}  # spawn workers on this host
    list(map_counting_nodes(LocalExecutor(1), _square, range(2), nodes))
    assert nodes == {socket.gethostname(): 7}  # counts add up over a stage's maps


class _NamedNodes:
    """An executor whose workers name their node, and one that names none (the host name then)."""

    node_id = staticmethod(lambda: "node-a")

    def map(self, fn, items):
        return [fn(item) for item in items]


class _Unnamed:
    def map(self, fn, items):
        assert fn.__name__ == "_square"  # the wrapper keeps the stage's function name
        return [fn(item) for item in items]


def test_an_executor_names_its_nodes_or_the_host_name_is_used():
    named, unnamed = Counter(), Counter()
    assert list(map_counting_nodes(_NamedNodes(), _square, [2, 3], named)) == [4, 9] and named == {"node-a": 2}
    assert list(map_counting_nodes(_Unnamed(), _square, [2], unnamed)) == [4]
    assert unnamed == {socket.gethostname(): 1}
