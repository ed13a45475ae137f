"""Results small and large: small ones ride with the completion message, large ones (over
64 KiB) stay on the worker until ``result()`` (or ``gather``) fetches them."""

from __future__ import annotations

import gc

import numpy as np
import pytest
import tasks
from helpers import LIVENESS

import meshpool
from meshpool.executor.future import Packed, Remote

SMALL = 1000
LARGE = 1_000_000  # well over the 64 KiB that ride along


def test_small_result_rides_with_completion(ex):
    fut = ex.submit(tasks.big, SMALL)
    meshpool.wait([fut], timeout=LIVENESS)
    assert type(fut._result) is Packed  # already here, not on a worker
    assert fut.result() == b"x" * SMALL


def test_large_result_fetched_on_demand(ex):
    fut = ex.submit(tasks.big, LARGE)
    meshpool.wait([fut], timeout=LIVENESS)
    assert type(fut._result) is Remote  # still on the worker
    assert fut.result(LIVENESS) == b"x" * LARGE
    assert fut.result(LIVENESS) == b"x" * LARGE  # fetched once, kept


@pytest.mark.parametrize("n", [64 * 1024 - 100, 64 * 1024 + 100])
def test_result_around_the_threshold(ex, n):
    assert ex.submit(tasks.big, n).result(LIVENESS) == b"x" * n


def test_large_numpy_result(ex):
    arr = ex.submit(tasks.ones, 500_000).result(LIVENESS)
    assert arr.shape == (500_000,) and arr.sum() == 500_000


def test_gather_mixes_small_large_and_plain(ex):
    fs = [ex.submit(tasks.big, LARGE), ex.submit(tasks.big, SMALL), ex.submit(tasks.big, LARGE)]
    assert ex.gather(fs, timeout=LIVENESS) == [b"x" * LARGE, b"x" * SMALL, b"x" * LARGE]
    assert all(type(f._result) is not Remote for f in fs)


def test_gather_raises_task_error(ex):
    with pytest.raises(ValueError, match="boom"):
        ex.gather([ex.submit(tasks.inc, 1), ex.submit(tasks.fail)], timeout=LIVENESS)


def test_large_result_as_dependency_moves_between_workers(ex):
    a = ex.submit(tasks.big, LARGE)
    b = ex.submit(len, a)
    assert b.result(LIVENESS) == LARGE


def test_large_argument(ex):
    data = np.arange(200_000, dtype=np.int64)  # 1.6 MB: goes to a worker as data
    assert ex.submit(np.sum, data).result(LIVENESS) == data.sum()


def test_large_result_works_after_shutdown():
    ex = meshpool.Executor(1)
    fut = ex.submit(tasks.big, LARGE)
    meshpool.wait([fut], timeout=LIVENESS)
    assert type(fut._result) is Remote
    ex.shutdown(wait=True)
    assert fut.result(0) == b"x" * LARGE


def test_dropped_large_result_is_freed_on_the_worker(ex):
    fut = ex.submit(tasks.big, LARGE)
    key = fut.key
    meshpool.wait([fut], timeout=LIVENESS)
    assert sum(w["nbytes"] for w in ex.workers()) >= LARGE
    del fut
    gc.collect()
    from helpers import wait_until

    wait_until(
        lambda: (
            key not in ex._core.server.state.tasks
            and sum(w["nbytes"] for w in ex.workers()) < LARGE
        ),
        what="the released result to be freed",
    )
