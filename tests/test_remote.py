"""The remote path: ``meshpool scheduler`` and ``meshpool worker`` as separate processes over
TCP, with CURVE credentials (``meshpool keygen``), found by directory or by address."""

from __future__ import annotations

import signal
import time

import psutil
import pytest
import tasks
from cli_cluster import CliCluster, free_port
from helpers import LIVENESS, wait_until

import meshpool


def start_cluster(cluster: CliCluster, nworkers: int = 2, port: int = 0) -> CliCluster:
    """A scheduler and one worker nanny ("w") with ``nworkers`` worker processes."""
    cluster.start_scheduler(port=port)
    cluster.start_worker("w", "--nworkers", str(nworkers))
    return cluster


def stop_cleanly(cluster: CliCluster) -> None:
    """SIGTERM stops the nanny and its worker processes, then the scheduler, each with code 0."""

    def gone(pid: int) -> bool:
        try:
            return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return True

    try:
        nanny = cluster.process("w")
        workers = [p.pid for p in psutil.Process(nanny.pid).children(recursive=True)]
        nanny.send_signal(signal.SIGTERM)
        assert nanny.wait(LIVENESS) == 0
        wait_until(lambda: all(gone(p) for p in workers), what="worker processes to exit")
    finally:
        codes = cluster.close()
    assert codes == {"w": 0, "scheduler": 0}


@pytest.fixture(scope="module")
def secured(tmp_path_factory):
    with CliCluster(tmp_path_factory.mktemp("remote")) as cluster:
        start_cluster(cluster)
        # a module-scoped cluster must wait: conftest's reaper kills processes that appear
        # during a test, and worker processes start late
        cluster.wait_for_workers(2)
        yield cluster
        stop_cleanly(cluster)


@pytest.fixture
def remote(secured, monkeypatch):
    monkeypatch.setenv("MESHPOOL_HOME", str(secured.home))
    with secured.executor() as ex:
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
    with CliCluster(tmp_path, security="insecure") as cluster:
        start_cluster(cluster, nworkers=1)
        cluster.share_env(monkeypatch)
        with meshpool.Executor(cluster.address) as ex:
            ex.wait_for_workers(1, timeout=LIVENESS)
            assert ex.submit(tasks.inc, 1).result(LIVENESS) == 2
            assert len(ex.submit(tasks.big, 200_000).result(LIVENESS)) == 200_000
        stop_cleanly(cluster)


def test_credentials_found_by_address(tmp_path, monkeypatch):
    """No --security: the scheduler makes credentials under MESHPOOL_HOME, keyed by its
    address, and the same user's workers and clients find them there."""
    port = free_port()
    with CliCluster(tmp_path, security="address") as cluster:
        start_cluster(cluster, nworkers=1, port=port)
        cluster.share_env(monkeypatch)
        assert (cluster.home / "clusters" / f"127.0.0.1-{port}" / "cluster.key_secret").exists()
        with meshpool.Executor(cluster.address) as ex:
            ex.wait_for_workers(1, timeout=LIVENESS)
            assert ex.submit(tasks.inc, 41).result(LIVENESS) == 42
        stop_cleanly(cluster)
