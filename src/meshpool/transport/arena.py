"""A worker's arena: shared-memory pages made ahead, by a process that only idle CPUs run.

The first big transfer out of a fresh worker used to pay for new tmpfs pages as it copied: on
this project's VM, 200 MB took ~110 ms to copy into new pages against ~45 ms into pages made
before, and far more when the host is busy (BENCHMARKS.md, session 6). So a registered worker
that has been idle for :data:`SETTLE` seconds (and, outside a local cluster, has moved data
through shared memory: only peers on its host could use the arena) registers one free segment of :func:`arena_bytes`
in its :class:`~meshpool.transport.shmpool.SegmentPool` and has its pages made in the
background::

    worker idle SETTLE s ─▶ pool.add_arena(size) ─▶ posix_spawn(python -S -c MAKE_PAGES path)
                                                    ─▶ sched_setscheduler(child, SCHED_IDLE)
    child                ─▶ maps the file, madvise(MADV_POPULATE_WRITE) a chunk at a time, exits
    worker tick          ─▶ waitpid(WNOHANG): exited ─▶ pool.arena_made(path, exit code == 0)
    worker close         ─▶ SIGKILL the child if it still runs, reap it

How it stays out of everyone's way:

- Idle first: on this VM any process using spare CPU, even at ``SCHED_IDLE``, made a busy
  cluster's slowest round trips slower (p99 of 1,000 round trips right after start: ~2.7 ms
  with the arena made at registration, ~1.5 ms without; a spinning ``SCHED_IDLE`` process did
  the same). So the arena waits until the worker has started no task for :data:`SETTLE` s.
- ``SCHED_IDLE``: the kernel runs the child (its interpreter's start-up too) only on a CPU
  nothing else wants. The child is set so by the worker, as soon as it exists: ``posix_spawn``
  takes only the classic policies (glibc refuses ``SCHED_IDLE`` there).
- A process, not a thread: populating a mapping holds its process's memory-map lock, which the
  worker's own ``mmap`` calls then wait for (start-up took ~50 ms longer with a thread here),
  and an idle-priority thread would take the worker's GIL at idle priority.
- Memory: the child's mapping goes with it, so the pages count in no process's RSS until a
  transfer maps them; a worker's memory limit sees nothing new. By default a worker per CPU
  holds ~3 % of RAM in arenas, and an arena free for ten minutes is removed (``ARENA_IDLE``).
- Data: populating changes no data, so a transfer may take the arena while its pages are being
  made (the pool's :func:`~meshpool.transport.shmpool._allocate` makes what it needs first), and
  /dev/shm running full is an error in the child, never a SIGBUS.

``MESHPOOL_SHM_ARENA`` sets the size in bytes; ``0`` turns it off. Linux 5.14 or later (older
kernels refuse ``MADV_POPULATE_WRITE``: the arena is dropped and transfers work as before).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys

from . import shm
from .shmpool import MADV_POPULATE_WRITE, SegmentPool, pool_bytes

logger = logging.getLogger("meshpool.arena")

ARENA_BYTES = 256 << 20  # the default size, where memory allows
ARENA_ENV = "MESHPOOL_SHM_ARENA"
RAM_SHARE = 32  # by default at most this fraction of RAM per CPU (a worker per CPU: ~3 %)
SETTLE = 1.0  # seconds a worker has started no task before it makes its arena


def arena_bytes() -> int:
    """``MESHPOOL_SHM_ARENA``, or :data:`ARENA_BYTES` but at most the pool's bytes and a
    thirty-second of RAM per CPU (16 GiB and 8 CPUs: 64 MiB each, 512 MiB for 8 workers)."""
    try:
        return max(0, int(os.environ[ARENA_ENV]))
    except (KeyError, ValueError):
        pass
    try:
        ram = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return 0
    return min(ARENA_BYTES, pool_bytes(), ram // (RAM_SHARE * (os.cpu_count() or 1)))


# (a chunk at a time: a woken task preempts an idle-priority one only once it is back from the
# kernel, or at the next tick, 4 ms here; one madvise over the whole arena delayed round trips
# of a busy cluster by that much)
CHUNK = 64 << 10
MAKE_PAGES = (  # (quiet when the worker removed the file first: it closed, or trimmed)
    "import mmap, os, sys\n"
    "try:\n"
    "    fd = os.open(sys.argv[1], os.O_RDWR)\n"
    "    m = mmap.mmap(fd, os.fstat(fd).st_size, flags=mmap.MAP_SHARED)\n"
    f"    for offset in range({shm.HEADER}, len(m), {CHUNK}):\n"
    f"        m.madvise({MADV_POPULATE_WRITE}, offset, min({CHUNK}, len(m) - offset))\n"
    "except OSError:\n"
    "    sys.exit(1)\n"
)


def _shm_used() -> bool:
    counts = shm.statistics()
    return bool(counts["sent"] or counts["received"])


class Arena:
    """The arena of one worker's pool, from its registration to its close (loop thread only)."""

    def __init__(self, pool: SegmentPool, now: float, local: bool) -> None:
        self.pool = pool
        self.local = local  # in a local cluster: its client and peers share our host
        self.path: str | None = None
        self.pid = 0  # the child making its pages, while it runs
        self.tried = False
        self._tasks_seen = 0
        self._quiet_since = now

    def tick(self, now: float, tasks_started: int, busy: bool) -> None:
        """On a registered worker's tick, until :attr:`tried`: start once it has been idle for
        :data:`SETTLE` s (``tasks_started`` counts the tasks its slots took, ``busy`` whether one
        runs now) and, outside a local cluster, has moved data through shared memory (a worker
        alone on its host would never use the arena)."""
        if busy or tasks_started != self._tasks_seen:
            self._tasks_seen = tasks_started
            self._quiet_since = now
        elif now - self._quiet_since >= SETTLE and (self.local or _shm_used()):
            self.start()

    def start(self) -> bool:
        """Register the arena and start making its pages (once); False if it is off or cannot
        be."""
        if self.tried:
            return False
        self.tried = True
        size = arena_bytes()
        if size < shm.THRESHOLD or not shm.host_key():
            return False
        self.path = self.pool.add_arena(size)
        if self.path is None:
            return False
        try:
            self.pid = os.posix_spawn(
                sys.executable,
                [sys.executable, "-S", "-c", MAKE_PAGES, self.path],
                {},
                setsigdef=(signal.SIGINT, signal.SIGTERM),
            )
        except (OSError, AttributeError, NotImplementedError) as exc:  # (not Linux)
            logger.debug("no arena: %s", exc)
            self.pool.arena_made(self.path, False)
            return False
        with contextlib.suppress(AttributeError, OSError):
            os.sched_setscheduler(self.pid, os.SCHED_IDLE, os.sched_param(0))
        return True

    def poll(self) -> None:
        """On the worker's tick: note the arena made once its child is done."""
        if not self.pid:
            return
        try:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
        except ChildProcessError:  # (reaped by someone else: its outcome is unknown)
            pid, status = self.pid, -1
        if pid:
            self.pid = 0
            made = status == 0  # (a normal exit with code 0)
            self.pool.arena_made(self.path or "", made)

    def stop(self) -> None:
        """At the worker's close: the child stops (the pool removes the file)."""
        if self.pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(self.pid, 0)
            self.pid = 0
