"""Liveness: ZMTP heartbeats catch workers that vanish without closing their connections.

A cluster of real processes started through the CLI (``meshpool scheduler`` and two ``meshpool
worker`` nannies on 127.0.0.1, CURVE on), with a short heartbeat timeout
(``MESHPOOL_HEARTBEAT_TIMEOUT``, inherited by every process):

* a worker frozen with SIGSTOP while it runs a task keeps its TCP connections open, so only the
  heartbeats can tell: the scheduler removes it (without blaming its task), every future gets its
  result from the other worker; after SIGCONT the frozen worker is told to leave and its nanny
  starts a fresh one, which takes work;
* a task holding the GIL for several heartbeat timeouts (one long C call; a Python thread's ticks
  prove the GIL was held) is not taken for a dead worker: libzmq answers heartbeats from its own
  I/O thread.

The network-partition version (a host's link taken down) is in test_multihost.py. Timing bounds
are liveness only; the measured removal times are printed.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from cli_cluster import START_TIMEOUT, CliCluster, free_port
from helpers import wait_until

pytestmark = pytest.mark.timeout(120)

HEARTBEAT_TIMEOUT = 2.0  # seconds (MESHPOOL_HEARTBEAT_TIMEOUT of every process here)
GONE_TIMEOUT = 30.0  # a frozen worker being removed (liveness only: ~HEARTBEAT_TIMEOUT expected)


# --- worker-side tasks (workers import this module: their PYTHONPATH has tests/) -------------


def square_marked(x: int, directory: str, delay: float) -> tuple[int, int]:
    """x squared and our pid, after ``delay`` s; ``directory/<x>.<pid>`` marks the start."""
    Path(directory, f"{x}.{os.getpid()}").touch()
    time.sleep(delay)
    return x * x, os.getpid()


def hold_gil(seconds: float) -> dict:
    """One C call (``sum(range(n))``) that holds the GIL about ``seconds``, while a Python
    thread counts ticks: ticks that stop during the call prove the GIL was held throughout."""
    n = 1_000_000
    while True:  # calibrate on this machine
        start = time.perf_counter()
        sum(range(n))
        took = time.perf_counter() - start
        if took > 0.2:
            break
        n *= 2
    n = int(n * seconds / took)
    ticks = [0]
    stop = threading.Event()

    def tick() -> None:
        while not stop.is_set():
            ticks[0] += 1
            time.sleep(0.005)

    ticker = threading.Thread(target=tick, daemon=True)
    ticker.start()
    time.sleep(0.1)
    before = ticks[0]
    start = time.perf_counter()
    sum(range(n))
    held = time.perf_counter() - start
    during = ticks[0] - before
    time.sleep(0.1)
    after = ticks[0] - before - during
    stop.set()
    ticker.join()
    return {"held": held, "ticks_during": during, "ticks_after": after, "pid": os.getpid()}


# --- the cluster ------------------------------------------------------------------------------


def _secured_cluster(tmp_path, monkeypatch) -> CliCluster:
    """A CliCluster (a fresh key pair) whose processes, and this test's clients, use a private
    MESHPOOL_HOME and the short heartbeat timeout."""
    cluster = CliCluster(tmp_path, MESHPOOL_HEARTBEAT_TIMEOUT=str(HEARTBEAT_TIMEOUT))
    cluster.share_env(monkeypatch)
    return cluster


@pytest.fixture
def cli_cluster(tmp_path, monkeypatch):
    """A secured scheduler and two worker nannies (wa, wb: one worker process each), all with a
    short heartbeat timeout."""
    with _secured_cluster(tmp_path, monkeypatch) as cluster:
        cluster.start_scheduler()
        for name in ("wa", "wb"):
            cluster.start_worker(name)
        yield cluster


def _by_name(ex) -> dict[str, dict]:
    return {w["name"]: w for w in ex.workers()}


def test_frozen_worker_is_removed_and_restarted_on_thaw(cli_cluster, tmp_path):

    cluster = cli_cluster
    marks = tmp_path / "marks"
    marks.mkdir()
    with cluster.executor() as ex:
        ex.wait_for_workers(2, timeout=START_TIMEOUT)
        victim = _by_name(ex)["wa-0"]
        futures = [ex.submit(square_marked, i, str(marks), 1.0) for i in range(6)]

        def victim_running() -> list[int]:
            started = [int(p.name.split(".")[0]) for p in marks.glob(f"*.{victim['pid']}")]
            return [i for i in started if not futures[i].done()]

        wait_until(lambda: victim_running(), START_TIMEOUT, "a task running on the victim")
        os.kill(victim["pid"], signal.SIGSTOP)
        frozen_at = time.monotonic()
        running = victim_running()
        try:
            wait_until(lambda: "wa-0" not in _by_name(ex), GONE_TIMEOUT, "the victim's removal")
            removed_after = time.monotonic() - frozen_at
            print(f"frozen worker removed {removed_after:.2f} s after SIGSTOP", file=sys.stderr)
            results = [f.result(timeout=GONE_TIMEOUT) for f in futures]
            assert [r[0] for r in results] == [i * i for i in range(6)]
            survivor = _by_name(ex)["wb-0"]["pid"]
            # interrupted by the freeze: ran again on the other worker
            assert any(results[i][1] == survivor for i in running), (running, results)
            log = cluster.log("scheduler")
            assert "connection timed out (host vanished?)" in log, log
        finally:
            os.kill(victim["pid"], signal.SIGCONT)

        # thawed: it comes back, is told to leave, and its nanny starts a fresh worker
        wait_until(
            lambda: "wa-0" in _by_name(ex) and _by_name(ex)["wa-0"]["pid"] != victim["pid"],
            START_TIMEOUT,
            "a fresh worker from the victim's nanny",
        )
        wait_until(lambda: _exited(victim["pid"]), START_TIMEOUT, "the thawed worker's exit")
        log = cluster.log("scheduler")
        assert "was removed and is back" in log, log
        assert "from unregistered peer" not in log, log  # what its slots sent after the thaw
        fresh = _by_name(ex)["wa-0"]["pid"]
        later = ex.options(workers=["wa-0"]).submit(square_marked, 7, str(marks), 0).result(60)
        assert later == (49, fresh)
        again = ex.map(square_marked, range(8), [str(marks)] * 8, [0] * 8)
        assert [r[0] for r in again] == [i * i for i in range(8)]
        assert cluster.process("wa").poll() is None  # the victim's nanny carries on


def _exited(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def test_task_holding_the_gil_is_not_taken_for_a_dead_worker(cli_cluster):

    with cli_cluster.executor() as ex:
        ex.wait_for_workers(2, timeout=START_TIMEOUT)
        before = {w["id"] for w in ex.workers()}
        report = ex.submit(hold_gil, 3 * HEARTBEAT_TIMEOUT).result(timeout=120)
        print(f"GIL held {report['held']:.1f} s in one call: {report}", file=sys.stderr)
        assert report["held"] > 1.5 * HEARTBEAT_TIMEOUT, report
        # the GIL really was held: the ticker (every 5 ms) stalled, then ran again
        assert report["ticks_during"] <= 2 and report["ticks_after"] >= 2, report
        assert {w["id"] for w in ex.workers()} == before
        assert report["pid"] in {w["pid"] for w in ex.workers()}
        assert "removed" not in cli_cluster.log("scheduler")
        assert ex.submit(pow, 3, 4).result(timeout=60) == 81


# --- a scheduler that vanishes (SIGKILL), and one that comes back on the same address ---------


class Restartable:
    """A secured ``meshpool scheduler`` on a fixed port, which the test kills and starts again,
    and one worker nanny ("n": two worker processes) with ``--scheduler-silence silence``."""

    def __init__(self, cluster: CliCluster) -> None:
        self.cluster = cluster
        self.port = free_port()
        self.address = f"tcp://127.0.0.1:{self.port}"
        self.schedulers: list[subprocess.Popen] = []

    def start_scheduler(self) -> subprocess.Popen:
        name = f"scheduler{len(self.schedulers)}"
        proc = self.cluster.start_scheduler(port=self.port, name=name)
        self.schedulers.append(proc)
        return proc

    def kill_scheduler(self) -> None:
        proc = self.schedulers[-1]
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=START_TIMEOUT)

    def start_nanny(self, silence: float) -> subprocess.Popen:
        return self.cluster.start_worker(
            "n", "--nworkers", "2", "--scheduler-silence", str(silence)
        )

    def worker_pids(self) -> set[int]:
        with self.cluster.executor() as ex:
            ex.wait_for_workers(2, timeout=START_TIMEOUT)
            return {w["pid"] for w in ex.workers()}


@pytest.fixture
def restartable(tmp_path, monkeypatch):
    with _secured_cluster(tmp_path, monkeypatch) as cluster:
        yield Restartable(cluster)


def test_workers_and_their_nanny_exit_when_the_scheduler_is_gone(restartable):
    silence = 3.0
    restartable.start_scheduler()
    nanny = restartable.start_nanny(silence)
    workers = restartable.worker_pids()
    restartable.kill_scheduler()
    lost_at = time.monotonic()
    assert nanny.wait(timeout=START_TIMEOUT) == 1
    print(f"nanny exited {time.monotonic() - lost_at:.1f} s after the scheduler", file=sys.stderr)
    wait_until(lambda: all(_exited(pid) for pid in workers), START_TIMEOUT, "the workers' exit")
    log = restartable.cluster.log("n")
    assert f"no word from the scheduler for {silence:g} s" in log, log
    assert "lost the scheduler at" in log, log


def test_workers_rejoin_a_scheduler_restarted_on_their_address(restartable, tmp_path):

    marks = tmp_path / "marks"
    marks.mkdir()
    restartable.start_scheduler()
    nanny = restartable.start_nanny(START_TIMEOUT)  # the silence limit is never reached here
    before = restartable.worker_pids()
    restartable.kill_scheduler()
    restartable.start_scheduler()
    # the old workers reconnect, are unknown to the new scheduler, and are told to restart:
    # their nanny starts fresh ones, which register
    with restartable.cluster.executor() as ex:
        wait_until(
            lambda: len({w["pid"] for w in ex.workers()} - before) == 2,
            START_TIMEOUT,
            "two fresh workers",
        )
        fresh = {w["pid"] for w in ex.workers()}
        results = ex.map(square_marked, range(8), [str(marks)] * 8, [0] * 8)
        assert [r[0] for r in results] == [i * i for i in range(8)]
        assert {r[1] for r in results} <= fresh
    wait_until(lambda: all(_exited(pid) for pid in before), START_TIMEOUT, "the old workers' exit")
    assert "unknown worker" in restartable.cluster.log("scheduler1")
    assert nanny.poll() is None  # the nanny carries on


def test_results_from_slots_of_unknown_workers_are_dropped_quietly(tmp_path):
    """A removed worker that comes back (or an earlier scheduler's) may still deliver what its
    slots finished: routine, so logged at debug; a peer that never said who it is, a warning."""
    import zmq

    from meshpool import messages as m

    cluster = CliCluster(tmp_path, security="insecure")
    context = zmq.Context()
    try:
        scheduler = cluster.start_scheduler("--log-level", "DEBUG")
        procs = cluster.procs
        for identity in ("ghost-1/0", "stranger"):
            sock = context.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 1000)
            sock.setsockopt(zmq.IDENTITY, identity.encode())
            sock.connect(cluster.address)
            sock.send_multipart(m.encode(m.ComputeDone("k", 1, False, 0.1)))
        procs.wait_for_output(scheduler, r"from unregistered peer 'stranger'", START_TIMEOUT)
        procs.wait_for_output(
            scheduler, r"from 'ghost-1/0', a worker not registered here", START_TIMEOUT
        )
        lines = cluster.log("scheduler").splitlines()
        assert any("WARNING" in line and "'stranger'" in line for line in lines), lines
        assert all("DEBUG" in line for line in lines if "ghost-1/0" in line), lines
    finally:
        context.destroy(linger=0)
        cluster.close()
