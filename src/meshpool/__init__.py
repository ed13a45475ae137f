"""meshpool: a concurrent.futures executor over a pool of worker processes, one machine or many.

>>> import meshpool
>>> with meshpool.Executor(2) as ex:           # doctest: +SKIP
...     print(ex.submit(pow, 2, 10).result())
1024

The top level imports lazily, so ``import meshpool.graph`` never pulls in zmq.
"""

from __future__ import annotations

import importlib
from typing import Any

from ._version import __version__

_EXPORTS = {
    "Executor": "meshpool.executor.executor",
    "ExecutorOptions": "meshpool.executor.executor",
    "ExecutorStatistics": "meshpool.executor.executor",
    "Future": "meshpool.executor.future",
    "as_completed": "meshpool.executor.waiting",
    "wait": "meshpool.executor.waiting",
    "FIRST_COMPLETED": "meshpool.executor.waiting",
    "FIRST_EXCEPTION": "meshpool.executor.waiting",
    "ALL_COMPLETED": "meshpool.executor.waiting",
    "Security": "meshpool.transport.security",
    "current_executor": "meshpool.executor.current",
    "get": "meshpool.executor.graphs:module_get",
    "compute": "meshpool.graph",
    "delayed": "meshpool.graph",
    "Delayed": "meshpool.graph",
    "visualize": "meshpool.graph",
    "progress": "meshpool.progressbar",
    "MeshpoolError": "meshpool.errors",
    "RemoteError": "meshpool.errors",
    "SerializationError": "meshpool.errors",
    "KilledWorker": "meshpool.errors",
    "WorkerLost": "meshpool.errors",
    "DataLost": "meshpool.errors",
    "SchedulerLost": "meshpool.errors",
    "WorkerStartError": "meshpool.errors",
    "InitializerFailed": "meshpool.errors",
    "CommError": "meshpool.errors",
    "SecurityError": "meshpool.errors",
    "VersionMismatch": "meshpool.errors",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    target = _EXPORTS.get(name)
    if target is None:
        raise AttributeError(f"module 'meshpool' has no attribute {name!r}")
    module, _, attribute = target.partition(":")
    value = getattr(importlib.import_module(module), attribute or name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
