"""Dict graphs and delayed objects on the cluster (loaded when a graph is first submitted).

``Executor.get(dsk, keys)`` submits a whole dask-style graph at once: each key becomes one task
``run_task(computation, dependency_keys, *dependency_refs)`` whose dependencies are the tasks of
the keys it refers to. Only the requested keys get futures; the others are submitted as internal
keys that the scheduler forgets as soon as no pending task needs them, so a reduction over a large
graph frees its intermediates as it goes. Priorities come from :func:`meshpool.graph.order`
(depth-first, memory-friendly), after the executor's own ``priority`` option.

Graphs run on "the current executor" (``current.py``). Waiting for a graph's results inside a
task gives the task's slot back meanwhile (``future.wait_in_task``).
"""

from __future__ import annotations

import uuid
from typing import TYPE_CHECKING, Any

from ..graph import (
    collections_to_dsk,
    cull,
    flatten,
    order,
    pack_results,
    run_task,
    to_plain_graph,
    toposort,
    validate_keys,
)
from ..transport.header import BATCH_DEPENDENCIES
from .current import current_executor
from .future import Future, KeyRef, wait_in_task

if TYPE_CHECKING:
    from .executor import Executor

GRAPH_BATCH = 10_000  # tasks per submit message for large graphs


def submit_graph(executor: Executor, dsk: Any, keys: Any, priority: int = 0) -> dict[Any, Future]:
    """Submit the part of ``dsk`` that ``keys`` need; return a future per requested key."""
    dsk = to_plain_graph(dsk)
    validate_keys(dsk, keys)
    dependencies = cull(dsk, keys)
    graph = {k: dsk[k] for k in dependencies}
    ranks = order(graph, dependencies=dependencies)
    submission = toposort(graph, dependencies=dependencies)  # raises CycleError naming the keys
    wanted = set(flatten([keys]))
    token = f"graph-{uuid.uuid4().hex[:12]}"
    core = executor._core
    batch = next(core.counter)
    refs: dict[Any, Any] = {}
    futures: dict[Any, Future] = {}
    # An internal key is released once every task that needs it has been submitted (batches
    # go in dependency order): the scheduler forgets it as soon as those tasks are done, so a
    # huge graph frees its intermediates while the rest of it is still being submitted.
    unsubmitted = dict.fromkeys(graph, 0)  # dependents of each key not yet submitted
    for ds in dependencies.values():
        for d in ds:
            unsubmitted[d] += 1
    releasable: list = []
    rows: list = []
    frames: list = []
    new_futures: list[Future] = []
    batch_deps = 0  # dependency keys in this batch (see BATCH_DEPENDENCIES)
    with executor._shutdown_lock:
        executor._check_open()
        for key in submission:
            cluster_key = (token, key)
            deps = sorted(dependencies[key], key=repr)
            dep_refs = [refs[d] for d in deps]
            for d in deps:
                unsubmitted[d] -= 1
                if not unsubmitted[d] and d not in wanted:
                    releasable.append((token, d))
            row, task_frames = executor._prepare_task(
                run_task,
                (graph[key], deps, *dep_refs),
                {},
                dep_refs,
                None,
                cluster_key,
                (-priority, batch, ranks[key]),
                keep=key in wanted,  # (an internal key's client hears nothing when it ends)
            )
            if key in wanted:
                fut = refs[key] = futures[key] = Future(cluster_key, core)
                new_futures.append(fut)
            else:  # an internal key: no future; released once its dependents are submitted
                refs[key] = KeyRef(cluster_key)
            rows.append(row)
            frames.extend(task_frames)
            batch_deps += len(row[1])
            if len(rows) >= GRAPH_BATCH or batch_deps >= BATCH_DEPENDENCIES:
                executor._submit_rows(rows, frames, new_futures)
                rows, frames, new_futures, batch_deps = [], [], [], 0
                if releasable:
                    core.command("release-many", releasable)
                    releasable = []
        if rows:
            executor._submit_rows(rows, frames, new_futures)
        if releasable:
            core.command("release-many", releasable)
    return futures


def get(executor: Executor, dsk: Any, keys: Any, priority: int = 0, **kwargs: Any) -> Any:
    """Run a dict graph on the cluster; results shaped like ``dask.get``'s."""
    futures = submit_graph(executor, dsk, keys, priority)
    ordered = list(futures)
    pending = [futures[k] for k in ordered]
    wait_in_task(pending, None)  # inside a task: wait without holding the task's slot
    values = executor.gather(pending)
    return pack_results(keys, dict(zip(ordered, values, strict=True)))


def compute(executor: Executor, objs: tuple, priority: int = 0) -> list[Future]:
    dsk, keys = collections_to_dsk(list(objs))
    futures = submit_graph(executor, dsk, keys, priority)
    return [futures[k] for k in keys]


def module_get(dsk: Any, keys: Any, **kwargs: Any) -> Any:
    """``meshpool.get``: on the current executor, else with threads in this process."""
    from ..graph import get_local

    executor = current_executor()
    if executor is None:
        return get_local(dsk, keys, **kwargs)
    return executor.get(dsk, keys, **kwargs)
