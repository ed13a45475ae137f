"""Large buffers through shared memory between peers on one host (``transport/shm.py``).

The cluster tests use real worker processes and read the real counters: the executor's
(``statistics().shm_bytes_*``) and a worker's own (``shm.statistics()``, read by a task running
there). Files are checked in /dev/shm by the pids of the processes under test, since other test
runs on this machine may have files of their own in flight.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest
import zmq
from helpers import becomes_true

import meshpool
from meshpool import messages as m
from meshpool.transport import shm

MB = 2**20

pytestmark = pytest.mark.skipif(not shm.host_key(), reason="no usable /dev/shm here")


def make_array(mb, value=1.0):
    return np.full(int(mb * MB) // 8, value)


def array_sum(a):
    return float(a.sum())


def sum_and_shm_received(a):
    return float(a.sum()), shm.statistics()["received"]


def shm_received():
    return shm.statistics()["received"]


def shm_sent():
    return shm.statistics()["sent"]


def _files_of(pids, arenas: bool = True) -> list[str]:
    """Files of these processes in /dev/shm (without workers' arenas, made ahead: ``False``)."""
    prefixes = tuple(f"meshpool-{os.getuid()}-{pid}-" for pid in pids)
    names = [n for n in os.listdir(shm.SHM_DIR) if n.startswith(prefixes)]
    return names if arenas else [n for n in names if "-pool-arena-" not in n]


# --- on a cluster -----------------------------------------------------------------------------


@pytest.mark.timeout(120)
def test_100_mb_in_and_out_of_a_task_go_through_shared_memory():
    array = make_array(100, 2.0)
    with meshpool.Executor(2) as ex:
        ex.wait_for_workers(2, timeout=60)
        pids = [os.getpid(), *(w["pid"] for w in ex.workers())]
        before = ex.statistics()
        assert ex.submit(array_sum, array).result(timeout=60) == 2.0 * array.size
        middle = ex.statistics()
        out = ex.submit(make_array, 100, 3.0).result(timeout=60)
        after = ex.statistics()
        assert out.shape == array.shape and bool((out == 3.0).all())
        out[0] = 4.0  # writable, as a socket-received array would be
        assert middle.shm_bytes_sent - before.shm_bytes_sent >= 100 * MB
        assert after.shm_bytes_received - middle.shm_bytes_received >= 100 * MB
        # only names went through the sockets
        assert after.client_bytes_sent - before.client_bytes_sent < MB
        assert after.client_bytes_received - before.client_bytes_received < MB
    assert _files_of(pids) == []


@pytest.mark.timeout(120)
def test_200_mb_worker_to_worker_goes_through_shared_memory():
    with meshpool.Executor(2) as ex:
        ex.wait_for_workers(2, timeout=60)
        pids = [os.getpid(), *(w["pid"] for w in ex.workers())]
        first, second = sorted(w["name"] for w in ex.workers())
        on_first, on_second = ex.options(workers=[first]), ex.options(workers=[second])
        received_before = on_second.submit(shm_received).result(timeout=30)
        before = ex.statistics()
        produced = on_first.submit(make_array, 200, 1.5)
        total, received_after = on_second.submit(sum_and_shm_received, produced).result(timeout=90)
        after = ex.statistics()
        assert total == 1.5 * 200 * MB / 8
        assert received_after - received_before >= 200 * MB
        # the caller saw none of it
        assert after.shm_bytes_received == before.shm_bytes_received
        assert after.client_bytes_received - before.client_bytes_received < MB
        del produced
    assert _files_of(pids) == []


@pytest.mark.timeout(120)
def test_a_pinned_tasks_big_arguments_go_straight_to_its_worker():
    with meshpool.Executor(2) as ex:
        ex.wait_for_workers(2, timeout=60)
        names = sorted(w["name"] for w in ex.workers())
        for name in [names[0]] * 3 + [names[1]] * 3:  # (round robin: some on the other one)
            on = ex.options(workers=[name])
            assert on.submit(array_sum, make_array(4, 1.0)).result(timeout=60) == 4 * MB / 8
        sent = [ex.options(workers=[n]).submit(shm_sent).result(timeout=30) for n in names]
        assert sent == [0, 0]  # no worker passed them on to the other
        assert ex.statistics().shm_bytes_sent >= 6 * 4 * MB


@pytest.mark.timeout(120)
def test_scatter_goes_through_shared_memory():
    with meshpool.Executor(2) as ex:
        ex.wait_for_workers(2, timeout=60)
        before = ex.statistics()
        [data] = ex.scatter([make_array(8, 5.0)])
        assert ex.submit(array_sum, data).result(timeout=60) == 5.0 * 8 * MB / 8
        assert ex.statistics().shm_bytes_sent - before.shm_bytes_sent >= 8 * MB


@pytest.mark.timeout(120)
def test_retiring_worker_hands_its_data_over_through_shared_memory():
    with meshpool.Executor(2) as ex:
        ex.wait_for_workers(2, timeout=60)
        first, second = sorted(w["name"] for w in ex.workers())
        received_before = ex.options(workers=[second]).submit(shm_received).result(timeout=30)
        kept = ex.options(workers=[first]).submit(make_array, 20, 7.0)
        kept.result(timeout=60)
        ex.retire_workers([first], timeout=60)
        received_after = ex.options(workers=[second]).submit(shm_received).result(timeout=30)
        assert received_after - received_before >= 20 * MB
        assert ex.submit(array_sum, kept).result(timeout=60) == 7.0 * 20 * MB / 8


@pytest.mark.timeout(120)
def test_files_of_a_worker_killed_mid_transfer_are_removed():
    """A worker answers a fetch with a shared-memory file and is SIGKILLed before anyone takes
    the file in: the local cluster removes it (the orphan of a dead process)."""
    with meshpool.Executor(2) as ex:
        ex.wait_for_workers(2, timeout=60)
        worker = sorted(ex.workers(), key=lambda w: w["name"])[0]
        held = ex.options(workers=[worker["name"]]).submit(make_array, 10)
        held.result(timeout=60)
        # a requester that asks and never reads the answer (as if it had died)
        sock = zmq.Context.instance().socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(worker["address"])
        try:
            sock.send_multipart(m.encode(m.GetData(1, [held.key], shm.host_key())))
            assert becomes_true(lambda: _files_of([worker["pid"]], arenas=False) != [])
            os.kill(worker["pid"], signal.SIGKILL)
            assert becomes_true(lambda: _files_of([worker["pid"]]) == [])
        finally:
            sock.close()
        # the cluster carries on (the result is recomputed on the replacement)
        assert ex.submit(array_sum, held).result(timeout=60) == 10 * MB / 8
    assert _files_of([os.getpid(), worker["pid"]]) == []


@pytest.mark.timeout(120)
def test_callers_files_for_a_killed_worker_are_removed_at_shutdown():
    """The caller writes a big argument to a file for a worker that is SIGKILLed before taking it
    in: shutdown removes the caller's file."""
    with meshpool.Executor(1) as ex:
        ex.wait_for_workers(1, timeout=60)
        [worker] = ex.workers()
        os.kill(worker["pid"], signal.SIGSTOP)  # it cannot take anything in now
        try:
            ex.submit(array_sum, make_array(10))
            tag = ex._core.prefix
            mine = f"meshpool-{os.getuid()}-{os.getpid()}-{tag}-"
            assert becomes_true(lambda: any(n.startswith(mine) for n in os.listdir(shm.SHM_DIR)))
        finally:
            os.kill(worker["pid"], signal.SIGKILL)
            with contextlib.suppress(ProcessLookupError):  # (the nanny may have reaped it)
                os.kill(worker["pid"], signal.SIGCONT)
        ex.shutdown(wait=False, cancel_futures=True)
    assert not any(n.startswith(mine) for n in os.listdir(shm.SHM_DIR))
    assert _files_of([worker["pid"]]) == []


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    "env", [{"MESHPOOL_SHM": "0"}, {"MESHPOOL_SHM_RESERVE": str(2**62)}], ids=["off", "no-room"]
)
def test_sockets_carry_the_data_when_shared_memory_is_unusable(monkeypatch, env):
    for name, value in env.items():
        monkeypatch.setenv(name, value)  # the workers inherit it
    with meshpool.Executor(2) as ex:
        ex.wait_for_workers(2, timeout=60)
        first, second = sorted(w["name"] for w in ex.workers())
        assert ex.submit(array_sum, make_array(20, 2.0)).result(timeout=60) == 2.0 * 20 * MB / 8
        out = ex.submit(make_array, 20, 3.0).result(timeout=60)
        assert bool((out == 3.0).all())
        produced = ex.options(workers=[first]).submit(make_array, 20, 1.0)
        total, received = (
            ex.options(workers=[second]).submit(sum_and_shm_received, produced).result(timeout=60)
        )
        assert total == 20 * MB / 8
        assert received == 0
        stats = ex.statistics()
        assert stats.shm_bytes_sent == stats.shm_bytes_received == 0
        assert stats.client_bytes_sent > 20 * MB and stats.client_bytes_received > 20 * MB


# --- the module's rules -----------------------------------------------------------------------


@pytest.mark.timeout(30)
def test_a_peer_with_another_host_key_never_gets_a_name():
    frames = [b"pickle", memoryview(bytearray(2 * shm.THRESHOLD))]
    for other in ["", "another-boot:4026531840:27:1:1000", shm.host_key() + "x"]:
        kept, spec = shm.pack_frames(frames, other)
        assert spec == [] and kept is frames


@pytest.mark.timeout(30)
def test_host_key_names_the_network_namespace_and_user(monkeypatch):
    parts = shm.host_key().split(":")
    assert str(os.stat("/proc/self/ns/net").st_ino) in parts
    assert parts[-1] == str(os.getuid())
    monkeypatch.setenv("MESHPOOL_SHM", "0")
    assert shm.host_key() == ""


@pytest.mark.timeout(30)
def test_another_network_namespace_has_another_host_key():
    unshare = shutil.which("unshare")
    if unshare is None:
        pytest.skip("no unshare(1)")
    code = "from meshpool.transport import shm; print(shm.host_key())"
    probe = subprocess.run(
        [unshare, "--net", "--map-root-user", sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=20,
    )
    if probe.returncode != 0:
        probe = subprocess.run(
            [unshare, "--net", sys.executable, "-c", code],
            capture_output=True,
            text=True,
            timeout=20,
        )
    if probe.returncode != 0:
        pytest.skip(f"cannot make a network namespace here: {probe.stderr.strip()[:200]}")
    theirs = probe.stdout.strip()
    assert theirs != shm.host_key()
    kept, spec = shm.pack_frames([memoryview(bytearray(2 * shm.THRESHOLD))], theirs)
    assert spec == []


@pytest.mark.timeout(30)
def test_frames_round_trip_and_the_mapping_outlives_the_name():
    data = np.arange(shm.THRESHOLD // 4, dtype=np.int64)
    frames = [b"small", memoryview(data).cast("B")]
    kept, spec = shm.pack_frames(frames, shm.host_key())
    assert kept == [b"small"] and len(spec) == 1
    name = spec[0][1]
    assert os.path.exists(os.path.join(shm.SHM_DIR, name))
    out = shm.unpack_frames(kept, spec)
    assert not os.path.exists(os.path.join(shm.SHM_DIR, name))  # unlinked by its receiver
    got = np.frombuffer(out[1], dtype=np.int64)
    assert bool((got == data).all())
    got[0] = -1  # writable, and private to the receiver
    assert data[0] == 0


@pytest.mark.timeout(30)
def test_a_lost_file_fails_clearly_and_leaves_nothing():
    big = memoryview(bytearray(shm.THRESHOLD))
    kept, spec = shm.pack_frames([big, big, big], shm.host_key())
    assert len(spec) == 3
    shm.discard(spec[0][1])  # gone before its receiver came
    with pytest.raises(shm.SharedMemoryLost):
        shm.unpack_frames(kept, spec)
    assert _files_of([os.getpid()]) == []
    with pytest.raises(ValueError):
        shm.unpack_frames([], [(5, "meshpool-x", 10)])  # index out of range


@pytest.mark.timeout(30)
def test_orphans_of_dead_processes_are_removed():
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    pid = int(dead.stdout)
    path = os.path.join(shm.SHM_DIR, f"meshpool-{os.getuid()}-{pid}-t-orphan")
    with open(path, "wb") as f:
        f.write(b"x")
    mine = shm.export(bytes(16))
    assert mine is not None
    try:
        shm.remove_orphans()
        assert not os.path.exists(path)
        assert os.path.exists(os.path.join(shm.SHM_DIR, mine[0]))  # ours: we are alive
    finally:
        shm.discard(mine[0])
