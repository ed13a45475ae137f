"""The stdlib Executor contract: constructor, submit, map, shutdown, ``with``.

Mirrors CPython's ``Lib/test/test_concurrent_futures`` (``test_map``, ``test_shutdown``,
``executor.py``), run against real worker processes. Tasks whose timing matters are *gated*
(``tasks.gated`` blocks until the test creates a file), so no test depends on a sleep.
"""

from __future__ import annotations

import concurrent.futures as cf
import os
import threading
import time
from pathlib import Path

import pytest
import tasks
from helpers import LIVENESS, gate_paths, release, wait_until

import meshpool


def idle(ex: meshpool.Executor) -> bool:
    return all(w["processing"] == 0 for w in ex.workers())


# --- constructor -------------------------------------------------------------------------------


def test_int_first_argument_is_max_workers():
    with meshpool.Executor(2) as ex:
        ex.wait_for_workers(2, timeout=LIVENESS)
        assert len(ex.workers()) == 2
        assert len(ex._core.cluster.pids()) == 2
        assert ex._core.address is None  # a local cluster, not an address


def test_keyword_arguments():
    with meshpool.Executor(
        None, 1, threads_per_worker=2, timeout=5, memory_limit="1GB", initializer=None
    ) as ex:
        ex.wait_for_workers(1, timeout=LIVENESS)
        (worker,) = ex.workers()
        assert worker["nthreads"] == 2
        assert worker["memory_limit"] == 10**9
        assert ex.submit(tasks.inc, 1).result(LIVENESS) == 2


@pytest.mark.parametrize("bad", [0, -1])
def test_max_workers_not_positive_raises_value_error(bad):
    with pytest.raises(ValueError, match="max_workers"):
        meshpool.Executor(bad)
    with pytest.raises(ValueError, match="max_workers"):
        meshpool.Executor(max_workers=bad)


def test_threads_per_worker_not_positive_raises_value_error():
    with pytest.raises(ValueError):
        meshpool.Executor(1, threads_per_worker=0)


def test_max_workers_given_twice_raises_type_error():
    with pytest.raises(TypeError):
        meshpool.Executor(2, max_workers=3)


def test_initializer_must_be_callable():
    with pytest.raises(TypeError):
        meshpool.Executor(1, initializer=42)


def test_start_up_to_first_result_is_live():
    start = time.monotonic()
    with meshpool.Executor(1) as ex:
        assert ex.submit(tasks.inc, 1).result(LIVENESS) == 2
    # ~0.5 s on an idle machine; this only says start-up does not hang.
    assert time.monotonic() - start < LIVENESS


def test_default_max_workers_is_cpu_count():
    with meshpool.Executor() as ex:
        n = os.cpu_count() or 1
        ex.wait_for_workers(n, timeout=LIVENESS)
        assert len(ex.workers()) == n


# --- submit ------------------------------------------------------------------------------------


def test_submit(ex):
    assert ex.submit(pow, 2, 8).result(LIVENESS) == 256


def test_submit_keyword(ex):
    assert ex.submit(tasks.mul, 2, y=8).result(LIVENESS) == 16
    assert ex.submit(tasks.capture, 1, 2, a=3).result(LIVENESS) == ((1, 2), {"a": 3})


def test_submit_fn_is_positional_only(ex):
    # submit(f, fn=1) passes fn on as the task's keyword argument
    assert ex.submit(tasks.capture, fn=1).result(LIVENESS) == ((), {"fn": 1})
    assert ex.submit(tasks.capture, self=1).result(LIVENESS) == ((), {"self": 1})
    with pytest.raises(TypeError):
        ex.submit(fn=tasks.capture)


def test_submit_not_callable(ex):
    with pytest.raises(TypeError):
        ex.submit(42)


# --- map ---------------------------------------------------------------------------------------


def test_map_in_order(ex):
    assert list(ex.map(pow, range(10), [2] * 10)) == [pow(i, 2) for i in range(10)]


def test_map_several_iterables_stops_at_shortest(ex):
    assert list(ex.map(tasks.total, [1, 2, 3], [10, 20], [100, 200, 300])) == [111, 222]


def test_map_accepts_generators(ex):
    assert list(ex.map(tasks.inc, (i for i in range(5)))) == [1, 2, 3, 4, 5]


def test_map_empty(ex):
    assert list(ex.map(tasks.inc, [])) == []
    assert list(ex.map(tasks.inc, [], chunksize=3)) == []


def test_map_submits_at_once(ex, tmp_path):
    """Like the stdlib, map() submits everything before the first result is asked for."""
    paths = [str(tmp_path / f"{i}") for i in range(4)]
    results = ex.map(tasks.touch, paths)
    wait_until(lambda: all(os.path.exists(p) for p in paths), what="all map items to run")
    assert list(results) == [None] * 4


@pytest.mark.parametrize("chunksize", [1, 2, 7, 100])
def test_map_chunksize(ex, chunksize):
    xs = list(range(23))
    assert list(ex.map(tasks.mul, xs, xs, chunksize=chunksize)) == [x * x for x in xs]


def test_map_chunksize_must_be_positive(ex):
    with pytest.raises(ValueError):
        ex.map(tasks.inc, [1], chunksize=0)


def test_map_timeout_cancels_what_has_not_started(ex, tmp_path):
    release_path = str(tmp_path / "release")
    started = [str(tmp_path / f"{i}.started") for i in range(6)]
    it = ex.map(tasks.gated, started, [release_path] * 6, range(6), timeout=0.2)
    try:
        with pytest.raises(TimeoutError):
            list(it)
    finally:
        release(release_path)
    wait_until(lambda: idle(ex), what="the running items to finish")
    ran = [p for p in started if os.path.exists(p)]
    # at most one item per worker was running when the timeout hit; nothing else ever starts
    assert len(ran) <= 2


def test_map_exception_raised_at_its_item(ex):
    results = []
    with pytest.raises(ValueError, match="bad item 2"):
        for value in ex.map(tasks.fail_at, range(5), [2] * 5):
            results.append(value)
    assert results == [0, 1]


def test_map_exception_cancels_rest(ex, tmp_path):
    release_path = str(tmp_path / "release")
    started = [str(tmp_path / f"{i}.started") for i in range(6)]
    blocker_started, blocker_release = gate_paths(tmp_path, "blocker")

    def items():
        yield ("fail",)
        for path in started:
            yield ("gate", path)

    # a worker runs the failing item at once; the other is busy; the rest queue
    blocker = ex.submit(tasks.gated, blocker_started, blocker_release)
    try:
        wait_until(lambda: os.path.exists(blocker_started), what="the blocker to start")
        it = ex.map(tasks.fail_or_gate, items(), [release_path] * 7)
        with pytest.raises(ValueError, match="first item fails"):
            next(it)
    finally:
        release(blocker_release)
        release(release_path)
    assert blocker.result(LIVENESS) is None
    wait_until(lambda: idle(ex), what="the cluster to go idle")
    # at most one gated item could start (on the worker that ran the failing one)
    assert sum(os.path.exists(p) for p in started) <= 1


def test_closing_map_iterator_cancels_what_has_not_started(ex, tmp_path):
    release_path = str(tmp_path / "release")
    first_started, first_release = gate_paths(tmp_path, "first")
    started = [str(tmp_path / f"{i}.started") for i in range(6)]
    release(first_release)
    it = ex.map(
        tasks.gated, [first_started, *started], [first_release] + [release_path] * 6, range(7)
    )
    try:
        assert next(it) == 0
        it.close()
    finally:
        release(release_path)
    wait_until(lambda: idle(ex), what="the cluster to go idle")
    # the two workers may each have started one more item; the rest were cancelled
    assert sum(os.path.exists(p) for p in started) <= 2


# --- shutdown ----------------------------------------------------------------------------------


def test_shutdown_wait_finishes_queued_work(tmp_path):
    ex = meshpool.Executor(2)
    fs = [ex.submit(tasks.slow_inc, i, 0.05) for i in range(6)]
    ex.shutdown(wait=True)
    assert all(f.done() for f in fs)
    assert [f.result(0) for f in fs] == [1, 2, 3, 4, 5, 6]
    assert not ex._core.thread.is_alive()


def test_shutdown_nowait_returns_and_work_still_finishes(tmp_path):
    started, release_path = gate_paths(tmp_path, "g")
    ex = meshpool.Executor(1)
    fut = ex.submit(tasks.gated, started, release_path, "done")
    ex.shutdown(wait=False)  # returns while the task is blocked
    assert not fut.done()
    release(release_path)
    assert fut.result(LIVENESS) == "done"
    ex._core.thread.join(LIVENESS)
    assert not ex._core.thread.is_alive()


@pytest.mark.parametrize("wait", [False, True])
def test_shutdown_cancel_futures(tmp_path, wait):
    ex = meshpool.Executor(2)
    gates = [gate_paths(tmp_path, f"g{i}") for i in range(2)]
    running = [ex.submit(tasks.gated, s, r, i) for i, (s, r) in enumerate(gates)]
    wait_until(lambda: all(os.path.exists(s) for s, _ in gates), what="both gates to start")
    queued = [ex.submit(tasks.inc, i) for i in range(10)]

    def release_when_cancelled():
        cf.wait(queued, timeout=LIVENESS)
        for _, r in gates:
            release(r)

    releaser = threading.Thread(target=release_when_cancelled)
    releaser.start()
    ex.shutdown(wait=wait, cancel_futures=True)
    releaser.join(LIVENESS)
    assert all(f.cancelled() for f in queued)
    assert [f.result(LIVENESS) for f in running] == [0, 1]
    ex._core.thread.join(LIVENESS)


def test_context_manager_waits_and_shuts_down():
    with meshpool.Executor(1) as ex:
        fut = ex.submit(tasks.slow_inc, 1, 0.05)
    assert fut.done() and fut.result(0) == 2
    with pytest.raises(RuntimeError, match="after shutdown"):
        ex.submit(tasks.inc, 1)


def test_submit_and_map_after_shutdown_raise_runtime_error():
    ex = meshpool.Executor(1)
    ex.shutdown()
    with pytest.raises(RuntimeError, match="after shutdown"):
        ex.submit(tasks.inc, 1)
    with pytest.raises(RuntimeError, match="after shutdown"):
        ex.map(tasks.inc, [1])
    ex.shutdown()  # twice is fine


def test_asking_a_shut_down_executor_raises_at_once_instead_of_timing_out():
    """Requests after shutdown used to wait out the executor's timeout (a bare TimeoutError)."""
    ex = meshpool.Executor(1)
    assert ex.submit(tasks.inc, 1).result(LIVENESS) == 2
    ex.shutdown()
    with pytest.raises(RuntimeError, match="shut down"):
        ex.workers()
    with pytest.raises(RuntimeError, match="shut down"):
        ex.wait_for_workers(1, timeout=60)


def test_shutdown_from_done_callback_does_not_deadlock():
    ex = meshpool.Executor(1)
    called = threading.Event()

    def stop(_):
        ex.shutdown(wait=True)
        called.set()

    ex.submit(tasks.inc, 1).add_done_callback(stop)
    assert called.wait(LIVENESS)
    ex._core.thread.join(LIVENESS)
    assert not ex._core.thread.is_alive()


def test_executor_is_a_stdlib_executor(ex):
    assert isinstance(ex, cf.Executor)
    assert "local cluster" in repr(ex)


def test_files_written_by_tasks_land_in_tmp_path(ex, tmp_path):
    path = tmp_path / "f"
    assert ex.submit(tasks.touch, str(path), 1).result(LIVENESS) == 1
    assert Path(path).read_text() != str(os.getpid())  # written by a worker, not by us
