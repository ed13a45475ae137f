"""Run a dict graph on a thread pool in this process: the reference scheduler, like dask.threaded.

Theory of operation
-------------------
``get_local(dsk, keys)`` does, in order:

1. normalise the graph (:func:`~meshpool.graph.dask_compat.to_plain_graph`: dask graphs work);
2. check the requested keys (``KeyError`` naming a missing one);
3. cull: keep only the keys the requested ones need, finding dependencies as it goes;
4. :func:`~meshpool.graph.order.order` them (``CycleError`` naming a cycle);
5. run: a heap of ready tasks by priority; at most ``num_workers`` tasks are in the pool at a
   time, so priority -- not submission order -- decides what runs next. The main thread alone
   touches the bookkeeping; pool threads only evaluate ``execute_task(comp, inputs)`` and report
   back through a queue. A result is dropped as soon as its last dependent has run, unless it
   was asked for;
6. shape the answer like ``dask.get``: :func:`pack_results`.

With one worker (and no ``pool``) the tasks run in the calling thread, in priority order.
A task's exception is raised to the caller as itself (with its traceback); tasks already running
are waited for, none is started after it.
"""

from __future__ import annotations

import heapq
import os
import queue
from collections.abc import Mapping
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from functools import partial
from typing import Any

from .core import Key, execute_task, flatten, get_dependencies, validate_keys
from .dask_compat import to_plain_graph
from .order import order


def pack_results(keys: Any, values_by_key: Mapping[Key, Any]) -> Any:
    """Shape results like ``dask.get``: a key gives its value, a list gives a tuple, recursively.

    >>> vals = {'a': 1, 'b': 2, ('x', 0): 3}
    >>> pack_results('a', vals), pack_results(['a', 'b'], vals), pack_results([['a', 'b'], ('x', 0)], vals)
    (1, (1, 2), ((1, 2), 3))
    """
    if isinstance(keys, list):
        return tuple(pack_results(k, values_by_key) for k in keys)
    return values_by_key[keys]


def cull(dsk: Mapping[Key, Any], keys: Any) -> dict[Key, set[Key]]:
    """The dependencies of every key that ``keys`` (a key or nested list) need, themselves included.

    >>> inc = lambda x: x + 1
    >>> cull({'a': 1, 'b': (inc, 'a'), 'c': (inc, 'a'), 'd': 2}, ['b']) == {'b': {'a'}, 'a': set()}
    True
    """
    deps: dict[Key, set[Key]] = {}
    work = list(flatten([keys]))
    while work:
        k = work.pop()
        if k in deps:
            continue
        deps[k] = d = get_dependencies(dsk, k)
        work.extend(d)
    return deps


def _run_inline(
    dsk: Mapping[Key, Any],
    deps: Mapping[Key, set[Key]],
    priority: Mapping[Key, int],
    wanted: set[Key],
) -> dict[Key, Any]:
    """Run every key of ``deps`` in the calling thread, in priority order."""
    remaining = {k: 0 for k in deps}
    for ds in deps.values():
        for d in ds:
            remaining[d] += 1
    results: dict[Key, Any] = {}
    for key in sorted(deps, key=priority.__getitem__):
        results[key] = execute_task(dsk[key], {d: results[d] for d in deps[key]})
        for d in deps[key]:
            remaining[d] -= 1
            if not remaining[d] and d not in wanted:
                del results[d]
    return results


def _report(done: queue.SimpleQueue[tuple[Key, Future[Any]]], key: Key, fut: Future[Any]) -> None:
    done.put((key, fut))


def _run_pool(
    dsk: Mapping[Key, Any],
    deps: Mapping[Key, set[Key]],
    priority: Mapping[Key, int],
    wanted: set[Key],
    pool: Executor,
    num_workers: int,
) -> dict[Key, Any]:
    """Run every key of ``deps`` on ``pool``, keeping at most ``num_workers`` tasks in it."""
    waiting = {k: len(ds) for k, ds in deps.items()}
    dependents: dict[Key, list[Key]] = {k: [] for k in deps}
    for k, ds in deps.items():
        for d in ds:
            dependents[d].append(k)
    remaining = {k: len(ts) for k, ts in dependents.items()}
    by_priority = {p: k for k, p in priority.items()}
    ready = [priority[k] for k, n in waiting.items() if n == 0]
    heapq.heapify(ready)
    done: queue.SimpleQueue[tuple[Key, Future[Any]]] = queue.SimpleQueue()
    results: dict[Key, Any] = {}
    in_flight = 0
    try:
        while ready or in_flight:
            while ready and in_flight < num_workers:
                key = by_priority[heapq.heappop(ready)]
                inputs = {d: results[d] for d in deps[key]}
                fut = pool.submit(execute_task, dsk[key], inputs)
                fut.add_done_callback(partial(_report, done, key))
                in_flight += 1
            key, fut = done.get()
            in_flight -= 1
            results[key] = fut.result()  # a task's exception is raised here, as itself
            for d in deps[key]:
                remaining[d] -= 1
                if not remaining[d] and d not in wanted:
                    del results[d]
            for t in dependents[key]:
                waiting[t] -= 1
                if not waiting[t]:
                    heapq.heappush(ready, priority[t])
    finally:
        while in_flight:  # let running tasks finish before returning or raising
            done.get()
            in_flight -= 1
    return results


def get_local(
    dsk: Any,
    keys: Any,
    num_workers: int | None = None,
    pool: Executor | None = None,
    **kwargs: Any,
) -> Any:
    """Compute ``keys`` (a key, or nested lists of keys) of a dict graph on local threads.

    ``num_workers`` threads (default: CPU count) of a private ``ThreadPoolExecutor``, or the
    given ``pool``. Other keyword arguments (dask passes some) are ignored.

    >>> inc = lambda x: x + 1
    >>> dsk = {'x': 1, 'y': (inc, 'x'), 'z': (sum, ['x', 'y'])}
    >>> get_local(dsk, 'z'), get_local(dsk, ['x', ['y', 'z']])
    (3, (1, (2, 3)))
    """
    dsk = to_plain_graph(dsk)
    validate_keys(dsk, keys)
    wanted = set(flatten([keys]))
    deps = cull(dsk, keys)
    priority = order({k: dsk[k] for k in deps}, deps)
    if num_workers is None:
        num_workers = getattr(pool, "_max_workers", None) or os.cpu_count() or 1
    if pool is None and num_workers <= 1:
        results = _run_inline(dsk, deps, priority, wanted)
    elif pool is not None:
        results = _run_pool(dsk, deps, priority, wanted, pool, max(num_workers, 1))
    else:
        with ThreadPoolExecutor(num_workers, thread_name_prefix="meshpool-local") as own:
            results = _run_pool(dsk, deps, priority, wanted, own, num_workers)
    return pack_results(keys, results)
