"""Workers joining and leaving: graceful retirement keeps every value; joiners take work at once."""

from __future__ import annotations

import os
import signal
import time

import numpy as np
import pytest
from cli_cluster import CliCluster, keygen
from tasks import getpid

import meshpool


def make(n):
    return np.arange(n)


def total(a):
    return int(a.sum())


def nap_then_pid(seconds):
    time.sleep(seconds)
    return os.getpid()


def test_retire_workers_moves_their_results_first():
    with meshpool.Executor(2) as ex:
        ex.wait_for_workers(2, timeout=60)
        first, second = sorted(w["name"] for w in ex.workers())
        futures = [ex.options(workers=[first]).submit(make, 100_000 + i) for i in range(5)]
        meshpool.wait(futures, timeout=60)
        assert ex.retire_workers([first], timeout=60) == [first]
        deadline = time.monotonic() + 30
        while [w["name"] for w in ex.workers()] != [second] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert [w["name"] for w in ex.workers()] == [second]  # not restarted
        for i, fut in enumerate(futures):
            assert int(fut.result(timeout=30).sum()) == int(np.arange(100_000 + i).sum())
        assert ex.submit(total, futures[0]).result(timeout=30) == int(np.arange(100_000).sum())


@pytest.fixture
def cluster(tmp_path):
    """A secured scheduler started through the CLI; the tests start its workers."""
    with CliCluster(tmp_path) as cluster:
        cluster.start_scheduler()
        yield cluster


def _wait_workers(ex, n, timeout=60):
    deadline = time.monotonic() + timeout
    while len(ex.workers()) < n:
        assert time.monotonic() < deadline, ex.workers()
        time.sleep(0.05)


def test_sigterm_to_a_worker_hands_off_its_data(cluster):
    nanny = cluster.start_worker("a")
    cluster.start_worker("b")
    with cluster.executor() as ex:
        _wait_workers(ex, 2)
        futures = [ex.options(workers=["a-0"]).submit(make, 50_000 + i) for i in range(4)]
        meshpool.wait(futures, timeout=60)
        nanny.send_signal(signal.SIGTERM)  # the nanny of worker a
        assert nanny.wait(timeout=60) == 0
        assert [w["name"] for w in ex.workers()] == ["b-0"]
        for i, fut in enumerate(futures):
            assert int(fut.result(timeout=30).sum()) == int(np.arange(50_000 + i).sum())


def test_a_joining_worker_takes_queued_work_at_once(cluster):
    cluster.start_worker("a")
    with cluster.executor() as ex:
        _wait_workers(ex, 1)
        queued = [ex.submit(nap_then_pid, 0.3) for _ in range(20)]
        cluster.start_worker("b")
        _wait_workers(ex, 2)
        joined = [w["pid"] for w in ex.workers() if w["name"] == "b-0"][0]
        ran_on = [f.result(timeout=120) for f in queued]
        assert joined in ran_on  # the newcomer took some of the work queued before it came


def test_restricted_task_waits_for_a_fitting_worker(cluster, caplog):
    cluster.start_worker("cpu")
    with cluster.executor() as ex:
        _wait_workers(ex, 1)
        gpu_task = ex.options(resources={"GPU": 1}).submit(getpid)
        named = ex.options(workers=["later-0"]).submit(getpid)
        time.sleep(0.5)
        assert not gpu_task.done() and not named.done()  # strict: nobody fits yet
        cluster.start_worker("later", "--resources", "GPU=1")
        assert gpu_task.result(timeout=60) == named.result(timeout=60)
        gpu_worker = [w for w in ex.workers() if w["name"] == "later-0"][0]
        assert gpu_worker["resources"] == {"GPU": 1.0}
        assert gpu_task.result() == gpu_worker["pid"]


def test_worker_with_wrong_credentials_fails_fast_and_clearly(cluster, tmp_path):
    other = keygen(tmp_path / "other-keys", cluster.env)
    for kind, flags in [("other", ["--security", str(other)]), ("insecure", ["--insecure"])]:
        worker = cluster.start_worker(kind, credentials=flags, ready=False)
        assert worker.wait(timeout=30) == 1  # liveness bound; it takes about a second
        out = cluster.log(kind)
        assert "refused" in out and "--security DIR" in out, out
