"""The benchmark workloads.

Each workload is ``fn(system, size) -> (metrics, extra)`` where ``system`` is a
started adapter from :mod:`systems`, ``metrics`` maps metric keys (see
``METRICS``) to numbers and ``extra`` holds anything else worth keeping in the
JSON.  Only the timed region of each workload is inside the ``perf_counter``
pair; executor start-up, worker warm-up and result checking are outside it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import os
import statistics
import time

import systems as systems_mod
import tasks

MB = 1_000_000  # data sizes are decimal megabytes

# name -> (full size, quick size)
SIZES = {
    "throughput": {"tasks": (10_000, 1_000)},
    "latency": {"calls": (1_000, 100), "warmup": (50, 10)},
    "map": {"items": (100_000, 10_000)},
    "map_chunked": {"items": (100_000, 10_000), "chunksize": (12_500, 1_250)},
    "chain": {"tasks": (1_000, 100)},
    "tree": {"leaves": (4_096, 512)},
    "data_in": {"mb": (100, 10)},
    "data_out": {"mb": (100, 10)},
    "w2w": {"mb": (200, 20)},
    "w2w_settled": {"mb": (200, 20), "settle_s": (2.0, 2.0)},
    "startup": {},
    "memory": {"tasks": (100_000, 10_000)},
    "graph_scale": {"small": (30_000, 3_000), "large": (300_000, 30_000)},
}

# metric key -> (workload, row label, unit, higher_is_better)
METRICS = {
    "throughput": ("throughput", "throughput", "tasks/s", True),
    "latency": ("latency", "latency (median)", "µs", False),
    "latency_p99": ("latency", "latency (p99)", "µs", False),
    "map": ("map", "map", "items/s", True),
    "map_chunked": ("map_chunked", "map (chunksize)", "items/s", True),
    "chain": ("chain", "chain", "µs/task", False),
    "tree": ("tree", "tree", "s", False),
    "data_in": ("data_in", "data_in", "MB/s", True),
    "data_out": ("data_out", "data_out", "MB/s", True),
    "w2w": ("w2w", "w2w", "s", False),
    "w2w_settled": ("w2w_settled", "w2w, settled cluster", "s", False),
    "startup": ("startup", "startup", "s", False),
    "memory": ("memory", "memory held", "bytes/task", False),
    "memory_returned": ("memory", "memory returned", "%", True),
    "graph_scale": ("graph_scale", "graph 10x tasks: time ratio", "x", False),
}

WORKLOADS = list(SIZES)

# Workloads that need futures passed as task arguments.
NEEDS_FUTURE_ARGS = {"chain", "tree", "w2w", "w2w_settled"}


# Workloads whose metric is per task/item, so a smaller count still measures
# the same thing (only averaged over fewer tasks): ``--scale`` applies to them.
SCALABLE = {"map": "items", "memory": "tasks"}


def sizes_for(workload: str, quick: bool, scale: float = 1.0) -> dict:
    size = {k: v[1 if quick else 0] for k, v in SIZES[workload].items()}
    if scale != 1.0 and workload in SCALABLE:
        key = SCALABLE[workload]
        size[key] = max(1, int(round(size[key] * scale)))
    return size


# Workloads that run a dict graph through ``Executor.get`` (meshpool's API only).
MESHPOOL_ONLY = {"graph_scale"}


def applicable(system: str, workload: str) -> bool:
    if workload in MESHPOOL_ONLY:
        return system == "meshpool"
    if workload in NEEDS_FUTURE_ARGS:
        return systems_mod.FUTURE_ARGS[system]
    return True


# --------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------


def warmup(system, n: int = 20) -> None:
    """Start every worker and import ``tasks`` in it."""
    got = system.gather([system.submit(tasks.noop, i) for i in range(n)])
    assert got == list(range(n)), got


def warmup_numpy(system) -> None:
    """Import NumPy in every worker (pinned when the system can pin)."""
    import numpy as np

    small = np.ones(1000)
    try:
        hs = [system.submit_on(w, tasks.total_sum, small) for w in range(systems_mod.N_WORKERS)]
    except systems_mod.NotApplicable:
        hs = [system.submit(tasks.total_sum, small) for _ in range(4 * systems_mod.N_WORKERS)]
    for h in hs:
        assert system.result(h) == 1000.0


def _check_random_sum(total: float, n: int) -> None:
    # mean of n U(0,1) is 0.5 with sd 0.29/sqrt(n)
    assert abs(total / n - 0.5) < 0.01, (total, n)


# --------------------------------------------------------------------------
# workloads
# --------------------------------------------------------------------------


def throughput(system, size):
    n = size["tasks"]
    warmup(system)
    t0 = time.perf_counter()
    hs = [system.submit(tasks.noop, i) for i in range(n)]
    res = system.gather(hs)
    dt = time.perf_counter() - t0
    assert list(res) == list(range(n))
    return {"throughput": n / dt}, {"elapsed_s": dt, "tasks": n}


def latency(system, size):
    n, w = size["calls"], size["warmup"]
    warmup(system)
    for i in range(w):
        assert system.result(system.submit(tasks.noop, i)) == i
    lat = []
    for i in range(n):
        t0 = time.perf_counter()
        r = system.result(system.submit(tasks.noop, i))
        lat.append(time.perf_counter() - t0)
        assert r == i
    lat_us = sorted(x * 1e6 for x in lat)
    p99 = lat_us[min(len(lat_us) - 1, int(round(0.99 * (len(lat_us) - 1))))]
    return (
        {"latency": statistics.median(lat_us), "latency_p99": p99},
        {"calls": n, "mean_us": statistics.fmean(lat_us), "max_us": lat_us[-1]},
    )


def _map(system, n, chunksize):
    warmup(system)
    t0 = time.perf_counter()
    res = system.map(tasks.noop, range(n), chunksize)
    dt = time.perf_counter() - t0
    assert list(res) == list(range(n))
    return dt


def map_(system, size):
    n = size["items"]
    dt = _map(system, n, 1)
    return {"map": n / dt}, {"elapsed_s": dt, "items": n, "chunksize": 1}


def map_chunked(system, size):
    n, cs = size["items"], size["chunksize"]
    dt = _map(system, n, cs)
    return {"map_chunked": n / dt}, {"elapsed_s": dt, "items": n, "chunksize": cs}


def chain(system, size):
    n = size["tasks"]
    warmup(system)
    t0 = time.perf_counter()
    x = system.submit(tasks.inc, 0)
    for _ in range(n - 1):
        x = system.submit(tasks.inc, x)
    r = system.result(x)
    dt = time.perf_counter() - t0
    assert r == n, r
    return {"chain": dt / n * 1e6}, {"elapsed_s": dt, "tasks": n}


def tree(system, size):
    leaves = size["leaves"]
    warmup(system)
    t0 = time.perf_counter()
    level = [system.submit(tasks.leaf, i) for i in range(leaves)]
    n_tasks = len(level)
    while len(level) > 1:
        nxt = [
            system.submit(tasks.add, level[i], level[i + 1]) for i in range(0, len(level) - 1, 2)
        ]
        if len(level) % 2:
            nxt.append(level[-1])
        n_tasks += len(level) // 2
        level = nxt
    r = system.result(level[0])
    dt = time.perf_counter() - t0
    assert r == leaves * (leaves - 1) // 2, r
    return {"tree": dt}, {"elapsed_s": dt, "tasks": n_tasks}


def data_in(system, size):
    mb = size["mb"]
    n = mb * MB // 8
    arr = tasks.make_array(n, seed=1)
    expected = float(arr.sum())
    warmup(system)
    warmup_numpy(system)
    t0 = time.perf_counter()
    r = system.result(system.submit(tasks.total_sum, arr))
    dt = time.perf_counter() - t0
    assert abs(r - expected) <= 1e-6 * abs(expected), (r, expected)
    # The same again (extra only): the best of three more, once buffers are allocated and warm.
    again = float("inf")
    for _ in range(3):
        t1 = time.perf_counter()
        r = system.result(system.submit(tasks.total_sum, arr))
        again = min(again, time.perf_counter() - t1)
        assert abs(r - expected) <= 1e-6 * abs(expected), (r, expected)
    return {"data_in": mb / dt}, {"elapsed_s": dt, "mb": mb, "again_mb_s": mb / again}


def data_out(system, size):
    mb = size["mb"]
    n = mb * MB // 8
    warmup(system)
    warmup_numpy(system)
    t0 = time.perf_counter()
    arr = system.result(system.submit(tasks.make_array, n, 2))
    dt = time.perf_counter() - t0
    assert arr.shape == (n,) and arr.dtype.name == "float64"
    _check_random_sum(float(arr.sum()), n)
    del arr
    again = float("inf")  # the same again (extra only): the best of three more
    for _ in range(3):
        t1 = time.perf_counter()
        arr = system.result(system.submit(tasks.make_array, n, 2))
        again = min(again, time.perf_counter() - t1)
        _check_random_sum(float(arr.sum()), n)
        del arr
    # How long making the array takes in one process (included in the timing).
    t1 = time.perf_counter()
    tasks.make_array(n, 2)
    local = time.perf_counter() - t1
    extra = {"elapsed_s": dt, "mb": mb, "again_mb_s": mb / again, "local_make_array_s": local}
    return {"data_out": mb / dt}, extra


def w2w(system, size):
    mb = size["mb"]
    n = mb * MB // 8
    warmup(system)
    warmup_numpy(system)
    time.sleep(size.get("settle_s", 0.0))  # (w2w_settled: the cluster idle a while first)
    t0 = time.perf_counter()
    prod = system.submit_on(0, tasks.make_array, n, 3)
    cons = system.submit_on(1, tasks.total_sum, prod)
    r = system.result(cons)
    dt = time.perf_counter() - t0
    _check_random_sum(r, n)
    del prod, cons
    again = float("inf")  # the same again (extra only): the best of three more
    for _ in range(3):
        t1 = time.perf_counter()
        prod = system.submit_on(0, tasks.make_array, n, 3)
        r = system.result(system.submit_on(1, tasks.total_sum, prod))
        again = min(again, time.perf_counter() - t1)
        _check_random_sum(r, n)
        del prod
    t1 = time.perf_counter()
    tasks.total_sum(tasks.make_array(n, 3))
    local = time.perf_counter() - t1
    extra = {"elapsed_s": dt, "mb": mb, "again_s": again, "local_make_and_sum_s": local}
    return {"w2w": dt}, extra


def _renamed(result: tuple, old: str, new: str) -> tuple:
    metrics, extra = result
    return {new: metrics[old]}, extra


def _rss(pids) -> int:
    import psutil

    return sum(psutil.Process(p).memory_info().rss for p in pids)


def _malloc_trim() -> bool:
    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        ctypes.CDLL(name).malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        return False
    return True


def memory(system, size):
    n = size["tasks"]
    warmup(system)
    pids, note = system.memory_pids()
    gc.collect()
    _malloc_trim()
    before = _rss(pids)
    t0 = time.perf_counter()
    hs = [system.submit(tasks.noop, i) for i in range(n)]
    system.wait_all(hs)
    dt = time.perf_counter() - t0
    gc.collect()
    held = _rss(pids)
    del hs
    gc.collect()
    system.after_release()
    gc.collect()
    trimmed = _malloc_trim()
    released = _rss(pids)
    grown = held - before
    returned = 100.0 * (held - released) / grown if grown > 0 else float("nan")
    extra = {
        "tasks": n,
        "pids_counted": pids,
        "counted": note,
        "rss_before": before,
        "rss_held": held,
        "rss_released": released,
        "malloc_trim": trimmed,
        "submit_and_wait_s": dt,
    }
    if hasattr(system, "system_pids"):
        try:
            extra["not_counted_rss"] = {
                k: _rss([p]) for k, p in system.system_pids().items() if p != os.getpid()
            }
        except Exception as e:  # informational only
            extra["not_counted_rss"] = repr(e)
    return {"memory": grown / n, "memory_returned": returned}, extra


def _fan_in_graph(n: int, fan_in: int = 4) -> tuple[dict, tuple]:
    """A reduction tree of about ``n`` tasks: leaves, then ``sum`` over ``fan_in`` at a time."""
    leaves = max(1, n * (fan_in - 1) // fan_in)
    dsk: dict = {("leaf", i): (tasks.leaf, i) for i in range(leaves)}
    level = [("leaf", i) for i in range(leaves)]
    depth = 0
    while len(level) > 1:
        depth += 1
        nxt = []
        for j in range(0, len(level), fan_in):
            key = ("sum", depth, j // fan_in)
            dsk[key] = (sum, level[j : j + fan_in])
            nxt.append(key)
        level = nxt
    return dsk, level[0]


def graph_scale(system, size):
    """One ``Executor.get`` of a graph of N tasks and of 10 N: does cost grow linearly?

    Timed: submitting the graph (ordering, culling, pickling) through to the result.
    """
    warmup(system)
    times = {}
    tasks_in = {}
    for label in ("small", "large"):
        dsk, root = _fan_in_graph(size[label])
        leaves = sum(1 for k in dsk if k[0] == "leaf")
        gc.collect()
        t0 = time.perf_counter()
        r = system.ex.get(dsk, root)
        times[label] = time.perf_counter() - t0
        assert r == leaves * (leaves - 1) // 2, r
        tasks_in[label] = len(dsk)
        del dsk
    ratio = times["large"] / times["small"]
    extra = {
        "tasks": tasks_in,
        "elapsed_s": times,
        "us_per_task": {k: times[k] / tasks_in[k] * 1e6 for k in times},
    }
    return {"graph_scale": ratio}, extra


FUNCS = {
    "throughput": throughput,
    "latency": latency,
    "map": map_,
    "map_chunked": map_chunked,
    "chain": chain,
    "tree": tree,
    "data_in": data_in,
    "data_out": data_out,
    "w2w": w2w,
    "w2w_settled": lambda system, size: _renamed(w2w(system, size), "w2w", "w2w_settled"),
    "memory": memory,
    "graph_scale": graph_scale,
    # "startup" is measured by run.py around a whole subprocess.
}
