"""meshpool.graph.order: static priorities that keep memory low.

As in dask's test_order.py, each test draws its graph (dependencies below, dependents above)
and runs under two key namings -- plain letters, and ('x', n) tuples whose sort order differs
from the letters' -- so no result can depend on how keys happen to be named.
"""

from __future__ import annotations

import random

import pytest

from meshpool.graph import CycleError, get_deps, order, toposort


def f(*args):
    return args


@pytest.fixture(params=["letters", "tuples"])
def k(request):
    """Name a node: ``k('a')`` is ``'a'``, or ``('x', -n)`` with n derived from the letters."""
    if request.param == "letters":
        return lambda name: name
    return lambda name: ("x", -int.from_bytes(name.encode(), "big"))


def graph(k, spec):
    """``{'b': ['a']}`` -> ``{k('a'): 1, k('b'): (f, k('a'))}``: leaves need not be listed."""
    dsk = {}
    for name, deps in spec.items():
        for d in deps:
            dsk.setdefault(k(d), 1)
        dsk[k(name)] = (f, *[k(d) for d in deps]) if deps else 1
    return dsk


def is_topological(dsk, o):
    dependencies, _ = get_deps(dsk)
    return sorted(o.values()) == list(range(len(dsk))) and all(
        o[d] < o[key] for key, deps in dependencies.items() for d in deps
    )


def peak_memory(dsk, o):
    """Most results held at once when running in order ``o`` and freeing results when unused."""
    dependencies, dependents = get_deps(dsk)
    left = {key: len(ts) for key, ts in dependents.items()}
    held, peak = set(), 0
    for key in sorted(dsk, key=o.get):
        held.add(key)
        peak = max(peak, len(held))
        for d in dependencies[key]:
            left[d] -= 1
            if not left[d]:
                held.discard(d)
    return peak


def test_two_chains_are_not_interleaved(k):
    r"""
    b   d
    |   |
    a   c
    """
    dsk = {k("a"): 1, k("b"): (f, k("a")), k("c"): 1, k("d"): (f, k("c"))}
    o = order(dsk)
    assert is_topological(dsk, o)
    assert o[k("b")] == o[k("a")] + 1
    assert o[k("d")] == o[k("c")] + 1


def test_binary_reduction_sums_each_pair_right_after_its_leaves(k):
    r"""
                      s
               /              \
           t0                   t1
        /      \            /       \
      u0        u1        u2         u3
     /  \      /  \      /  \       /  \
    l0  l1    l2  l3    l4  l5     l6  l7
    """
    spec = {f"u{i}": [f"l{2 * i}", f"l{2 * i + 1}"] for i in range(4)}
    spec |= {"t0": ["u0", "u1"], "t1": ["u2", "u3"], "s": ["t0", "t1"]}
    dsk = graph(k, spec)
    o = order(dsk)
    assert is_topological(dsk, o)
    for i in range(4):
        leaves = {o[k(f"l{2 * i}")], o[k(f"l{2 * i + 1}")]}
        assert leaves == {o[k(f"u{i}")] - 2, o[k(f"u{i}")] - 1}
    for total, parts in spec.items():
        assert o[k(total)] == max(o[k(p)] for p in parts) + 1


def test_wide_reduction_holds_few_results(k):
    """A 64-leaf binary tree: post-order holds one partial result per level at most."""
    level = [f"l{i}" for i in range(64)]
    spec: dict[str, list[str]] = {}
    depth = 0
    while len(level) > 1:
        depth += 1
        nxt = [f"s{depth}_{j}" for j in range(len(level) // 2)]
        spec |= {s: level[2 * j : 2 * j + 2] for j, s in enumerate(nxt)}
        level = nxt
    dsk = graph(k, spec)
    o = order(dsk)
    assert is_topological(dsk, o)
    assert peak_memory(dsk, o) <= depth + 2  # breadth-first would hold all 64 leaves


def test_pipelines_finish_before_the_next_starts(k):
    r"""
            out
        /    |    \
      g0    g1    g2
      |     |     |
      f0    f1    f2
      |     |     |
      l0    l1    l2
    """
    spec = {"out": ["g0", "g1", "g2"]}
    for i in range(3):
        spec |= {f"g{i}": [f"f{i}"], f"f{i}": [f"l{i}"]}
    dsk = graph(k, spec)
    o = order(dsk)
    assert is_topological(dsk, o)
    for i in range(3):
        assert o[k(f"g{i}")] == o[k(f"f{i}")] + 1 == o[k(f"l{i}")] + 2
    assert peak_memory(dsk, o) <= 4


def test_independent_reductions_do_not_mix(k):
    r"""
         r1               r2
      / |  | \         / |  | \
     a  b  c  d       e  f  g  h
    """
    dsk = graph(k, {"r1": list("abcd"), "r2": list("efgh")})
    o = order(dsk)
    assert is_topological(dsk, o)
    first = sorted(o[k(n)] for n in ["r1", *"abcd"])
    second = sorted(o[k(n)] for n in ["r2", *"efgh"])
    assert first[-1] < second[0] or second[-1] < first[0]


def test_shared_root_feeds_outputs_one_by_one(k):
    r"""
    o0  o1  o2  o3
    |   |   |   |
    a0  a1  a2  a3
      \  \  /  /
          r
    """
    spec = {f"o{i}": [f"a{i}"] for i in range(4)} | {f"a{i}": ["r"] for i in range(4)}
    dsk = graph(k, spec)
    o = order(dsk)
    assert is_topological(dsk, o)
    assert o[k("r")] == 0
    for i in range(4):
        assert o[k(f"o{i}")] == o[k(f"a{i}")] + 1


def test_taller_dependency_first(k):
    r"""
        out
       /   \
      c     z
      |
      b
      |
      a
    """
    dsk = graph(k, {"out": ["c", "z"], "c": ["b"], "b": ["a"]})
    o = order(dsk)
    assert [key for key in sorted(dsk, key=o.get)] == [k(n) for n in ["a", "b", "c", "z", "out"]]


def test_deterministic_and_independent_of_insertion_order(k):
    rng = random.Random(42)
    spec = {f"n{i}": [f"n{j}" for j in rng.sample(range(i), min(i, 3))] for i in range(60)}
    dsk = graph(k, spec)
    o = order(dsk)
    items = list(dsk.items())
    rng.shuffle(items)
    assert order(dict(items)) == o
    assert order(dsk, get_deps(dsk)[0]) == o


@pytest.mark.parametrize("seed", range(5))
def test_random_dags_are_ordered_topologically(seed):
    rng = random.Random(seed)
    n = 200
    dsk = {}
    for i in range(n):
        deps = rng.sample(range(i), min(i, rng.randint(0, 4)))
        dsk[("x", i)] = (f, *[("x", j) for j in deps])
    assert is_topological(dsk, order(dsk))


def test_order_ignores_dependencies_outside_the_graph():
    assert order({"b": 1}, {"b": {"a"}}) == {"b": 0}


def test_cycle_is_named():
    with pytest.raises(CycleError, match="'a' -> 'b' -> 'a'"):
        order({"a": (f, "b"), "b": (f, "a"), "c": 1})


def test_scaling_300k_tasks():
    """toposort and order stay iterative (no recursion limit): a 300,000-task chain, a 65,535
    tree. (Their speed is measured in benchmarks/, not asserted here.)"""
    n = 300_000
    chain = {("x", 0): 0, **{("x", i): (f, ("x", i - 1)) for i in range(1, n)}}
    assert toposort(chain)[-1] == ("x", n - 1)
    o = order(chain)
    assert o[("x", n - 1)] == n - 1 and o[("x", 0)] == 0

    tree = {("l", i): i for i in range(2**15)}
    level, depth = list(tree), 0
    while len(level) > 1:
        depth += 1
        nxt = [("s", depth, j) for j in range(len(level) // 2)]
        tree.update({s: (f, level[2 * j], level[2 * j + 1]) for j, s in enumerate(nxt)})
        level = nxt
    o = order(tree)
    assert o[level[0]] == len(tree) - 1
    assert o[("s", 1, 0)] == 2
