"""meshpool.graph with real dask: get_local as a dask scheduler, task-spec graphs, HLGs."""

from __future__ import annotations

import pickle
from collections import Counter
from operator import add

import pytest

from meshpool.graph import get_local, order, to_dot, to_plain_graph

dask = pytest.importorskip("dask")
task_spec = pytest.importorskip("dask._task_spec")


# Importing pandas/pyarrow takes seconds: done once, in fixtures, outside the tests' timings.
@pytest.fixture(scope="module")
def da():
    return pytest.importorskip("dask.array")


@pytest.fixture(scope="module")
def dd():
    return pytest.importorskip("dask.dataframe")


@pytest.fixture(scope="module")
def db():
    return pytest.importorskip("dask.bag")


def test_array_sum(da):
    np = pytest.importorskip("numpy")
    x = da.arange(10_000, chunks=500).reshape((100, 100)).rechunk(25)
    total, col = dask.compute(x.sum(), (x + 1).mean(axis=0), scheduler=get_local)
    assert total == np.arange(10_000).sum()
    np.testing.assert_allclose(col, (np.arange(10_000).reshape(100, 100) + 1).mean(axis=0))


def test_dataframe_groupby_mean(dd):
    pd = pytest.importorskip("pandas")
    df = pd.DataFrame({"g": [i % 7 for i in range(200)], "v": [float(i) for i in range(200)]})
    ddf = dd.from_pandas(df, npartitions=6)
    (result,) = dask.compute(ddf.groupby("g").v.mean(), scheduler=get_local)
    expected = df.groupby("g").v.mean()
    pd.testing.assert_series_equal(result.sort_index(), expected.sort_index())


def test_bag_word_count(db):
    lines = ["the cat sat", "the dog sat on the cat", "a dog"]
    bag = db.from_sequence(lines, npartitions=2)
    counts = bag.str.split().flatten().frequencies()
    (result,) = dask.compute(counts, scheduler=get_local)
    assert dict(result) == Counter(" ".join(lines).split())


def test_dask_delayed_with_num_workers():
    @dask.delayed
    def inc(x):
        return x + 1

    parts = [inc(i) for i in range(20)]
    total = dask.delayed(sum)(parts)
    assert total.compute(scheduler=get_local, num_workers=2) == sum(range(1, 21))


def test_high_level_graph_and_keys_like_dask_get(da):
    x = da.ones((6, 6), chunks=3) + 1
    graph, keys = x.__dask_graph__(), x.__dask_keys__()
    ours = get_local(graph, keys)
    theirs = dask.get(graph, keys)
    assert len(ours) == len(theirs) == 2 and isinstance(ours, tuple)
    for row_ours, row_theirs in zip(ours, theirs, strict=True):
        for a, b in zip(row_ours, row_theirs, strict=True):
            assert (a == b).all()


def test_task_spec_nodes():
    from dask._task_spec import Alias, DataNode, Dict, List, Task, TaskRef

    dsk = {
        "a": DataNode("a", (1, 2)),  # a tuple value: must stay a value
        "s": DataNode("s", "a"),  # a string equal to a key: must stay a string
        "b": Task("b", sum, TaskRef("a")),
        "c": Alias("c", "b"),
        "d": Task("d", list, List(TaskRef("b"), TaskRef("c"), 7)),
        "e": Task("e", dict, Dict(k=TaskRef("d"), s=TaskRef("s"))),
        "f": (add, "b", 10),  # legacy tuples mixed in
    }
    assert get_local(dsk, ["a", "s", "c", "e", "f"]) == (
        (1, 2),
        "a",
        3,
        {"k": [3, 3, 7], "s": "a"},
        13,
    )
    plain = to_plain_graph(dsk)
    assert plain["c"] == "b"
    func, *deps = pickle.loads(pickle.dumps(plain["e"]))
    assert deps == ["d", "s"]
    assert func([3, 3, 7], "a") == {"k": [3, 3, 7], "s": "a"}
    assert 'label="dict", shape=circle' in to_dot(dsk)
    assert sorted(order(plain), key=str) == sorted(plain, key=str)


def test_task_spec_missing_dependency_is_named():
    dsk = {"b": task_spec.Task("b", abs, task_spec.TaskRef("gone"))}
    with pytest.raises(KeyError, match="'gone'"):
        get_local(dsk, "b")


def test_plain_graphs_pass_through_untouched():
    dsk = {"a": 1, "b": (abs, "a")}
    assert to_plain_graph(dsk) is dsk
    assert get_local(dsk, "b") == dask.get(dsk, "b") == 1
    with pytest.raises(TypeError, match="not a task graph"):
        to_plain_graph(42)


def test_meshpool_delayed_is_a_dask_collection():
    from meshpool.graph import delayed

    d = delayed(abs)(-3) + 1
    assert dask.is_dask_collection(d)
    assert dask.compute(d) == (4,)
    assert dask.compute(d, scheduler="sync") == (4,)
    assert dask.delayed(lambda x: x * 10)(d).compute() == 40
    assert dask.base.tokenize(d) == dask.base.tokenize(d)
