"""Workers joining and leaving: graceful retirement keeps every value; joiners take work at once."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
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


def _start(args: list[str], env: dict) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "meshpool.cli", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


@pytest.fixture
def cluster_env(tmp_path):
    tests_dir = os.path.dirname(__file__)  # remote workers import tasks and this module
    env = dict(
        os.environ,
        MESHPOOL_HOME=str(tmp_path / "home"),
        PYTHONPATH=os.pathsep.join([tests_dir, os.environ.get("PYTHONPATH", "")]),
    )
    keys = tmp_path / "keys"
    subprocess.run([sys.executable, "-m", "meshpool.cli", "keygen", str(keys)], check=True)
    scheduler = _start(
        ["scheduler", "--host", "127.0.0.1", "--port", "0", "--security", str(keys)], env
    )
    line = scheduler.stdout.readline()
    assert "meshpool scheduler at" in line, line
    address = line.split(" at ", 1)[1].strip()
    procs = [scheduler]
    yield env, keys, address, procs
    for proc in procs:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


def _wait_workers(ex, n, timeout=60):
    deadline = time.monotonic() + timeout
    while len(ex.workers()) < n:
        assert time.monotonic() < deadline, ex.workers()
        time.sleep(0.05)


def test_sigterm_to_a_worker_hands_off_its_data(cluster_env):
    env, keys, address, procs = cluster_env
    procs.append(_start(["worker", address, "--security", str(keys), "--name", "a"], env))
    procs.append(_start(["worker", address, "--security", str(keys), "--name", "b"], env))
    with meshpool.Executor(address, security=str(keys)) as ex:
        _wait_workers(ex, 2)
        futures = [ex.options(workers=["a-0"]).submit(make, 50_000 + i) for i in range(4)]
        meshpool.wait(futures, timeout=60)
        procs[1].send_signal(signal.SIGTERM)  # the nanny of worker a
        assert procs[1].wait(timeout=60) == 0
        assert [w["name"] for w in ex.workers()] == ["b-0"]
        for i, fut in enumerate(futures):
            assert int(fut.result(timeout=30).sum()) == int(np.arange(50_000 + i).sum())


def test_a_joining_worker_takes_queued_work_at_once(cluster_env):
    env, keys, address, procs = cluster_env
    procs.append(_start(["worker", address, "--security", str(keys), "--name", "a"], env))
    with meshpool.Executor(address, security=str(keys)) as ex:
        _wait_workers(ex, 1)
        queued = [ex.submit(nap_then_pid, 0.3) for _ in range(20)]
        procs.append(_start(["worker", address, "--security", str(keys), "--name", "b"], env))
        _wait_workers(ex, 2)
        joined = [w["pid"] for w in ex.workers() if w["name"] == "b-0"][0]
        ran_on = [f.result(timeout=120) for f in queued]
        assert joined in ran_on  # the newcomer took some of the work queued before it came


def test_restricted_task_waits_for_a_fitting_worker(cluster_env, caplog):
    env, keys, address, procs = cluster_env
    procs.append(_start(["worker", address, "--security", str(keys), "--name", "cpu"], env))
    with meshpool.Executor(address, security=str(keys)) as ex:
        _wait_workers(ex, 1)
        gpu_task = ex.options(resources={"GPU": 1}).submit(getpid)
        named = ex.options(workers=["later-0"]).submit(getpid)
        time.sleep(0.5)
        assert not gpu_task.done() and not named.done()  # strict: nobody fits yet
        procs.append(
            _start(
                [
                    "worker",
                    address,
                    "--security",
                    str(keys),
                    "--name",
                    "later",
                    "--resources",
                    "GPU=1",
                ],
                env,
            )
        )
        assert gpu_task.result(timeout=60) == named.result(timeout=60)
        gpu_worker = [w for w in ex.workers() if w["name"] == "later-0"][0]
        assert gpu_worker["resources"] == {"GPU": 1.0}
        assert gpu_task.result() == gpu_worker["pid"]


def test_worker_with_wrong_credentials_fails_fast_and_clearly(cluster_env, tmp_path):
    env, keys, address, procs = cluster_env
    other = tmp_path / "other-keys"
    subprocess.run([sys.executable, "-m", "meshpool.cli", "keygen", str(other)], check=True)
    for flags in (["--security", str(other)], ["--insecure"]):
        worker = _start(["worker", address, *flags], env)
        procs.append(worker)
        out, _ = worker.communicate(timeout=30)  # liveness bound; it takes about a second
        assert worker.returncode == 1
        assert "refused" in out and "--security DIR" in out, out
