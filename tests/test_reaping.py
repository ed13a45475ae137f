"""A caller's thread blocked in ``result()`` reads its result off the lanes itself
(``executor/reaping.py``); everything else a waiting caller relies on still holds."""

from __future__ import annotations

import concurrent.futures as cf
import os
import threading
import time

import pytest
import tasks
from helpers import LIVENESS, gate_paths, release, run_script, wait_until, write_script

import meshpool


@pytest.fixture
def ex1():
    ex = meshpool.Executor(1)
    ex.wait_for_workers(1, timeout=LIVENESS)
    yield ex
    ex.shutdown()


@pytest.mark.timeout(60)
def test_the_waiting_thread_reads_the_results(ex1):
    reaper = ex1._core._reaper
    assert reaper is not None  # an embedded cluster has lanes
    before = reaper.turns
    assert [ex1.submit(tasks.inc, i).result(LIVENESS) for i in range(50)] == list(range(1, 51))
    # each result woke the waiting thread, not the I/O thread (which would leave turns alone)
    assert reaper.turns - before >= 25


@pytest.mark.timeout(60)
def test_no_reaping_without_lanes(monkeypatch):
    monkeypatch.setenv("MESHPOOL_LANES", "0")
    with meshpool.Executor(1) as ex:
        assert ex._core._reaper is None
        assert ex.submit(tasks.inc, 1).result(LIVENESS) == 2


@pytest.mark.timeout(60)
def test_threads_waiting_at_once_all_get_their_results(ex1):
    errors: list = []

    def loop(offset):
        try:
            for i in range(40):
                assert ex1.submit(tasks.inc, offset + i).result(LIVENESS) == offset + i + 1
        except Exception as exc:  # (reported below: an assert in a thread would be lost)
            errors.append(exc)

    threads = [threading.Thread(target=loop, args=(1000 * n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(LIVENESS)
    assert not errors
    assert not any(t.is_alive() for t in threads)


@pytest.mark.timeout(60)
def test_a_cancel_from_another_thread_wakes_the_waiting_thread(ex1, tmp_path):
    started, gate = gate_paths(tmp_path, "busy")
    busy = ex1.submit(tasks.gated, started, gate, "busy")  # the only worker: queued behind it
    wait_until(lambda: os.path.exists(started), what="the gated task to start")
    queued = ex1.submit(tasks.inc, 1)
    threading.Timer(0.3, queued.cancel).start()
    t0 = time.monotonic()
    with pytest.raises(cf.CancelledError):
        queued.result(LIVENESS)
    assert time.monotonic() - t0 < LIVENESS / 2  # woken by the cancel, not by a timeout
    release(gate)
    assert busy.result(LIVENESS) == "busy"


@pytest.mark.timeout(60)
def test_a_timeout_while_waiting_then_the_result(ex1, tmp_path):
    started, gate = gate_paths(tmp_path, "held")
    fut = ex1.submit(tasks.gated, started, gate, "held")  # runs until the test releases it
    with pytest.raises(cf.TimeoutError):
        fut.result(timeout=0.1)
    release(gate)
    assert fut.result(LIVENESS) == "held"
    assert ex1.submit(tasks.inc, 2).result(LIVENESS) == 3  # the lanes were handed back


@pytest.mark.timeout(60)
def test_results_another_thread_waits_for_arrive_while_one_thread_reaps(ex1, tmp_path):
    """The reaping thread handles every lane, not only its own future's."""
    started, gate = gate_paths(tmp_path, "long")
    long = ex1.submit(tasks.gated, started, gate, "long")
    wait_until(lambda: os.path.exists(started), what="the gated task to start")
    quick = ex1.submit(tasks.inc, 5)
    got: list = []
    waiter = threading.Thread(target=lambda: got.append(quick.result(LIVENESS)))
    waiter.start()
    threading.Timer(0.3, release, args=(gate,)).start()
    assert long.result(LIVENESS) == "long"  # this thread reaps meanwhile
    waiter.join(LIVENESS)
    assert got == [6]


@pytest.mark.timeout(120)
def test_sigint_handler_is_left_as_it_was(tmp_path):
    """The handler is swapped only around each inline block: between calls, and after, it is
    Python's default (``asyncio.run`` replaces only that one)."""
    script = write_script(
        tmp_path,
        """
        import signal
        import meshpool, tasks

        ex = meshpool.Executor(1)
        assert ex.submit(tasks.inc, 1).result(60) == 2  # the main thread read it
        print(signal.getsignal(signal.SIGINT) is signal.default_int_handler)
        ex.shutdown()
        print(signal.getsignal(signal.SIGINT) is signal.default_int_handler)
        """,
    )
    proc = run_script(script, timeout=100)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["True", "True"]


@pytest.mark.timeout(120)
def test_a_programs_own_sigint_handler_stays_and_gets_every_interrupt_late(tmp_path):
    """A handler the program installed is swapped out only while the main thread handles
    messages; interrupts meanwhile reach it afterwards, and no future is lost."""
    script = write_script(
        tmp_path,
        """
        import os, signal, threading, time
        import meshpool, tasks

        calls = []

        def mine(signum, frame):
            calls.append(signum)

        signal.signal(signal.SIGINT, mine)
        ex = meshpool.Executor(2)
        stop = threading.Event()
        sent = 0

        def pester():
            global sent
            while not stop.wait(0.002):
                os.kill(os.getpid(), signal.SIGINT)
                sent += 1

        pest = threading.Thread(target=pester)
        pest.start()
        results = [ex.submit(tasks.inc, i).result(10) for i in range(1500)]
        stop.set()
        pest.join()
        time.sleep(0.2)
        ex.shutdown()
        print(results == [i + 1 for i in range(1500)], signal.getsignal(signal.SIGINT) is mine,
              len(calls) > 0, sent > 0)
        """,
    )
    proc = run_script(script, timeout=100)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["True"] * 4


SIGNAL_STORM = """
import os, signal, threading, time
import meshpool, tasks

armed = [False]  # raise only inside the try below: a raise anywhere else would end the script


class Alarm(BaseException):  # (as pytest-timeout's: an Exception raised by a handler while a
    pass                     # result is unpickled is reported as unpicklable, SerializationError)


def interrupted(signum, frame):
    if armed[0]:
        armed[0] = False
        raise {exception}()


ex = meshpool.Executor(2)
ex.wait_for_workers(2, timeout=60)
signal.signal(signal.{signal}, interrupted)
stop = threading.Event()
if {by_timer}:
    signal.setitimer(signal.ITIMER_REAL, 0.003, 0.0037)
else:
    def pester():
        while not stop.wait(0.0037):
            os.kill(os.getpid(), signal.{signal})
    threading.Thread(target=pester).start()
futures, raised = [], 0
deadline = time.monotonic() + 3
while time.monotonic() < deadline:
    try:
        armed[0] = True
        fut = ex.submit(tasks.inc, len(futures))
        futures.append(fut)
        fut.result(10)
        armed[0] = False
    except {exception}:
        raised += 1
stop.set()
signal.setitimer(signal.ITIMER_REAL, 0, 0)
stuck = 0
for i, fut in enumerate(futures):
    try:
        assert fut.result(10) == i + 1
    except Exception:
        stuck += 1
t0 = time.monotonic()
ex.shutdown()
print(f"raised={{raised}} futures={{len(futures)}} stuck={{stuck}} "
      f"shutdown={{time.monotonic() - t0:.1f}}")
"""


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    "signal_name, exception, by_timer",
    [("SIGINT", "KeyboardInterrupt", False), ("SIGALRM", "Alarm", True)],
    ids=["ctrl-c", "alarm"],
)
def test_a_raising_signal_handler_during_round_trips_loses_nothing(
    tmp_path, signal_name, exception, by_timer
):
    """A handler that raises (Ctrl-C's, a timeout's on SIGALRM), at random moments of a loop
    of round trips: every future the loop got still finishes, and shutdown is quick. Raised
    halfway through a message the main thread was handling, it lost the message: its future
    stayed pending, and shutdown waited for it. (The default SIGINT handler is held the same
    way as this one; this one raises only inside the loop's try, so that the script itself
    cannot be cut short between two statements.)"""
    source = SIGNAL_STORM.format(signal=signal_name, exception=exception, by_timer=by_timer)
    proc = run_script(write_script(tmp_path, source), timeout=100)
    assert proc.returncode == 0, proc.stderr[-3000:]
    fields = dict(item.split("=") for item in proc.stdout.split())
    assert int(fields["raised"]) >= 50, proc.stdout  # the loop really was interrupted
    assert int(fields["futures"]) >= 100, proc.stdout
    assert fields["stuck"] == "0", proc.stdout
    assert float(fields["shutdown"]) < 10, proc.stdout
