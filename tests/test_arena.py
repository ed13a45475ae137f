"""Workers' arenas: shared-memory pages made ahead of the first big transfer (``transport/arena.py``).

The pool-level tests run sender and receiver in this process, with the real child process making
the pages; the cluster tests check that a real worker makes its arena once registered and sends through it.
"""

from __future__ import annotations

import gc
import os
import subprocess
import sys
import time
import uuid

import numpy as np
import pytest
import tasks
from helpers import becomes_true, gate_paths, release, wait_until

import meshpool
from meshpool.transport import arena, shm, shmpool
from meshpool.transport.arena import Arena
from meshpool.transport.shmpool import SegmentPool

MB = 2**20

pytestmark = pytest.mark.skipif(not shm.host_key(), reason="no usable /dev/shm here")


@pytest.fixture
def pool():
    pool = SegmentPool(f"a{uuid.uuid4().hex[:6]}")
    yield pool
    pool.close()
    assert _files(pool) == []


def _files(pool: SegmentPool) -> list[str]:
    prefix = f"meshpool-{os.getuid()}-{os.getpid()}-{pool.tag}-pool-"
    return sorted(n for n in os.listdir(shm.SHM_DIR) if n.startswith(prefix))


def _allocated(name: str) -> int:
    return os.stat(os.path.join(shm.SHM_DIR, name)).st_blocks * 512


def _made(pool: SegmentPool) -> str:
    """Start the pool's arena, wait until its pages are made (polling as a worker's tick
    does); its file name."""
    made = Arena(pool, time.monotonic(), local=True)
    assert made.start()
    deadline = time.monotonic() + 30
    while made.pid and time.monotonic() < deadline:
        made.poll()
        time.sleep(0.01)
    assert made.pid == 0
    [name] = _files(pool)
    return name


def _send(pool: SegmentPool, array: np.ndarray) -> tuple[list, list]:
    kept, spec = shm.pack_frames([b"head", memoryview(array).cast("B")], shm.host_key(), pool=pool)
    assert kept == [b"head"] and len(spec) == 1
    return kept, spec


def _receive(kept: list, spec: list) -> np.ndarray:
    return np.frombuffer(shm.unpack_frames(kept, spec)[1], dtype=np.float64)


@pytest.mark.timeout(60)
def test_the_arena_is_made_ahead_and_taken_by_big_frames_only(pool, monkeypatch):
    monkeypatch.setenv("MESHPOOL_SHM_ARENA", str(16 * MB))
    name = _made(pool)
    assert "-pool-arena-" in name
    assert _allocated(name) >= 16 * MB  # its pages exist before any transfer

    small_kept, small_spec = _send(pool, np.full(MB // 8, 1.0))  # 1 MiB: a segment of its own
    assert small_spec[0][1] != name
    kept, spec = _send(pool, np.full(4 * MB // 8, 2.0))  # 4 MiB: at least an eighth, the arena
    assert spec[0][1] == name
    assert pool._segments[name].populated == 4 * MB  # mapped as far as the frame went, not 16
    got = _receive(kept, spec)
    assert bool((got == 2.0).all()) and bool((_receive(small_kept, small_spec) == 1.0).all())
    del got
    gc.collect()
    kept, spec = _send(pool, np.full(16 * MB // 8, 3.0))  # free again, and reused whole
    assert spec[0][1] == name
    assert bool((_receive(kept, spec) == 3.0).all())


@pytest.mark.timeout(60)
def test_idle_trims_keep_the_arena_and_memory_pressure_removes_it(pool, monkeypatch):
    monkeypatch.setenv("MESHPOOL_SHM_ARENA", str(8 * MB))
    _made(pool)
    monkeypatch.setattr(shmpool, "POOL_IDLE", 0.0)
    pool.keep = MB  # over its bytes, too
    pool.tidy()
    assert len(_files(pool)) == 1
    pool.tidy(force=True)
    assert _files(pool) == []


@pytest.mark.timeout(60)
def test_an_arena_free_for_long_is_removed(pool, monkeypatch):
    monkeypatch.setenv("MESHPOOL_SHM_ARENA", str(8 * MB))
    _made(pool)
    pool.tidy()
    assert len(_files(pool)) == 1
    monkeypatch.setattr(shmpool, "ARENA_IDLE", 0.0)
    pool.tidy()
    assert _files(pool) == []


@pytest.mark.timeout(60)
def test_a_transfer_may_take_the_arena_while_its_pages_are_being_made(pool):
    path = pool.add_arena(32 * MB)
    assert path is not None and _allocated(os.path.basename(path)) < MB  # nothing made yet
    kept, spec = _send(pool, np.arange(8 * MB // 8, dtype=np.float64))
    assert spec[0][1] == os.path.basename(path)
    got = _receive(kept, spec)
    # making the pages runs over the data a receiver holds: it only makes missing ones
    argv = [sys.executable, "-S", "-c", arena.MAKE_PAGES, path]
    subprocess.run(argv, check=True, timeout=30)
    assert bool((got == np.arange(8 * MB // 8)).all())
    assert _allocated(os.path.basename(path)) >= 32 * MB


@pytest.mark.timeout(60)
def test_no_room_or_turned_off_means_no_arena(pool, monkeypatch):
    monkeypatch.setenv("MESHPOOL_SHM_ARENA", "0")
    assert not Arena(pool, time.monotonic(), local=True).start()
    monkeypatch.setenv("MESHPOOL_SHM_ARENA", str(8 * MB))
    monkeypatch.setenv("MESHPOOL_SHM_RESERVE", str(2**62))  # /dev/shm "full"
    assert not Arena(pool, time.monotonic(), local=True).start()
    assert _files(pool) == []


@pytest.mark.timeout(60)
def test_a_closing_worker_stops_the_child_making_its_arena(pool, monkeypatch):
    monkeypatch.setenv("MESHPOOL_SHM_ARENA", str(256 * MB))
    made = Arena(pool, time.monotonic(), local=True)
    assert made.start()
    pid = made.pid
    assert os.sched_getscheduler(pid) == os.SCHED_IDLE
    made.stop()
    assert made.pid == 0
    with pytest.raises(ChildProcessError):  # killed and reaped
        os.waitpid(pid, os.WNOHANG)


@pytest.mark.timeout(60)
def test_a_child_that_fails_leaves_no_arena(pool, monkeypatch):
    monkeypatch.setenv("MESHPOOL_SHM_ARENA", str(8 * MB))
    made = Arena(pool, time.monotonic(), local=True)
    assert made.start()
    os.kill(made.pid, 9)  # (as if /dev/shm had run full: any exit but a clean one)
    assert becomes_true(lambda: made.poll() or made.pid == 0)
    assert _files(pool) == []


@pytest.mark.timeout(60)
def test_the_child_fails_quietly_when_its_file_is_gone(tmp_path):
    """A worker that closes (or trims) removes the file: the child must not print a traceback
    into the user's terminal, which it shares."""
    argv = [sys.executable, "-S", "-c", arena.MAKE_PAGES, str(tmp_path / "gone")]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    assert done.returncode == 1 and done.stderr == ""


def test_the_default_size_leaves_memory_to_everything_else(monkeypatch):
    monkeypatch.delenv("MESHPOOL_SHM_ARENA", raising=False)
    ram = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    size = arena.arena_bytes()
    assert 0 <= size <= arena.ARENA_BYTES
    assert size <= ram // (arena.RAM_SHARE * (os.cpu_count() or 1))
    monkeypatch.setenv("MESHPOOL_SHM_POOL", "0")  # no pool: nothing to keep an arena in
    assert arena.arena_bytes() == 0


# --- on a cluster -----------------------------------------------------------------------------


def make_array(mb, value):
    return np.full(int(mb * MB) // 8, value)


def sum_and_segments(a):
    """The sum, and the names of the segments this worker has mapped (what it received)."""
    return float(a.sum()), sorted(shm._mapped)


def _arenas_of(pid: int) -> list[str]:
    prefix = f"meshpool-{os.getuid()}-{pid}-"
    return [n for n in os.listdir(shm.SHM_DIR) if n.startswith(prefix) and "-arena-" in n]


@pytest.mark.timeout(120)
def test_a_worker_makes_its_arena_once_registered_and_sends_through_it(monkeypatch):
    monkeypatch.setenv("MESHPOOL_SHM_ARENA", str(32 * MB))
    with meshpool.Executor(2) as ex:
        ex.wait_for_workers(2, timeout=60)
        first, second = sorted(ex.workers(), key=lambda w: w["name"])
        for worker in (first, second):
            assert becomes_true(lambda w=worker: len(_arenas_of(w["pid"])) == 1)
        [name] = _arenas_of(first["pid"])
        assert becomes_true(lambda: _allocated(name) >= 32 * MB)
        produced = ex.options(workers=[first["name"]]).submit(make_array, 20, 2.0)
        total, mapped = (
            ex.options(workers=[second["name"]]).submit(sum_and_segments, produced).result(60)
        )
        assert total == 2.0 * 20 * MB / 8
        assert name in mapped  # the first big transfer went through the arena
        pids = [first["pid"], second["pid"]]
    assert becomes_true(lambda: not any(_arenas_of(p) for p in pids))  # removed with its worker


def test_the_arena_waits_until_the_worker_has_started_no_task_for_a_while(pool, monkeypatch):
    monkeypatch.setenv("MESHPOOL_SHM_ARENA", str(8 * MB))
    made = Arena(pool, 0.0, local=True)
    made.tick(0.5, tasks_started=0, busy=False)
    made.tick(0.9, tasks_started=1, busy=False)  # a task started: idle from here
    made.tick(1.8, tasks_started=1, busy=True)  # one runs: still not idle
    made.tick(2.5, tasks_started=1, busy=False)
    assert not made.tried and _files(pool) == []
    made.tick(2.5 + arena.SETTLE, tasks_started=1, busy=False)
    assert made.tried and made.pid
    made.stop()


def test_outside_a_local_cluster_the_arena_waits_for_shared_memory_traffic(pool, monkeypatch):
    """A worker alone on its host (a remote cluster) would hold the arena's memory for nothing."""
    monkeypatch.setenv("MESHPOOL_SHM_ARENA", str(8 * MB))
    counts = {"sent": 0, "received": 0}
    monkeypatch.setattr(shm, "statistics", lambda: dict(counts))
    made = Arena(pool, 0.0, local=False)
    made.tick(10.0, tasks_started=0, busy=False)
    assert not made.tried
    counts["received"] = 4 * MB  # a peer on this host sent it something big
    made.tick(11.0, tasks_started=0, busy=False)
    assert made.tried and made.pid
    made.stop()


@pytest.mark.timeout(120)
def test_a_busy_worker_makes_its_arena_only_once_idle(tmp_path, monkeypatch):
    monkeypatch.setenv("MESHPOOL_SHM_ARENA", str(8 * MB))
    started, release_path = gate_paths(tmp_path, "busy")
    with meshpool.Executor(1) as ex:
        gated = ex.submit(tasks.gated, started, release_path, 1)
        wait_until(lambda: os.path.exists(started), what="the gated task to start")
        [worker] = ex.workers()
        time.sleep(2 * arena.SETTLE)
        assert _arenas_of(worker["pid"]) == []  # running a task all along
        release(release_path)
        assert gated.result(60) == 1
        assert becomes_true(lambda: len(_arenas_of(worker["pid"])) == 1)


@pytest.mark.timeout(120)
def test_workers_make_no_arena_when_it_is_off(monkeypatch):
    monkeypatch.setenv("MESHPOOL_SHM_ARENA", "0")
    with meshpool.Executor(1) as ex:
        ex.wait_for_workers(1, timeout=60)
        [worker] = ex.workers()
        assert ex.submit(make_array, 2, 1.0).result(timeout=60).sum() == 2 * MB / 8
        assert _arenas_of(worker["pid"]) == []
