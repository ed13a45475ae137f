"""meshpool.graph.core: keys, tasks, dependencies, toposort, cycles, evaluation, substitution."""

from __future__ import annotations

import doctest
import importlib
import os
import pickle
import subprocess
import sys
from collections import namedtuple
from concurrent.futures import Future

import pytest

from meshpool.graph import (
    CycleError,
    Literal,
    apply,
    execute_task,
    find_cycle,
    flatten,
    get_dependencies,
    get_deps,
    iskey,
    istask,
    quote,
    run_task,
    subs,
    substitute_keys,
    toposort,
    validate_keys,
)

GRAPH_MODULES = ["core", "order", "local", "delayed", "dot", "dask_compat", "scheduling"]


def inc(x):
    return x + 1


def add(*args):
    return sum(args)


def identity(x):
    return x


Point = namedtuple("Point", ["x", "y"])


@pytest.mark.parametrize("name", GRAPH_MODULES)
def test_doctests(name):
    module = importlib.import_module(f"meshpool.graph.{name}")
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.failed == 0
    assert result.attempted > 0


def test_import_is_pure():
    code = "import sys, meshpool.graph; print(sorted({'zmq', 'dask'} & set(sys.modules)))"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "[]"


def test_istask_iskey():
    assert istask((inc, 1))
    assert istask((Literal(1),))
    assert not istask(())
    assert not istask([inc, 1])
    assert not istask(("inc", 1))
    assert all(iskey(k) for k in ["a", b"a", 1, 1.5, ("x", 0, 1), ("x", ("y", 2))])
    assert not any(iskey(k) for k in [None, ["a"], ("x", None), {"a"}, object()])


@pytest.mark.parametrize(
    "comp, expected",
    [
        ((inc, "x"), ["x"]),
        ((add, "x", "y", "x"), ["x", "y"]),
        ((add, (inc, "x"), 1), ["x"]),
        ((sum, ["x", ["y", 1]]), ["x", "y"]),
        (["y", "x"], ["y", "x"]),
        (("x", "y"), ["x", "y"]),  # a plain tuple: its items are read
        ((identity, {"k": "x"}), []),  # a dict is a literal
        ((identity, {"x", 1}), ["x"]),
        ((identity, frozenset(["y"])), ["y"]),
        ((identity, ("t", 0)), [("t", 0)]),  # a tuple key is a reference
        ((identity, [("t", 0), ("t", 9)]), [("t", 0)]),  # ('t', 9) is not a key
        ((identity, "nokey"), []),
        ((identity, [["x"], {"x": 1}]), ["x"]),
        ((identity, quote("x")), []),
        ((identity, Point("x", 2)), ["x"]),
        ("x", ["x"]),
        (3, []),
    ],
)
def test_get_dependencies(comp, expected):
    dsk = {"x": 1, "y": 2, ("t", 0): 3, "c": comp}
    assert get_dependencies(dsk, "c", as_list=True) == expected
    assert get_dependencies(dsk, task=comp) == set(expected)


def test_get_dependencies_needs_key_or_task():
    with pytest.raises(ValueError):
        get_dependencies({"a": 1})


def test_get_deps():
    dsk = {"a": 1, "b": (inc, "a"), "c": (add, "a", "b"), "d": ["c", "a"]}
    dependencies, dependents = get_deps(dsk)
    assert dependencies == {"a": set(), "b": {"a"}, "c": {"a", "b"}, "d": {"a", "c"}}
    assert dependents == {"a": {"b", "c", "d"}, "b": {"c"}, "c": {"d"}, "d": set()}


def test_toposort_orders_dependencies_first():
    dsk = {"e": (add, "c", "d"), "d": (inc, "b"), "c": (inc, "a"), "b": 1, "a": 2}
    out = toposort(dsk)
    assert sorted(out) == sorted(dsk)
    position = {k: i for i, k in enumerate(out)}
    for k, deps in get_deps(dsk)[0].items():
        assert all(position[d] < position[k] for d in deps)
    assert toposort(dsk) == out  # deterministic


def test_toposort_accepts_dependencies():
    assert toposort({"a": None, "b": None}, {"a": {"b"}, "b": set()}) == ["b", "a"]


@pytest.mark.parametrize(
    "dsk, cycle",
    [
        ({"a": (inc, "a")}, ["a", "a"]),
        ({"a": (inc, "b"), "b": (inc, "a")}, ["a", "b", "a"]),
        ({"a": (inc, "b"), "b": (inc, "c"), "c": (add, "a", 1)}, ["a", "b", "c", "a"]),
        ({"x": 1, "y": (add, "x", "z"), "z": (inc, "w"), "w": ["y"]}, ["y", "z", "w", "y"]),
        ({("t", 0): (inc, ("t", 1)), ("t", 1): (inc, ("t", 0))}, [("t", 0), ("t", 1), ("t", 0)]),
    ],
)
def test_cycles_are_named(dsk, cycle):
    with pytest.raises(CycleError) as info:
        toposort(dsk)
    assert info.value.cycle == cycle
    assert isinstance(info.value, ValueError) and isinstance(info.value, RuntimeError)
    assert pickle.loads(pickle.dumps(info.value)).cycle == cycle
    assert str(info.value) == "cycle in graph: " + " -> ".join(map(repr, cycle))
    assert find_cycle(dsk) == cycle


def test_value_that_is_its_own_key_is_a_literal():
    """dask reports ``{0: 0}`` as a cycle; here it is the value 0 (handy for ``{i: i}``)."""
    dsk = {0: 0, ("t", 1): ("t", 1), 1: (inc, 0)}
    assert get_deps(dsk)[0] == {0: set(), ("t", 1): set(), 1: {0}}
    assert toposort(dsk) == [0, ("t", 1), 1]
    assert execute_task(dsk[("t", 1)], {}) == ("t", 1)


def test_cycle_behind_a_dag_part():
    dsk = {"a": 1, "b": (inc, "a"), "c": (add, "b", "e"), "d": (inc, "c"), "e": (inc, "d")}
    with pytest.raises(CycleError, match="'c' -> 'e' -> 'd' -> 'c'"):
        toposort(dsk)
    assert find_cycle({"a": 1, "b": (inc, "a")}) == []


def test_toposort_long_chain_is_iterative():
    """Far deeper than the recursion limit (the 300,000-task timing is in test_graph_order)."""
    n = 30_000
    dsk = {("x", 0): 0, **{("x", i): (inc, ("x", i - 1)) for i in range(1, n)}}
    out = toposort(dsk)
    assert out == [("x", i) for i in range(n)]
    assert toposort(dsk, {k: get_dependencies(dsk, k) for k in reversed(dsk)}) == out
    dsk[("x", 0)] = (inc, ("x", n - 1))
    with pytest.raises(CycleError) as info:
        toposort(dsk)
    assert len(info.value.cycle) == n + 1


@pytest.mark.parametrize(
    "comp, expected",
    [
        ((inc, "x"), 2),
        ((add, (inc, "x"), "y"), 12),
        ((sum, ["x", "y", (inc, "y")]), 22),
        (["x", ["y", 5]], [1, [10, 5]]),
        (("x", "nokey", (inc, "x")), (1, "nokey", 2)),
        ((identity, {"k": "x"}), {"k": "x"}),
        ({"k": "x"}, {"k": "x"}),
        ((identity, {"x", 3}), {1, 3}),
        ((identity, frozenset(["x"])), frozenset([1])),
        ((identity, Point("x", "y")), Point(1, 10)),
        ((identity, quote(["x", (inc, "x")])), ["x", (inc, "x")]),
        ((apply, divmod, ["y", 3]), (3, 1)),
        ((apply, int, ["101"], (dict, [["base", "two"]])), 5),
        (("t", 0), "tuple key"),
        ((), ()),
        ([], []),
        (None, None),
    ],
)
def test_execute_task(comp, expected):
    cache = {"x": 1, "y": 10, "two": 2, ("t", 0): "tuple key"}
    assert execute_task(comp, cache) == expected


def test_execute_task_propagates_exceptions():
    with pytest.raises(ZeroDivisionError):
        execute_task((divmod, "x", 0), {"x": 1})


def test_run_task_keeps_values_as_values():
    value = (inc, "x")  # looks like a task, is a value
    assert run_task((identity, "a"), ["a"], value) is value
    assert run_task(["a", "b"], ["a", "b"], [1], "x") == [[1], "x"]
    with pytest.raises(ValueError):
        run_task((identity, "a"), ["a"], 1, 2)


def test_substitute_keys_leaves_substituted_objects_untouched():
    fut = Future()
    inner = ["x", ("x",)]  # would be rewritten if we looked inside it
    comp = (add, "x", [(inc, "y"), ("x", "z")], {"x": "y"}, "nokey")
    out = substitute_keys(comp, {"x": fut, "y": inner})
    assert out[0] is add
    assert out[1] is fut
    assert out[2][0] == (inc, inner) and out[2][0][1] is inner
    assert out[2][1] == (fut, "z")
    assert out[3] == {"x": "y"}  # dicts are literals
    assert out[4] == "nokey"
    assert inner == ["x", ("x",)]


def test_substitute_then_run_roundtrip():
    dsk = {"a": 3, "b": (add, "a", (sum, ["a", 1]), (sum, ("a", 2)))}
    deps = get_dependencies(dsk, "b", as_list=True)
    assert deps == ["a"]
    assert run_task(dsk["b"], deps, 3) == 3 + 4 + 5
    assert execute_task(substitute_keys(dsk["b"], {"a": 3}), {}) == 12


def test_subs():
    assert subs((inc, "x"), "x", 1) == (inc, 1)
    assert subs((add, ["x", ("y", "x")]), "x", 5) == (add, [5, ("y", 5)])
    assert subs("x", "x", 1) == 1
    assert subs(("x", 0), ("x", 0), 1) == 1


def test_flatten_and_validate_keys():
    assert list(flatten([["a", ["b"]], ("x", 0)])) == ["a", "b", ("x", 0)]
    assert list(flatten("abc")) == ["abc"]
    dsk = {"a": 1, ("x", 0): 2}
    validate_keys(dsk, ("x", 0))
    validate_keys(dsk, [["a"], ("x", 0)])
    with pytest.raises(KeyError, match="'missing' is not a key"):
        validate_keys(dsk, ["a", ["missing"]])
    with pytest.raises(KeyError, match="not a key"):
        validate_keys(dsk, [[{}]])


def test_literal_and_quote_pickle():
    q = quote((inc, "x"))
    assert istask(q)
    assert execute_task(pickle.loads(pickle.dumps(q)), {"x": 1}) == (inc, "x")
    assert quote(1.5) == 1.5
    assert repr(Literal([1])) == "Literal<list>"
