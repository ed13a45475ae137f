"""Resilience: memory limits, bounded lineage, a vanished scheduler, failure types apart."""

from __future__ import annotations

import gc
import os
import signal
import subprocess
import sys
import time

import pytest
from tasks import big, getpid, inc

import meshpool


def hog(megabytes: int) -> int:
    block = b"x" * (megabytes * 2**20)  # touched, so resident
    time.sleep(2)
    return len(block)


def step(x: int) -> int:
    return x + 1


def test_memory_limit_restarts_the_worker_and_a_poison_task_becomes_killed_worker():
    with meshpool.Executor(1, memory_limit="300MB") as ex:
        ex.wait_for_workers(1, timeout=60)
        first = ex.workers()[0]["pid"]
        with pytest.raises(meshpool.KilledWorker, match="3 workers"):
            ex.submit(hog, 500).result(timeout=120)
        assert ex.submit(getpid).result(timeout=60) != first  # restarted, still serving
        assert ex.submit(inc, 1).result(timeout=30) == 2


def _kill_worker(ex, name: str) -> None:
    pid = [w["pid"] for w in ex.workers() if w["name"] == name][0]
    os.kill(pid, signal.SIGKILL)


def test_lost_result_whose_input_was_released_fails_with_data_lost():
    with meshpool.Executor(2) as ex:
        ex.wait_for_workers(2, timeout=60)
        name = sorted(w["name"] for w in ex.workers())[0]
        a = ex.options(workers=[name]).submit(inc, 1)
        b = ex.options(workers=[name]).submit(big, 200_000)  # large: stays on the worker
        c = ex.options(workers=[name]).submit(lambda n, _: b"y" * n, 200_000, a)
        meshpool.wait([a, b, c], timeout=60)
        del a
        gc.collect()
        time.sleep(0.3)  # the release reaches the scheduler; c's input is forgotten
        _kill_worker(ex, name)
        with pytest.raises(meshpool.DataLost):
            c.result(timeout=60)
        # b had no inputs: it is simply recomputed (on the restarted worker)
        assert len(b.result(timeout=60)) == 200_000


def test_long_chain_with_dropped_futures_keeps_the_scheduler_flat():
    """``x = submit(step, x)`` with the history dropped: what is done is forgotten."""
    with meshpool.Executor(1) as ex:
        state = ex._core.server.state
        x = ex.submit(step, 0)
        sizes = []
        for _ in range(20):
            for _ in range(1000):
                x = ex.submit(step, x)
            meshpool.wait([x], timeout=120)
            sizes.append((len(state.tasks), len(ex._core.lineage)))
        assert x.result(timeout=30) == 20_001
    # releases of dropped futures arrive asynchronously, so a few hundred may be in flight;
    # what matters is that the history is not kept: bounded by one batch, never growing
    assert max(s for pair in sizes for s in pair) < 1000, sizes


def test_vanished_scheduler_fails_pending_futures_with_scheduler_lost(tmp_path):
    env = dict(os.environ, MESHPOOL_HOME=str(tmp_path / "home"))
    tests_dir = os.path.dirname(__file__)
    env["PYTHONPATH"] = os.pathsep.join([tests_dir, env.get("PYTHONPATH", "")])
    scheduler = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "meshpool.cli",
            "scheduler",
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--insecure",
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    worker = None
    try:
        line = scheduler.stdout.readline()
        while " at " not in line:  # the --insecure warning comes first
            line = scheduler.stdout.readline()
        address = line.split(" at ", 1)[1].strip()
        worker = subprocess.Popen(
            [sys.executable, "-m", "meshpool.cli", "worker", address, "--insecure"],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        with meshpool.Executor(address, security=None) as ex:
            ex.wait_for_workers(1, timeout=60)
            pending = ex.submit(time.sleep, 60)
            os.killpg(scheduler.pid, signal.SIGKILL)
            started = time.monotonic()
            with pytest.raises(meshpool.SchedulerLost):
                pending.result(timeout=60)
            assert time.monotonic() - started < 30
            with pytest.raises(meshpool.SchedulerLost):
                ex.submit(inc, 1)
    finally:
        for proc in (scheduler, worker):
            if proc is not None and proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)


def test_failure_kinds_are_told_apart_by_type():
    assert issubclass(
        meshpool.SchedulerLost, __import__("concurrent.futures").futures.BrokenExecutor
    )
    for cls in (meshpool.KilledWorker, meshpool.WorkerLost, meshpool.DataLost):
        assert issubclass(cls, meshpool.MeshpoolError)
        assert not issubclass(cls, meshpool.SchedulerLost)
