"""Reused shared-memory segments (``transport/shmpool.py``, receiving side in ``shm.py``).

Receivers that must die mid-transfer are real processes (SIGKILLed); the rest runs sender and
receiver in this process, which exercises the same files, headers and mappings (a receiver maps a
segment on its own, as another process would). Files are checked by this test's own tags and
pids: other test runs on this machine may have files of their own in flight.
"""

from __future__ import annotations

import gc
import os
import signal
import subprocess
import sys
import textwrap
import threading
import uuid

import numpy as np
import pytest
from helpers import becomes_true

import meshpool
from meshpool.transport import shm, shmpool
from meshpool.transport.shmpool import SegmentPool

MB = 2**20

pytestmark = pytest.mark.skipif(not shm.host_key(), reason="no usable /dev/shm here")


@pytest.fixture
def pool():
    pool = SegmentPool(f"t{uuid.uuid4().hex[:6]}")
    yield pool
    pool.close()
    assert _segments(pool) == []


def _segments(pool: SegmentPool, pid: int | None = None) -> list[str]:
    prefix = f"meshpool-{os.getuid()}-{pid or os.getpid()}-{pool.tag}-pool-"
    return sorted(n for n in os.listdir(shm.SHM_DIR) if n.startswith(prefix))


def _state(name: str) -> int:
    with open(os.path.join(shm.SHM_DIR, name), "rb") as f:
        return f.read(9)[shm._STATE]


def _send(pool: SegmentPool, array: np.ndarray) -> tuple:
    """What a sender puts in a message for one big frame: (kept frames, spec row)."""
    kept, spec = shm.pack_frames([b"head", memoryview(array).cast("B")], shm.host_key(), pool=pool)
    assert kept == [b"head"] and len(spec) == 1
    return kept, spec


def _receive(kept: list, spec: list, dtype=np.float64) -> np.ndarray:
    return np.frombuffer(shm.unpack_frames(kept, spec)[1], dtype=dtype)


def _use_one_segment(pool: SegmentPool) -> str:
    """Send and receive one big frame and drop what was received: the name of the pool's one
    segment, free again."""
    got = _receive(*_send(pool, np.full(MB, 1.0)))
    [name] = _segments(pool)
    del got
    gc.collect()
    return name


# --- one process --------------------------------------------------------------------------------


@pytest.mark.timeout(30)
def test_a_released_segment_is_reused_with_the_new_data(pool):
    kept, spec = _send(pool, np.full(MB, 1.0))
    [(_, name, size, generation)] = spec
    assert generation == 1 and size == 8 * MB
    got = _receive(kept, spec)
    assert bool((got == 1.0).all())
    assert _state(name) == shm.TAKEN
    got[0] = 5.0  # writable: the receiver's own until it lets go
    del got
    gc.collect()
    assert _state(name) == shm.FREE
    kept, spec = _send(pool, np.full(MB, 2.0))
    assert [(row[1], row[3]) for row in spec] == [(name, 2)]  # same file, next generation
    got = _receive(kept, spec)
    assert bool((got == 2.0).all())
    assert _segments(pool) == [name]
    assert pool.statistics()["segments"] == 1


@pytest.mark.timeout(30)
def test_a_held_view_keeps_its_data_while_later_transfers_use_other_segments(pool):
    held = _receive(*_send(pool, np.arange(MB, dtype=np.float64)))
    for round_ in range(3):  # each released at once: they share one second segment
        got = _receive(*_send(pool, np.full(MB, float(round_))))
        assert bool((got == round_).all())
        del got
        gc.collect()
    assert bool((held == np.arange(MB)).all())
    assert len(_segments(pool)) == 2
    del held
    gc.collect()
    assert pool.statistics()["segments"] == 2


@pytest.mark.timeout(30)
def test_segments_are_reused_for_smaller_frames_but_not_much_smaller_ones(pool):
    got = _receive(*_send(pool, np.full(2 * MB, 1.0)))
    del got
    gc.collect()
    kept, spec = _send(pool, np.full(3 * MB // 2, 3.0))  # fits in the free 16 MiB segment
    got = _receive(kept, spec)
    assert got.size == 3 * MB // 2 and bool((got == 3.0).all())
    assert len(_segments(pool)) == 1
    del got
    gc.collect()
    got = _receive(*_send(pool, np.full(MB // 4, 4.0)))  # 2 MiB: a segment of its own
    assert got.size == MB // 4 and bool((got == 4.0).all())
    assert len(_segments(pool)) == 2
    del got
    gc.collect()
    got = _receive(*_send(pool, np.full(4 * MB, 5.0)))  # bigger than both
    assert got.size == 4 * MB and bool((got == 5.0).all())
    assert len(_segments(pool)) == 3


@pytest.mark.timeout(60)
def test_threads_sending_and_holding_at_random_never_see_each_others_data(pool):
    """Four threads send through one pool and keep some of what they receive for a while: every
    view must keep its own bytes until it is dropped (a segment reused too early would not)."""
    errors: list[str] = []

    def run(seed: int) -> None:
        rng = np.random.default_rng(seed)
        held: list[tuple[np.ndarray, float]] = []
        for i in range(40):
            value = float(seed * 1000 + i)
            size = int(rng.integers(MB // 8, MB // 2))  # 1-4 MiB of float64
            got = _receive(*_send(pool, np.full(size, value)))
            held.append((got, value))
            if rng.random() < 0.7:  # drop one at random, keep the rest a while longer
                held.pop(int(rng.integers(len(held))))
            for array, expected in held:
                if not (array == expected).all():
                    errors.append(f"thread {seed}: a held view changed (expected {expected})")
                    return

    threads = [threading.Thread(target=run, args=(seed,)) for seed in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    gc.collect()
    stats = pool.statistics()
    assert stats["segments"] < 4 * 40  # reused, not one per transfer
    pool.tidy()
    assert pool.statistics()["free_bytes"] == stats["bytes"]  # all handed back


@pytest.mark.timeout(30)
def test_an_answer_for_an_old_generation_is_lost_not_wrong(pool):
    first = _send(pool, np.full(MB, 1.0))
    shm.decline_segment(first[1][0][1], first[1][0][3])  # its message failed: free again
    second = _send(pool, np.full(MB, 2.0))
    assert second[1][0][1] == first[1][0][1]
    with pytest.raises(shm.SharedMemoryLost):
        _receive(*first)  # the segment carries another transfer now
    assert bool((_receive(*second) == 2.0).all())


@pytest.mark.timeout(30)
def test_a_segment_whose_file_was_removed_under_the_pool_is_not_sent_again(pool):
    name = _use_one_segment(pool)
    os.unlink(os.path.join(shm.SHM_DIR, name))  # someone cleaned /dev/shm
    shm.prune_mappings(force=True)  # (and this receiver has no mapping of it left)
    kept, spec = _send(pool, np.full(MB, 2.0))
    assert spec[0][1] != name
    assert bool((_receive(kept, spec) == 2.0).all())
    assert pool.statistics()["segments"] == 1


@pytest.mark.timeout(30)
def test_a_segment_nobody_took_expires_and_is_never_reused(pool, monkeypatch):
    kept, spec = _send(pool, np.full(MB, 1.0))
    monkeypatch.setattr(shm, "EXPIRY", 0.0)
    pool.tidy()
    assert _segments(pool) == []
    with pytest.raises(shm.SharedMemoryLost):
        _receive(kept, spec)


@pytest.mark.timeout(30)
def test_idle_segments_are_removed_and_the_pool_keeps_at_most_its_bytes(pool, monkeypatch):
    views = [_receive(*_send(pool, np.full(MB, float(i)))) for i in range(3)]
    assert len(_segments(pool)) == 3
    del views
    gc.collect()
    pool.keep = 9 * MB  # room for one 8 MiB segment
    pool.tidy()
    assert len(_segments(pool)) == 1
    monkeypatch.setattr(shmpool, "POOL_IDLE", 0.0)
    pool.tidy()
    assert _segments(pool) == []


@pytest.mark.timeout(30)
def test_a_mapping_is_kept_for_reuse_and_dropped_once_its_file_is_gone(pool):
    name = _use_one_segment(pool)
    assert name in shm._mapped
    shm.prune_mappings(force=False)  # (throttled or not: the file is there, so it stays)
    assert name in shm._mapped
    pool.tidy(force=True)  # the sender lets it go
    assert _segments(pool) == []
    shm._last_prune = 0.0
    shm.prune_mappings()
    assert name not in shm._mapped


@pytest.mark.timeout(30)
def test_no_room_for_a_new_segment_means_a_free_one_or_the_socket(pool, monkeypatch):
    got = _receive(*_send(pool, np.full(MB, 1.0)))
    monkeypatch.setenv("MESHPOOL_SHM_RESERVE", str(2**62))  # /dev/shm "full"
    frames = [b"head", memoryview(np.full(MB, 2.0)).cast("B")]
    kept, spec = shm.pack_frames(frames, shm.host_key(), pool=pool)
    assert spec == [] and kept is frames  # the one segment is held: the socket carries it
    del got
    gc.collect()
    kept, spec = shm.pack_frames(frames, shm.host_key(), pool=pool)
    assert len(spec) == 1  # a free segment needs no new room
    assert bool((_receive(kept, spec) == 2.0).all())


@pytest.mark.timeout(30)
def test_pools_off_means_one_off_files(monkeypatch):
    monkeypatch.setenv("MESHPOOL_SHM_POOL", "0")
    pool = SegmentPool("toff")
    kept, spec = shm.pack_frames([memoryview(bytearray(MB))], shm.host_key(), pool=pool)
    assert [row[3] for row in spec] == [0]
    shm.unpack_frames(kept, spec)
    assert _segments(pool) == []


# --- receivers and senders that die -------------------------------------------------------------

_RECEIVER = textwrap.dedent(
    """
    import sys, time
    import numpy as np
    from meshpool.transport import shm
    name, size, generation = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    view = shm.unpack_frames([], [(0, name, size, generation)])[0]
    print(float(np.frombuffer(view).sum()), flush=True)
    time.sleep(60)  # holding it, until killed
    """
)

_SENDER = textwrap.dedent(
    """
    import sys, time
    import numpy as np
    from meshpool.transport import shm
    from meshpool.transport.shmpool import SegmentPool
    pool = SegmentPool("tdead")
    kept, spec = shm.pack_frames([memoryview(np.full(2**20, 3.0)).cast("B")], shm.host_key(),
                                 pool=pool)
    print(repr(spec), flush=True)
    time.sleep(60)  # until killed
    """
)


@pytest.mark.timeout(60)
def test_a_killed_receiver_does_not_leak_its_segment(pool):
    kept, spec = _send(pool, np.full(MB, 1.0))
    [(_, name, size, generation)] = spec
    receiver = subprocess.Popen(
        [sys.executable, "-c", _RECEIVER, name, str(size), str(generation)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert float(receiver.stdout.readline()) == float(MB)
        assert _state(name) == shm.TAKEN
        pool.tidy()
        assert pool.statistics()["free_bytes"] == 0  # alive: still its
    finally:
        receiver.kill()
        receiver.wait(timeout=10)
        receiver.stdout.close()
    pool.tidy()
    assert _state(name) == shm.FREE
    kept, spec = _send(pool, np.full(MB, 2.0))
    assert spec[0][1] == name  # reused
    assert bool((_receive(kept, spec) == 2.0).all())


_FORKING_RECEIVER = textwrap.dedent(
    """
    import os, sys
    from meshpool.transport import shm
    name, size, generation = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    view = shm.unpack_frames([], [(0, name, size, generation)])[0]
    child = os.fork()
    if child:
        os.waitpid(child, 0)
        print(int(open(shm.SHM_DIR + "/" + name, "rb").read(9)[8]), flush=True)
        sys.stdin.readline()  # held until the test has looked
    # the child ends normally: interpreter shutdown runs the finalizers of its copies of views
    """
)


@pytest.mark.timeout(60)
def test_a_forked_child_exiting_does_not_free_its_parents_segment(pool):
    kept, spec = _send(pool, np.full(MB, 1.0))
    [(_, name, size, generation)] = spec
    receiver = subprocess.Popen(
        [sys.executable, "-c", _FORKING_RECEIVER, name, str(size), str(generation)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert int(receiver.stdout.readline()) == shm.TAKEN  # after the child exited
        assert _state(name) == shm.TAKEN
    finally:
        receiver.communicate("\n", timeout=20)
    assert _state(name) == shm.FREE  # the parent's own exit lets it go


@pytest.mark.timeout(60)
def test_a_killed_sender_leaves_no_segment_and_our_view_stays_valid():
    sender = subprocess.Popen([sys.executable, "-c", _SENDER], stdout=subprocess.PIPE, text=True)
    try:
        spec = eval(sender.stdout.readline())  # noqa: S307 - a repr of ints and a name we made
        got = np.frombuffer(shm.unpack_frames([], spec)[0])
    finally:
        sender.kill()
        sender.wait(timeout=10)
        sender.stdout.close()
    name = spec[0][1]
    assert os.path.exists(os.path.join(shm.SHM_DIR, name))
    shm.remove_orphans()  # what the local cluster and nannies run when a worker dies
    assert not os.path.exists(os.path.join(shm.SHM_DIR, name))
    assert bool((got == 3.0).all())  # the mapping outlives the file and its sender
    del got
    gc.collect()
    shm._last_prune = 0.0
    shm.prune_mappings()
    assert name not in shm._mapped


# --- on a cluster -------------------------------------------------------------------------------


def array_sum(a):
    return float(a.sum())


def make_array(mb, value):
    return np.full(int(mb * MB) // 8, value)


@pytest.mark.timeout(120)
def test_repeated_transfers_reuse_one_segment_each_way():
    with meshpool.Executor(2) as ex:
        ex.wait_for_workers(2, timeout=60)
        workers = sorted(ex.workers(), key=lambda w: w["name"])
        first, second = (w["name"] for w in workers)
        for round_ in range(3):
            value = float(round_ + 1)
            assert ex.submit(array_sum, make_array(20, value)).result(timeout=60) == (
                value * 20 * MB / 8
            )
            out = ex.submit(make_array, 20, value).result(timeout=60)
            assert bool((out == value).all())
            del out
            produced = ex.options(workers=[first]).submit(make_array, 20, value)
            total = ex.options(workers=[second]).submit(array_sum, produced).result(timeout=60)
            assert total == value * 20 * MB / 8
            del produced
            gc.collect()
            # the receivers have let go once their values are released
            assert becomes_true(lambda: ex._core.shm_pool.statistics()["free_bytes"] > 0)
        assert ex._core.shm_pool.statistics()["segments"] == 1
        pids = [w["pid"] for w in workers]
        files = [n for n in os.listdir(shm.SHM_DIR) if any(f"-{p}-" in n for p in pids)]
        sent = [n for n in files if "-pool-arena-" not in n]  # (arenas: made ahead, 256 MiB)
        assert 1 <= len(sent) <= 2  # one segment per worker that sent (results may go twice)
    assert not [n for n in os.listdir(shm.SHM_DIR) if any(f"-{p}-" in n for p in pids)]


@pytest.mark.timeout(120)
def test_the_callers_mappings_of_worker_segments_go_with_the_executor_or_its_last_view():
    """Mapped segments would keep the memory of files their workers removed: the caller forgets
    idle ones at shutdown, and one still viewed when its last view goes."""
    with meshpool.Executor(2) as ex:
        ex.wait_for_workers(2, timeout=60)
        pids = [w["pid"] for w in ex.workers()]
        dropped = ex.submit(make_array, 10, 1.0).result(timeout=60)
        kept = ex.submit(make_array, 12, 2.0).result(timeout=60)
        del dropped
        gc.collect()

        def theirs() -> list[str]:
            return [n for n in shm._mapped if any(f"-{pid}-" in n for pid in pids)]

        assert len(theirs()) >= 1
    assert becomes_true(
        lambda: not any(f"-{p}-" in n for n in os.listdir(shm.SHM_DIR) for p in pids)
    )
    assert len(theirs()) == 1  # only the one a view still holds
    assert bool((kept == 2.0).all())  # valid after its worker and file are gone
    del kept
    gc.collect()
    assert theirs() == []


@pytest.mark.timeout(120)
def test_a_worker_killed_while_holding_a_callers_segment_frees_it():
    with meshpool.Executor(1) as ex:
        ex.wait_for_workers(1, timeout=60)
        [worker] = ex.workers()
        [data] = ex.scatter([make_array(10, 1.0)])  # held by the worker, in our segment
        assert ex.submit(array_sum, data).result(timeout=60) == 10 * MB / 8
        pool = ex._core.shm_pool
        assert pool.statistics()["free_bytes"] == 0
        os.kill(worker["pid"], signal.SIGKILL)
        assert becomes_true(lambda: pool.statistics()["free_bytes"] > 0)
