"""Clusters started through the command line, for tests: ``meshpool scheduler`` and ``meshpool
worker`` processes (run by this interpreter, from this checkout), their output in log files, a
wait until each is ready, and a stop that reaps them all::

    with CliCluster(tmp_path) as cluster:         # a fresh key pair (or security="insecure", ...)
        cluster.start_scheduler()                 # returns once it printed its address
        cluster.start_worker("w1", "--nworkers", "1")  # once its worker processes exist
        with cluster.executor() as ex:
            ...

Every process runs in a session of its own (in a network namespace, if given) with
``<directory>/<name>.log`` as its output. :meth:`Processes.stop` (``CliCluster.close``, also on
leaving the ``with``) SIGTERMs them, newest first, SIGKILLs what is left (the nannies' workers
too) and reaps each: cleanup never depends on the test having gone well.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil
from netns import in_namespace

SRC = str(Path(__file__).resolve().parent.parent / "src")
TESTS = str(Path(__file__).resolve().parent)

START_TIMEOUT = 60.0  # a process announcing itself (liveness only: the machine may be slow)
STOP_TIMEOUT = 10.0  # seconds a process gets to exit after SIGTERM before SIGKILL
SCHEDULER_READY = r"meshpool scheduler at (tcp://\S+)"
WORKER_READY = r"meshpool worker: \d+ process"  # printed once its worker processes exist


def meshpool_command(*args: str) -> list[str]:
    """The ``meshpool`` CLI run by this interpreter (no dependence on PATH)."""
    return [sys.executable, "-m", "meshpool.cli", *args]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (for a scheduler on a fixed port)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def process_env(home: str, **extra: str) -> dict[str, str]:
    """The environment of every process a test starts: this checkout and ``tests/`` importable,
    ``MESHPOOL_HOME`` in the test's tmp dir (never ``~/.meshpool``), no inherited
    ``MESHPOOL_*`` settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MESHPOOL_")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (SRC, TESTS, env.get("PYTHONPATH", "")) if p)
    env["MESHPOOL_HOME"] = home
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


def keygen(directory: Path, env: dict[str, str]) -> Path:
    """``meshpool keygen DIR`` through the CLI; returns ``directory``."""
    subprocess.run(
        meshpool_command("keygen", str(directory)),
        env=env,
        check=True,
        capture_output=True,
        timeout=START_TIMEOUT,
    )
    assert (directory / "cluster.key_secret").exists()
    return directory


class Processes:
    """Long-running processes (schedulers, workers) with their output in log files."""

    def __init__(self, logs: Path, env: dict[str, str]) -> None:
        self.logs = logs
        self.env = env
        self.started: list[tuple[subprocess.Popen, Path]] = []

    def start(self, name: str, argv: list[str], namespace: str | None = None) -> subprocess.Popen:
        """Start ``argv`` (in ``namespace``, if any), output to ``<logs>/<name>.log``."""
        log = self.logs / f"{name}.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                in_namespace(namespace, argv),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=self.env,
                start_new_session=True,
            )
        self.started.append((proc, log))
        return proc

    def wait_for_output(
        self, proc: subprocess.Popen, pattern: str, timeout: float = START_TIMEOUT
    ) -> re.Match[str]:
        """Wait until ``proc``'s log matches ``pattern``; fail early if the process exits."""
        log = next(path for p, path in self.started if p is proc)
        deadline = time.monotonic() + timeout
        while True:
            found = re.search(pattern, log.read_text(errors="replace"))
            if found:
                return found
            if proc.poll() is not None:
                raise AssertionError(f"{proc.args} exited ({proc.returncode}):\n{self.tail(log)}")
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"no {pattern!r} from {proc.args} within {timeout:g} s:\n{self.tail(log)}"
                )
            time.sleep(0.05)

    @staticmethod
    def tail(log: Path, lines: int = 40) -> str:
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])

    def all_logs(self) -> str:
        """Every log's tail, for an assertion message."""
        return "\n".join(f"--- {log.name}\n{self.tail(log)}" for _, log in self.started)

    def stop(self) -> dict[str, int | None]:
        """Stop every process, newest first (worker nannies hand their data off to the
        scheduler, so it goes last): SIGTERM to its session, SIGKILL after
        :data:`STOP_TIMEOUT`, and descendants in process groups of their own (a nanny's
        workers) are killed at the end. Returns each log name's exit code."""
        descendants = []
        codes: dict[str, int | None] = {}
        for proc, log in reversed(self.started):
            try:
                descendants += psutil.Process(proc.pid).children(recursive=True)
            except psutil.Error:
                pass
            _signal_session(proc, signal.SIGTERM)
            try:
                proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                _signal_session(proc, signal.SIGKILL)
                try:
                    proc.wait(STOP_TIMEOUT)
                except subprocess.TimeoutExpired:
                    pass
            codes[log.stem] = proc.returncode
        for child in descendants:
            try:
                child.kill()
                child.wait(STOP_TIMEOUT)
            except psutil.Error:
                pass
        self.started.clear()
        return codes


def _signal_session(proc: subprocess.Popen, sig: int) -> None:
    """Signal the process group ``proc`` leads (start_new_session), or just ``proc``."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        try:
            proc.send_signal(sig)
        except ProcessLookupError:
            pass


class CliCluster:
    """A scheduler and worker nannies started with the ``meshpool`` CLI, with a private
    ``MESHPOOL_HOME`` under ``directory``.

    ``security``: ``"keys"`` (a fresh key pair, passed with ``--security`` to every process),
    ``"insecure"`` (``--insecure``), or ``"address"`` (no flag: the scheduler writes the
    cluster's keys under ``MESHPOOL_HOME`` by its address, where the same user's workers and
    clients find them). ``env``: extra variables for every process it starts (and for this
    one, with :meth:`share_env`).
    """

    def __init__(self, directory: Path, *, security: str = "keys", **env: str) -> None:
        assert security in ("keys", "insecure", "address"), security
        directory.mkdir(parents=True, exist_ok=True)
        self.directory = directory
        self.home = directory / "home"
        self.home.mkdir(exist_ok=True)
        self.extra_env = env
        self.env = process_env(str(self.home), **env)
        self.procs = Processes(directory, self.env)
        self.security = security
        self.keys = keygen(directory / "keys", self.env) if security == "keys" else None
        self.address = ""

    def __enter__(self) -> CliCluster:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def credentials(self) -> list[str]:
        """The security flags of this cluster's processes."""
        if self.keys is not None:
            return ["--security", str(self.keys)]
        return ["--insecure"] if self.security == "insecure" else []

    def start_scheduler(
        self,
        *args: str,
        host: str = "127.0.0.1",
        port: int = 0,
        name: str = "scheduler",
        namespace: str | None = None,
    ) -> subprocess.Popen:
        """``meshpool scheduler`` (port 0: it picks one); returns once it printed its address,
        which becomes :attr:`address`."""
        argv = ["scheduler", "--host", host, "--port", str(port), *self.credentials(), *args]
        proc = self.procs.start(name, meshpool_command(*argv), namespace)
        self.address = self.procs.wait_for_output(proc, SCHEDULER_READY).group(1)
        return proc

    def start_worker(
        self,
        name: str,
        *args: str,
        address: str | None = None,
        credentials: list[str] | None = None,
        namespace: str | None = None,
        ready: bool = True,
    ) -> subprocess.Popen:
        """A ``meshpool worker`` nanny with ``--name name`` (its log is ``name.log``), for
        this cluster's scheduler (or ``address``), with the cluster's security flags (or
        ``credentials``). With ``ready``, returns once its worker processes exist (so
        conftest's reaper counts them as older than the test), not once they registered."""
        flags = self.credentials() if credentials is None else credentials
        argv = ["worker", address or self.address, *flags, "--name", name, *args]
        proc = self.procs.start(name, meshpool_command(*argv), namespace)
        if ready:
            self.procs.wait_for_output(proc, WORKER_READY)
        return proc

    def executor(self, timeout: float = START_TIMEOUT, **kwargs: Any) -> Any:
        """A client of this cluster in this process (``meshpool.Executor``)."""
        import meshpool

        security = str(self.keys) if self.keys is not None else None
        return meshpool.Executor(self.address, security=security, timeout=timeout, **kwargs)

    def wait_for_workers(self, n: int) -> None:
        with self.executor() as ex:
            ex.wait_for_workers(n, timeout=START_TIMEOUT)

    def share_env(self, monkeypatch: Any) -> None:
        """Give this process (its clients) the cluster's ``MESHPOOL_HOME`` and extra variables,
        and no ``MESHPOOL_SECURITY`` of its own."""
        monkeypatch.setenv("MESHPOOL_HOME", str(self.home))
        for name, value in self.extra_env.items():
            monkeypatch.setenv(name, value)
        monkeypatch.delenv("MESHPOOL_SECURITY", raising=False)

    def process(self, name: str) -> subprocess.Popen:
        """The process started as ``name`` (its log's name)."""
        return next(proc for proc, log in self.procs.started if log.stem == name)

    def log(self, name: str) -> str:
        return (self.directory / f"{name}.log").read_text(errors="replace")

    def close(self) -> dict[str, int | None]:
        """Stop and reap every process (:meth:`Processes.stop`); their exit codes by name."""
        return self.procs.stop()
