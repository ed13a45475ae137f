"""Shared fixtures: a session-wide local cluster, and per-test process cleanup.

Every test runs under pytest-timeout (pyproject: ``timeout_method = "signal"``). After each test,
any process it started that is still alive is killed by process group, so a failing test cannot
leave workers behind for the next one.
"""

from __future__ import annotations

import os
import signal
import sys
import time

import psutil
import pytest

HERE = os.path.dirname(__file__)
if HERE not in sys.path:
    sys.path.insert(0, HERE)


@pytest.fixture(scope="session")
def session_executor():
    import meshpool

    ex = meshpool.Executor(2)
    # Workers start in the background: wait for them here, or the first test using ``ex``
    # would see them as processes it started and the reaper below would kill them.
    ex.wait_for_workers(2, timeout=60)
    yield ex
    ex.shutdown(wait=True)


@pytest.fixture
def ex(session_executor):
    """The shared 2-worker local cluster (use a fresh Executor when that is the point)."""
    yield session_executor


@pytest.fixture(autouse=True)
def _reap_children():
    me = psutil.Process()
    before = {p.pid for p in me.children(recursive=True)}
    yield
    deadline = time.monotonic() + 5
    while True:
        new = [p for p in me.children(recursive=True) if _is_new(p, before)]
        new = [p for p in new if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        if not new or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    for proc in new:
        try:
            os.killpg(os.getpgid(proc.pid), signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            try:
                proc.kill()
            except psutil.NoSuchProcess:
                pass


def _is_new(proc: psutil.Process, before: set[int]) -> bool:
    """Started during this test (not by a process that existed before it, e.g. a nanny of a
    module-scoped fixture restarting its workers)."""
    try:
        return proc.pid not in before and not any(a.pid in before for a in proc.parents())
    except psutil.Error:
        return True


def children_of(pid: int | None = None) -> list[psutil.Process]:
    proc = psutil.Process(pid) if pid else psutil.Process()
    return [
        p
        for p in proc.children(recursive=True)
        if p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    ]
