"""meshpool.graph.delayed: lazy calls, Delayed objects, compute, and where compute runs."""

from __future__ import annotations

import operator
import pickle
import threading
from collections import OrderedDict, namedtuple

import pytest

from meshpool.graph import (
    Delayed,
    collections_to_dsk,
    compute,
    delayed,
    get_dependencies,
    get_local,
    get_scheduler,
    set_get_provider,
    toposort,
)

Point = namedtuple("Point", ["x", "y"])


def inc(x):
    return x + 1


def add(x, y):
    return x + y


def identity(x):
    return x


@pytest.fixture
def recording_get():
    """A ``get`` that records its calls and runs on local threads."""
    calls = []

    def get(dsk, keys, **kwargs):
        calls.append((dict(dsk), keys, kwargs))
        return get_local(dsk, keys, **kwargs)

    get.calls = calls
    return get


def test_wrap_function_and_decorator_forms():
    assert delayed(inc)(1).compute() == 2

    @delayed
    def double(x):
        return 2 * x

    @delayed(pure=True)
    def triple(x):
        return 3 * x

    assert isinstance(double(1), Delayed)
    assert double(triple(2)).compute() == 12
    assert triple(2).key == triple(2).key
    assert double(2).key != double(2).key
    assert double(2).key.startswith("double-")


def test_keys_and_graph():
    a = delayed(1, name="a")
    b = delayed(inc, pure=True)(a, dask_key_name="b")
    assert a.key == "a" and b.key == "b"
    assert b.dask == {"a": 1, "b": (inc, "a")}
    assert get_dependencies(b.dask, "b") == {"a"}
    assert repr(b) == "Delayed('b')"
    assert hash(b) == hash("b")


def test_delayed_arguments_anywhere():
    a, b = delayed(1), delayed(2)
    assert delayed(identity)([a, [b, 3]]).compute() == [1, [2, 3]]
    assert delayed(identity)((a, (b, 3))).compute() == (1, (2, 3))
    assert delayed(identity)({"k": a, "n": {"m": b}}).compute() == {"k": 1, "n": {"m": 2}}
    assert delayed(identity)({a, 5}).compute() == {1, 5}
    assert delayed(identity)(frozenset([b])).compute() == frozenset([2])
    assert delayed(identity)(Point(a, b)).compute() == Point(1, 2)
    other = delayed(identity)(OrderedDict(k=a)).compute()  # only exact containers are searched
    # the Delayed itself reaches the function (by identity in-process, by key on a cluster)
    assert type(other) is OrderedDict and other["k"].key == a.key


def test_keyword_arguments():
    a = delayed(2)
    assert delayed(pow)(a, 3, mod=5).compute() == 3
    assert delayed(pow)(2, 3, mod=a + 3).compute() == 3
    assert delayed(sorted)([3, 1, 2], key=None, reverse=True).compute() == [3, 2, 1]


def test_literals_reach_the_function_unchanged():
    """Strings that are keys, task-like tuples, lists of keys: all passed as they are."""
    a = delayed(1, name="a")
    looks_like_task = (inc, "a")
    out = delayed(lambda *args: args)(a, "a", looks_like_task, ["a"], {"a"}, {"a": "a"}, b"a")
    assert out.compute() == (1, "a", looks_like_task, ["a"], {"a"}, {"a": "a"}, b"a")
    assert delayed(looks_like_task).compute() == looks_like_task
    assert delayed("a").compute() == "a"


def test_attributes_items_and_methods():
    c = delayed(complex)(1, 2)
    assert c.real.compute() == 1.0
    assert c.conjugate().compute() == complex(1, -2)
    s = delayed("a,b,c")
    assert s.split(",").compute() == ["a", "b", "c"]
    assert s.split(sep=",", maxsplit=1)[1].compute() == "b,c"
    d = delayed({"k": [10, 20]})
    assert d["k"][1].compute() == 20
    assert delayed([1, 2, 3])[delayed(0)].compute() == 1
    with pytest.raises(AttributeError):
        _ = c._private


def test_operators():
    x, y = delayed(7), delayed(2)
    results = {
        "+": (x + y, 9),
        "-": (x - y, 5),
        "*": (x * y, 14),
        "/": (x / y, 3.5),
        "//": (x // y, 3),
        "%": (x % y, 1),
        "**": (x**y, 49),
        "&": (x & y, 2),
        "|": (x | y, 7),
        "^": (x ^ y, 5),
        "<<": (x << y, 28),
        ">>": (x >> y, 1),
        "r+": (1 + x, 8),
        "r-": (10 - x, 3),
        "r*": (3 * x, 21),
        "r/": (14 / x, 2.0),
        "r//": (15 // x, 2),
        "r%": (15 % x, 1),
        "r**": (2**y, 4),
        "neg": (-x, -7),
        "pos": (+x, 7),
        "abs": (abs(-x), 7),
        "~": (~x, -8),
        "<": (x < y, False),
        "<=": (x <= 7, True),
        ">": (x > y, True),
        ">=": (x >= 8, False),
        "==": (x == 7, True),
        "!=": (x != 7, False),
    }
    values = compute(*(d for d, _ in results.values()))
    assert dict(zip(results, values, strict=True)) == {k: v for k, (_, v) in results.items()}
    assert (x + y).key == (x + y).key  # operators are pure


def test_matmul():
    np = pytest.importorskip("numpy")
    a = delayed(np.eye(2))
    assert ((a @ np.ones(2)) == 1).all().compute()


def test_truth_iteration_and_mutation_are_refused():
    d = delayed(inc)(1)
    with pytest.raises(TypeError, match="truth"):
        bool(d)
    with pytest.raises(TypeError):
        iter(d)
    with pytest.raises(TypeError):
        len(d)
    with pytest.raises(TypeError, match="immutable"):
        d.x = 1


def test_nout_unpacking():
    q, r = delayed(divmod, nout=2)(17, 5)
    assert (q.compute(), r.compute()) == (3, 2)
    assert len(delayed(divmod, nout=2)(1, 1)) == 2


def test_delayed_callable_values():
    getter = delayed(lambda: len)()
    assert getter("abcd").compute() == 4
    assert delayed(delayed(inc)(1)).compute() == 2  # delayed of a Delayed is itself


def test_compute_shares_one_graph(recording_get):
    ran = []

    @delayed(pure=True)
    def load(x):
        ran.append(x)
        return x

    base = load(10)
    a, b = base + 1, base * 2
    assert compute(a, b, [a, 5], "plain", scheduler=recording_get) == (11, 20, [11, 5], "plain")
    assert ran == [10]  # the shared dependency ran once
    assert len(recording_get.calls) == 1
    assert compute(1, "x") == (1, "x")


def test_compute_scheduler_choices(recording_get):
    d = delayed(inc)(1)
    assert d.compute(scheduler="sync") == 2
    assert d.compute(scheduler="threads", num_workers=2) == 2
    assert d.compute(scheduler=recording_get, num_workers=3) == 2
    dsk, keys, kwargs = recording_get.calls[0]
    assert keys == [d.key] and kwargs == {"num_workers": 3}
    with pytest.raises(ValueError, match="unknown scheduler"):
        d.compute(scheduler="nope")


def test_provider_decides_the_default_scheduler(recording_get):
    current = [None]
    previous = set_get_provider(lambda: current[0])
    try:
        assert get_scheduler() is get_local
        assert delayed(inc)(1).compute() == 2
        current[0] = recording_get
        assert get_scheduler() is recording_get
        assert delayed(inc)(2).compute() == 3
        assert compute(delayed(inc)(3)) == (4,)
        assert len(recording_get.calls) == 2
    finally:
        assert set_get_provider(previous) is not None
    assert get_scheduler() is get_local or previous is not None


def test_collections_to_dsk():
    a = delayed(1, name="a")
    b = delayed(add, pure=True)(a, 2, dask_key_name="b")
    dsk, keys = collections_to_dsk([b, a, [a, b]])
    assert keys[:2] == ["b", "a"]
    assert get_local(dsk, keys) == (3, 1, [1, 3])


def test_exceptions_propagate():
    d = delayed(operator.truediv)(1, 0)
    with pytest.raises(ZeroDivisionError):
        (d + 1).compute()


def test_pickle_roundtrip():
    a = delayed(1, name="a")
    b = delayed(add)(a, 2) * 10
    b2 = pickle.loads(pickle.dumps(b))
    assert b2.key == b.key and b2.dask == b.dask and b2.compute() == 30
    f = pickle.loads(pickle.dumps(delayed(inc, pure=True)))
    assert f(1).compute() == 2
    m = pickle.loads(pickle.dumps(delayed("a b").split))
    assert m().compute() == ["a", "b"]


def test_long_chain_needs_no_recursion():
    x = delayed(0)
    for _ in range(10_000):
        x = x + 1
    assert len(x.dask) == 10_001
    assert len(toposort(x.dask)) == 10_001
    assert x.compute(scheduler="sync") == 10_000
    assert pickle.loads(pickle.dumps(x)).compute(scheduler="sync") == 10_000


def test_pure_tokens_depend_on_content():
    f = delayed(add, pure=True)
    assert f(1, 2).key == f(1, 2).key != f(2, 1).key
    assert f(delayed(1, name="p"), 2).key != f(delayed(1, name="q"), 2).key
    lock = threading.Lock()  # cannot be pickled: the key falls back to a random one
    assert f(lock, 1).key != f(lock, 1).key
