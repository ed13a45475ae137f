"""Task graphs on a real cluster: dependencies, locality, worker-to-worker data, the graph API."""

from __future__ import annotations

import concurrent.futures as cf
import gc
import operator
import os
import subprocess
import sys
import threading
import time
import tracemalloc

import numpy as np
import psutil
import pytest
from tasks import add, fail, full_array, getpid, inc, sleep

import meshpool
from meshpool.graph import CycleError


def total(*args):
    return sum(args)


def nested_sum(structure):
    """Sum every number inside nested lists / tuples / dicts / sets."""
    if isinstance(structure, dict):
        return sum(nested_sum(v) for v in structure.values())
    if isinstance(structure, (list, tuple, set, frozenset)):
        return sum(nested_sum(v) for v in structure)
    return structure


def make_array(mb, value=1.0):
    return np.full(int(mb * 2**20) // 8, value)


def array_sum_and_pid(a):
    return float(a.sum()), os.getpid()


def running_order(tag, log_path):
    with open(log_path, "a") as f:
        f.write(f"{tag}\n")
    return tag


# --- dependencies -----------------------------------------------------------------------------


def test_futures_nested_in_containers_are_dependencies(ex):
    a, b, c, d = (ex.submit(inc, i) for i in range(4))
    structure = [a, (b, {"x": c}), {d}, frozenset([a])]
    assert ex.submit(nested_sum, structure).result(timeout=30) == 1 + 2 + 3 + 4 + 1


def test_dependencies_receive_values_not_futures(ex):
    a = ex.submit(make_array, 1)
    assert ex.submit(lambda x: type(x).__name__, a).result(timeout=30) == "ndarray"


def test_graph_of_ten_thousand_futures(ex):
    leaves = [ex.submit(inc, i) for i in range(5_000)]
    level = leaves
    while len(level) > 1:
        level = [ex.submit(add, level[i], level[i + 1]) for i in range(0, len(level) - 1, 2)] + (
            [level[-1]] if len(level) % 2 else []
        )
    assert level[0].result(timeout=120) == sum(range(1, 5_001))


def test_get_graph_of_twenty_thousand_tasks(ex):
    dsk = {("x", 0): 0}
    for i in range(1, 20_000):
        dsk[("x", i)] = (inc, ("x", i - 1))
    dsk["total"] = (sum, [("x", i) for i in range(0, 20_000, 1000)])
    assert ex.get(dsk, ("x", 19_999)) == 19_999
    assert ex.get(dsk, "total") == sum(range(0, 20_000, 1000))


def _fan_in_tree(tasks: int, fan_in: int = 4) -> tuple[dict, tuple, int]:
    """About ``tasks`` tasks: leaves ``inc(i)``, summed ``fan_in`` at a time up to one root."""
    leaves = tasks * (fan_in - 1) // fan_in
    dsk: dict = {("leaf", i): (inc, i) for i in range(leaves)}
    level = list(dsk)
    depth = 0
    while len(level) > 1:
        depth += 1
        nxt = []
        for j in range(0, len(level), fan_in):
            dsk[("sum", depth, j)] = (sum, level[j : j + fan_in])
            nxt.append(("sum", depth, j))
        level = nxt
    return dsk, level[0], leaves * (leaves + 1) // 2


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_get_graph_of_two_hundred_thousand_tasks(ex):
    """Hundreds of thousands of tasks in one graph (the issue's criterion; ~2 min on 2 cores)."""
    dsk, root, expected = _fan_in_tree(200_000)
    assert len(dsk) >= 200_000
    assert ex.get(dsk, root) == expected


# --- locality and worker-to-worker data -------------------------------------------------------


def test_data_moves_worker_to_worker_not_through_caller():
    """500 MB go from one worker to another; caller and scheduler move under 1 MB."""
    with meshpool.Executor(2) as ex:
        ex.wait_for_workers(2)
        first, second = sorted(w["name"] for w in ex.workers())
        before = ex.statistics()
        producers = [ex.options(workers=[first]).submit(make_array, 50, i) for i in range(10)]
        consumers = [ex.options(workers=[second]).submit(array_sum_and_pid, p) for p in producers]
        results = [c.result(timeout=120) for c in consumers]
        after = ex.statistics()
    sums = [r[0] for r in results]
    assert sums == [i * 50 * 2**20 / 8 for i in range(10)]
    consumer_pids = {r[1] for r in results}
    assert len(consumer_pids) == 1 and os.getpid() not in consumer_pids
    moved_by_caller = (after.client_bytes_sent - before.client_bytes_sent) + (
        after.client_bytes_received - before.client_bytes_received
    )
    moved_by_scheduler = (after.scheduler_bytes_sent - before.scheduler_bytes_sent) + (
        after.scheduler_bytes_received - before.scheduler_bytes_received
    )
    assert moved_by_caller + moved_by_scheduler < 1_000_000, (moved_by_caller, moved_by_scheduler)


def test_task_runs_where_its_input_lives(ex):
    ex.wait_for_workers(2)
    names = sorted(w["name"] for w in ex.workers())
    for name in names:
        data = ex.options(workers=[name]).submit(make_array, 20)
        holder = ex.options(workers=[name]).submit(getpid).result(timeout=30)
        assert ex.submit(array_sum_and_pid, data).result(timeout=30)[1] == holder


def test_large_argument_goes_to_a_worker_without_copies_in_the_caller(ex):
    array = make_array(100)
    gc.collect()
    tracemalloc.start()
    try:
        fut = ex.submit(array_sum_and_pid, array)
        result = fut.result(timeout=60)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert result[0] == array.size
    assert peak < 5 * 2**20, f"submitting 100 MB raised traced memory by {peak / 2**20:.1f} MB"


def test_large_argument_is_not_in_the_task_spec(ex):
    before = ex.statistics()
    assert ex.submit(array_sum_and_pid, make_array(20)).result(timeout=60)[0] == 20 * 2**20 / 8
    after = ex.statistics()
    scheduler_moved = (after.scheduler_bytes_sent - before.scheduler_bytes_sent) + (
        after.scheduler_bytes_received - before.scheduler_bytes_received
    )
    assert scheduler_moved < 100_000


# --- scatter / gather ---------------------------------------------------------------------------


def test_scatter_and_gather(ex):
    data = ex.scatter([make_array(1, i) for i in range(4)])
    assert all(isinstance(f, meshpool.Future) for f in data)
    sums = [ex.submit(array_sum_and_pid, d) for d in data]
    assert [s[0] for s in ex.gather(sums, timeout=30)] == [i * 2**20 / 8 for i in range(4)]
    one = ex.scatter({"a": 1})
    assert one.result(timeout=30) == {"a": 1}
    arrays = ex.gather([ex.submit(make_array, 1, i) for i in range(3)], timeout=30)
    assert [float(a[0]) for a in arrays] == [0.0, 1.0, 2.0]


# --- failure and cancellation flow through the graph -----------------------------------------------


def test_failure_propagates_to_every_dependent(ex):
    a = ex.submit(fail, "upstream broke")
    b = ex.submit(inc, a)
    c = ex.submit(add, b, 1)
    for fut in (a, b, c):
        with pytest.raises(ValueError, match="upstream broke") as info:
            fut.result(timeout=30)
        assert "fail" in "".join(
            __import__("traceback").format_exception(info.type, info.value, info.tb)
        )


def test_cancel_cancels_pending_dependents():
    with meshpool.Executor(1) as ex:
        blocker = ex.submit(sleep, 1.0)
        waiting = ex.submit(inc, blocker)
        downstream = ex.submit(inc, waiting)
        further = ex.submit(add, downstream, 1)
        assert waiting.cancel()
        for fut in (waiting, downstream, further):
            with pytest.raises(cf.CancelledError):
                fut.result(timeout=30)
            assert fut.cancelled()
        assert blocker.result(timeout=30) == 1.0


# --- memory follows references ---------------------------------------------------------------------


def _worker_rss(ex) -> dict:
    return {w["pid"]: psutil.Process(w["pid"]).memory_info().rss for w in ex.workers()}


def test_dropped_results_free_worker_memory():
    with meshpool.Executor(2) as ex:
        ex.wait_for_workers(2)
        ex.gather([ex.submit(make_array, 1) for _ in range(4)])  # warm up: numpy imported
        baseline = _worker_rss(ex)
        for _ in range(5):
            futures = [ex.submit(make_array, 20) for _ in range(6)]
            meshpool.wait(futures, timeout=60)
            del futures
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            now = _worker_rss(ex)
            if all(now[p] <= baseline[p] * 1.10 + 2**20 for p in baseline):
                break
            time.sleep(0.1)
        held = sum(w["nbytes"] for w in ex.workers())
        assert held == 0
        assert all(now[p] <= baseline[p] * 1.10 + 2**20 for p in baseline), (baseline, now)


def test_dropping_a_future_does_not_cancel_it(ex, tmp_path):
    marker = tmp_path / "ran"
    ex.submit(lambda: (time.sleep(0.2), marker.write_text("yes")))
    gc.collect()
    deadline = time.monotonic() + 30
    while not marker.exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert marker.read_text() == "yes"


# --- ordering ---------------------------------------------------------------------------------------


def _reduction_peak_rss(dsk: dict, root: tuple, leaves: int) -> dict:
    with meshpool.Executor(2) as ex:
        ex.wait_for_workers(2)
        pids = [w["pid"] for w in ex.workers()]
        peak = dict.fromkeys(pids, 0)
        done = threading.Event()

        def watch():
            while not done.is_set():
                for pid in pids:
                    peak[pid] = max(peak[pid], psutil.Process(pid).memory_info().rss)
                done.wait(0.005)

        watcher = threading.Thread(target=watch)
        watcher.start()
        try:
            result = ex.get(dsk, root)
        finally:
            done.set()
            watcher.join()
    assert result[0] == sum(range(leaves))
    return peak


def _reduction_graph(leaves: int) -> tuple[dict, tuple]:
    dsk: dict = {}
    level = []
    for i in range(leaves):
        dsk[("leaf", i)] = (full_array, 10, i)  # from a small module: no pytest in workers
        level.append(("leaf", i))
    n = 0
    while len(level) > 1:
        nxt = []
        for j in range(0, len(level), 2):
            dsk[("add", n)] = (operator.add, level[j], level[j + 1])
            nxt.append(("add", n))
            n += 1
        level = nxt
    return dsk, level[0]


def _assert_reduction_stays_under(leaves: int, limit_mb: int) -> None:
    dsk, root = _reduction_graph(leaves)
    peak = _reduction_peak_rss(dsk, root, leaves)
    peaks = sorted(round(v / 2**20) for v in peak.values())
    assert max(peak.values()) < limit_mb * 2**20, f"worker peaks {peaks} MB"


def test_reduction_of_256_leaves_of_10mb_keeps_workers_small():
    """The short form CI runs: 2.5 GB of leaves; depth-first order, inputs freed on the slot
    before its next task, and no worker running leaves far ahead of the other keep every worker
    under 150 MB (without them a worker would hold gigabytes)."""
    _assert_reduction_stays_under(256, 150)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_reduction_of_1024_leaves_of_10mb_keeps_workers_small():
    """The issue's criterion. A worker is ~41 MB with numpy; peaks measured 121-132 MB, also
    with a CPU hog running beside it (before: 150-280 MB under load)."""
    _assert_reduction_stays_under(1024, 150)


def test_priority_runs_first(tmp_path):
    log = tmp_path / "order.log"
    with meshpool.Executor(1) as ex:
        ex.submit(sleep, 0.5)
        time.sleep(0.2)  # the blocker is running; what follows queues behind it
        low = [ex.submit(running_order, f"low{i}", str(log)) for i in range(20)]
        high = ex.options(priority=10).submit(running_order, "high", str(log))
        meshpool.wait([*low, high], timeout=60)
    ran = log.read_text().split()
    assert ran.index("high") < len(ran) // 2, ran


def test_priority_is_not_a_submit_keyword(ex):
    assert ex.submit(lambda priority: priority, priority=3).result(timeout=30) == 3


# --- the seeds' graph API ------------------------------------------------------------------------


def test_get_matches_dask_semantics(ex):
    dsk = {"a": 1, "b": (inc, "a"), "y": 10, "z": (add, "b", "y"), ("t", 0): [(inc, "z"), "a"]}
    assert ex.get(dsk, "z") == 12
    assert ex.get(dsk, ["z", "b"]) == (12, 2)
    assert ex.get(dsk, [["z"], [("t", 0)]]) == ((12,), ([13, 1],))
    with pytest.raises(KeyError, match="nope"):
        ex.get(dsk, "nope")
    with pytest.raises(CycleError, match="'p'"):
        ex.get({"p": (inc, "q"), "q": (inc, "p")}, "p")
    with pytest.raises(ValueError, match="boom"):
        ex.get({"f": (fail,)}, "f")


def test_get_runs_on_workers(ex):
    pids = ex.get({"pid": (getpid,)}, "pid")
    assert pids != os.getpid()


def test_dask_high_level_graph_accepted(ex):
    dask = pytest.importorskip("dask")
    import dask.array as da

    x = da.ones((100, 100), chunks=(25, 25))
    assert dask.compute(x.sum(), scheduler=ex.get)[0] == 10_000


def test_delayed_and_current_executor():
    @meshpool.delayed
    def where(x):
        return os.getpid(), x

    value = where(1)
    with meshpool.Executor(1) as ex:
        assert meshpool.current_executor() is ex
        pid, x = value.compute()
        assert pid != os.getpid() and x == 1
        assert meshpool.compute(value, where(2))[1][1] == 2
        fut = ex.compute(where(3))
        assert isinstance(fut, meshpool.Future) and fut.result(timeout=30)[1] == 3
        assert meshpool.get({"a": (getpid,)}, "a") != os.getpid()
    assert meshpool.current_executor() is not ex


def test_no_current_executor_runs_locally():
    import meshpool.executor.graphs as graphs

    if graphs.current_executor() is not None:
        pytest.skip("another executor is still running in this session")
    assert meshpool.get({"a": 1, "b": (inc, "a")}, "b") == 2


def test_visualize_futures(ex, tmp_path):
    a = ex.submit(inc, 1)
    b = ex.submit(inc, 2)
    c = ex.submit(add, a, b)
    written = meshpool.visualize([c], filename=str(tmp_path / "graph.dot"))
    text = (tmp_path / "graph.dot").read_text()
    assert str(written[0]).endswith("graph.dot")
    assert text.startswith("digraph") and text.count("->") >= 2
    assert "add" in text and "inc" in text


def test_graph_package_does_not_import_zmq():
    code = "import sys, meshpool.graph; print('zmq' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_intermediates_too_large_for_the_caller_stay_on_workers():
    """30 intermediates of 50 MB (1.5 GB) flow through; the caller's memory stays flat."""
    me = psutil.Process()
    with meshpool.Executor(2) as ex:
        ex.wait_for_workers(2)
        before = me.memory_info().rss
        sums = []
        for i in range(30):
            a = ex.submit(make_array, 50, i)
            b = ex.submit(np.sqrt, a)
            sums.append(ex.submit(lambda x: float(x.sum()), b))
            del a, b
        values = ex.gather(sums, timeout=120)
        grown = me.memory_info().rss - before
    assert len(values) == 30
    assert grown < 50 * 2**20, f"caller grew by {grown / 2**20:.0f} MB"
