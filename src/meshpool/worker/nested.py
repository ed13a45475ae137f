"""Tasks that submit tasks: the executor a task sees as ``meshpool.current_executor()``.

Theory of operation::

    task on a slot thread ── current_executor() ──▶ the task's handle ─┐ one client per worker
    another task ──────────── current_executor() ──▶ its own handle ───┴▶ process (made on first
                                                      use): DEALER ──▶ the scheduler's ROUTER
    task ── fut.result() ──▶ future.task_wait_hook ──▶ Slot.block_on (execution.py): the slot
                                                      runs other tasks while this one waits

:func:`install` runs once in a worker process. It points ``executor.current._task_executor`` at a
:class:`TaskExecutorFactory` and ``executor.future.task_wait_hook`` at the slots' waiting code, so
``submit``/``map``/``meshpool.get``/``delayed(...).compute()`` inside a task run on the same
cluster, and waiting for them never holds an execution slot.

Handles: the worker process keeps one remote-mode client (:class:`TaskExecutor`, one connection
and one I/O thread) for all its tasks; each task gets its own *handle* on it (a view sharing the
client), made on its first ``current_executor()``. ``shutdown()`` on a handle waits for the tasks
submitted through it (``wait=True``, giving the slot back meanwhile) or cancels them
(``cancel_futures=True``) and closes that handle only: never the cluster, and never the
connection other tasks of the process are using (a ``with current_executor() as ex:`` block in
one task must not break its neighbours). The task's next ``current_executor()`` is a fresh
handle. Outside tasks (threads a task started) ``current_executor()`` is the shared client itself.

Priorities: a task submitted from a task ranks one step above the task submitting it (unless
given a priority explicitly). A task tree therefore runs depth-first, children before the
siblings of their parents, which keeps the number of tasks waiting at once near the tree's depth
times the thread count, instead of its width (breadth-first order would start every internal
node of the tree before the first leaf finished).
"""

from __future__ import annotations

import math
import threading
from typing import TYPE_CHECKING, TypeGuard

from ..executor import current as _current  # (loaded: compute() runs on the cluster)
from ..executor import future as _future
from ..transport.security import Security
from . import execution
from .execution import current_task, current_task_priority, wait_in_slot

if TYPE_CHECKING:
    from .task_executor import TaskExecutor


def child_priority() -> int:
    """At least one priority step above the running task's (the scheduler's priorities are
    ``(-priority, ...)``); 0 outside a task."""
    parent = current_task_priority()
    first = parent[0] if isinstance(parent, tuple) and parent else None
    if isinstance(first, (int, float)) and math.isfinite(first):
        return 1 - math.floor(first)
    return 0


class TaskExecutorFactory:
    """``current_executor()`` inside a worker: the running task's handle on the process's
    :class:`TaskExecutor` (both made on first use, and again after a ``shutdown()``)."""

    def __init__(self, scheduler_address: str, security: Security | None) -> None:
        self.scheduler_address = scheduler_address
        self.security = security
        self._lock = threading.Lock()
        self._executor: TaskExecutor | None = None

    def __call__(self) -> TaskExecutor:
        client = self._client()
        task = current_task()
        if task is None:
            return client
        handle = task.handle
        if handle is None or handle._shutdown or handle._shared is not client:
            handle = task.handle = client.handle()
        return handle

    def _client(self) -> TaskExecutor:
        """The process's client; thread-safe; a new one if it was shut down or broke."""
        executor = self._executor
        if _usable(executor):
            return executor
        with self._lock:
            executor = self._executor
            if not _usable(executor):
                from .task_executor import TaskExecutor  # a whole client: not loaded at start

                executor = TaskExecutor(self.scheduler_address, security=self.security)
                self._executor = executor
        return executor

    def barrier(self, timeout: float | None) -> None:
        """The scheduler has seen this process's submissions (before a task frees its slot)."""
        executor = self._executor
        if _usable(executor):
            try:
                executor.barrier(executor._core.timeout if timeout is None else timeout)
            except Exception:  # only an ordering hint: never fail the waiting task for it
                pass


def install(scheduler_address: str, security: Security | None) -> None:
    """Make tasks in this (worker) process submit to, and wait on, their own cluster."""
    factory = TaskExecutorFactory(scheduler_address, security)
    _current._task_executor = factory
    _future.task_wait_hook = wait_in_slot
    execution.submissions_barrier = factory.barrier


def _usable(executor: TaskExecutor | None) -> TypeGuard[TaskExecutor]:
    return executor is not None and not executor._shutdown and executor._core.broken is None
