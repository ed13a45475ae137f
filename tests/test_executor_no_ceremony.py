"""No ceremony: scripts without a ``__main__`` guard, the caller's sys.path and cwd, stdout,
and ``initializer``/``initargs`` (also for workers restarted after a crash)."""

from __future__ import annotations

import concurrent.futures as cf
import os
import signal

import pytest
import tasks
from helpers import LIVENESS, run_script, wait_until, write_script

import meshpool


def test_script_without_main_guard(tmp_path):
    script = write_script(
        tmp_path,
        """
        import meshpool

        class Point:
            def __init__(self, x, y):
                self.x, self.y = x, y

        def scale(p, k):
            return Point(p.x * k, p.y * k)

        def square(x):
            return x * x

        ex = meshpool.Executor(2)
        p = ex.submit(scale, Point(1, 2), 3).result(60)
        print("point", p.x, p.y, type(p).__name__)
        print("map", list(ex.map(square, range(5))))
        ex.shutdown()
        print("end")
        """,
    )
    proc = run_script(script)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ["point 3 6 Point", "map [0, 1, 4, 9, 16]", "end"]
    assert "Traceback" not in proc.stderr


def test_callers_sys_path_and_cwd_reach_workers(tmp_path):
    mods = tmp_path / "mods"
    mods.mkdir()
    (mods / "only_here.py").write_text("def triple(x):\n    return 3 * x\n")
    workdir = tmp_path / "work"
    workdir.mkdir()
    script = write_script(
        tmp_path,
        f"""
        import os, sys
        sys.path.insert(0, {str(mods)!r})
        import meshpool

        def use_module(x):
            import only_here
            return only_here.triple(x), os.getcwd()

        with meshpool.Executor(1) as ex:
            value, cwd = ex.submit(use_module, 5).result(60)
        print(value)
        print(cwd == os.getcwd(), cwd == {str(workdir)!r})
        """,
    )
    proc = run_script(script, cwd=workdir)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ["15", "True True"]


def test_worker_stdout_goes_to_callers_stdout(tmp_path):
    script = write_script(
        tmp_path,
        """
        import meshpool

        def chatty(x):
            print("flushed from a worker", x, flush=True)
            print("buffered from a worker", x)   # no flush: must not be lost at exit
            return x

        with meshpool.Executor(1) as ex:
            ex.submit(chatty, 7).result(60)
        print("caller done")
        """,
    )
    proc = run_script(script, unbuffered=False)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert "flushed from a worker 7" in lines
    assert "buffered from a worker 7" in lines
    assert "caller done" in lines


# --- initializer ---------------------------------------------------------------------------------


def _values_by_pid(ex, n=40):
    return dict(ex.map(tasks.pid_and_initialized, range(n)))


def test_initializer_runs_once_in_each_worker_process(tmp_path):
    log = tmp_path / "init.log"
    with meshpool.Executor(
        2, threads_per_worker=2, initializer=tasks.record_initializer, initargs=(str(log), 42)
    ) as ex:
        ex.wait_for_workers(2, timeout=LIVENESS)
        pids = {w["pid"] for w in ex.workers()}
        for pid, value in ex.map(tasks.pid_and_initialized, range(40)):
            assert value == 42
            assert pid in pids
        wait_until(lambda: len(log.read_text().split()) >= 2, what="both initializers")
    ran = log.read_text().split()
    assert sorted(int(p) for p in ran) == sorted(pids)  # once per process, not per thread


def test_initializer_runs_in_restarted_worker(tmp_path):
    with meshpool.Executor(2, initializer=tasks.initializer, initargs=("set",)) as ex:
        ex.wait_for_workers(2, timeout=LIVENESS)
        victim = next(w for w in ex.workers() if w["name"] == "worker-0")
        on_victim = ex.options(workers=["worker-0"])
        assert on_victim.submit(tasks.pid_and_initialized).result(LIVENESS) == (
            victim["pid"],
            "set",
        )
        os.kill(victim["pid"], signal.SIGKILL)

        def replaced():
            names = {w["name"]: w["pid"] for w in ex.workers()}
            return names.get("worker-0") not in (None, victim["pid"])

        wait_until(replaced, what="worker-0 to be restarted")
        pid, value = on_victim.submit(tasks.pid_and_initialized).result(LIVENESS)
        assert pid != victim["pid"]
        assert value == "set"


def test_initializer_that_raises_breaks_the_executor():
    ex = meshpool.Executor(1, initializer=tasks.failing_initializer)
    try:
        fut = ex.submit(tasks.inc, 1)
        with pytest.raises(meshpool.InitializerFailed) as info:
            fut.result(LIVENESS)
        assert isinstance(info.value, cf.BrokenExecutor)
        assert "initializer fails on purpose" in str(info.value)
        with pytest.raises(meshpool.InitializerFailed):
            ex.submit(tasks.inc, 1)
        with pytest.raises(meshpool.InitializerFailed):
            ex.map(tasks.inc, [1])
    finally:
        ex.shutdown()


@pytest.mark.xfail(
    strict=True,
    reason="functions defined in a script's __main__ travel by value (cloudpickle), each with "
    "its own copy of the globals they read: a global the initializer sets is not the one a task "
    "reads. Works for initializers and tasks in an importable module (tests above).",
)
def test_initializer_and_task_defined_in_main_share_globals(tmp_path):
    script = write_script(
        tmp_path,
        """
        import meshpool

        STATE = "unset"

        def init(value):
            global STATE
            STATE = value

        def read(_):
            return STATE

        with meshpool.Executor(1, initializer=init, initargs=("set",)) as ex:
            print(ex.submit(read, 0).result(60))
        """,
    )
    proc = run_script(script)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ["set"]
