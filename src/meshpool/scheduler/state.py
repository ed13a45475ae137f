"""The scheduler's state machine: messages in, messages out, no I/O.

Theory of operation
-------------------
The scheduler holds the task graph: one :class:`TaskState` per key a client has submitted (or
scattered) and not yet forgotten, and one :class:`WorkerState` per connected worker. Every input is
a message from a client or a worker, or an event from the shell (a worker connection lost); every
output is a list of ``(peer id, message)`` pairs for the shell to send. The state machine never
unpickles a payload: task specs, results and errors are opaque frames it stores or forwards.

A task's life::

    waiting ──(inputs in memory)──▶ ready ──(a worker has room)──▶ processing ──▶ memory
       │                              │                               │     └──▶ erred
       └──────────── cancelled ◀──────┴──── (the worker had not started it)
    memory / erred / cancelled ──(no client wants it, no pending task needs it)──▶ forgotten

Placement: a ready task goes to the worker, among those with room, where it can start earliest:
queued work (tasks per thread times the mean task duration) plus the bytes of its inputs that
worker lacks over an assumed bandwidth. Each worker thread is a *slot* with its own connection;
the scheduler sends a slot its tasks directly and the slot runs them in arrival order, so the
oldest unfinished task of a slot is the one executing. A slot holds a few tasks beyond the one it
runs (a prefetch queue covering about :data:`PREFETCH_SECONDS` of work), which hides the round
trip for small tasks without piling long tasks onto one worker; idle slots steal queued tasks
(:meth:`SchedulerState._steal`). A worker's death is blamed only on executing tasks.

Taking back a task queued on a slot (a client's cancel, a steal) is a *recall*: the "oldest is
executing" view lags (the slot may have started the next task while its ComputeDone is on the
way), so the worker decides. CancelCompute goes to its control connection, which answers at once
(CancelComputeReply) whether the task had started; until then the task stays PROCESSING with
``recall`` set, and the client's CancelReply waits (``_CancelRequest``).

A task that waits for other tasks (a ``result()`` inside it) says so on its slot's connection
(SlotBlocked): it moves from the slot's queue to the worker's ``blocked`` set, so it no longer
counts against the slot's room and the slot is sent more work, which the worker runs on another
thread. It is still executing on that worker: KilledWorker blames it if the worker dies, and a
cancel leaves it alone. Its completion may arrive on a helper connection ``worker-id/slot~n``,
which counts as the slot's. A slot with blocked tasks gets no prefetch: each task it is sent
next must be the most urgent one when it frees (tasks submitted from tasks rank above their
parent), or a task tree would run breadth-first, every prefetched task blocking in turn.

References: a task is kept while a client wants it (``wanted_by``) or a pending task needs it
(``waiters``). Dropping a future releases the key but never cancels the task; the result is
forgotten once it is done. A result lost with its worker is recomputed from its spec when it is
still needed. Data a client sent straight to a worker has no spec: it is tracked from the
moment it is announced (``WorkerState.arriving``), so it is lost with its worker even before it
arrived; a task's large arguments are then sent again by the client that kept them
(ResendData), scattered data fails with DataLost.

Where the code lives: this module has the entry points and the message handlers. The rules
they share are layers of :class:`SchedulerState`, one module each: ``model`` (TaskState,
WorkerState), ``transitions`` (moving tasks between states, holding and freeing results),
``placement`` (dispatch, prefetch, chaining, lean workers), ``recalls`` (cancels and steals),
``retirement``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from .. import messages as m
from ..pinning import renewed
from .model import (
    _FINISHED,
    CANCELLED,
    ERRED,
    MEMORY,
    NO_WORKER,
    PROCESSING,
    READY,
    WAITING,
    InvalidTransition,
    Outgoing,
    TaskState,
    WorkerState,
    _error_frames,
    _missing_dependency_error,
    _Recall,
    _with,
    _without,
    oversized,
    shrink,
)
from .placement import (
    BANDWIDTH,
    MAX_HELD_IMBALANCE,
    MAX_PREFETCH_PER_THREAD,
    PREFETCH_SECONDS,
    STEAL_MAX_BYTES,
)
from .retirement import Retirement

__all__ = [
    "BANDWIDTH",
    "CANCELLED",
    "DEFAULT_DURATION",
    "ERRED",
    "InvalidTransition",
    "KILLED_WORKER_LIMIT",
    "MAX_HELD_IMBALANCE",
    "MAX_PREFETCH_PER_THREAD",
    "MEMORY",
    "NO_WORKER",
    "PREFETCH_SECONDS",
    "PROCESSING",
    "READY",
    "STEAL_MAX_BYTES",
    "SchedulerState",
    "TaskState",
    "WAITING",
    "WorkerState",
]

logger = logging.getLogger("meshpool.scheduler")

# mean task duration assumed before any has been measured: long, so a first burst of large
# tasks is not prefetched several deep (which costs memory on reductions); tiny tasks bring the
# estimate down within a few dozen completions
DEFAULT_DURATION = 0.005
DURATION_WEIGHT = 0.1  # weight of the newest duration in the moving average
KILLED_WORKER_LIMIT = 3  # a task running on this many dying workers is a poison task


class SchedulerState(Retirement):
    """All the scheduler knows. ``handle_client``/``handle_worker`` take messages and return
    what to send; ``remove_worker``/``remove_client`` take connection losses."""

    def __init__(self, killed_worker_limit: int = KILLED_WORKER_LIMIT) -> None:
        self.tasks: dict[Any, TaskState] = {}
        self.workers: dict[str, WorkerState] = {}
        self.clients: set[str] = set()
        self.initializers: list[list] = []  # frames of each client's initializer, replayed
        self.killed_worker_limit = killed_worker_limit
        self._ready: list = []  # heap of (priority, seq, TaskState); stale entries skipped
        self._seq = 0
        self._no_worker: set[TaskState] = set()
        self._thieves: set[tuple[str, int]] = set()  # idle slots waiting for a stolen task
        self._mean_duration = DEFAULT_DURATION
        self._from_slot = -1  # the slot index of the worker message being handled
        self._retired: set[str] = set()  # told to close after retiring (no longer schedulable)
        self._out: Outgoing = []
        self._frees: dict[str, m.FreeKeys] = {}  # this step's FreeKeys message per worker
        self._frees_told_control: set[str] = set()  # workers whose control thread got it too
        # kept data to resend once a worker joins (and the worker it was lost with)
        self._homeless: dict[Any, tuple[TaskState, WorkerState | None]] = {}
        self._client_handlers: dict[type, Callable[[str, Any], None]] = {
            m.SubmitTasks: self._client_submit,
            m.ReleaseKeys: self._client_release,
            m.CancelKeys: self._client_cancel,
            m.WhoHas: self._client_who_has,
            m.IsRunning: self._client_is_running,
            m.SetInitializer: self._client_initializer,
            m.Scatter: self._client_scatter,
            m.DataNotKept: self._client_not_kept,
            m.GetWorkers: self._client_get_workers,
            m.Ping: self._client_ping,
            m.RetireWorkers: self._client_retire,
        }
        self._worker_handlers: dict[type, Callable[[WorkerState, Any], None]] = {
            m.ComputeDone: self._worker_done,
            m.ComputeErred: self._worker_erred,
            m.MissingData: self._worker_missing_data,
            m.InitializerErred: self._worker_initializer_erred,
            m.AddKeys: self._worker_add_keys,
            m.SlotHello: self._worker_slot_hello,
            m.SlotBlocked: self._worker_blocked,
            m.RetireMe: self._worker_retire_me,
            m.CancelComputeReply: self._worker_cancel_reply,
            m.Heartbeat: self._worker_heartbeat,
        }

    # --- entry points ------------------------------------------------------------------------

    def handle_client(self, client_id: str, msg: Any) -> Outgoing:
        self.clients.add(client_id)
        handler = self._client_handlers.get(type(msg))
        if handler is None:
            logger.warning("dropping unexpected %s from client %s", type(msg).__name__, client_id)
            return []
        handler(client_id, msg)
        self._advance_retirements()
        return self._flush()

    def handle_worker(self, peer: str, msg: Any) -> Outgoing:
        """A message from a worker's control connection ("id"), one of its slots ("id/n"), or a
        slot's helper connection ("id/n~k": a task that gave its slot away while waiting)."""
        if isinstance(msg, m.RegisterWorker):
            self._add_worker(msg)
            return self._flush()
        worker_id, _, slot = peer.partition("/")
        ws = self.workers.get(worker_id)
        if ws is None:
            logger.warning("dropping %s from unknown worker %s", type(msg).__name__, worker_id)
            return []
        slot = slot.partition("~")[0]
        self._from_slot = int(slot) if slot.isdigit() else -1
        handler = self._worker_handlers.get(type(msg))
        if handler is None:
            logger.warning("dropping unexpected %s from worker %s", type(msg).__name__, ws.name)
            return []
        handler(ws, msg)
        self._advance_retirements()
        return self._flush()

    def remove_worker(
        self,
        worker_id: str,
        reason: str = "connection lost",
        blame: bool = True,
        running: list[int] | None = None,
    ) -> Outgoing:
        """Forget a worker and reschedule its tasks.

        ``blame=False`` (a host that vanished: heartbeat timeout) does not count
        its executing tasks towards KilledWorker: silence is not the task's fault.
        ``running``: what each slot's run marker said (the ``seq`` of the task it was running,
        0 for none; ``worker/reporting.py``). Without it, a slot's oldest unreported task is
        taken for the one it was running.
        """
        ws = self.workers.pop(worker_id, None)
        if ws is None:
            return []
        logger.info("worker %s removed: %s", ws.name, reason)
        for client_id, request_id, names in ws.retiring or ():  # died while retiring
            if not any(w.name in names for w in self.workers.values()):
                self._out.append((client_id, m.Reply(request_id, names)))
        for ts in list(ws.has_what):
            ts.who_has = _without(ts.who_has, ws)
            if not ts.who_has and ts.state == MEMORY:
                if ts.spec is None:
                    self._scattered_lost(ts, ws, blame)
                else:
                    self._data_lost(ts, ws)
        ws.has_what.clear()
        arriving, ws.arriving = ws.arriving, {}
        for ts in arriving.values():  # sent here by a client, never reported: lost on the way
            if self.tasks.get(ts.key) is ts and ts.state == WAITING:
                self._scattered_lost(ts, ws, blame)
        executing = _executing(ws, running)
        executing.update(t for t in ws.processing if t.recall is not None and t.recall.started)
        recalled: list[tuple[TaskState, _Recall]] = []
        for ts in sorted(ws.processing, key=lambda t: t.priority):
            ts.processing_on = None
            ts.slot = -1
            if ts.recall is not None:
                recalled.append((ts, ts.recall))
                ts.recall = None
            if ts.state != PROCESSING:
                continue
            if ts in executing:
                if blame:
                    ts.suspicious += 1
                    if ts.suspicious >= self.killed_worker_limit:
                        self._fail_killed(ts, ws)
                        continue
                if (ts.options or {}).get("at_most_once"):
                    self._fail_worker_lost(ts, ws)
                    continue
            self._make_ready_or_wait(ts)
        ws.processing.clear()
        ws.blocked.clear()
        ws.blocked_count = [0] * ws.nthreads
        for q in ws.slots:
            q.clear()
        self._thieves = {t for t in self._thieves if t[0] != worker_id}
        for ts, recall in recalled:  # the worker never answered: it did not start them here
            ts.recall = recall
            cancel = recall.cancel and ts.state not in _FINISHED
            self._end_recall(ts, self._cancel(ts) if cancel else [])
        self._dispatch()
        self._advance_retirements()
        return self._flush()

    def remove_client(self, client_id: str) -> Outgoing:
        self.clients.discard(client_id)
        for ts in [ts for ts in self.tasks.values() if client_id in ts.wanted_by]:
            ts.wanted_by = _without(ts.wanted_by, client_id)
            self._maybe_forget(ts)
        # what it was sending may never arrive (its sockets closed), and it resends nothing
        for ts in self._take_arriving(lambda t: (t.options or {}).get("from") == client_id):
            self._data_lost(ts, None)
        self._dispatch()
        return self._flush()

    def _take_arriving(self, which: Callable[[TaskState], bool]) -> list[TaskState]:
        """Take the data on its way to workers (or waiting for one to join) that ``which``
        selects out of the bookkeeping; the still-waiting ones."""
        taken = []
        for table in [ws.arriving for ws in self.workers.values()]:
            for key, ts in list(table.items()):
                if which(ts):
                    del table[key]
                    taken.append(ts)
        for key, (ts, _) in list(self._homeless.items()):
            if which(ts):
                del self._homeless[key]
                taken.append(ts)
        return [ts for ts in taken if self.tasks.get(ts.key) is ts and ts.state == WAITING]

    # --- clients -----------------------------------------------------------------------------

    def _client_submit(self, client_id: str, msg: m.SubmitTasks) -> None:
        frames = msg.frames
        offset = 0
        new: list[TaskState] = []
        for key, dep_keys, nframes, priority, options in msg.tasks:
            spec = tuple(frames[offset : offset + nframes])  # (a tuple of bytes: not GC-tracked)
            offset += nframes
            ts = self.tasks.get(key)
            if ts is not None:  # resubmitted key (dask graphs may share keys): keep the first
                ts.wanted_by = _with(ts.wanted_by, client_id)
                if ts.state in _FINISHED:
                    self._report(ts, client_id)
                continue
            ts = TaskState(key, spec, priority, options)
            ts.wanted_by = _with(ts.wanted_by, client_id)
            deps = []
            for dk in dep_keys:
                dts = self.tasks.get(dk)
                if dts is None:
                    ts.state = ERRED
                    ts.error = _missing_dependency_error(key, dk)
                    self.tasks[key] = ts
                    self._out.append((client_id, m.TaskErred(key, ts.error)))
                    break
                deps.append(dts)
            else:
                self.tasks[key] = ts
                ts.dependencies = tuple(deps)
                new.append(ts)
        for ts in new:
            self._link_new_task(ts)
        self._dispatch()

    def _link_new_task(self, ts: TaskState) -> None:
        failed = None
        for dts in ts.dependencies:
            dts.dependents = _with(dts.dependents, ts)
            if dts.state == ERRED or dts.state == CANCELLED:
                failed = dts
            elif dts.state != MEMORY:
                ts.waiting_on = _with(ts.waiting_on, dts)
            self._add_waiter(dts, ts)
        if failed is not None:
            if failed.state == ERRED:
                self._fail(ts, failed.error)
            else:
                self._cancel(ts)
            return
        if not ts.waiting_on:
            self._push_ready(ts)

    def _client_release(self, client_id: str, msg: m.ReleaseKeys) -> None:
        for key in msg.keys:
            ts = self.tasks.get(key)
            if ts is not None:
                ts.wanted_by = _without(ts.wanted_by, client_id)
                self._maybe_forget(ts)
        if oversized(self.tasks):  # a big release: its tables go back now, not at a tick
            self.compact()

    def _client_is_running(self, client_id: str, msg: m.IsRunning) -> None:
        """Running: on a worker and the oldest task of its slot (or one the worker said it
        had started when a recall came too late)."""
        ts = self.tasks.get(msg.key)
        running = False
        if ts is not None and ts.state == PROCESSING and ts.processing_on is not None:
            queue = ts.processing_on.slots[ts.slot]
            started = ts.recall is not None and ts.recall.started
            running = bool(queue and queue[0] is ts) or started or ts in ts.processing_on.blocked
        self._out.append((client_id, m.Reply(msg.request_id, running)))

    def _client_who_has(self, client_id: str, msg: m.WhoHas) -> None:
        locations = {}
        for key in msg.keys:
            ts = self.tasks.get(key)
            locations[key] = [ws.address for ws in ts.who_has] if ts is not None else []
        self._out.append((client_id, m.WhoHasReply(msg.request_id, locations)))

    def _client_initializer(self, client_id: str, msg: m.SetInitializer) -> None:
        self.initializers.append(msg.frames)
        for ws in self.workers.values():
            for slot in ws.ready_slots:
                self._send(f"{ws.id}/{slot}", m.RunInitializer(msg.frames))

    def _client_scatter(self, client_id: str, msg: m.Scatter) -> None:
        """The client sends data straight to workers; the keys wait for the workers' AddKeys.
        Data for a worker that is gone already is lost at once (resent, if ``kept``)."""
        for key, worker_id in msg.items:
            ts = self.tasks.get(key)
            new = ts is None
            if ts is None:
                ts = TaskState(key, None, (0,), {"from": client_id, "kept": bool(msg.kept)})
                self.tasks[key] = ts
            ts.wanted_by = _with(ts.wanted_by, client_id)
            if ts.state == MEMORY:
                self._report(ts, client_id)
            elif new:
                ws = self.workers.get(worker_id)
                if ws is not None:
                    ws.arriving[key] = ts
                else:
                    self._data_lost(ts, None)
        self._dispatch()

    def _client_not_kept(self, client_id: str, msg: m.DataNotKept) -> None:
        """The client could not resend data: it is lost."""
        keys = set(msg.keys)
        for ts in self._take_arriving(lambda t: t.key in keys):
            self._fail(
                ts,
                _error_frames(
                    "DataLost", f"{ts.key!r} was lost with its worker, and its client has no copy"
                ),
            )
        self._dispatch()

    def _client_get_workers(self, client_id: str, msg: m.GetWorkers) -> None:
        info = [ws.info() for ws in self.workers.values() if ws.id not in self._retired]
        self._out.append((client_id, m.Reply(msg.request_id, info)))

    def _client_ping(self, client_id: str, msg: m.Ping) -> None:
        self._out.append((client_id, m.Reply(msg.request_id, "pong")))

    # --- workers -----------------------------------------------------------------------------

    def _add_worker(self, msg: m.RegisterWorker) -> None:
        if msg.worker_id in self.workers:
            self.remove_worker(msg.worker_id, "re-registered")
        ws = WorkerState(msg)
        self.workers[ws.id] = ws
        logger.info("worker %s joined (%d threads, %s)", ws.name, ws.nthreads, ws.address)
        homeless, self._homeless = self._homeless, {}
        for ts, gone in homeless.values():  # lost while no worker was there to take it
            if self.tasks.get(ts.key) is ts and ts.state == WAITING:
                self._data_lost(ts, gone)
        for ts in list(self._no_worker):
            if self._fits(ts, ws):
                self._no_worker.discard(ts)
                self._push_ready(ts)
        self._dispatch()

    def _worker_done(self, ws: WorkerState, msg: m.ComputeDone) -> None:
        ts = self.tasks.get(msg.key)
        if ts is not None and ts.state == PROCESSING and ts.slot != self._from_slot:
            logger.warning("dropping %s: %r was not sent to that slot", type(msg).__name__, ts.key)
            return
        if ts is None or ts.state != PROCESSING or ts.processing_on is not ws:
            # stale: cancelled, rescheduled or forgotten meanwhile
            if ts is not None and ts.state == MEMORY:
                self._add_replica(ts, ws, msg.nbytes)
            else:
                self._free(ws, msg.key, msg.nbytes)
            return
        self._mean_duration += DURATION_WEIGHT * (msg.duration - self._mean_duration)
        slot = ts.slot
        self._release_slot(ts, ws)
        ts.state = MEMORY
        ts.nbytes = msg.nbytes
        self._hold(ts, ws)
        for client_id in ts.wanted_by:
            self._out.append((client_id, m.TaskDone(ts.key, ts.nbytes, msg.has_value, msg.frames)))
        for dep in ts.dependents:
            dep.waiting_on = _without(dep.waiting_on, ts)
            if not dep.waiting_on and dep.state == WAITING:
                self._push_ready(dep)
        self._finish_dependencies(ts)
        self._maybe_forget(ts)
        self._chain(ws, slot)
        self._dispatch()

    def _worker_erred(self, ws: WorkerState, msg: m.ComputeErred) -> None:
        ts = self.tasks.get(msg.key)
        if ts is None or ts.state != PROCESSING or ts.processing_on is not ws:
            return
        if ts.slot != self._from_slot:
            logger.warning("dropping ComputeErred: %r was not sent to that slot", ts.key)
            return
        self._release_slot(ts, ws)
        if ts.retries_left > 0:
            ts.retries_left -= 1
            self._push_ready(ts)
        else:
            self._fail(ts, msg.frames)
        self._dispatch()

    def _worker_missing_data(self, ws: WorkerState, msg: m.MissingData) -> None:
        ts = self.tasks.get(msg.key)
        dts = self.tasks.get(msg.dependency)
        if dts is not None:
            for holder in [w for w in dts.who_has if w.address == msg.address]:
                self._unhold(dts, holder)
            if not dts.who_has and dts.state == MEMORY:
                self._data_lost(dts, None)
        if ts is not None and ts.state == PROCESSING and ts.processing_on is ws:
            self._release_slot(ts, ws)
            self._make_ready_or_wait(ts)
        self._dispatch()

    def _worker_initializer_erred(self, ws: WorkerState, msg: m.InitializerErred) -> None:
        for client_id in self.clients:
            self._out.append(
                (
                    client_id,
                    m.ClusterBroken("initializer", f"initializer failed on {ws.name}", msg.frames),
                )
            )

    def _worker_add_keys(self, ws: WorkerState, msg: m.AddKeys) -> None:
        for key, nbytes in msg.items:
            ws.arriving.pop(key, None)
            ts = self.tasks.get(key)
            if ts is None:  # released before it landed
                self._free(ws, key, nbytes)
                continue
            if ts.state == MEMORY:
                self._add_replica(ts, ws, nbytes)
                continue
            if ts.state != WAITING or ts.spec is not None:
                self._free(ws, key, nbytes)
                continue
            ts.state = MEMORY
            ts.nbytes = nbytes
            self._hold(ts, ws)
            for client_id in ts.wanted_by:
                self._out.append((client_id, m.TaskDone(key, nbytes, False, [])))
            for dep in ts.dependents:
                dep.waiting_on = _without(dep.waiting_on, ts)
                if not dep.waiting_on and dep.state == WAITING:
                    self._push_ready(dep)
            self._maybe_forget(ts)
        self._dispatch()

    def _worker_slot_hello(self, ws: WorkerState, msg: m.SlotHello) -> None:
        if ws.retiring is not None or ws.id in self._retired:
            return
        if 0 <= msg.slot < ws.nthreads and msg.slot not in ws.ready_slots:
            ws.ready_slots.append(msg.slot)
            for frames in self.initializers:
                self._send(f"{ws.id}/{msg.slot}", m.RunInitializer(frames))
            self._dispatch()

    def _worker_blocked(self, ws: WorkerState, msg: m.SlotBlocked) -> None:
        """A slot's task waits on other tasks: it leaves the slot's queue (and room) but stays
        executing on the worker."""
        ts = self.tasks.get(msg.key)
        if (
            ts is None
            or ts.state != PROCESSING
            or ts.processing_on is not ws
            or ts.slot != self._from_slot
            or ts in ws.blocked
        ):
            return  # stale: finished (its result came on a helper connection first), or moved
        try:
            ws.slots[ts.slot].remove(ts)
        except ValueError:  # pragma: no cover - processing on a slot means queued there
            return
        ws.blocked.add(ts)
        ws.blocked_count[ts.slot] += 1
        self._dispatch()

    def _worker_heartbeat(self, ws: WorkerState, msg: m.Heartbeat) -> None:
        pass  # any traffic counts as liveness; the shell tracks it

    # --- introspection (tests) ---------------------------------------------------------------

    def compact(self) -> None:
        """Give back the tables of big containers that have emptied out (a dict or set keeps
        its size after deletions: 100,000 tasks released left ~8 MB of empty tables)."""
        shrink(self.tasks)
        self._seq = renewed(self._seq)  # (see pinning.py)
        for ws in self.workers.values():
            shrink(ws.has_what)
            shrink(ws.processing)
            ws.sent[:] = [renewed(count) for count in ws.sent]

    def validate_state(self) -> None:
        """Check every invariant; tests call this after each step (never the hot path)."""
        for key, ts in self.tasks.items():
            assert ts.key == key
            if ts.state == PROCESSING:
                assert ts.processing_on is not None and ts in ts.processing_on.processing, ts
            else:
                assert ts.processing_on is None, ts
                assert ts.recall is None, ts
            if ts.state == MEMORY:
                assert ts.who_has, ts
            for ws in ts.who_has:
                assert ts in ws.has_what and ws.id in self.workers, (ts, ws)
            for dts in ts.dependencies:
                assert ts in dts.dependents, (ts, dts)
                if ts.state not in _FINISHED:
                    assert dts.key in self.tasks, (ts, dts)
                    assert ts in dts.waiters, (ts, dts)
            if ts.state == WAITING:
                assert set(ts.waiting_on) == {d for d in ts.dependencies if d.state != MEMORY}, ts
        for ws in self.workers.values():
            for ts in ws.processing:
                assert ts.processing_on is ws and ts.state == PROCESSING, (ts, ws)
                assert (ts in ws.slots[ts.slot]) != (ts in ws.blocked), (ts, ws)
            assert ws.blocked <= ws.processing, ws
            for index, count in enumerate(ws.blocked_count):
                assert count == sum(1 for t in ws.blocked if t.slot == index), (ws, index)
            assert sum(len(q) for q in ws.slots) + len(ws.blocked) == len(ws.processing), ws
            assert ws.nbytes == sum(t.nbytes for t in ws.has_what), ws
            assert ws.waiting_nbytes == sum(t.nbytes for t in ws.has_what if t.waiters), ws
            for key, ts in ws.arriving.items():
                assert ts.key == key and ts.spec is None and ts.state != MEMORY, (ts, ws)
        for key, (ts, _) in self._homeless.items():
            assert ts.key == key and ts.spec is None, ts


def _executing(ws: WorkerState, running: list[int] | None) -> set[TaskState]:
    """The tasks a removed worker was running: blocked ones, and each slot's current task."""
    if running is None or len(running) != len(ws.slots):
        current = {q[0] for q in ws.slots if q}
    else:
        current = {
            ts
            for q, seq in zip(ws.slots, running, strict=True)
            for ts in q
            if seq and ts.seq == seq
        }
    return current | ws.blocked
