"""Workers that die holding, or receiving, data a client sent them.

A task's large arguments (over 64 KiB) go from the caller straight to one worker's data socket
before the task is submitted. When that worker dies before the task ran (the data sent to it
after it died, the data on its way, or held there), the caller's copy goes to another worker and
the task runs; arguments that no worker survives receiving fail with DataLost.
``Executor.scatter``ed data has no copy anywhere else: its worker's death is DataLost for it and
the tasks that need it (docs/architecture.md, "Failure and lineage"), also while on its way.

Workers are SIGKILLed; the local cluster's nanny starts fresh ones.
"""

from __future__ import annotations

import contextlib
import os
import signal

import numpy as np
import pytest
from helpers import LIVENESS, gate_paths, release, wait_until
from tasks import array_sum, gated, inc

import meshpool
from meshpool.transport import shm

MB = 2**20


def _only_worker(ex: meshpool.Executor) -> dict:
    ex.wait_for_workers(1, timeout=LIVENESS)
    [worker] = ex.workers()
    return worker


def _kill(pid: int) -> None:
    os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(ProcessLookupError):  # (stopped: the kill lands once it runs)
        os.kill(pid, signal.SIGCONT)


@pytest.mark.timeout(120)
def test_arguments_sent_to_a_worker_already_dead_are_sent_again():
    with meshpool.Executor(1) as ex:
        worker = _only_worker(ex)
        ex.scatter(0)  # the caller has the worker list now, and reuses it for a second
        _kill(worker["pid"])
        fut = ex.submit(array_sum, np.ones(MB))  # so the arguments go to the dead worker
        assert fut.result(timeout=2 * LIVENESS) == MB
        assert _only_worker(ex)["pid"] != worker["pid"]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("use_shm", ["1", "0"], ids=["shared-memory", "socket"])
def test_arguments_a_worker_died_receiving_are_sent_again_and_shutdown_waits_for_the_task(
    monkeypatch, use_shm
):
    """The CI hang: shutdown(wait=True) waited for a task whose arguments never arrived."""
    monkeypatch.setenv("MESHPOOL_SHM", use_shm)  # (the workers inherit it)
    size = 32 * MB  # through the socket: more than its buffers hold, so part of it is on the way
    with meshpool.Executor(1) as ex:
        worker = _only_worker(ex)
        os.kill(worker["pid"], signal.SIGSTOP)  # it takes nothing in now
        try:
            fut = ex.submit(array_sum, np.ones(size // 8))
            wait_until(lambda: ex.statistics().client_bytes_sent > size or _shm_files_of(ex))
        finally:
            _kill(worker["pid"])
    assert fut.result(timeout=0) == size // 8
    assert ex._core.kept == {}  # the caller's copy went with the task


def _shm_files_of(ex: meshpool.Executor) -> bool:
    mine = f"meshpool-{os.getuid()}-{os.getpid()}-{ex._core.prefix}-"
    return shm.host_key() != "" and any(n.startswith(mine) for n in os.listdir(shm.SHM_DIR))


@pytest.mark.timeout(120)
def test_arguments_held_by_a_worker_that_died_before_the_task_ran_are_sent_again(tmp_path):
    started, gate = gate_paths(tmp_path, "busy")
    with meshpool.Executor(1) as ex:
        worker = _only_worker(ex)
        busy = ex.submit(gated, started, gate, "done")  # takes the only slot
        wait_until(lambda: os.path.exists(started))
        fut = ex.submit(array_sum, np.ones(MB))
        wait_until(lambda: ex.workers()[0]["keys"] == 1, what="the arguments arrived")
        _kill(worker["pid"])
        release(gate)  # for busy's rerun on the fresh worker
        assert fut.result(timeout=2 * LIVENESS) == MB
        assert busy.result(timeout=LIVENESS) == "done"


@pytest.mark.timeout(180)
def test_arguments_no_worker_survives_receiving_fail_with_data_lost(monkeypatch):
    monkeypatch.setenv("MESHPOOL_SHM", "0")  # received into the worker's own memory
    with meshpool.Executor(1, memory_limit="100MB") as ex:
        _only_worker(ex)  # a bare worker takes ~30 MB
        fut = ex.submit(array_sum, np.ones(160 * MB // 8))
        with pytest.raises(meshpool.DataLost, match="3 workers"):
            fut.result(timeout=120)
        assert ex.submit(inc, 1).result(timeout=LIVENESS) == 2  # the cluster still serves


@pytest.mark.timeout(120)
def test_scattered_data_whose_worker_dies_before_it_arrived_is_data_lost():
    with meshpool.Executor(1) as ex:
        worker = _only_worker(ex)
        os.kill(worker["pid"], signal.SIGSTOP)
        try:
            [data] = ex.scatter([np.ones(MB)])
        finally:
            _kill(worker["pid"])
        with pytest.raises(meshpool.DataLost):
            data.result(timeout=LIVENESS)
        with pytest.raises(meshpool.DataLost):
            ex.submit(array_sum, data).result(timeout=LIVENESS)


@pytest.mark.timeout(120)
def test_scattered_data_whose_worker_died_holding_it_is_data_lost():
    with meshpool.Executor(1) as ex:
        worker = _only_worker(ex)
        [data] = ex.scatter([np.ones(MB)])
        assert ex.submit(array_sum, data).result(timeout=LIVENESS) == MB
        _kill(worker["pid"])
        with pytest.raises(meshpool.DataLost):
            ex.submit(array_sum, data).result(timeout=LIVENESS)


@pytest.mark.timeout(120)
def test_map_over_large_arguments_leaves_nothing_behind(ex):
    """Their keys are released once the tasks are submitted (map and graphs used to keep them)."""
    assert list(ex.map(array_sum, [np.ones(MB // 8)] * 4)) == [MB // 8] * 4
    wait_until(lambda: all(w["keys"] == 0 for w in ex.workers()), what="arguments freed")
    assert ex._core.kept == {}
