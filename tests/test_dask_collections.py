"""Real dask collections computed on a real 2-worker cluster: ``scheduler=ex.get``.

dask hands ``ex.get`` its whole graph; meshpool submits it at once as a task graph (see
``meshpool.executor.graphs``). Each test checks the answer against pandas/numpy or dask's
synchronous scheduler, and that the tasks ran in the workers (partitions report their pid).
"""

from __future__ import annotations

import os
from collections import Counter

import pytest

import meshpool

dask = pytest.importorskip("dask")
np = pytest.importorskip("numpy")
pd = pytest.importorskip("pandas")


@pytest.fixture(scope="module")
def da():
    return pytest.importorskip("dask.array")


@pytest.fixture(scope="module")
def dd():
    return pytest.importorskip("dask.dataframe")


@pytest.fixture(scope="module")
def db():
    return pytest.importorskip("dask.bag")


@pytest.fixture
def pids(ex):
    ex.wait_for_workers(2, timeout=30)
    return {w["pid"] for w in ex.workers()}


def block_pid(block):
    return np.full((1, 1), os.getpid())


def partition_pid(part):
    return pd.Series([os.getpid()])


def test_array_reduction(ex, da, pids):
    data = da.random.random((2000, 2000), chunks=500)
    total = (data + 1).sum()
    before = ex.statistics().submitted
    (result,) = dask.compute(total, scheduler=ex.get)
    assert ex.statistics().submitted > before
    assert result == total.compute(scheduler="sync")  # the same graph, the same sums
    expected = (data.compute(scheduler="sync") + 1).sum()  # numpy on the same numbers
    assert result == pytest.approx(expected, rel=1e-12)
    ran = data.map_blocks(block_pid, chunks=(1, 1)).compute(scheduler=ex.get)
    assert set(ran.ravel()) <= pids and os.getpid() not in set(ran.ravel())


def test_dataframe_groupby_mean(ex, dd, pids):
    df = pd.DataFrame({"k": [i % 7 for i in range(1000)], "v": [i * 0.5 for i in range(1000)]})
    ddf = dd.from_pandas(df, npartitions=4)
    result = ddf.groupby("k").v.mean().compute(scheduler=ex.get)
    pd.testing.assert_series_equal(result.sort_index(), df.groupby("k").v.mean())
    ran = ddf.map_partitions(partition_pid, meta=(None, "int64")).compute(scheduler=ex.get)
    assert len(ran) == 4 and set(ran) <= pids


def test_bag_word_count(ex, db):
    lines = ["the cat sat on the mat", "the dog sat", "a cat and a dog"] * 20
    counts = db.from_sequence(lines, npartitions=4).str.split().flatten().frequencies()
    (result,) = dask.compute(counts, scheduler=ex.get)
    assert dict(result) == Counter(" ".join(lines).split())


def test_meshpool_as_the_default_dask_scheduler(ex, da, pids):
    blocks = da.zeros((4, 4), chunks=2).map_blocks(block_pid, chunks=(1, 1))
    with dask.config.set(scheduler=ex.get):  # the one-liner (also usable without `with`)
        ran = blocks.compute()
        assert dask.delayed(sum)([1, 2, 3]).compute() == 6
    assert set(ran.ravel()) <= pids
    # meshpool.get follows the current executor (threads in this process when there is none)
    assert meshpool.current_executor() is ex
    with dask.config.set(scheduler=meshpool.get):
        ran = blocks.compute()
    assert set(ran.ravel()) <= pids


def test_several_collections_in_one_compute(ex, da):
    """One graph for several outputs, shaped as dask's own scheduler shapes them.

    (Not mixing dataframes with arrays: dask 2026.8 itself returns mixed expression and
    HighLevelGraph results out of order, with its synchronous scheduler too.)"""
    x = da.arange(100, chunks=10)
    outputs = (x.sum(), x[:3] * 2, {"mean": x.mean(), "max": x.max()})
    result = dask.compute(*outputs, scheduler=ex.get)
    expected = dask.compute(*outputs, scheduler="sync")
    assert result[0] == expected[0] == 4950
    assert result[1].tolist() == expected[1].tolist() == [0, 2, 4]
    assert result[2] == expected[2] == {"mean": 49.5, "max": 99}
