"""Tasks that submit tasks: ``meshpool.current_executor()`` inside a task, on real worker processes.

A task that waits for the tasks it submitted gives its execution slot back until the wait ends,
so even a one-worker, one-thread pool runs a whole task tree. Past the cap on replacement
threads (``MESHPOOL_MAX_REPLACEMENTS``) a waiting task runs queued tasks itself. Bounds here are
liveness bounds only (see helpers.LIVENESS): a failure means stuck, never slow.

The scheduler's side (SlotBlocked) is driven synchronously first, with test_state_machine's Sim.
"""

from __future__ import annotations

import os
import threading
import time

import pytest
from helpers import LIVENESS
from tasks import getpid, inc, sleep
from test_state_machine import Sim, compute, only, task_done

import meshpool
from meshpool import messages as m
from meshpool.scheduler.state import PROCESSING, WAITING

# --- the scheduler: a blocked task leaves its slot's room but stays executing ------------------


def blocked_sim() -> Sim:
    """One worker, one slot, running "a", which has said it waits (SlotBlocked)."""
    sim = Sim()
    sim.register("w1")
    assert sim.submit(("a", [])) == [("w1/0", compute("a", 1))]
    assert sim.worker("w1/0", m.SlotBlocked("a")) == []
    assert sim.state.workers["w1"].blocked == {sim.ts("a")}
    return sim


def test_a_blocked_task_frees_its_slot_which_then_gets_no_prefetch():
    sim = blocked_sim()
    assert sim.submit(("b", [])) == [("w1/0", compute("b", 2))]
    assert sim.submit(("c", [])) == []  # one at a time while the slot has a blocked task
    assert sim.done("w1/0", "b") == [("c1", task_done("b")), ("w1/0", compute("c", 3))]


def test_a_blocked_tasks_result_may_come_from_a_helper_connection_of_its_slot():
    sim = blocked_sim()
    assert sim.done("w1/1~1", "a") == []  # not that slot's task: dropped
    assert sim.ts("a").state == PROCESSING
    assert sim.done("w1/0~1", "a") == [("c1", task_done("a"))]
    assert sim.state.workers["w1"].blocked == set()


def test_a_blocked_task_is_blamed_when_its_worker_dies():
    sim = blocked_sim()
    sim.submit(("b", []), ("c", []))  # b runs in the freed slot, c waits for room
    sim.remove("w1")
    assert {k: sim.ts(k).suspicious for k in "abc"} == {"a": 1, "b": 1, "c": 0}


def test_cancel_leaves_a_blocked_task_alone():
    sim = blocked_sim()
    sim.submit(("b", []))
    assert sim.client(m.CancelKeys(5, ["a"])) == [("c1", m.CancelReply(5, []))]


def test_stale_or_misdirected_slot_blocked_is_ignored():
    sim = blocked_sim()
    sim.submit(("b", []))
    assert sim.worker("w1/0", m.SlotBlocked("a")) == []  # again
    assert sim.worker("w1/1", m.SlotBlocked("b")) == []  # not that slot's task
    assert sim.worker("w1/0", m.SlotBlocked("nope")) == []
    sim.done("w1/0", "b")
    assert sim.worker("w1/0", m.SlotBlocked("b")) == []  # finished meanwhile
    assert sim.state.workers["w1"].blocked == {sim.ts("a")}


def test_no_chaining_behind_a_blocked_task():
    """The slot runs other tasks before a blocked one finishes: its dependents must wait."""
    sim = blocked_sim()
    assert sim.submit(("b", []), ("d", ["a", "b"])) == [("w1/0", compute("b", 2))]
    assert only(sim.done("w1/0", "b"), m.Compute) == []
    assert sim.ts("d").state == WAITING
    out = sim.done("w1/0~1", "a")
    deps = [("a", ["addr-w1"]), ("b", ["addr-w1"])]
    assert only(out, m.Compute) == [("w1/0", compute("d", 3, deps))]


# --- functions the tests run on workers -------------------------------------------------------


def fib(n):
    """Each call above the leaves submits its two halves to the cluster and waits for them."""
    if n < 2:
        return n
    ex = meshpool.current_executor()
    a = ex.submit(fib, n - 1)
    b = ex.submit(fib, n - 2)
    return a.result() + b.result()


def fib_traced(n):
    """fib, with each leaf reporting how deep it ran nested in waiting tasks on its thread, and
    how many slot threads its worker had: ``(value, deepest nesting, most slot threads)``."""
    if n < 2:
        from meshpool.worker import execution

        slots = sum(1 for t in threading.enumerate() if t.name.startswith("meshpool-slot-"))
        return n, execution._local.task.depth, slots
    ex = meshpool.current_executor()
    a = ex.submit(fib_traced, n - 1)
    b = ex.submit(fib_traced, n - 2)
    (va, da, sa), (vb, db, sb) = a.result(), b.result()
    return va + vb, max(da, db), max(sa, sb)


def submit_and_wait(x):
    return meshpool.current_executor().submit(inc, x).result(timeout=LIVENESS)


def where():
    return os.getpid(), threading.current_thread().name


def use_and_close_handle():
    first = meshpool.current_executor()
    assert first is not None
    one = first.submit(inc, 1).result(timeout=LIVENESS)
    first.shutdown()
    second = meshpool.current_executor()
    two = second.submit(inc, 2).result(timeout=LIVENESS)
    return one, two, second is not first, os.getpid()


def submit_then_close(x):
    """The handle's shutdown(wait=True) waits for its pending tasks without holding the slot."""
    with meshpool.current_executor() as ex:
        fut = ex.submit(inc, x)
    return fut.result(timeout=0)


_holder_ready = threading.Event()  # in the worker process: two tasks of one worker meet here
_closer_done = threading.Event()


def hold_handle_across_neighbours_shutdown():
    ex = meshpool.current_executor()
    _holder_ready.set()
    assert _closer_done.wait(LIVENESS)
    return ex.submit(inc, 1).result(timeout=LIVENESS)


def close_own_handle():
    assert _holder_ready.wait(LIVENESS)
    with meshpool.current_executor() as ex:
        ex.submit(inc, 0).result(timeout=LIVENESS)
    _closer_done.set()
    return True


def graphs_inside():
    """meshpool.get and delayed(...).compute() inside a task: where did the inner tasks run?
    (compute() first: the worker has not loaded the executor's graph module yet)"""
    delayed_where = meshpool.delayed(where)().compute()
    got = meshpool.get({"a": (where,), "b": (inc, 41)}, ["a", "b"])
    return os.getpid(), got, delayed_where


def wait_many(n):
    ex = meshpool.current_executor()
    futures = [ex.submit(inc, i) for i in range(n)]
    done, not_done = meshpool.wait(futures, timeout=LIVENESS)
    gathered = ex.gather([ex.submit(inc, i) for i in range(n)], timeout=LIVENESS)
    return sorted(f.result() for f in done), len(not_done), gathered


def wait_with_timeout():
    slow = meshpool.current_executor().submit(sleep, 2)
    try:
        slow.result(timeout=0.1)
    except TimeoutError:
        return "timed out"
    return "finished"


def fail_inside():
    return meshpool.current_executor().submit(inc, "not a number").result(timeout=LIVENESS)


# --- tests --------------------------------------------------------------------------------------


@pytest.mark.timeout(240)
def test_fib_18_on_one_thread():
    """8,361 tasks, each internal one waiting for the two it submitted, on a single thread."""
    with meshpool.Executor(1, threads_per_worker=1) as ex:
        ex.wait_for_workers(1, timeout=LIVENESS)
        start = time.perf_counter()
        assert ex.submit(fib, 18).result(timeout=120) == 2584
        print(f"fib(18) on 1 worker x 1 thread: {time.perf_counter() - start:.1f} s")


@pytest.mark.timeout(120)
def test_task_waits_for_task_it_submitted_on_one_thread():
    with meshpool.Executor(1, threads_per_worker=1) as ex:
        assert ex.submit(submit_and_wait, 1).result(timeout=LIVENESS) == 2
        assert list(ex.map(submit_and_wait, range(5), timeout=LIVENESS)) == [1, 2, 3, 4, 5]


@pytest.mark.timeout(120)
def test_current_executor_in_task_and_its_shutdown_leaves_the_cluster_alone():
    with meshpool.Executor(1, threads_per_worker=1) as ex:
        one, two, fresh, pid = ex.submit(use_and_close_handle).result(timeout=LIVENESS)
        assert (one, two, fresh) == (2, 3, True)
        # the cluster (and the worker) outlived the task's handle
        assert list(ex.map(inc, range(3), timeout=LIVENESS)) == [1, 2, 3]
        assert ex.submit(getpid).result(timeout=LIVENESS) == pid
        assert ex.submit(submit_and_wait, 5).result(timeout=LIVENESS) == 6


@pytest.mark.timeout(120)
def test_handle_shutdown_waits_for_its_tasks_without_holding_the_slot():
    with meshpool.Executor(1, threads_per_worker=1) as ex:
        assert ex.submit(submit_then_close, 7).result(timeout=LIVENESS) == 8


@pytest.mark.timeout(120)
def test_shutdown_of_one_tasks_handle_leaves_its_neighbours_handles_working():
    """Two tasks on one worker's two threads: the second closes its handle (a ``with`` block)
    while the first still holds its own; the first's submit afterwards works."""
    with meshpool.Executor(1, threads_per_worker=2) as ex:
        holder = ex.submit(hold_handle_across_neighbours_shutdown)
        closer = ex.submit(close_own_handle)
        assert closer.result(timeout=LIVENESS) is True
        assert holder.result(timeout=LIVENESS) == 2


@pytest.mark.timeout(120)
def test_get_and_delayed_inside_a_task_run_on_the_cluster():
    with meshpool.Executor(2, threads_per_worker=1) as ex:
        ex.wait_for_workers(2, timeout=LIVENESS)
        worker_pids = {w["pid"] for w in ex.workers()}
        outer_pid, (inner_a, b), inner_delayed = ex.submit(graphs_inside).result(timeout=LIVENESS)
        assert outer_pid in worker_pids and b == 42
        for pid, thread in (inner_a, inner_delayed):
            # run by a worker's execution slot, not by threads in the outer task's process
            assert pid in worker_pids and pid != os.getpid()
            assert thread.startswith("meshpool-slot-"), thread


@pytest.mark.timeout(120)
def test_wait_gather_timeout_and_errors_inside_tasks():
    with meshpool.Executor(1, threads_per_worker=1) as ex:
        done, not_done, gathered = ex.submit(wait_many, 6).result(timeout=LIVENESS)
        assert (done, not_done, gathered) == ([1, 2, 3, 4, 5, 6], 0, [1, 2, 3, 4, 5, 6])
        assert ex.submit(wait_with_timeout).result(timeout=LIVENESS) == "timed out"
        with pytest.raises(TypeError):
            ex.submit(fail_inside).result(timeout=LIVENESS)
        assert ex.submit(submit_and_wait, 1).result(timeout=LIVENESS) == 2


@pytest.mark.timeout(180)
def test_past_the_replacement_cap_a_waiting_task_runs_queued_tasks(monkeypatch):
    """With a cap of 2 replacement threads, fib(11) has ~10 tasks waiting at once: the ones past
    the cap run the slot's tasks nested on their own stack while they wait."""
    monkeypatch.setenv("MESHPOOL_MAX_REPLACEMENTS", "2")
    with meshpool.Executor(1, threads_per_worker=1) as ex:
        value, deepest, most_threads = ex.submit(fib_traced, 11).result(timeout=120)
    assert value == 89
    assert deepest >= 1  # some leaf ran nested inside a waiting task (help while waiting)
    assert most_threads <= 1 + 2  # the owner plus at most two replaced threads


@pytest.mark.timeout(240)
def test_nested_tasks_on_a_secured_remote_cluster(tmp_path):
    """CLI scheduler and workers over TCP with CURVE: the task's handle uses the worker's keys."""
    from cli_cluster import CliCluster

    with CliCluster(tmp_path) as cluster:
        cluster.start_scheduler()
        cluster.start_worker("w", "--nworkers", "1")
        with cluster.executor() as ex:
            ex.wait_for_workers(1, timeout=LIVENESS)
            assert ex.submit(fib, 10).result(timeout=120) == 55
            assert ex.submit(submit_and_wait, 1).result(timeout=LIVENESS) == 2
