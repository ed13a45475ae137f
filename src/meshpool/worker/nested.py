"""Tasks that submit tasks: the executor a task sees as ``meshpool.current_executor()``.

Theory of operation::

    task on a slot thread ── current_executor() ──▶ TaskExecutor (one per worker process, made
                                                    on first use): a plain remote-mode client
                                                    DEALER ──▶ the scheduler's ROUTER
    task ── fut.result() ──▶ future.task_wait_hook ──▶ Slot.block_on (execution.py): the slot
                                                    runs other tasks while this one waits

:func:`install` runs once in a worker process. It points ``executor.graphs._task_executor`` at a
:class:`TaskExecutorFactory` and ``executor.future.task_wait_hook`` at the slots' waiting code, so
``submit``/``map``/``meshpool.get``/``delayed(...).compute()`` inside a task run on the same
cluster, and waiting for them never holds an execution slot.

The handle is just a client: ``shutdown()`` on it closes its own connection (pending futures of
its own finish first), never the cluster; the next ``current_executor()`` makes a fresh one.

Priorities: a task submitted from a task ranks one step above the task submitting it (unless
given a priority explicitly). A task tree therefore runs depth-first, children before the
siblings of their parents, which keeps the number of tasks waiting at once near the tree's depth
times the thread count, instead of its width (breadth-first order would start every internal
node of the tree before the first leaf finished).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterable
from concurrent import futures as cf
from typing import Any

from .. import messages as m
from ..executor import future as _future
from ..executor import graphs as _graphs
from ..executor.executor import Executor
from ..executor.future import wait_in_task
from ..transport.security import Security
from . import execution
from .execution import current_task_priority, note_submission, wait_in_slot


class TaskExecutor(Executor):
    """A client of the worker's own cluster whose tasks rank above the task submitting them."""

    def _prepare(self, fn: Any, args: tuple, kwargs: dict, options: dict | None) -> tuple:
        if options is None or "priority" not in options:
            options = dict(options or {}, priority=child_priority())
        note_submission()
        return super()._prepare(fn, args, kwargs, options)

    def get(self, dsk: Any, keys: Any, **kwargs: Any) -> Any:
        kwargs.setdefault("priority", child_priority())
        note_submission()
        return super().get(dsk, keys, **kwargs)

    def compute(self, obj: Any, *more: Any, priority: int | None = None) -> Any:
        note_submission()
        return super().compute(
            obj, *more, priority=child_priority() if priority is None else priority
        )

    def gather(self, futures: Iterable[cf.Future], timeout: float | None = None) -> list:
        futures = list(futures)
        timeout = wait_in_task(futures, timeout)  # Executor.gather waits with cf.wait
        return super().gather(futures, timeout)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Close this handle, never the cluster. Waiting for its pending tasks first gives the
        calling task's slot back, like ``result()`` (the base class joins its I/O thread)."""
        if wait and not cancel_futures and not self._shutdown and self._core.broken is None:
            try:
                self.barrier(self._core.timeout)  # the I/O thread has taken in every submit
            except Exception:  # broken meanwhile: nothing left to wait for
                pass
            wait_in_task(list(self._core.pending.values()), None)
        super().shutdown(wait, cancel_futures=cancel_futures)

    def barrier(self, timeout: float | None) -> None:
        """Return once the scheduler has handled everything this client sent so far."""
        self._core.request(m.Ping, timeout)


def child_priority() -> int:
    """At least one priority step above the running task's (the scheduler's priorities are
    ``(-priority, ...)``); 0 outside a task."""
    parent = current_task_priority()
    first = parent[0] if isinstance(parent, tuple) and parent else None
    if isinstance(first, (int, float)) and math.isfinite(first):
        return 1 - math.floor(first)
    return 0


class TaskExecutorFactory:
    """``current_executor()`` inside a worker: the process's :class:`TaskExecutor`, made on
    first use (thread-safe) and again after a ``shutdown()``."""

    def __init__(self, scheduler_address: str, security: Security | None) -> None:
        self.scheduler_address = scheduler_address
        self.security = security
        self._lock = threading.Lock()
        self._executor: TaskExecutor | None = None

    def __call__(self) -> Executor:
        executor = self._executor
        if executor is not None and _graphs._usable(executor):
            return executor
        with self._lock:
            executor = self._executor
            if executor is None or not _graphs._usable(executor):
                executor = TaskExecutor(self.scheduler_address, security=self.security)
                self._executor = executor
        return executor

    def barrier(self, timeout: float | None) -> None:
        """The scheduler has seen this process's submissions (before a task frees its slot)."""
        executor = self._executor
        if executor is not None and _graphs._usable(executor):
            try:
                executor.barrier(executor._core.timeout if timeout is None else timeout)
            except Exception:  # only an ordering hint: never fail the waiting task for it
                pass


def install(scheduler_address: str, security: Security | None) -> None:
    """Make tasks in this (worker) process submit to, and wait on, their own cluster."""
    factory = TaskExecutorFactory(scheduler_address, security)
    _graphs._task_executor = factory
    _future.task_wait_hook = wait_in_slot
    execution.submissions_barrier = factory.barrier
