"""Run a dict graph on a thread pool in this process: the reference scheduler, like dask.threaded.

Theory of operation
-------------------
``get_local(dsk, keys)`` does, in order:

1. normalise the graph (:func:`~meshpool.graph.dask_compat.to_plain_graph`: dask graphs work);
2. check the requested keys (``KeyError`` naming a missing one);
3. cull: keep only the keys the requested ones need, finding dependencies as it goes;
4. :func:`~meshpool.graph.order.order` them (``CycleError`` naming a cycle);
5. run: ``num_workers`` *worker loops* go to the pool. They share a heap of ready tasks and
   the bookkeeping under one lock: each takes the ready task of smallest priority, evaluates
   ``execute_task(comp, inputs)`` without the lock, then records the result, drops inputs that
   no remaining task needs (unless asked for) and readies dependents. Finishing a task and
   starting the next happen in the same thread -- no round trip through a coordinating thread
   per task, which made small tasks ~6x slower -- and idle loops sleep on a condition;
6. shape the answer like ``dask.get``: :func:`pack_results`.

With one worker (and no ``pool``) the single loop runs in the calling thread, so tasks run
exactly in priority order. A task's exception is raised to the caller as itself (with its
traceback); tasks already running are waited for, none is started after it. Do not pass a
``pool`` that the graph's own tasks also use for nested ``get_local`` calls: the loops of the
outer call hold its threads.
"""

from __future__ import annotations

import heapq
import os
import threading
from collections.abc import Mapping
from concurrent.futures import Executor, ThreadPoolExecutor
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


class _Run:
    """The state of one ``get_local`` call, shared by its worker loops under one lock.

    Each worker loop takes the ready task of smallest priority, runs it without the lock,
    then records the result, frees inputs nobody needs any more and readies dependents. The
    bookkeeping happens in the thread that ran the task: no hop through a coordinating thread,
    and one loop running alone follows the priorities exactly.
    """

    def __init__(
        self,
        dsk: Mapping[Key, Any],
        deps: Mapping[Key, set[Key]],
        priority: Mapping[Key, int],
        wanted: set[Key],
    ) -> None:
        self.dsk = dsk
        self.deps = deps
        self.priority = priority
        self.wanted = wanted
        self.waiting = {k: len(ds) for k, ds in deps.items()}
        self.dependents: dict[Key, list[Key]] = {k: [] for k in deps}
        for k, ds in deps.items():
            for d in ds:
                self.dependents[d].append(k)
        self.remaining = {k: len(ts) for k, ts in self.dependents.items()}
        self.by_priority = {p: k for k, p in priority.items()}
        self.ready = sorted(priority[k] for k, n in self.waiting.items() if n == 0)  # a heap
        self.results: dict[Key, Any] = {}
        self.left = len(deps)  # tasks not finished
        self.error: BaseException | None = None
        self.stop = False
        self.cond = threading.Condition(threading.Lock())

    def worker_loop(self) -> None:
        """Run tasks until all are done, one failed, or ``stop`` is set."""
        cond, ready, results = self.cond, self.ready, self.results
        key: Key = None
        value: Any = None
        with cond:
            while True:
                if key is not None:  # record the task just run
                    self.left -= 1
                    results[key] = value
                    for d in self.deps[key]:
                        self.remaining[d] -= 1
                        if not self.remaining[d] and d not in self.wanted:
                            del results[d]
                    woken = 0
                    for t in self.dependents[key]:
                        self.waiting[t] -= 1
                        if not self.waiting[t]:
                            heapq.heappush(ready, self.priority[t])
                            woken += 1
                    if woken > 1:
                        cond.notify(woken - 1)  # this thread takes one itself
                    key = value = None
                if self.error is not None or self.stop or not self.left:
                    cond.notify_all()
                    return
                if not ready:
                    cond.wait()
                    continue
                key = self.by_priority[heapq.heappop(ready)]
                inputs = {d: results[d] for d in self.deps[key]}
                failure: BaseException | None = None
                cond.release()
                try:
                    value = execute_task(self.dsk[key], inputs)
                except BaseException as e:  # KeyboardInterrupt too: re-raised by get_local
                    failure = e
                finally:
                    del inputs
                    cond.acquire()
                if failure is not None:
                    if self.error is None:
                        self.error = failure
                    cond.notify_all()
                    return

    def halt(self) -> None:
        with self.cond:
            self.stop = True
            self.cond.notify_all()


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
    run = _Run(dsk, deps, priority, wanted)
    if pool is None and num_workers <= 1:
        run.worker_loop()
    elif pool is not None:
        _run_on(pool, run, num_workers)
    else:
        with ThreadPoolExecutor(num_workers, thread_name_prefix="meshpool-local") as own:
            _run_on(own, run, num_workers)
    if run.error is not None:
        raise run.error  # a task's exception, as itself, with its traceback
    return pack_results(keys, run.results)


def _run_on(pool: Executor, run: _Run, num_workers: int) -> None:
    """Run ``num_workers`` worker loops on ``pool`` and wait for them."""
    loops = [pool.submit(run.worker_loop) for _ in range(max(num_workers, 1))]
    try:
        for loop in loops:
            loop.result()
    finally:
        run.halt()  # after KeyboardInterrupt: start no more tasks
