"""Process hygiene: whatever way an executor ends, its workers, sockets and fds go with it.

Scenarios that end a process (interpreter exit, SIGKILL, fork) run in subprocess scripts, so
pytest's own process stays clean; they report what they saw on stdout or through exit codes.
"""

from __future__ import annotations

import gc
import json
import os
import signal
import subprocess
import sys

import psutil
import tasks
from conftest import children_of
from helpers import LIVENESS, run_script, script_env, wait_until, write_script

import meshpool


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_shutdown_leaves_no_processes_no_directory():
    ex = meshpool.Executor(2)
    ex.wait_for_workers(2, timeout=LIVENESS)
    directory = ex._core.directory
    pids = ex._core.cluster.pids()
    assert os.path.isdir(directory)
    assert {p.pid for p in children_of()} >= set(pids)
    ex.submit(tasks.big, 200_000).result(LIVENESS)  # a data socket in use too
    ex.shutdown()
    assert not any(alive(pid) for pid in pids)
    assert not os.path.exists(directory)
    assert children_of() == [] or not (set(pids) & {p.pid for p in children_of()})


def test_leaving_with_block_leaves_no_processes_no_directory():
    with meshpool.Executor(2) as ex:
        ex.wait_for_workers(2, timeout=LIVENESS)
        directory = ex._core.directory
        pids = ex._core.cluster.pids()
        assert ex.submit(tasks.inc, 1).result(LIVENESS) == 2
    assert not any(alive(pid) for pid in pids)
    assert not os.path.exists(directory)


def test_no_leaked_file_descriptors(ex):
    assert ex.submit(tasks.inc, 1).result(LIVENESS) == 2  # this process's zmq context exists
    me = psutil.Process()
    before = me.num_fds()
    for _ in range(3):
        with meshpool.Executor(2) as other:
            other.submit(tasks.inc, 1).result(LIVENESS)
            other.submit(tasks.big, 200_000).result(LIVENESS)
    assert me.num_fds() - before <= 3  # slack: helper threads' eventfds come and go


def test_workers_run_in_their_own_process_group(ex):
    ex.wait_for_workers(2, timeout=LIVENESS)
    for worker in ex.workers():
        assert os.getpgid(worker["pid"]) != os.getpgid(0)


def test_garbage_collected_executor_stops_its_workers():
    ex = meshpool.Executor(2)
    ex.wait_for_workers(2, timeout=LIVENESS)
    pids = ex._core.cluster.pids()
    directory = ex._core.directory
    thread = ex._core.thread
    assert ex.submit(tasks.inc, 1).result(LIVENESS) == 2
    del ex
    gc.collect()
    thread.join(LIVENESS)
    assert not thread.is_alive()
    wait_until(lambda: not any(alive(p) for p in pids), what="the workers to exit")
    assert not os.path.exists(directory)


def test_garbage_collected_executor_finishes_queued_work_first(tmp_path):
    ex = meshpool.Executor(1)
    thread = ex._core.thread
    markers = [tmp_path / f"{i}" for i in range(4)]
    for marker in markers:
        ex.submit(tasks.slow_inc, 0, 0.02)
        ex.submit(tasks.touch, str(marker))
    del ex
    gc.collect()
    thread.join(LIVENESS)
    assert all(m.exists() for m in markers)


def test_interpreter_exit_without_shutdown_finishes_work_and_leaves_nothing(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    script = write_script(
        tmp_path,
        f"""
        import json, os, time
        import meshpool

        def write(i):
            time.sleep(0.05)
            with open(os.path.join({str(out)!r}, str(i)), "w") as f:
                f.write("done")

        ex = meshpool.Executor(2)
        for i in range(8):
            ex.submit(write, i)
        ex.wait_for_workers(2, timeout=60)
        pids = [w["pid"] for w in ex.workers()]
        print(json.dumps({{"pids": pids, "dir": ex._core.directory}}))
        # no shutdown(), no main guard: the interpreter just ends
        """,
    )
    proc = run_script(script)
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout.splitlines()[0])
    assert sorted(os.listdir(out), key=int) == [str(i) for i in range(8)]
    wait_until(lambda: not any(alive(p) for p in info["pids"]), what="workers to exit")
    assert not os.path.exists(info["dir"])
    assert "Traceback" not in proc.stderr


def test_killed_caller_takes_its_workers_along(tmp_path):
    script = write_script(
        tmp_path,
        """
        import json, sys, threading
        import meshpool
        import tasks

        ex = meshpool.Executor(2)
        ex.wait_for_workers(2, timeout=60)
        ex.submit(tasks.big, 200_000).result(60)
        info = {"pids": [w["pid"] for w in ex.workers()], "dir": ex._core.directory}
        print(json.dumps(info), flush=True)
        threading.Event().wait()   # until killed
        """,
    )
    proc = subprocess.Popen(
        [sys.executable, str(script)], stdout=subprocess.PIPE, text=True, env=script_env()
    )
    try:
        assert proc.stdout is not None
        info = json.loads(proc.stdout.readline())
        sockets = os.listdir(info["dir"])
        assert len(sockets) >= 3  # the scheduler's and each worker's data socket
        proc.send_signal(signal.SIGKILL)
        proc.wait(LIVENESS)
    finally:
        proc.kill()
        proc.wait()
    wait_until(lambda: not any(alive(p) for p in info["pids"]), what="orphaned workers to exit")
    leftover = os.listdir(info["dir"]) if os.path.exists(info["dir"]) else []
    assert leftover == []


def test_executor_inherited_through_fork_refuses_to_submit(tmp_path):
    script = write_script(
        tmp_path,
        """
        import os, sys
        import meshpool
        import tasks

        ex = meshpool.Executor(1)
        assert ex.submit(tasks.inc, 1).result(60) == 2
        pid = os.fork()
        if pid == 0:
            try:
                ex.submit(tasks.inc, 1)
            except RuntimeError as exc:
                code = 10 if "fork" in str(exc) else 11
            except BaseException:
                code = 12
            else:
                code = 13
            os._exit(code)
        _, status = os.waitpid(pid, 0)
        print(os.waitstatus_to_exitcode(status))
        print(ex.submit(tasks.inc, 2).result(60))   # the parent's executor is unharmed
        ex.shutdown()
        """,
    )
    proc = run_script(script)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ["10", "3"]


def test_executor_inherited_through_fork_child_exits_cleanly(tmp_path):
    """A forked child that just exits normally must neither hang nor touch the parent's pool."""
    script = write_script(
        tmp_path,
        """
        import os, sys
        import meshpool
        import tasks

        ex = meshpool.Executor(1)
        assert ex.submit(tasks.inc, 1).result(60) == 2
        pid = os.fork()
        if pid == 0:
            ex.shutdown()            # a no-op in the child
            sys.exit(0)              # a normal exit: atexit hooks run
        _, status = os.waitpid(pid, 0)
        print(os.waitstatus_to_exitcode(status))
        print(ex.submit(tasks.inc, 2).result(60))
        ex.shutdown()
        """,
    )
    proc = run_script(script)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ["0", "3"]


def test_workers_failing_to_start_break_the_executor(tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "cloudpickle.py").write_text("raise ImportError('broken on purpose')\n")
    script = write_script(
        tmp_path,
        f"""
        import sys
        import cloudpickle, zmq
        import meshpool
        import meshpool.executor.executor
        import tasks

        # workers get this sys.path: they crash importing cloudpickle, every time
        sys.path.insert(0, {str(broken)!r})
        ex = meshpool.Executor(2)
        fut = ex.submit(tasks.inc, 1)
        try:
            fut.result(60)
        except meshpool.WorkerStartError as exc:
            print("future:", type(exc).__name__)
        try:
            ex.submit(tasks.inc, 1)
        except meshpool.WorkerStartError as exc:
            print("submit:", type(exc).__name__)
        ex.shutdown()
        procs = ex._core.cluster.processes.values()
        print("alive:", sum(wp.process.poll() is None for wp in procs))
        """,
    )
    proc = run_script(script)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [
        "future: WorkerStartError",
        "submit: WorkerStartError",
        "alive: 0",
    ]
    assert "broken on purpose" in proc.stderr  # the workers' own error is shown
