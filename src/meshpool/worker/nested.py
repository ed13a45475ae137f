"""Tasks that submit tasks: the executor a task sees as ``meshpool.current_executor()``.

Theory of operation::

    task on a slot thread ── current_executor() ──▶ the task's handle ─┐ one client per worker
    another task ──────────── current_executor() ──▶ its own handle ───┴▶ process (made on first
                                                      use): DEALER ──▶ the scheduler's ROUTER
    task ── fut.result() ──▶ future.task_wait_hook ──▶ Slot.block_on (execution.py): the slot
                                                      runs other tasks while this one waits

:func:`install` runs once in a worker process. It points ``executor.graphs._task_executor`` at a
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
import weakref
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
from .execution import current_task, current_task_priority, note_submission, wait_in_slot


class TaskExecutor(Executor):
    """A client of the worker's own cluster whose tasks rank above the task submitting them;
    or, made by :meth:`handle`, one task's view of that client."""

    _shared: TaskExecutor | None = None  # set on a task's handle: the client it is a view of
    _submitted: weakref.WeakSet | None = None  # a handle's own futures, for its shutdown()

    def handle(self) -> TaskExecutor:
        """A view for one task: this client's connection and I/O thread, its own shutdown."""
        view = object.__new__(TaskExecutor)
        view.__dict__.update(self.__dict__)  # the lock too: one FunctionCache, used under it
        view._shutdown = False
        view._context_tokens = []
        view._shared = self
        view._submitted = weakref.WeakSet()
        return view

    def _prepare(self, fn: Any, args: tuple, kwargs: dict, options: dict | None) -> tuple:
        if options is None or "priority" not in options:
            options = dict(options or {}, priority=child_priority())
        note_submission()
        prepared = super()._prepare(fn, args, kwargs, options)
        if self._submitted is not None:
            self._submitted.add(prepared[0])
        return prepared

    def get(self, dsk: Any, keys: Any, **kwargs: Any) -> Any:
        kwargs.setdefault("priority", child_priority())
        note_submission()
        return super().get(dsk, keys, **kwargs)

    def compute(self, obj: Any, *more: Any, priority: int | None = None) -> Any:
        note_submission()
        result = super().compute(
            obj, *more, priority=child_priority() if priority is None else priority
        )
        if self._submitted is not None:
            self._submitted.update(result if more else [result])
        return result

    def gather(self, futures: Iterable[cf.Future], timeout: float | None = None) -> list:
        futures = list(futures)
        timeout = wait_in_task(futures, timeout)  # Executor.gather waits with cf.wait
        return super().gather(futures, timeout)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Close this handle, never the cluster (see the module docstring)."""
        if self._submitted is None:  # the shared client (used outside tasks)
            self._shutdown_client(wait, cancel_futures)
            return
        with self._shutdown_lock:
            self._shutdown = True
        own = [f for f in list(self._submitted) if not f.done()]
        if cancel_futures:
            for fut in own:
                fut.cancel()
        elif wait and own:
            cf.wait(own, wait_in_task(own, None))

    def _shutdown_client(self, wait: bool, cancel_futures: bool) -> None:
        """Close the connection. Waiting for its pending tasks first gives the calling task's
        slot back, like ``result()`` (the base class joins the I/O thread)."""
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
    """``current_executor()`` inside a worker: the running task's handle on the process's
    :class:`TaskExecutor` (both made on first use, and again after a ``shutdown()``)."""

    def __init__(self, scheduler_address: str, security: Security | None) -> None:
        self.scheduler_address = scheduler_address
        self.security = security
        self._lock = threading.Lock()
        self._executor: TaskExecutor | None = None

    def __call__(self) -> Executor:
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
