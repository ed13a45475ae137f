"""The client a worker process's tasks submit through (``worker/nested.py`` explains the design).

Kept apart from ``nested.py`` because it is a whole ``Executor`` (client, graphs, the graph
package): a worker imports it only when a task first calls ``current_executor()``, not at start.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable
from concurrent import futures as cf
from typing import Any

from .. import messages as m
from ..executor.executor import Executor
from ..executor.future import wait_in_task
from .execution import note_submission
from .nested import child_priority


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
