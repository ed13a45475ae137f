"""The embedded local cluster's worker processes, and their supervision (the nanny's job).

Workers are fresh interpreters (``python -m meshpool.worker``), never forks: the caller may hold
zmq contexts and threads, and needs no ``__main__`` guard. Each gets its configuration as one JSON
line on stdin and keeps that pipe open: when the caller dies, even by SIGKILL, the pipe closes and
the worker exits, removing its ipc socket files. Workers run in their own process group, so a
Ctrl-C in the caller's terminal reaches only the caller, which then shuts down cleanly.

Shared-memory files (``transport/shm.py``) a worker made that nobody took in are removed when it
exits (by the worker, or here, when it was killed) and when the cluster stops.

One waiter thread per process reports its exit through ``on_exit``; the owner (the client's I/O
thread, or the ``meshpool worker`` nanny) tells the scheduler and calls :meth:`LocalWorkers.exited`,
which starts a fresh one. A worker that dies before it ever registered counts as a failed start;
:data:`MAX_FAILED_STARTS` in a row break the cluster. A worker tells us itself that it registered:
it writes a line on a pipe (``status_fd`` in its config) and closes it, so a worker that registered
and then died, however often (killed, over its memory limit), never counts as a failed start.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from ..transport import shm

MAX_FAILED_STARTS = 3  # consecutive workers dying before registering: stop retrying
STOP_TIMEOUT = 5.0  # seconds a closing worker gets before it is killed
STATUS_TIMEOUT = 1.0  # seconds an exited worker's status line may still take to be read


@dataclass
class WorkerProcess:
    index: int
    worker_id: str
    name: str
    process: subprocess.Popen
    started: float = field(default_factory=time.monotonic)
    registered: bool = False


class LocalWorkers:
    def __init__(
        self,
        *,
        count: int,
        scheduler_address: str,
        directory: str,
        prefix: str,
        nthreads: int,
        memory_limit: int | None,
        on_exit: Callable[[str, int], None],
        extra_config: dict | None = None,
        data_host: str | None = None,
        name_prefix: str = "worker",
    ) -> None:
        self.count = count
        self.scheduler_address = scheduler_address
        self.directory = directory
        self.prefix = prefix
        self.nthreads = nthreads
        self.memory_limit = memory_limit
        self.on_exit = on_exit
        self.extra_config = extra_config or {}
        self.data_host = data_host  # None: ipc sockets in ``directory``; else tcp on this host
        self.name_prefix = name_prefix
        self.processes: dict[str, WorkerProcess] = {}
        self.failed_starts = 0
        self.closing = False
        self._generation = 0
        # Reentrant: exited() spawns the replacement while holding it, so that close() (which
        # takes it to set ``closing``) can never miss a worker spawned during shutdown.
        self._lock = threading.RLock()

    def start(self) -> None:
        for index in range(self.count):
            self._spawn(index)

    def _spawn(self, index: int) -> WorkerProcess:
        self._generation += 1
        worker_id = f"{self.prefix}-{index}-{self._generation}"
        name = f"{self.name_prefix}-{index}"
        status_read, status_write = os.pipe()
        try:
            process = _popen_worker(status_write)
        except BaseException:
            os.close(status_read)
            raise
        finally:
            os.close(status_write)  # the worker's copy is the only one: its exit is our EOF
        assert process.stdin is not None
        config = self._config(worker_id, name, status_write)
        process.stdin.write(json.dumps(config).encode() + b"\n")
        process.stdin.flush()
        wp = WorkerProcess(index, worker_id, name, process)
        with self._lock:
            self.processes[worker_id] = wp
        status = threading.Thread(
            target=self._read_status,
            args=(wp, status_read),
            name=f"meshpool-status-{name}",
            daemon=True,
        )
        status.start()
        threading.Thread(
            target=self._wait, args=(wp, status), name=f"meshpool-wait-{name}", daemon=True
        ).start()
        return wp

    def _config(self, worker_id: str, name: str, status_fd: int) -> dict:
        """The worker's configuration (its stdin's first line)."""
        config = {
            "scheduler": self.scheduler_address,
            "worker_id": worker_id,
            "name": name,
            "nthreads": self.nthreads,
            "memory_limit": self.memory_limit or 0,
            "sys_path": [p for p in sys.path if p],
            "cwd": os.getcwd(),
            "status_fd": status_fd,  # its number in the worker (pass_fds keeps it)
            **self.extra_config,
        }
        if self.data_host is None:
            config["data_address"] = f"ipc://{self.directory}/w{self._generation}"
            scheduler = os.path.join(self.directory, "scheduler")
            config["cleanup"] = [scheduler, scheduler + ".lane"]  # (lanes: transport/lanes.py)
            config["cleanup_dir"] = self.directory
        else:
            config["data_address"] = f"tcp://{self.data_host}:0"
        return config

    def _read_status(self, wp: WorkerProcess, fd: int) -> None:
        """The worker's one line (``registered``), or end-of-file when it exits before."""
        try:
            line = os.read(fd, 64)
        except OSError:
            line = b""
        finally:
            os.close(fd)
        if line.startswith(b"registered"):
            self._started(wp)

    def _wait(self, wp: WorkerProcess, status: threading.Thread) -> None:
        code = wp.process.wait()
        status.join(STATUS_TIMEOUT)  # a worker that registered and died at once counts as such
        shm.remove_orphans()  # shared-memory files it made that nobody took in
        self.on_exit(wp.worker_id, code)

    def registered(self, worker_id: str) -> None:
        wp = self.processes.get(worker_id)
        if wp is not None:
            self._started(wp)

    def _started(self, wp: WorkerProcess) -> None:
        """``wp`` registered: a successful start, which ends a run of failed ones."""
        with self._lock:
            wp.registered = True
            self.failed_starts = 0

    def exited(self, worker_id: str, restart: bool = True) -> bool:
        """Forget an exited process and restart it (unless it was retired on purpose);
        False once starts keep failing."""
        with self._lock:
            wp = self.processes.pop(worker_id, None)
            if wp is None or self.closing or not restart:
                return True
            if wp.process.stdin is not None:
                try:
                    wp.process.stdin.close()
                except OSError:
                    pass
            if not wp.registered:
                self.failed_starts += 1
                if self.failed_starts >= MAX_FAILED_STARTS:
                    return False
            self._spawn(wp.index)
        return True

    def pids(self) -> list[int]:
        return [wp.process.pid for wp in self.processes.values()]

    def close(self, timeout: float = STOP_TIMEOUT, graceful: float = 0.0) -> None:
        """Stop every worker: close their stdin (they exit), then kill any that linger.

        With ``graceful`` seconds, first ask each to retire (SIGTERM: it hands its data to the
        remaining workers through the scheduler and exits) and wait that long for it.
        """
        with self._lock:
            self.closing = True
            procs = list(self.processes.values())
        if graceful > 0:
            for wp in procs:
                try:
                    wp.process.send_signal(signal.SIGTERM)
                except OSError:
                    pass
            _wait_all(procs, graceful, kill=False)
        for wp in procs:
            if wp.process.stdin is not None:
                try:
                    wp.process.stdin.close()
                except OSError:
                    pass
        _wait_all(procs, timeout, kill=True)
        shm.remove_orphans()


def _wait_all(procs: list[WorkerProcess], seconds: float, kill: bool) -> None:
    """Wait up to ``seconds`` in all for the processes to exit; then kill the rest if asked."""
    deadline = time.monotonic() + seconds
    for wp in procs:
        try:
            wp.process.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            if kill:
                wp.process.kill()
                wp.process.wait()


def _popen_worker(status_fd: int) -> subprocess.Popen:
    """A fresh worker interpreter in its own process group, inheriting ``status_fd``."""
    kwargs: dict = {}
    if sys.version_info >= (3, 11):
        kwargs["process_group"] = 0
    else:  # pragma: no cover - Python 3.10
        kwargs["start_new_session"] = True
    return subprocess.Popen(
        [sys.executable, "-m", "meshpool.worker"],
        stdin=subprocess.PIPE,
        close_fds=True,
        pass_fds=(status_fd,),
        env=_worker_environment(),
        **kwargs,
    )


def _worker_environment() -> dict[str, str]:
    """The caller's environment, plus glibc malloc settings that let workers give freed memory
    back to the system (as dask's nanny does): without them a worker that freed many large
    results keeps their pages, and its RSS never comes back down."""
    env = dict(os.environ)
    env.setdefault("MALLOC_TRIM_THRESHOLD_", "65536")
    # a fixed threshold stops glibc raising it after a big free, which sends later big blocks
    # to heaps where holes are never returned
    env.setdefault("MALLOC_MMAP_THRESHOLD_", "1048576")
    # one arena per thread (slots, zmq I/O) multiplies fragmentation; two are plenty here
    env.setdefault("MALLOC_ARENA_MAX", "2")
    return env
