"""Workers report tiny tasks several to a message, and still blame a crash on the right task.

See ``worker/reporting.py``: a slot holds the ComputeDone of a tiny task while its next task
runs, and a run marker in ``/dev/shm`` tells a scheduler on the same host which task each slot
was running when its worker died.
"""

from __future__ import annotations

import os

import pytest
from helpers import wait_until
from tasks import getpid, inc

import meshpool
from meshpool.transport import runmarker, shm


def crash_worker(x: int) -> int:
    os._exit(13)


def note_run_then_crash(path: str) -> None:
    with open(path, "a") as f:
        f.write("ran\n")
    os._exit(13)


def _marker_files(pid: int) -> list[str]:
    prefix = f"meshpool-{os.getuid()}-{pid}-run-"
    return [name for name in os.listdir(shm.SHM_DIR) if name.startswith(prefix)]


pytestmark = pytest.mark.skipif(not shm.host_key(), reason="no usable /dev/shm here")


@pytest.mark.timeout(90)
def test_tiny_tasks_are_reported_several_to_a_message():
    with meshpool.Executor(1) as ex:
        ex.wait_for_workers(1, timeout=60)
        before = ex.statistics().scheduler_messages_received
        futures = [ex.submit(inc, i) for i in range(3000)]
        assert [f.result(timeout=60) for f in futures] == list(range(1, 3001))
        received = ex.statistics().scheduler_messages_received - before
    # one message per task without holding; a batch carries up to MAX_HELD of them
    assert received < 2000, received


@pytest.mark.timeout(150)
def test_a_crash_right_after_held_results_is_blamed_on_the_crashing_task():
    """Hundreds of tiny tasks around one that kills its worker: each death comes right after
    results the slot held back. Blaming "the oldest unreported task" would put it on one of
    those, and the killer would kill workers forever; the run marker names the killer."""
    with meshpool.Executor(1) as ex:
        ex.wait_for_workers(1, timeout=60)
        warm = [ex.submit(inc, i) for i in range(500)]  # the slot learns its tasks are tiny
        meshpool.wait(warm, timeout=60)
        before = [ex.submit(inc, i) for i in range(300)]
        killer = ex.submit(crash_worker, 0)
        after = [ex.submit(inc, i) for i in range(300)]
        with pytest.raises(meshpool.KilledWorker):
            killer.result(timeout=120)
        assert [f.result(timeout=60) for f in before + after] == [i + 1 for i in range(300)] * 2
        assert ex.submit(inc, 1).result(timeout=30) == 2


@pytest.mark.timeout(90)
def test_an_at_most_once_task_killing_its_worker_behind_held_results_runs_once(tmp_path):
    """The blame must name the task that was running: taken for one of the held (finished)
    tasks before it, an ``at_most_once`` task would be run again."""
    runs = tmp_path / "runs"
    with meshpool.Executor(1) as ex:
        ex.wait_for_workers(1, timeout=60)
        meshpool.wait([ex.submit(inc, i) for i in range(500)], timeout=60)
        before = [ex.submit(inc, i) for i in range(300)]
        once = ex.options(at_most_once=True).submit(note_run_then_crash, str(runs))
        with pytest.raises(meshpool.WorkerLost):
            once.result(timeout=60)
        assert [f.result(timeout=60) for f in before] == [i + 1 for i in range(300)]
    assert runs.read_text() == "ran\n"


@pytest.mark.timeout(150)
def test_without_shared_memory_workers_report_each_task_and_blame_still_works(monkeypatch):
    """MESHPOOL_SHM=0 (as for a worker on another host than its scheduler): no marker, so
    nothing is held, and the old rule (the oldest unreported task) finds the killer."""
    monkeypatch.setenv("MESHPOOL_SHM", "0")
    with meshpool.Executor(1) as ex:
        ex.wait_for_workers(1, timeout=60)
        before = ex.statistics().scheduler_messages_received
        futures = [ex.submit(inc, i) for i in range(1000)]
        meshpool.wait(futures, timeout=60)
        assert ex.statistics().scheduler_messages_received - before >= 1000
        killer = ex.submit(crash_worker, 0)
        with pytest.raises(meshpool.KilledWorker):
            killer.result(timeout=120)
        assert ex.submit(inc, 1).result(timeout=30) == 2


@pytest.mark.timeout(60)
def test_the_marker_file_is_gone_once_the_worker_registered():
    with meshpool.Executor(1) as ex:
        ex.wait_for_workers(1, timeout=60)
        pid = ex.submit(getpid).result(timeout=30)
        # (the worker's control thread may read the scheduler's answer after a task ran)
        wait_until(lambda: not _marker_files(pid), 10, "the worker to unlink its run marker")
    assert _marker_files(pid) == []


def test_a_marker_reads_back_what_each_slot_wrote():
    marker = runmarker.RunMarker(3)
    try:
        assert marker.path and oct(os.stat(marker.path).st_mode & 0o777) == "0o600"
        reader = runmarker.open_marker(marker.path, 3)
        assert reader is not None
        marker.unlink()  # the mapping outlives the file
        marker.set(0, 7)
        marker.set(2, 2**40)
        assert reader.running() == [7, 0, 2**40]
        reader.close()
    finally:
        marker.unlink()
    assert runmarker.open_marker("/etc/passwd", 3) is None
    assert runmarker.open_marker("", 3) is None
