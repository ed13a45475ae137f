"""Which ``get`` runs ``compute()`` when none is named: a one-slot provider registry.

Theory of operation
-------------------
``graph`` must not import the executor, yet ``Delayed.compute()`` inside ``with Executor():``
should run on that executor. So :func:`get_scheduler` asks a *provider* at each call: a
zero-argument function returning the current executor's ``get(dsk, keys, **kw)`` or ``None``
when there is none, and falls back to :func:`~meshpool.graph.local.get_local` (threads in this
process). The default provider looks for ``meshpool.executor.current`` in ``sys.modules`` (it
imports nothing): loaded in every process that made an executor and in every worker, it answers
there, whichever of the two packages was imported first, and neither has to load the other at
start-up. :func:`set_get_provider` replaces it.

Named schedulers (``scheduler=`` of ``compute``) are resolved by :func:`resolve_scheduler`: a
callable is used as is, ``"threads"`` means ``get_local`` and ``"sync"`` runs in the calling
thread.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from functools import partial
from typing import Any

from .local import get_local

GetFunction = Callable[..., Any]
"""``get(dsk, keys, **kwargs) -> results shaped like keys``."""

GetProvider = Callable[[], "GetFunction | None"]


def _executor_get() -> GetFunction | None:
    """The default provider: the current executor's ``get``, if the executor is loaded."""
    current = sys.modules.get("meshpool.executor.current")
    return current.current_get() if current is not None else None


_provider: GetProvider | None = _executor_get


def set_get_provider(fn: GetProvider | None) -> GetProvider | None:
    """Install the function that supplies the default ``get``; return the previous one.

    >>> previous = set_get_provider(lambda: None)
    >>> get_scheduler() is get_local
    True
    >>> _ = set_get_provider(previous)
    """
    global _provider
    previous, _provider = _provider, fn
    return previous


def get_scheduler() -> GetFunction:
    """The provider's ``get`` if it offers one, else :func:`get_local`.

    >>> custom = lambda dsk, keys, **kw: 'custom'
    >>> previous = set_get_provider(lambda: custom)
    >>> get_scheduler() is custom
    True
    >>> _ = set_get_provider(previous)
    """
    provider = _provider
    if provider is not None:
        get = provider()
        if get is not None:
            return get
    return get_local


def resolve_scheduler(scheduler: GetFunction | str | None) -> GetFunction:
    """A ``get`` function from ``scheduler=``: callable, ``"threads"``, ``"sync"`` or ``None``.

    >>> resolve_scheduler("threads") is get_local
    True
    >>> resolve_scheduler("sync")({'a': 1}, 'a')
    1
    """
    if scheduler is None:
        return get_scheduler()
    if callable(scheduler):
        return scheduler
    if scheduler in ("threads", "threading", "local"):
        return get_local
    if scheduler in ("sync", "synchronous", "single-threaded"):
        return partial(get_local, num_workers=1)
    raise ValueError(f"unknown scheduler {scheduler!r}: pass a get function, 'threads' or 'sync'")
