"""Futures as the stdlib knows them: as_completed, wait, done callbacks, cancel, lifetimes.

Mirrors CPython's ``test_as_completed.py``, ``test_wait.py`` and ``test_future.py`` against real
workers. Slow tasks are *gated* (``tasks.gated`` blocks until the test creates a file), so what
is running and what is queued is decided by the test, not by timing.
"""

from __future__ import annotations

import concurrent.futures as cf
import gc
import os
import threading

import pytest
import tasks
from helpers import LIVENESS, gate_paths, release, wait_until

import meshpool


class Gate:
    """A gated task on the shared executor; released (always) when the ``with`` block ends."""

    def __init__(self, ex, tmp_path, name, value=None):
        self.started, self.release_path = gate_paths(tmp_path, name)
        self.future = ex.submit(tasks.gated, self.started, self.release_path, value)

    def wait_started(self):
        wait_until(lambda: os.path.exists(self.started), what=f"{self.started} to start")
        return self

    def release(self):
        release(self.release_path)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()


def occupy_all(ex, tmp_path):
    """Gates running on both workers of the shared executor (so the next submit queues)."""
    gates = [Gate(ex, tmp_path, f"busy{i}", i) for i in range(2)]
    for gate in gates:
        gate.wait_started()
    return gates


# --- as_completed ------------------------------------------------------------------------------

AS_COMPLETED = [
    pytest.param(cf.as_completed, id="stdlib"),
    pytest.param(meshpool.as_completed, id="meshpool"),
    pytest.param("method", id="Executor.as_completed"),
]


def _as_completed(kind, ex, fs, timeout=None):
    if kind == "method":
        return ex.as_completed(fs, timeout=timeout)
    return kind(fs, timeout=timeout)


@pytest.mark.parametrize("kind", AS_COMPLETED)
def test_as_completed_yields_each_future_once(ex, kind):
    fs = [ex.submit(tasks.inc, i) for i in range(5)]
    got = list(_as_completed(kind, ex, fs, timeout=LIVENESS))
    assert len(got) == 5 and set(got) == set(fs)


@pytest.mark.parametrize("kind", AS_COMPLETED)
def test_as_completed_duplicates_yielded_once(ex, kind):
    a = ex.submit(tasks.inc, 1)
    b = ex.submit(tasks.inc, 2)
    got = list(_as_completed(kind, ex, [a, a, b, a], timeout=LIVENESS))
    assert sorted(f.result() for f in got) == [2, 3]


@pytest.mark.parametrize("kind", AS_COMPLETED)
def test_as_completed_yields_in_completion_order(ex, tmp_path, kind):
    with Gate(ex, tmp_path, "slow", "slow") as gate:
        gate.wait_started()
        fast = ex.submit(tasks.inc, 1)
        it = iter(_as_completed(kind, ex, [gate.future, fast], timeout=LIVENESS))
        assert next(it) is fast
        gate.release()
        assert next(it) is gate.future
        with pytest.raises(StopIteration):
            next(it)


@pytest.mark.parametrize("kind", AS_COMPLETED)
def test_as_completed_timeout(ex, tmp_path, kind):
    with Gate(ex, tmp_path, "slow") as gate:
        done = ex.submit(tasks.inc, 1)
        done.result(LIVENESS)
        got = []
        with pytest.raises(TimeoutError):
            for fut in _as_completed(kind, ex, [done, gate.future], timeout=0.1):
                got.append(fut)
        assert got == [done]


def test_meshpool_as_completed_add_while_iterating(ex):
    first = ex.submit(tasks.inc, 1)
    ac = meshpool.as_completed([first])
    seen = []
    for fut in ac:
        seen.append(fut)
        if len(seen) == 1:
            ac.add(ex.submit(tasks.inc, 10))
            ac.add(first)  # already known: not yielded again
        if len(seen) == 2:
            ac.update([ex.submit(tasks.inc, 20)])
    assert [f.result() for f in seen] == [2, 11, 21]
    assert ac.count() == 0


def test_as_completed_with_plain_and_meshpool_futures(ex):
    plain: cf.Future = cf.Future()
    fut = ex.submit(tasks.inc, 1)
    ac = meshpool.as_completed([plain, fut], timeout=LIVENESS)
    assert next(ac) is fut
    plain.set_result(5)
    assert next(ac) is plain


# --- wait --------------------------------------------------------------------------------------

WAIT = [pytest.param(cf.wait, id="stdlib"), pytest.param(meshpool.wait, id="meshpool")]


@pytest.mark.parametrize("wait", WAIT)
def test_wait_first_completed(ex, tmp_path, wait):
    with Gate(ex, tmp_path, "slow") as gate:
        fast = ex.submit(tasks.inc, 1)
        done, not_done = wait([gate.future, fast], timeout=LIVENESS, return_when=cf.FIRST_COMPLETED)
        assert done == {fast} and not_done == {gate.future}


@pytest.mark.parametrize("wait", WAIT)
def test_wait_first_exception(ex, tmp_path, wait):
    with Gate(ex, tmp_path, "slow") as gate:
        ok = ex.submit(tasks.inc, 1)
        ok.result(LIVENESS)
        bad = ex.submit(tasks.fail)
        done, not_done = wait(
            [gate.future, ok, bad], timeout=LIVENESS, return_when=cf.FIRST_EXCEPTION
        )
        assert done == {ok, bad} and not_done == {gate.future}


@pytest.mark.parametrize("wait", WAIT)
def test_wait_first_exception_none_raise(ex, wait):
    fs = [ex.submit(tasks.inc, i) for i in range(3)]
    done, not_done = wait(fs, timeout=LIVENESS, return_when=meshpool.FIRST_EXCEPTION)
    assert done == set(fs) and not not_done


@pytest.mark.parametrize("wait", WAIT)
def test_wait_all_completed(ex, wait):
    fs = [ex.submit(tasks.inc, i) for i in range(4)] + [ex.submit(tasks.fail)]
    done, not_done = wait(fs, timeout=LIVENESS, return_when=meshpool.ALL_COMPLETED)
    assert done == set(fs) and not not_done


@pytest.mark.parametrize("wait", WAIT)
def test_wait_timeout(ex, tmp_path, wait):
    with Gate(ex, tmp_path, "slow") as gate:
        ok = ex.submit(tasks.inc, 1)
        ok.result(LIVENESS)
        done, not_done = wait([ok, gate.future], timeout=0.2)
        assert done == {ok} and not_done == {gate.future}


def test_meshpool_wait_and_as_completed_make_no_condition_per_future(ex, tmp_path):
    """A Condition is most of a future's memory: meshpool.wait and as_completed make none
    (the stdlib's wait makes one per future, which is why the drop-in keeps them lazy)."""
    with Gate(ex, tmp_path, "slow") as gate:
        fs = [ex.submit(tasks.inc, i) for i in range(200)]
        done, not_done = meshpool.wait([*fs, gate.future], timeout=0.5)
        assert gate.future in not_done
        gate.release()
        done, not_done = meshpool.wait([*fs, gate.future], timeout=LIVENESS)
        assert not not_done and len(done) == 201
    more = [ex.submit(tasks.inc, i) for i in range(200)]
    assert sorted(f.result() for f in meshpool.as_completed(more, timeout=LIVENESS)) == list(
        range(1, 201)
    )
    assert [f for f in [*fs, gate.future, *more] if f._cond is not None] == []
    assert [f.result() for f in fs] == list(range(1, 201))


@pytest.mark.parametrize("return_when", [cf.FIRST_COMPLETED, cf.FIRST_EXCEPTION])
def test_meshpool_wait_returns_at_once_when_already_satisfied(ex, tmp_path, return_when):
    with Gate(ex, tmp_path, "slow") as gate:
        finished = ex.submit(tasks.fail if return_when == cf.FIRST_EXCEPTION else tasks.inc, 1)
        meshpool.wait([finished], timeout=LIVENESS)
        done, not_done = meshpool.wait(
            [gate.future, finished], timeout=LIVENESS, return_when=return_when
        )
        assert done == {finished} and not_done == {gate.future}


def test_meshpool_wait_sees_a_cancel(ex, tmp_path):
    gates = occupy_all(ex, tmp_path)
    try:
        queued = ex.submit(tasks.inc, 1)
        assert queued.cancel()
        done, not_done = meshpool.wait([queued], timeout=LIVENESS)
        assert done == {queued} and queued.cancelled()
    finally:
        for gate in gates:
            gate.release()


# --- done callbacks ----------------------------------------------------------------------------


def test_done_callback_runs_once_after_completion_off_the_io_thread(ex):
    calls = []
    finished = threading.Event()

    def callback(fut):
        calls.append((fut.done(), fut.result(), threading.current_thread().name))
        finished.set()

    fut = ex.submit(tasks.inc, 41)
    fut.add_done_callback(callback)
    assert finished.wait(LIVENESS)
    fut.result()
    # a second completion path (e.g. result()) must not run it again
    ex.submit(tasks.inc, 0).result(LIVENESS)
    assert len(calls) == 1
    done, value, thread_name = calls[0]
    assert done and value == 42
    assert thread_name != "meshpool-io"


def test_done_callback_of_an_error_and_a_cancel(ex, tmp_path):
    seen = []
    calls = threading.Semaphore(0)

    def callback(fut):
        seen.append("cancelled" if fut.cancelled() else type(fut.exception()).__name__)
        calls.release()

    gates = occupy_all(ex, tmp_path)
    try:
        queued = ex.submit(tasks.inc, 1)
        queued.add_done_callback(callback)
        assert queued.cancel()
    finally:
        for gate in gates:
            gate.release()
    bad = ex.submit(tasks.fail)
    bad.add_done_callback(callback)
    assert calls.acquire(timeout=LIVENESS) and calls.acquire(timeout=LIVENESS)
    assert sorted(seen) == ["ValueError", "cancelled"]


def test_done_callback_added_to_done_future_runs_immediately(ex):
    fut = ex.submit(tasks.inc, 1)
    fut.result(LIVENESS)
    calls = []
    fut.add_done_callback(lambda f: calls.append(threading.current_thread()))
    assert calls == [threading.current_thread()]


def test_done_callback_exception_is_logged_not_fatal(ex, caplog):
    ran = threading.Event()

    def bad(_):
        raise RuntimeError("callback bug")

    fut = ex.submit(tasks.inc, 1)
    fut.add_done_callback(bad)
    fut.add_done_callback(lambda _: ran.set())
    assert ran.wait(LIVENESS)  # the later callback still ran
    assert ex.submit(tasks.inc, 2).result(LIVENESS) == 3


# --- result() from several threads -------------------------------------------------------------


def test_result_times_out_then_every_waiting_thread_gets_the_value(ex, tmp_path):
    with Gate(ex, tmp_path, "waited", 7) as gate:
        with pytest.raises(TimeoutError):
            gate.future.result(0.05)
        got = []
        threads = [
            threading.Thread(target=lambda: got.append(gate.future.result(LIVENESS)))
            for _ in range(3)
        ]
        for thread in threads:
            thread.start()
        wait_until(lambda: len(gate.future._waiters) == 3, what="three threads waiting")
        assert gate.future._cond is None  # (result() waits without a Condition)
        gate.release()
        for thread in threads:
            thread.join(LIVENESS)
        assert got == [7, 7, 7]
        assert gate.future._waiters == []


def test_a_thread_waiting_in_result_sees_the_cancel(ex, tmp_path):
    gates = occupy_all(ex, tmp_path)
    try:
        queued = ex.submit(tasks.inc, 1)
        raised = []

        def wait() -> None:
            try:
                queued.result(LIVENESS)
            except cf.CancelledError as exc:
                raised.append(exc)

        thread = threading.Thread(target=wait)
        thread.start()
        wait_until(lambda: len(queued._waiters) == 1, what="a thread waiting")
        assert queued.cancel()
        thread.join(LIVENESS)
        assert len(raised) == 1
    finally:
        for gate in gates:
            gate.release()


# --- cancel ------------------------------------------------------------------------------------


def test_cancel_queued_task(ex, tmp_path):
    marker = tmp_path / "should-not-exist"
    gates = occupy_all(ex, tmp_path)
    try:
        queued = ex.submit(tasks.touch, str(marker))
        assert queued.cancel() is True
        assert queued.cancelled() and queued.done()
        # the stdlib's own waiting functions see it at once
        done, _ = cf.wait([queued], timeout=0)
        assert done == {queued}
        assert list(cf.as_completed([queued], timeout=0)) == [queued]
        with pytest.raises(cf.CancelledError):
            queued.result(0)
        assert queued.cancel() is True  # again: still True
    finally:
        for gate in gates:
            gate.release()
    assert [g.future.result(LIVENESS) for g in gates] == [0, 1]
    ex.submit(tasks.inc, 1).result(LIVENESS)
    wait_until(lambda: all(w["processing"] == 0 for w in ex.workers()), what="idle")
    assert not marker.exists()


def test_cancel_task_not_yet_dispatched(ex, tmp_path):
    """Far more tasks than the workers' prefetch queues: most are still on the scheduler."""
    gates = occupy_all(ex, tmp_path)
    try:
        queued = [ex.submit(tasks.inc, i) for i in range(200)]
        results = [f.cancel() for f in reversed(queued)]
        assert all(results)
        assert all(f.cancelled() for f in queued)
    finally:
        for gate in gates:
            gate.release()


def test_cancel_running_task_returns_false_and_it_completes(ex, tmp_path):
    with Gate(ex, tmp_path, "running", "finished") as gate:
        gate.wait_started()
        assert gate.future.cancel() is False
        assert not gate.future.cancelled()
        gate.release()
        assert gate.future.result(LIVENESS) == "finished"


def test_cancel_finished_task_returns_false(ex):
    fut = ex.submit(tasks.inc, 1)
    assert fut.result(LIVENESS) == 2
    assert fut.cancel() is False
    assert fut.result() == 2


def test_cancel_is_never_a_lie(ex, tmp_path):
    """A cancel that returns True means the task never runs, even when it races the worker.

    Each round submits short tasks that append to a log and cancels them at once, newest first:
    some are taken back, some have already run. None that reported cancelled may appear in the
    log (the scheduler's view of a slot's queue lags; the worker must decide).
    """
    log = tmp_path / "log"
    log.touch()
    cancelled: set[str] = set()
    for round_ in range(30):
        fs = [ex.submit(tasks.append_line, str(log), f"{round_}-{i}") for i in range(8)]
        cancelled |= {f"{round_}-{i}" for i, f in reversed(list(enumerate(fs))) if f.cancel()}
        cf.wait(fs, timeout=LIVENESS)
        for i, fut in enumerate(fs):
            assert fut.cancelled() == (f"{round_}-{i}" in cancelled)
            assert fut.cancelled() or fut.result() == f"{round_}-{i}"
    wait_until(lambda: all(w["processing"] == 0 for w in ex.workers()), what="idle")
    assert cancelled, "no cancel succeeded: the test proves nothing"
    assert cancelled & set(log.read_text().split()) == set()


def test_cancelling_a_dependency_cancels_dependents(ex, tmp_path):
    gates = occupy_all(ex, tmp_path)
    try:
        a = ex.submit(tasks.inc, 1)
        b = ex.submit(tasks.inc, a)
        assert a.cancel()
        with pytest.raises(cf.CancelledError):
            b.result(LIVENESS)
    finally:
        for gate in gates:
            gate.release()


# --- lifetimes ---------------------------------------------------------------------------------


def test_discarded_future_still_runs(ex, tmp_path):
    marker = tmp_path / "ran"
    ex.submit(tasks.touch, str(marker))  # the future is dropped at once
    gc.collect()
    wait_until(marker.exists, what="the discarded task to run")


def test_dropping_a_future_never_cancels_its_task(ex, tmp_path):
    marker = tmp_path / "ran"
    started, release_path = gate_paths(tmp_path, "g")
    fut = ex.submit(tasks.gated, started, release_path)
    after = ex.submit(tasks.touch, str(marker))
    del fut, after
    gc.collect()
    release(release_path)
    wait_until(marker.exists, what="the dropped task to run")
    wait_until(lambda: os.path.exists(started), what="the dropped gated task to run")


def test_dropped_dependency_still_feeds_its_dependent(ex):
    a = ex.submit(tasks.inc, 1)
    b = ex.submit(tasks.add, a, 10)
    del a
    gc.collect()
    assert b.result(LIVENESS) == 12


def test_future_repr_and_key(ex):
    fut = ex.submit(tasks.inc, 1)
    fut.result(LIVENESS)
    assert "inc" in repr(fut) and "finished" in repr(fut)
    assert isinstance(fut, cf.Future)


def test_running_task_reports_running(ex, tmp_path):
    with Gate(ex, tmp_path, "running") as gate:
        gate.wait_started()
        assert gate.future.running()


def test_finished_futures_are_not_running(ex):
    done = ex.submit(abs, -2)
    assert done.result(timeout=30) == 2
    assert not done.running()


def test_a_callback_added_to_a_finished_future_runs_at_once_without_a_condition(ex):
    """(as_completed adds one per future: a future already finished used to get a Condition
    through the stdlib's add_done_callback)"""
    fut = ex.submit(tasks.inc, 1)
    done, _ = meshpool.wait([fut], timeout=LIVENESS)
    assert done == {fut}
    seen: list = []
    fut.add_done_callback(seen.append)
    assert seen == [fut]
    assert fut._cond is None
    assert [f.result() for f in meshpool.as_completed([fut])] == [2]
    assert fut._cond is None
