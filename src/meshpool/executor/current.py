"""The current executor: the one ``meshpool.get``, ``compute()`` and ``current_executor()`` use.

It is, in order: inside a task, the worker's handle to its own cluster (:data:`_task_executor`, a
factory ``worker/nested.py`` installs in worker processes); else the innermost ``with
Executor()`` block; else the most recently created executor still running; else none
(``meshpool.get``/``compute`` then use threads in this process).

This module imports nothing heavy, so that neither a caller creating an Executor nor a worker
starting up loads the graph package (``graphs.py`` is loaded when a graph is first submitted).
``meshpool.graph.scheduling`` finds :func:`current_get` here by itself, through ``sys.modules``,
once this module is loaded.
"""

from __future__ import annotations

import contextvars
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .executor import Executor

_current: contextvars.ContextVar[Executor | None] = contextvars.ContextVar(
    "meshpool_current_executor", default=None
)
_recent: list[weakref.ref] = []
# Set inside worker processes (tasks that submit tasks): returns the worker's client of its own
# cluster, made on first use.
_task_executor: Callable[[], Executor] | None = None


def register(executor: Executor) -> None:
    # only executors still usable count towards the cap: 32 executors made and shut down after
    # a long-lived one must not push it out (it would stop being "current")
    _recent[:] = [ref for ref in _recent if _usable(ref())]
    _recent.append(weakref.ref(executor))
    del _recent[:-32]


def enter(executor: Executor) -> contextvars.Token:
    return _current.set(executor)


def leave(token: contextvars.Token) -> None:
    try:
        _current.reset(token)
    except ValueError:  # left in another context (e.g. another task): just clear
        _current.set(None)


def _usable(executor: Executor | None) -> bool:
    return executor is not None and not executor._shutdown and executor._core.broken is None


def current_executor() -> Executor | None:
    """The executor ``meshpool.get``/``compute`` use here, or None."""
    if _task_executor is not None:
        return _task_executor()
    executor = _current.get()
    if _usable(executor):
        return executor
    for ref in reversed(_recent):
        executor = ref()
        if _usable(executor):
            return executor
    return None


def current_get() -> Any:
    """The current executor's ``get``, or None: what ``compute()`` runs on by default."""
    executor = current_executor()
    return executor.get if executor is not None else None
