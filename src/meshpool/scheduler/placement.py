"""Placement: which ready task goes to which worker's slot, and how many a slot holds.

A ready task goes to the open worker where it can start earliest (queued work plus the input
bytes it lacks over :data:`BANDWIDTH`); slots hold a prefetch queue of about
:data:`PREFETCH_SECONDS` of work; dependents chain behind their inputs in a slot
(:meth:`Placement._chain`); leaves of a reduction go only to lean workers
(:meth:`Placement._lean`). Stealing is in ``recalls.py``.
"""

from __future__ import annotations

import collections
import heapq
import logging
import math
from collections.abc import Iterable
from typing import Any

from .. import messages as m
from .model import (
    MEMORY,
    NO_WORKER,
    PROCESSING,
    READY,
    WAITING,
    TaskState,
    WorkerState,
)
from .transitions import Transitions

logger = logging.getLogger("meshpool.scheduler")

BANDWIDTH = 500e6  # bytes/s assumed between workers, to weigh moving inputs against queueing
PREFETCH_SECONDS = 0.002  # a worker's queue beyond its threads covers about this much work
MAX_PREFETCH_PER_THREAD = 32  # ...but never more tasks than this per thread
# A task without inputs that feeds others (a leaf of a reduction) does not start on a worker
# holding this many more bytes awaiting dependents than the leanest worker (see _lean).
MAX_HELD_IMBALANCE = 24 * 2**20
# An idle worker steals a queued task only if that moves at most this many input bytes: more
# could cost longer than waiting for the busy worker (whose running task's length we don't know).
STEAL_MAX_BYTES = int(0.01 * BANDWIDTH)


class Placement(Transitions):
    def slot_capacity(self) -> int:
        """Tasks a slot may hold: the one it runs plus a prefetch queue covering a little work."""
        per_thread = PREFETCH_SECONDS / max(self._mean_duration, 1e-6)
        # no prefetch for tasks longer than the window: idle time is then a small share of the
        # task, and fewer tasks in flight keeps memory low on reductions
        return 1 + min(MAX_PREFETCH_PER_THREAD, int(per_thread))

    def _open_slot(self, ws: WorkerState, capacity: int) -> int:
        """The least loaded ready slot of ``ws`` with room, or -1."""
        best, best_len = -1, capacity
        for index in ws.ready_slots:
            length = len(ws.slots[index])
            if length < best_len and (length == 0 or not ws.blocked_count[index]):
                best, best_len = index, length
        return best

    @staticmethod
    def _room(ws: WorkerState, slot: int, capacity: int) -> int:
        """Tasks ``slot`` may hold: no prefetch while it has blocked tasks (module docstring)."""
        return 1 if ws.blocked_count[slot] else capacity

    def _fits(self, ts: TaskState, ws: WorkerState) -> bool:
        if ts.restrictions is None:
            return True
        names, resources = ts.restrictions
        if names is not None and ws.name not in names and ws.id not in names:
            return False
        if resources:
            for name, amount in resources.items():
                if ws.resources.get(name, 0) < amount:
                    return False
        return True

    def _has_room(self, ts: TaskState, ws: WorkerState) -> bool:
        resources = ts.restrictions[1] if ts.restrictions else None
        if resources:
            for name, amount in resources.items():
                if ws.used_resources.get(name, 0) + amount > ws.resources.get(name, 0):
                    return False
        return True

    def _lean(self, open_workers: set[WorkerState]) -> set[WorkerState]:
        """The open workers that may start a task without inputs feeding others.

        Such a task (a leaf of a reduction) makes a result that must wait for its siblings. If
        a worker stalls (a loaded machine deschedules it for 0.3 s), the others would run
        leaves far ahead of it, each keeping a stack of partial results that cannot combine
        until the stalled task ends: twice the memory. So a worker holding more than
        :data:`MAX_HELD_IMBALANCE` bytes awaiting dependents beyond the leanest worker runs only
        tasks that consume results; new leaves wait for a leaner worker. The imbalance, not the
        amount, is bounded: workers that keep pace never wait.
        """
        floor = min((w.waiting_nbytes for w in self.workers.values() if w.ready_slots), default=0)
        floor += MAX_HELD_IMBALANCE
        return {w for w in open_workers if w.waiting_nbytes <= floor}

    def _decide_worker(self, ts: TaskState, candidates: Iterable[WorkerState]) -> Any:
        best = None
        best_cost = math.inf
        duration = self._mean_duration
        for ws in candidates:
            if ts.restrictions is not None and not (self._fits(ts, ws) and self._has_room(ts, ws)):
                continue
            queued = len(ws.processing) - len(ws.blocked)
            cost = queued / len(ws.ready_slots or (0,)) * duration
            for dts in ts.dependencies:
                if ws not in dts.who_has:
                    cost += dts.nbytes / BANDWIDTH
            # ties (common: no inputs, or inputs split evenly) go to the worker holding less
            cost += ws.nbytes * 1e-18
            if cost < best_cost:
                best, best_cost = ws, cost
        return best

    def _dispatch(self) -> None:
        """Hand ready tasks, best priority first, to workers with room; then let idle slots
        steal queued ones."""
        if not self.workers:
            return
        if self._ready:
            self._dispatch_ready()
        self._steal()

    def _dispatch_ready(self) -> None:
        capacity = self.slot_capacity()
        open_workers = {ws for ws in self.workers.values() if self._open_slot(ws, capacity) >= 0}
        deferred = []
        while self._ready and open_workers:
            entry = heapq.heappop(self._ready)
            ts = entry[2]
            if ts.state != READY:
                continue
            candidates = open_workers
            if not ts.dependencies and ts.dependents and ts.restrictions is None:
                candidates = self._lean(open_workers)
                if not candidates:  # wait for a lean worker to have room (or to become lean)
                    deferred.append(entry)
                    break
            ws = self._decide_worker(ts, candidates)
            if ws is None:
                if not any(self._fits(ts, w) for w in self.workers.values()):
                    ts.state = NO_WORKER
                    self._no_worker.add(ts)
                    logger.warning(
                        "task %r waits: no worker fits its restrictions %s",
                        ts.key,
                        ts.restrictions,
                    )
                else:
                    deferred.append(entry)
                continue
            slot = self._open_slot(ws, capacity)
            self._assign(ts, ws, slot)
            self._chain(ws, slot, (ts,))  # (only ts is new in the slot: only its dependents)
            if self._open_slot(ws, capacity) < 0:
                open_workers.discard(ws)
        for entry in deferred:
            heapq.heappush(self._ready, entry)

    def _chain(self, ws: WorkerState, slot: int, new: Iterable[TaskState] | None = None) -> None:
        """Queue dependents right behind their inputs in a slot.

        A waiting task whose unfinished inputs are all queued in one slot can go to that slot
        now: slots run in order, so its inputs are in the worker's store when it starts. A chain
        ``x = submit(f, x)`` then runs without a scheduler round trip per link. A dependent queued
        this way whose input fails or is cancelled is withdrawn with CancelCompute.

        ``new``: the tasks just queued in the slot, when nothing else changed there (only their
        dependents can have become chainable); else every queued task's dependents are looked
        at (a task ended: its room may take a dependent refused before for lack of it).
        """
        queue = ws.slots[slot]
        capacity = self._room(ws, slot, self.slot_capacity())
        if len(queue) >= capacity:
            return
        # most queued tasks have no dependents, and in a reduction several share one: look at
        # each dependent once (rescanning every queued task's dependents after each dispatch
        # was a fifth of the scheduler's py-spy samples in a 30,000-task reduction)
        pending = collections.deque(ts for ts in (queue if new is None else new) if ts.dependents)
        refused: set[TaskState] = set()  # (until one of their inputs is chained here)
        while pending:
            for dep in pending.popleft().dependents:
                if dep.state != WAITING or dep in refused:
                    continue
                if len(queue) >= capacity:
                    return
                if not self._chainable(dep, ws, slot):
                    refused.add(dep)
                    continue
                self._assign(dep, ws, slot)
                if dep.dependents:
                    refused.difference_update(dep.dependents)
                    pending.append(dep)

    def _chainable(self, ts: TaskState, ws: WorkerState, slot: int) -> bool:
        if ts.restrictions is not None and not (self._fits(ts, ws) and self._has_room(ts, ws)):
            return False
        for dts in ts.waiting_on:
            if dts.state != PROCESSING or dts.processing_on is not ws or dts.slot != slot:
                return False
            if dts in ws.blocked:  # the slot runs other tasks before it finishes
                return False
        return True

    def _assign(self, ts: TaskState, ws: WorkerState, slot: int) -> None:
        ts.state = PROCESSING
        ts.processing_on = ws
        ts.slot = slot
        ws.sent[slot] += 1
        ts.seq = ws.sent[slot]
        ws.slots[slot].append(ts)
        ws.processing.add(ts)
        resources = ts.restrictions[1] if ts.restrictions else None
        if resources:
            for name, amount in resources.items():
                ws.used_resources[name] = ws.used_resources.get(name, 0) + amount
        deps = [
            (d.key, [w.address for w in d.who_has] if d.state == MEMORY else [ws.address])
            for d in ts.dependencies
        ]
        self._send(
            f"{ws.id}/{slot}", m.Compute(ts.key, ts.priority, deps, ts.options, ts.spec or ())
        )
