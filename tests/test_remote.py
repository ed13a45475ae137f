"""The remote path: ``meshpool scheduler`` and ``meshpool worker`` as separate processes over
TCP, with CURVE credentials (``meshpool keygen``), found by directory or by address."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import tasks
from helpers import LIVENESS, script_env, wait_until

import meshpool


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Cluster:
    """A scheduler and a worker nanny started through the CLI, stopped with SIGTERM."""

    def __init__(self, tmp: Path, home: Path, *scheduler_args: str, nworkers: int = 2) -> None:
        self.port = free_port()
        self.address = f"tcp://127.0.0.1:{self.port}"
        self.env = script_env(MESHPOOL_HOME=str(home))  # PYTHONPATH has tests/: tasks.py
        cli = [sys.executable, "-m", "meshpool.cli"]
        # the logs live as long as the cluster; stop() closes them
        self.scheduler_log = open(tmp / "scheduler.log", "w")  # noqa: SIM115
        self.scheduler = subprocess.Popen(
            [*cli, "scheduler", "--host", "127.0.0.1", "--port", str(self.port), *scheduler_args],
            stdout=subprocess.PIPE,
            stderr=self.scheduler_log,
            text=True,
            env=self.env,
        )
        self.procs = [self.scheduler]
        assert self.scheduler.stdout is not None
        line = self.scheduler.stdout.readline()
        assert line.startswith("meshpool scheduler at"), line
        self.worker_log = open(tmp / "worker.log", "w")  # noqa: SIM115
        worker_args = [a for a in scheduler_args if a.startswith("--") and a != "--port"]
        if "--security" in scheduler_args:
            worker_args = ["--security", scheduler_args[scheduler_args.index("--security") + 1]]
        self.workers = subprocess.Popen(
            [*cli, "worker", self.address, "--nworkers", str(nworkers), *worker_args],
            stdout=self.worker_log,
            stderr=subprocess.STDOUT,
            env=self.env,
        )
        self.procs.append(self.workers)

    def wait_for_workers(self, n: int, security: object = None) -> None:
        """Block until ``n`` workers joined. A module-scoped cluster must: conftest's reaper
        kills processes that appear during a test, and worker processes start late."""
        with meshpool.Executor(self.address, security=security) as ex:  # type: ignore[arg-type]
            ex.wait_for_workers(n, timeout=LIVENESS)

    def stop(self) -> None:
        """SIGTERM both; assert they (and the worker processes) exit."""
        worker_pids = [p.pid for p in psutil.Process(self.workers.pid).children(recursive=True)]
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        try:
            codes = [proc.wait(LIVENESS) for proc in self.procs]
        finally:
            for proc in self.procs:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
            self.scheduler_log.close()
            self.worker_log.close()
        assert codes == [0, 0]

        def gone(pid: int) -> bool:
            try:
                return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
            except psutil.NoSuchProcess:
                return True

        wait_until(lambda: all(gone(p) for p in worker_pids), what="worker processes to exit")


@pytest.fixture(scope="module")
def secured(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("remote")
    home = tmp / "home"
    keys = tmp / "keys"
    subprocess.run(
        [sys.executable, "-m", "meshpool.cli", "keygen", str(keys)],
        check=True,
        capture_output=True,
        env=script_env(MESHPOOL_HOME=str(home)),
    )
    cluster = Cluster(tmp, home, "--security", str(keys))
    cluster.wait_for_workers(2, security=str(keys))
    cluster.keys = keys  # type: ignore[attr-defined]
    cluster.home = home  # type: ignore[attr-defined]
    yield cluster
    cluster.stop()


@pytest.fixture
def remote(secured, monkeypatch):
    monkeypatch.setenv("MESHPOOL_HOME", str(secured.home))
    with meshpool.Executor(secured.address, security=str(secured.keys)) as ex:
        ex.wait_for_workers(2, timeout=LIVENESS)
        yield ex


def test_submit_and_map(remote):
    assert remote.submit(tasks.inc, 1).result(LIVENESS) == 2
    assert list(remote.map(tasks.mul, range(10), range(10))) == [i * i for i in range(10)]
    assert list(remote.map(tasks.inc, range(7), chunksize=3)) == list(range(1, 8))


def test_dependencies(remote):
    a = remote.submit(tasks.inc, 1)
    b = remote.submit(tasks.inc, 10)
    c = remote.submit(tasks.add, a, b)
    d = remote.submit(tasks.total, a, b, c)
    assert d.result(LIVENESS) == 2 + 11 + 13


def test_large_results_and_dependencies(remote):
    n = 1_000_000
    a = remote.submit(tasks.big, n)
    assert remote.submit(len, a).result(LIVENESS) == n
    assert a.result(LIVENESS) == b"x" * n
    assert remote.gather([remote.submit(tasks.big, n), remote.submit(tasks.big, 10)]) == [
        b"x" * n,
        b"x" * 10,
    ]


def test_errors_travel(remote):
    with pytest.raises(ValueError, match="remote"):
        remote.submit(tasks.fail, "remote").result(LIVENESS)


def test_workers_listed(remote):
    workers = remote.workers()
    assert len(workers) == 2
    assert all(w["address"].startswith("tcp://") for w in workers)


def test_no_credentials_refused_within_timeout(secured, monkeypatch):
    monkeypatch.setenv("MESHPOOL_HOME", str(secured.home))
    start = time.monotonic()
    with pytest.raises(meshpool.CommError):
        meshpool.Executor(secured.address, timeout=1)
    assert time.monotonic() - start < LIVENESS


def test_wrong_credentials_refused_within_timeout(secured, tmp_path, monkeypatch):
    monkeypatch.setenv("MESHPOOL_HOME", str(secured.home))
    wrong = meshpool.Security.generate(tmp_path / "wrong")
    start = time.monotonic()
    with pytest.raises(meshpool.CommError):
        meshpool.Executor(secured.address, security=wrong, timeout=1)
    with pytest.raises(meshpool.CommError):
        meshpool.Executor(secured.address, security=str(tmp_path / "wrong"), timeout=1)
    assert time.monotonic() - start < LIVENESS


def test_missing_credential_directory_is_a_security_error(secured, tmp_path):
    with pytest.raises(meshpool.SecurityError):
        meshpool.Executor(secured.address, security=str(tmp_path / "nothing-here"), timeout=1)


def test_insecure_cluster(tmp_path, monkeypatch):
    home = tmp_path / "home"
    monkeypatch.setenv("MESHPOOL_HOME", str(home))
    cluster = Cluster(tmp_path, home, "--insecure", nworkers=1)
    try:
        with meshpool.Executor(cluster.address) as ex:
            ex.wait_for_workers(1, timeout=LIVENESS)
            assert ex.submit(tasks.inc, 1).result(LIVENESS) == 2
            assert len(ex.submit(tasks.big, 200_000).result(LIVENESS)) == 200_000
    finally:
        cluster.stop()


def test_credentials_found_by_address(tmp_path, monkeypatch):
    """No --security: the scheduler makes credentials under MESHPOOL_HOME, keyed by its
    address, and the same user's workers and clients find them there."""
    home = tmp_path / "home"
    monkeypatch.setenv("MESHPOOL_HOME", str(home))
    cluster = Cluster(tmp_path, home, nworkers=1)
    try:
        assert (home / "clusters" / f"127.0.0.1-{cluster.port}" / "cluster.key_secret").exists()
        with meshpool.Executor(cluster.address) as ex:
            ex.wait_for_workers(1, timeout=LIVENESS)
            assert ex.submit(tasks.inc, 41).result(LIVENESS) == 42
    finally:
        cluster.stop()
