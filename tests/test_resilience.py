"""Resilience: memory limits (also under the CLI nanny), bounded lineage, a vanished scheduler,
failure types apart."""

from __future__ import annotations

import gc
import os
import signal
import time

import pytest
from cli_cluster import CliCluster, free_port
from helpers import LIVENESS
from tasks import big, break_my_slot, getpid, inc

import meshpool
from meshpool.cluster.local import MAX_FAILED_STARTS


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


def test_a_slot_failing_outside_its_task_restarts_the_worker_instead_of_hanging():
    """The task closes its slot's socket, so the slot itself fails once the task returns. The
    worker exits (rather than keep a dead slot whose tasks would wait forever), the task is
    retried on a fresh worker, and after three such deaths it is a KilledWorker."""
    with meshpool.Executor(1) as ex:
        ex.wait_for_workers(1, timeout=60)
        first = ex.workers()[0]["pid"]
        with pytest.raises(meshpool.KilledWorker):
            ex.submit(break_my_slot).result(timeout=120)
        assert ex.submit(getpid).result(timeout=60) != first
        assert ex.submit(inc, 1).result(timeout=30) == 2


# --- the CLI nanny (`meshpool worker`): restarts vs. failed starts ----------------------------


@pytest.fixture
def cli_scheduler(tmp_path, monkeypatch):
    """A secured ``meshpool scheduler`` (a CliCluster without workers yet)."""
    with CliCluster(tmp_path) as cluster:
        cluster.share_env(monkeypatch)
        cluster.start_scheduler()
        yield cluster


@pytest.mark.timeout(180)
def test_cli_worker_over_its_memory_limit_is_restarted_every_time(cli_scheduler):
    """Deaths of workers that had registered are no failed starts: the nanny restarts the
    worker more than MAX_FAILED_STARTS times, the poison tasks end as KilledWorker, and the
    restarted worker still serves."""
    cluster = cli_scheduler
    nanny = cluster.start_worker("m", "--memory-limit", "100MB")
    with cluster.executor(timeout=LIVENESS) as ex:
        ex.wait_for_workers(1, timeout=LIVENESS)
        poison = [ex.submit(hog, 300) for _ in range(2)]  # 3 deaths each
        for future in poison:
            with pytest.raises(meshpool.KilledWorker):
                future.result(timeout=120)
        assert ex.submit(inc, 1).result(timeout=LIVENESS) == 2
        log = cluster.log("m")
        assert log.count("exceeds the limit") >= 6, log
        assert nanny.poll() is None, log  # carried on: none of these was a failed start
        assert "failed to start" not in log


@pytest.mark.timeout(120)
def test_cli_worker_that_cannot_start_makes_its_nanny_give_up(cli_scheduler):
    cluster = cli_scheduler
    # a bare worker takes more than 1 MB: every start fails before registering
    nanny = cluster.start_worker("tiny", "--memory-limit", "1MB", ready=False)
    assert nanny.wait(timeout=LIVENESS * 2) == 1
    log = cluster.log("tiny")
    assert log.count("exceeds the limit") == MAX_FAILED_STARTS, log
    assert "failed to start 3 times in a row" in log, log
    # nothing listens there: no scheduler ever answers, and the nanny says so
    nowhere = cluster.start_worker(
        "nowhere",
        "--scheduler-silence",
        "2",
        address=f"tcp://127.0.0.1:{free_port()}",
        credentials=["--insecure"],
        ready=False,
    )
    assert nowhere.wait(timeout=LIVENESS * 2) == 1
    log = cluster.log("nowhere")
    assert "no answer from a scheduler at" in log, log


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
    with CliCluster(tmp_path, security="insecure") as cluster:
        scheduler = cluster.start_scheduler()
        cluster.start_worker("w")
        with cluster.executor() as ex:
            ex.wait_for_workers(1, timeout=60)
            pending = ex.submit(time.sleep, 60)
            os.killpg(scheduler.pid, signal.SIGKILL)
            started = time.monotonic()
            with pytest.raises(meshpool.SchedulerLost):
                pending.result(timeout=60)
            assert time.monotonic() - started < 30
            with pytest.raises(meshpool.SchedulerLost):
                ex.submit(inc, 1)


def test_failure_kinds_are_told_apart_by_type():
    assert issubclass(
        meshpool.SchedulerLost, __import__("concurrent.futures").futures.BrokenExecutor
    )
    for cls in (meshpool.KilledWorker, meshpool.WorkerLost, meshpool.DataLost):
        assert issubclass(cls, meshpool.MeshpoolError)
        assert not issubclass(cls, meshpool.SchedulerLost)
