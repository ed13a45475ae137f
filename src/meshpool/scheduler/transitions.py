"""How a task moves between states, and what the scheduler sends when it does.

The base of ``state.SchedulerState``: readying, failing, cancelling and forgetting tasks,
who holds which result (and how much of it pending tasks still need), and the outgoing
messages of one step (FreeKeys batched per worker, sent to a slot: :meth:`Transitions._free`).
"""

from __future__ import annotations

import heapq
import logging
from typing import Any

from .. import messages as m
from .model import (
    _EMPTY,
    _FINISHED,
    CANCELLED,
    ERRED,
    MEMORY,
    NO_WORKER,
    PROCESSING,
    READY,
    WAITING,
    Outgoing,
    TaskState,
    WorkerState,
    _error_frames,
    _with,
    _without,
)

logger = logging.getLogger("meshpool.scheduler")

FREE_LATER_BYTES = 1024 * 1024  # keys up to this size may wait for their slot's task to end


class Transitions:
    """The state-changing rules every handler shares (see ``state.py`` for the whole)."""

    tasks: dict[Any, TaskState]
    workers: dict[str, WorkerState]
    clients: set[str]
    initializers: list[list]
    killed_worker_limit: int
    _ready: list
    _seq: int
    _no_worker: set[TaskState]
    _thieves: set[tuple[str, int]]
    _mean_duration: float
    _from_slot: int
    _retired: set[str]
    _out: Outgoing
    _frees: dict[str, m.FreeKeys]
    _frees_told_control: set[str]
    _homeless: dict[Any, tuple[TaskState, WorkerState | None]]

    # defined further up the chain (recalls.py, placement.py, state.py)
    def _end_recall(self, ts: TaskState, cancelled: list[TaskState]) -> None:
        raise NotImplementedError

    def _steal(self) -> None:
        raise NotImplementedError

    def remove_worker(
        self,
        worker_id: str,
        reason: str = "connection lost",
        blame: bool = True,
        running: list[int] | None = None,
    ) -> Outgoing:
        raise NotImplementedError

    def _push_ready(self, ts: TaskState) -> None:
        ts.state = READY
        self._seq += 1
        heapq.heappush(self._ready, (ts.priority, self._seq, ts))

    def _make_ready_or_wait(self, ts: TaskState) -> None:
        """Put a task back to be scheduled, first recomputing inputs that were lost.

        Lineage is bounded: a result is kept recomputable only while something references it
        (a client's future or a pending dependent). An input already released cannot be
        recomputed, so a task that needs it again fails with DataLost instead of waiting
        forever; ``x = submit(step, x)`` looped a million times thus keeps memory flat.
        """
        ts.state = WAITING
        for dts in ts.dependencies:
            if self.tasks.get(dts.key) is not dts:
                self._fail(
                    ts,
                    _error_frames(
                        "DataLost",
                        f"{ts.key!r} must be recomputed, but its input {dts.key!r} was "
                        "released already (lineage is kept only while a result is "
                        "referenced; keep the input's future to keep it recomputable)",
                    ),
                )
                return
        ts.waiting_on = {d for d in ts.dependencies if d.state != MEMORY} or _EMPTY
        for dts in ts.waiting_on:
            if dts.state not in (WAITING, READY, PROCESSING, NO_WORKER):
                self._data_lost(dts, None)
        if ts.state == WAITING and not ts.waiting_on:
            self._push_ready(ts)

    def _data_lost(self, ts: TaskState, ws: WorkerState | None) -> None:
        """A result has no holder left (or data a client sent never arrived): recompute it, or
        have its client send it again, if anything still needs it; else DataLost."""
        needed = ts.wanted_by or ts.waiters
        if not needed:
            self._forget(ts)
            return
        if ts.spec is None:
            ts.state = WAITING  # out of MEMORY, or _fail would take it for finished and skip it
            if not self._resend(ts, ws):
                self._fail(ts, _error_frames("DataLost", self._lost_reason(ts, ws)))
            return
        self._make_ready_or_wait(ts)

    def _resend(self, ts: TaskState, gone: WorkerState | None) -> bool:
        """Ask the client that kept a copy of lost data (a task's large arguments) to send it
        again, to the worker receiving the least such data (or to the next worker to join).
        False if nobody can: not kept, its client gone, or lost with too many workers."""
        options = ts.options or {}
        client_id = options.get("from")
        if (
            not options.get("kept")
            or client_id not in self.clients
            or ts.suspicious >= self.killed_worker_limit
        ):
            return False
        open_workers = [w for w in self.workers.values() if w.retiring is None]
        if not open_workers:
            self._homeless[ts.key] = (ts, gone)
            return True
        target = min(open_workers, key=lambda w: (len(w.arriving), w.nbytes))
        target.arriving[ts.key] = ts
        row = (ts.key, target.id, target.address)
        self._send(client_id, m.ResendData(gone.address if gone is not None else "", [row]))
        return True

    def _lost_reason(self, ts: TaskState, ws: WorkerState | None) -> str:
        options = ts.options or {}
        if not options.get("kept"):
            where = f" on {ws.name}" if ws is not None else ""
            return (
                f"{ts.key!r} lived only{where} (held or on its way there), which is gone, and "
                "has no lineage (scattered data) to recompute it from"
            )
        if ts.suspicious >= self.killed_worker_limit:
            return (
                f"{ts.key!r} (data sent by its client) was lost with {ts.suspicious} workers "
                "that died holding or receiving it"
            )
        return f"{ts.key!r} was lost with its worker, and the client that kept a copy is gone"

    def _scattered_lost(self, ts: TaskState, ws: WorkerState, blame: bool) -> None:
        """``ws`` died holding or receiving data a client sent (no spec); ``blame``: count it
        against the data (a worker killed by receiving it, again and again, ends in DataLost)."""
        if blame:
            ts.suspicious += 1
        self._data_lost(ts, ws)

    def _release_slot(self, ts: TaskState, ws: WorkerState) -> None:
        ws.processing.discard(ts)
        queue = ws.slots[ts.slot]
        if ts in ws.blocked:
            ws.blocked.discard(ts)
            ws.blocked_count[ts.slot] -= 1
        elif queue and queue[0] is ts:
            queue.popleft()
        else:
            try:
                queue.remove(ts)
            except ValueError:
                pass
        ts.processing_on = None
        ts.slot = -1
        resources = ts.restrictions[1] if ts.restrictions else None
        if resources:
            for name, amount in resources.items():
                ws.used_resources[name] = ws.used_resources.get(name, 0) - amount
        if ts.recall is not None:  # it finished or failed before the worker answered
            self._end_recall(ts, [])

    def _finish_dependencies(self, ts: TaskState) -> None:
        for dts in ts.dependencies:
            self._discard_waiter(dts, ts)
            self._maybe_forget(dts)

    def _hold(self, ts: TaskState, ws: WorkerState) -> None:
        ts.who_has = _with(ts.who_has, ws)
        ws.has_what.add(ts)
        ws.nbytes += ts.nbytes
        if ts.waiters:
            ws.waiting_nbytes += ts.nbytes

    def _unhold(self, ts: TaskState, ws: WorkerState) -> None:
        ts.who_has = _without(ts.who_has, ws)
        ws.has_what.discard(ts)
        ws.nbytes -= ts.nbytes
        if ts.waiters:
            ws.waiting_nbytes -= ts.nbytes

    def _add_waiter(self, dts: TaskState, ts: TaskState) -> None:
        if not dts.waiters:
            for ws in dts.who_has:
                ws.waiting_nbytes += dts.nbytes
        dts.waiters = _with(dts.waiters, ts)

    def _discard_waiter(self, dts: TaskState, ts: TaskState) -> None:
        if ts in dts.waiters:
            dts.waiters = _without(dts.waiters, ts)
            if not dts.waiters:
                for ws in dts.who_has:
                    ws.waiting_nbytes -= dts.nbytes

    def _fail(self, ts: TaskState, error: list | None) -> None:
        """Fail ``ts`` and every pending task downstream with the same error."""
        stack = [ts]
        while stack:
            t = stack.pop()
            if t.state in _FINISHED:
                continue
            if t.processing_on is not None:
                if t is not ts:  # a dependent chained behind its input: withdraw it
                    self._send(t.processing_on.id, m.CancelCompute(0, t.key, t.slot))
                self._release_slot(t, t.processing_on)
            t.state = ERRED
            t.error = error
            self._no_worker.discard(t)
            for client_id in t.wanted_by:
                self._out.append((client_id, m.TaskErred(t.key, error or [])))
            stack.extend(t.dependents)
            self._finish_dependencies(t)
            self._maybe_forget(t)

    def _fail_killed(self, ts: TaskState, ws: WorkerState) -> None:
        self._fail(
            ts,
            _error_frames(
                "KilledWorker",
                (ts.key, ts.suspicious, ws.name),
            ),
        )

    def _fail_worker_lost(self, ts: TaskState, ws: WorkerState) -> None:
        self._fail(
            ts,
            _error_frames(
                "WorkerLost",
                f"worker {ws.name} died while running at-most-once task {ts.key!r}; "
                "it is not re-run",
            ),
        )

    def _cancel(self, ts: TaskState) -> list[TaskState]:
        """Cancel a task that has not started and every pending task downstream."""
        cancelled = []
        stack = [ts]
        while stack:
            t = stack.pop()
            if t.state in _FINISHED:
                continue
            if t.processing_on is not None and t is not ts:
                # a dependent already on a worker: it cannot run without its input anyway
                self._send(t.processing_on.id, m.CancelCompute(0, t.key, t.slot))
                self._release_slot(t, t.processing_on)
            t.state = CANCELLED
            self._no_worker.discard(t)
            cancelled.append(t)
            stack.extend(t.dependents)
        for t in cancelled:
            wanted = [c for c in t.wanted_by]
            for client_id in wanted:
                self._out.append((client_id, m.TasksCancelled([t.key])))
            self._finish_dependencies(t)
            self._maybe_forget(t)
        return cancelled

    def _maybe_forget(self, ts: TaskState) -> None:
        if ts.state in _FINISHED and not ts.wanted_by and not ts.waiters:
            self._forget(ts)

    def _forget(self, ts: TaskState) -> None:
        if self.tasks.get(ts.key) is not ts:
            return
        del self.tasks[ts.key]
        for ws in list(ts.who_has):
            self._unhold(ts, ws)
            self._free(ws, ts.key, ts.nbytes)
        for dts in ts.dependencies:
            dts.dependents = _without(dts.dependents, ts)
            self._discard_waiter(dts, ts)
            self._maybe_forget(dts)
        ts.spec = None
        ts.dependencies = ()

    def _add_replica(self, ts: TaskState, ws: WorkerState, nbytes: int) -> None:
        if ws not in ts.who_has:
            self._hold(ts, ws)

    def _report(self, ts: TaskState, client_id: str) -> None:
        if ts.state == MEMORY:
            self._out.append((client_id, m.TaskDone(ts.key, ts.nbytes, False, [])))
        elif ts.state == ERRED:
            self._out.append((client_id, m.TaskErred(ts.key, ts.error or [])))
        elif ts.state == CANCELLED:
            self._out.append((client_id, m.TasksCancelled([ts.key])))

    def _send(self, peer: str, msg: Any) -> None:
        self._out.append((peer, msg))

    def _free(self, ws: WorkerState, key: Any, nbytes: int = -1) -> None:
        """Tell ``ws`` to drop ``key`` (``nbytes`` big, -1 unknown): one FreeKeys per worker per
        step, sent to a slot.

        A slot reads its messages in order before it starts a task, so the keys are gone before
        the slot makes anything new, however late the worker's control thread gets to run (under
        load it lagged the slots by up to 0.2 s, while they made ten more 10 MB results). When
        that slot has work in hand and a key is not small, the control connection is told too
        (freeing twice is harmless), so the memory does not wait for a long task to end. (Small
        keys wait: telling the control thread costs a wake-up in both processes.)
        """
        small = 0 <= nbytes <= FREE_LATER_BYTES
        msg = self._frees.get(ws.id)
        if msg is not None:
            msg.keys.append(key)
            if small or ws.id in self._frees_told_control:
                return  # (the common case of a big release: no slot lookup per key)
            slot = min(ws.ready_slots, key=lambda i: len(ws.slots[i]), default=-1)
        else:
            msg = self._frees[ws.id] = m.FreeKeys([key])
            slot = min(ws.ready_slots, key=lambda i: len(ws.slots[i]), default=-1)
            if slot >= 0:
                self._send(f"{ws.id}/{slot}", msg)
        if slot >= 0 and (small or not ws.slots[slot]):
            return  # an idle slot frees it at once; a small key may wait for a busy one
        self._frees_told_control.add(ws.id)
        self._send(ws.id, msg)

    def _flush(self) -> Outgoing:
        out, self._out = self._out, []
        self._frees.clear()
        self._frees_told_control.clear()
        return out
