"""meshpool.graph.local: get_local runs dict graphs like dask.get, on threads."""

from __future__ import annotations

import threading
from collections import namedtuple
from concurrent.futures import ThreadPoolExecutor
from operator import add

import pytest

from meshpool.graph import (
    CycleError,
    apply,
    get_local,
    order,
    pack_results,
    quote,
)


def inc(x):
    return x + 1


def identity(x):
    return x


Point = namedtuple("Point", ["x", "y"])

# (graph, keys, expected): a catalogue of the tuple format's rules.
CASES = [
    ({"x": 1, "y": (inc, "x"), "z": (add, "x", "y")}, "z", 3),
    ({"x": 1, "y": (inc, "x")}, ["x", "y"], (1, 2)),
    ({"x": 1, "y": (inc, "x"), "z": 5}, [["x", "y"], "z"], ((1, 2), 5)),
    ({"a": 1, "b": 2, "c": (sum, ["a", "b", 3])}, "c", 6),
    ({"a": 1, "b": ["a", ["a", 5]]}, "b", [1, [1, 5]]),
    ({"a": 1, "b": ("a", 2, "nokey")}, "b", (1, 2, "nokey")),
    ({("x", 0): 1, ("x", 1): 2, "y": (add, ("x", 0), ("x", 1))}, "y", 3),
    ({("x", 0): 1, "y": [("x", 0), ("x", 5)]}, "y", [1, ("x", 5)]),
    ({("x", 0): 1, ("x", 1): (inc, ("x", 0))}, [("x", 0), ("x", 1)], (1, 2)),
    ({"a": 1, "b": "a", "c": "b"}, "c", 1),
    ({"a": 1, "b": (identity, {"k": "a"})}, "b", {"k": "a"}),
    ({"a": 1, "b": {"k": "a"}}, "b", {"k": "a"}),
    ({"a": 1, "b": (sorted, {"a", 2})}, "b", [1, 2]),
    ({"a": 1, "b": (identity, frozenset(["a"]))}, "b", frozenset([1])),
    ({"a": 1, "b": (list, [(0, (inc, "a"))])}, "b", [(0, 2)]),
    ({"a": 1, "b": (identity, Point("a", 2))}, "b", Point(1, 2)),
    ({"a": (len, "hello")}, "a", 5),
    ({1: 10, 2: (inc, 1), 2.5: (add, 1, 2)}, [2, 2.5], (11, 21)),
    ({"a": [], "b": (), "c": (identity, [])}, ["a", "b", "c"], ([], (), [])),
    ({"a": 2, "b": (apply, pow, ["a", 3], (dict, [["mod", 5]]))}, "b", 3),
    ({"a": 1, "b": quote(["a", (inc, "a")])}, "b", ["a", (inc, "a")]),
    ({"a": 1, "b": (inc, "a"), "unused": (inc, "b")}, "b", 2),
    ({"a": 1}, [], ()),
]


@pytest.fixture(params=[1, 4], ids=["inline", "threads"])
def workers(request):
    return request.param


@pytest.mark.parametrize("dsk, keys, expected", CASES)
def test_catalogue(dsk, keys, expected, workers):
    assert get_local(dsk, keys, num_workers=workers) == expected


@pytest.mark.parametrize("dsk, keys, expected", CASES)
def test_same_as_dask_get(dsk, keys, expected):
    dask_core = pytest.importorskip("dask.core")
    assert dask_core.get(dsk, keys) == expected == get_local(dsk, keys)


def test_pack_results():
    values = {"a": 1, "b": 2, ("x", 0): 3}
    assert pack_results("a", values) == 1
    assert pack_results(("x", 0), values) == 3
    assert pack_results(["a", [("x", 0), ["b"]]], values) == (1, (3, (2,)))


def test_missing_key_is_named(workers):
    with pytest.raises(KeyError, match="'nope' is not a key"):
        get_local({"a": 1}, ["a", ["nope"]], num_workers=workers)
    with pytest.raises(KeyError, match=r"\('x', 3\)"):
        get_local({"a": 1}, ("x", 3), num_workers=workers)


def test_cycle_is_named(workers):
    dsk = {"a": 1, "b": (add, "a", "d"), "c": (inc, "b"), "d": (inc, "c")}
    with pytest.raises(CycleError, match="'d' -> 'c' -> 'b' -> 'd'"):
        get_local(dsk, "d", num_workers=workers)


class Boom(Exception):
    pass


def test_task_exception_propagates_as_itself(workers):
    ran = []

    def fail(x):
        raise Boom(f"bad {x}")

    def record(x):
        ran.append(x)
        return x

    dsk = {"a": 1, "b": (fail, "a"), "c": (record, "b"), "d": (inc, "a")}
    with pytest.raises(Boom, match="bad 1"):
        get_local(dsk, ["c", "d"], num_workers=workers)
    assert ran == []  # nothing that depends on the failure runs
    with pytest.raises(ZeroDivisionError):
        get_local({"a": (divmod, 1, 0)}, "a", num_workers=workers)


def test_ten_thousand_tasks(workers):
    """A 16,383-task binary tree reduction and a 10,000-step chain."""
    dsk = {("l", i): i for i in range(2**13)}
    level, depth = list(dsk), 0
    while len(level) > 1:
        depth += 1
        nxt = [("s", depth, j) for j in range(len(level) // 2)]
        dsk.update({s: (add, level[2 * j], level[2 * j + 1]) for j, s in enumerate(nxt)})
        level = nxt
    assert get_local(dsk, level[0], num_workers=workers) == sum(range(2**13))
    chain = {0: 0, **{i: (inc, i - 1) for i in range(1, 10_000)}}
    assert get_local(chain, 9_999, num_workers=workers) == 9_999


def test_single_worker_pool_runs_in_priority_order():
    ran = []

    def record(name, *args):
        ran.append(name)
        return name

    dsk = {}
    for i in range(4):
        dsk[f"l{i}"] = (record, quote(f"l{i}"))
        dsk[f"m{i}"] = (record, quote(f"m{i}"), f"l{i}")
    dsk["out"] = (record, quote("out"), "m0", "m1", "m2", "m3")
    with ThreadPoolExecutor(1) as pool:
        get_local(dsk, "out", pool=pool)
        assert pool.submit(int, "7").result() == 7  # the pool is not shut down
    o = order(dsk)
    assert ran == sorted(dsk, key=o.get)


def test_runs_tasks_concurrently():
    barrier = threading.Barrier(2, timeout=10)

    def meet(x):
        barrier.wait()  # raises BrokenBarrierError unless both tasks run at once
        return x

    dsk = {"a": (meet, 1), "b": (meet, 2), "c": (add, "a", "b")}
    assert get_local(dsk, "c", num_workers=2) == 3


def test_intermediate_results_are_released(workers):
    live = set()
    peak = []

    class Blob:
        def __init__(self, n):
            self.n = n
            live.add(n)
            peak.append(len(live))

        def __del__(self):
            live.discard(self.n)

    def step(prev):
        return Blob(prev.n + 1)

    dsk = {"b0": (Blob, 0), **{f"b{i}": (step, f"b{i - 1}") for i in range(1, 200)}}
    assert get_local(dsk, "b199", num_workers=workers).n == 199
    assert max(peak) <= 3


def test_extra_keyword_arguments_are_ignored():
    assert get_local({"a": 1}, "a", cache=None, optimize_graph=False) == 1
