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
still needed; scattered data has no spec and fails with DataLost.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import math
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any

from .. import messages as m

logger = logging.getLogger("meshpool.scheduler")

Outgoing = list  # list[tuple[peer_id, message]]

BANDWIDTH = 500e6  # bytes/s assumed between workers, to weigh moving inputs against queueing
PREFETCH_SECONDS = 0.002  # a worker's queue beyond its threads covers about this much work
MAX_PREFETCH_PER_THREAD = 32  # ...but never more tasks than this per thread
# mean task duration assumed before any has been measured: long, so a first burst of large
# tasks is not prefetched several deep (which costs memory on reductions); tiny tasks bring the
# estimate down within a few dozen completions
DEFAULT_DURATION = 0.005
DURATION_WEIGHT = 0.1  # weight of the newest duration in the moving average
KILLED_WORKER_LIMIT = 3  # a task running on this many dying workers is a poison task
# A task without inputs that feeds others (a leaf of a reduction) does not start on a worker
# holding this many more bytes awaiting dependents than the leanest worker (see _lean).
MAX_HELD_IMBALANCE = 24 * 2**20
# An idle worker steals a queued task only if that moves at most this many input bytes: more
# could cost longer than waiting for the busy worker (whose running task's length we don't know).
STEAL_MAX_BYTES = int(0.01 * BANDWIDTH)

WAITING, READY, PROCESSING, MEMORY, ERRED, CANCELLED, NO_WORKER = (
    "waiting",
    "ready",
    "processing",
    "memory",
    "erred",
    "cancelled",
    "no-worker",
)
_FINISHED = (MEMORY, ERRED, CANCELLED)


class InvalidTransition(RuntimeError):
    """The state machine was asked for a move its rules do not allow (a bug, not bad input)."""


class TaskState:
    __slots__ = (
        "key",
        "state",
        "spec",
        "dependencies",
        "dependents",
        "waiting_on",
        "waiters",
        "who_has",
        "processing_on",
        "priority",
        "nbytes",
        "wanted_by",
        "options",
        "error",
        "retries_left",
        "suspicious",
        "slot",
        "restrictions",
        "recall",
    )

    def __init__(self, key: Any, spec: list | None, priority: Any, options: dict | None) -> None:
        self.key = key
        self.state = WAITING
        self.spec = spec  # opaque frames; None for scattered data (no lineage)
        self.dependencies: tuple[TaskState, ...] = ()
        self.dependents: set[TaskState] = set()
        self.waiting_on: set[TaskState] = set()  # dependencies not yet in memory
        self.waiters: set[TaskState] = set()  # dependents not yet finished
        self.who_has: set[WorkerState] = set()
        self.processing_on: WorkerState | None = None
        self.priority = priority
        self.nbytes = 0
        self.wanted_by: set[str] = set()
        self.options = options
        self.error: list | None = None
        self.retries_left = (options or {}).get("retries", 0) or 0
        self.suspicious = 0
        self.slot = -1
        self.restrictions = _restrictions(options)
        self.recall: _Recall | None = None  # asked the worker to take it back; no answer yet

    def __repr__(self) -> str:
        return f"<TaskState {self.key!r} {self.state}>"


class _CancelRequest:
    """A client's CancelKeys, answered once every worker asked about its keys has replied."""

    __slots__ = ("client_id", "request_id", "cancelled", "outstanding")

    def __init__(self, client_id: str, request_id: int) -> None:
        self.client_id = client_id
        self.request_id = request_id
        self.cancelled: list = []
        self.outstanding = 0


class _Recall:
    """A task queued on a slot that we asked the worker to take back (CancelCompute).

    ``cancel``: a client cancels it; else it is being stolen for ``thief`` (worker id, slot).
    ``started``: the worker answered that it had started the task. The recall then stays, as a
    note that the task is executing: it is not asked about again (steal retries would ping-pong
    until the previous task's ComputeDone arrives) and is blamed if the worker dies.
    """

    __slots__ = ("cancel", "thief", "requests", "started")

    def __init__(self, cancel: bool, thief: tuple[str, int] | None = None) -> None:
        self.cancel = cancel
        self.thief = thief
        self.requests: list[_CancelRequest] = []
        self.started = False


def _restrictions(options: dict | None) -> tuple | None:
    if not options:
        return None
    workers = options.get("workers")
    resources = options.get("resources")
    if not workers and not resources:
        return None
    return (frozenset(workers) if workers else None, dict(resources) if resources else None)


class WorkerState:
    __slots__ = (
        "id",
        "name",
        "address",
        "nthreads",
        "memory_limit",
        "resources",
        "used_resources",
        "processing",
        "slots",
        "blocked",
        "blocked_count",
        "ready_slots",
        "has_what",
        "nbytes",
        "waiting_nbytes",
        "pid",
        "versions",
        "retiring",
        "handoff",
    )

    def __init__(self, msg: m.RegisterWorker) -> None:
        self.id = msg.worker_id
        self.name = msg.name
        self.address = msg.data_address
        self.nthreads = max(1, int(msg.nthreads))
        self.memory_limit = msg.memory_limit
        self.resources = dict(msg.resources or {})
        self.used_resources: dict[str, float] = {}
        self.processing: set[TaskState] = set()
        self.slots: list[deque[TaskState]] = [deque() for _ in range(self.nthreads)]
        self.blocked: set[TaskState] = set()  # executing, but waiting on other tasks (no room)
        self.blocked_count = [0] * self.nthreads  # of those, per slot
        self.ready_slots: list[int] = []
        self.has_what: set[TaskState] = set()
        self.nbytes = 0
        self.waiting_nbytes = 0  # of ``nbytes``, results some pending task still needs
        self.pid = msg.pid
        self.retiring: list | None = None  # None, or the (client, request) waiting on it
        self.handoff: set = set()  # keys asked to be copied elsewhere while retiring
        self.versions = msg.versions

    def __repr__(self) -> str:
        return f"<WorkerState {self.name} {len(self.processing)} processing>"

    def info(self) -> dict:
        return {
            "id": self.id,
            "name": self.name,
            "address": self.address,
            "nthreads": self.nthreads,
            "memory_limit": self.memory_limit,
            "resources": dict(self.resources),
            "processing": len(self.processing),
            "executing": sum(1 for q in self.slots if q) + len(self.blocked),
            "keys": len(self.has_what),
            "nbytes": self.nbytes,
            "pid": self.pid,
        }


class SchedulerState:
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
        self._client_handlers: dict[type, Callable[[str, Any], None]] = {
            m.SubmitTasks: self._client_submit,
            m.ReleaseKeys: self._client_release,
            m.CancelKeys: self._client_cancel,
            m.WhoHas: self._client_who_has,
            m.IsRunning: self._client_is_running,
            m.SetInitializer: self._client_initializer,
            m.Scatter: self._client_scatter,
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
        self, worker_id: str, reason: str = "connection lost", blame: bool = True
    ) -> Outgoing:
        """Forget a worker and reschedule its tasks.

        ``blame=False`` (a host that vanished: heartbeat timeout) does not count
        its executing tasks towards KilledWorker: silence is not the task's fault.
        """
        ws = self.workers.pop(worker_id, None)
        if ws is None:
            return []
        logger.info("worker %s removed: %s", ws.name, reason)
        for client_id, request_id, names in ws.retiring or ():  # died while retiring
            if not any(w.name in names for w in self.workers.values()):
                self._out.append((client_id, m.Reply(request_id, names)))
        for ts in list(ws.has_what):
            ts.who_has.discard(ws)
            if not ts.who_has and ts.state == MEMORY:
                self._data_lost(ts, ws)
        ws.has_what.clear()
        executing = {q[0] for q in ws.slots if q} | ws.blocked
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
            ts.wanted_by.discard(client_id)
            self._maybe_forget(ts)
        return self._flush()

    # --- clients -----------------------------------------------------------------------------

    def _client_submit(self, client_id: str, msg: m.SubmitTasks) -> None:
        frames = msg.frames
        offset = 0
        new: list[TaskState] = []
        for key, dep_keys, nframes, priority, options in msg.tasks:
            spec = frames[offset : offset + nframes]
            offset += nframes
            ts = self.tasks.get(key)
            if ts is not None:  # resubmitted key (dask graphs may share keys): keep the first
                ts.wanted_by.add(client_id)
                if ts.state in _FINISHED:
                    self._report(ts, client_id)
                continue
            ts = TaskState(key, spec, priority, options)
            ts.wanted_by.add(client_id)
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
            dts.dependents.add(ts)
            if dts.state == ERRED or dts.state == CANCELLED:
                failed = dts
            elif dts.state != MEMORY:
                ts.waiting_on.add(dts)
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
                ts.wanted_by.discard(client_id)
                self._maybe_forget(ts)

    def _client_cancel(self, client_id: str, msg: m.CancelKeys) -> None:
        """Cancel what no worker has started: not yet sent, or queued behind a slot's task.

        A task queued on a slot may in fact have started (the slot's ComputeDone for the task
        before it can still be on the way), so the worker decides: the reply waits for its
        CancelComputeReply. The slot's first task is taken to be running and is left alone.
        """
        request = _CancelRequest(client_id, msg.request_id)
        for key in msg.keys:
            ts = self.tasks.get(key)
            if ts is None:
                continue
            if ts.state in (WAITING, READY, NO_WORKER):
                request.cancelled.extend(t.key for t in self._cancel(ts))
            elif ts.state == PROCESSING and ts.processing_on is not None:
                ws = ts.processing_on
                queue = ws.slots[ts.slot]
                started = ts in ws.blocked or (ts.recall is not None and ts.recall.started)
                if queue and queue[0] is not ts and not started:  # queued behind the executing one
                    if ts.recall is None:
                        ts.recall = _Recall(cancel=True)
                        self._send(ws.id, m.CancelCompute(msg.request_id, ts.key, ts.slot))
                    ts.recall.cancel = True
                    ts.recall.requests.append(request)
                    request.outstanding += 1
        if not request.outstanding:
            self._answer_cancel(request)
        self._dispatch()

    def _answer_cancel(self, request: _CancelRequest) -> None:
        self._out.append((request.client_id, m.CancelReply(request.request_id, request.cancelled)))

    def _end_recall(self, ts: TaskState, cancelled: list[TaskState]) -> None:
        """A recalled task's fate is known: answer the cancel requests waiting on it."""
        recall, ts.recall = ts.recall, None
        if recall is None:
            return
        if recall.thief is not None:
            self._thieves.discard(recall.thief)
        for request in recall.requests:
            request.cancelled.extend(t.key for t in cancelled)
            request.outstanding -= 1
            if request.outstanding == 0:
                self._answer_cancel(request)

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
        """The client sent data straight to workers; the keys wait for the workers' AddKeys."""
        for key, _worker_id in msg.items:
            ts = self.tasks.get(key)
            if ts is None:
                ts = TaskState(key, None, (0,), None)
                self.tasks[key] = ts
            ts.wanted_by.add(client_id)
            if ts.state == MEMORY:
                self._report(ts, client_id)

    def _client_get_workers(self, client_id: str, msg: m.GetWorkers) -> None:
        info = [ws.info() for ws in self.workers.values() if ws.id not in self._retired]
        self._out.append((client_id, m.Reply(msg.request_id, info)))

    def _client_ping(self, client_id: str, msg: m.Ping) -> None:
        self._out.append((client_id, m.Reply(msg.request_id, "pong")))

    def _client_retire(self, client_id: str, msg: m.RetireWorkers) -> None:
        names = set(msg.names)
        targets = [ws for ws in self.workers.values() if ws.name in names or ws.id in names]
        if not targets:
            self._out.append((client_id, m.Reply(msg.request_id, [])))
            return
        request = (client_id, msg.request_id, [ws.name for ws in targets])
        for ws in targets:
            self._start_retire(ws, request)

    # --- graceful retirement ------------------------------------------------------------------
    #
    # A retiring worker gets no new tasks (its slots are no longer open) and finishes those it
    # has; every result it alone holds is copied to another worker (ReplicateKeys: the other
    # worker fetches it from the retiring one's data socket and answers AddKeys). Once it runs
    # nothing and holds nothing only it has, it is told to close: no future loses its value.

    def _start_retire(self, ws: WorkerState, request: tuple | None) -> None:
        if ws.retiring is None:
            ws.retiring = []
            ws.ready_slots = []
            logger.info("worker %s retiring: handing off its data", ws.name)
        if request is not None:
            ws.retiring.append(request)
        self._advance_retirements()

    def _worker_retire_me(self, ws: WorkerState, msg: m.RetireMe) -> None:
        self._start_retire(ws, None)

    def _advance_retirements(self) -> None:
        retiring = [ws for ws in self.workers.values() if ws.retiring is not None]
        if not retiring:
            return
        staying = [ws for ws in self.workers.values() if ws.retiring is None]
        for ws in retiring:
            sole = [ts for ts in ws.has_what if ts.who_has == {ws} and ts.state == MEMORY]
            if sole and staying:
                self._hand_off(ws, [ts for ts in sole if ts.key not in ws.handoff], staying)
                continue
            if sole:
                logger.warning(
                    "retiring %s, the last worker: %d results will be recomputed later",
                    ws.name,
                    len(sole),
                )
            if ws.processing:
                continue
            self._send(ws.id, m.CloseWorker("retired"))
            requests, ws.retiring = ws.retiring or [], None
            self._retired.add(ws.id)
            # gone from the state now, so nobody is sent to fetch from it any more
            self._out = self.remove_worker(ws.id, "retired")
            for client_id, request_id, names in requests:
                if not any(
                    w.name in names and w.id not in self._retired for w in self.workers.values()
                ):
                    self._out.append((client_id, m.Reply(request_id, names)))

    def _hand_off(self, ws: WorkerState, tasks: list, staying: list[WorkerState]) -> None:
        """Ask the staying workers (least loaded first) to copy ``tasks`` from ``ws``."""
        planned = {w.id: w.nbytes for w in staying}
        by_target: dict[str, list] = {}
        for ts in tasks:
            target = min(staying, key=lambda w: planned[w.id])
            planned[target.id] += ts.nbytes
            by_target.setdefault(target.id, []).append((ts.key, [ws.address]))
            ws.handoff.add(ts.key)
        for target_id, items in by_target.items():
            self._send(target_id, m.ReplicateKeys(items))

    # --- workers -----------------------------------------------------------------------------

    def _add_worker(self, msg: m.RegisterWorker) -> None:
        if msg.worker_id in self.workers:
            self.remove_worker(msg.worker_id, "re-registered")
        ws = WorkerState(msg)
        self.workers[ws.id] = ws
        logger.info("worker %s joined (%d threads, %s)", ws.name, ws.nthreads, ws.address)
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
                self._free(ws, msg.key)
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
            dep.waiting_on.discard(ts)
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
            ts = self.tasks.get(key)
            if ts is None:  # released before it landed
                self._free(ws, key)
                continue
            if ts.state == MEMORY:
                self._add_replica(ts, ws, nbytes)
                continue
            if ts.state != WAITING or ts.spec is not None:
                self._free(ws, key)
                continue
            ts.state = MEMORY
            ts.nbytes = nbytes
            self._hold(ts, ws)
            for client_id in ts.wanted_by:
                self._out.append((client_id, m.TaskDone(key, nbytes, False, [])))
            for dep in ts.dependents:
                dep.waiting_on.discard(ts)
                if not dep.waiting_on and dep.state == WAITING:
                    self._push_ready(dep)
            self._maybe_forget(ts)
        self._dispatch()

    def _worker_cancel_reply(self, ws: WorkerState, msg: m.CancelComputeReply) -> None:
        ts = self.tasks.get(msg.key)
        if (
            ts is None
            or ts.recall is None
            or ts.state != PROCESSING
            or ts.processing_on is not ws
            or ts.slot != msg.slot
        ):
            return  # stale: the task finished, failed or moved meanwhile
        recall = ts.recall
        if not msg.cancelled:  # it had started: it runs to completion where it is
            self._end_recall(ts, [])
            ts.recall = _Recall(cancel=False)
            ts.recall.started = True
            self._dispatch()
            return
        ts.recall = None  # _release_slot must not answer for it
        self._release_slot(ts, ws)
        ts.recall = recall
        if recall.cancel:
            self._end_recall(ts, self._cancel(ts))
        else:
            self._end_recall(ts, [])
            thief = self.workers.get(recall.thief[0]) if recall.thief else None
            slot = recall.thief[1] if recall.thief else -1
            if (
                thief is not None
                and slot in thief.ready_slots
                and not thief.slots[slot]
                and self._fits(ts, thief)
                and self._has_room(ts, thief)
            ):
                self._assign(ts, thief, slot)
            else:
                self._push_ready(ts)
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

    # --- transitions -------------------------------------------------------------------------

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
        ts.waiting_on = {d for d in ts.dependencies if d.state != MEMORY}
        for dts in ts.waiting_on:
            if dts.state not in (WAITING, READY, PROCESSING, NO_WORKER):
                self._data_lost(dts, None)
        if ts.state == WAITING and not ts.waiting_on:
            self._push_ready(ts)

    def _data_lost(self, ts: TaskState, ws: WorkerState | None) -> None:
        """A result has no holder left: recompute it if anything still needs it."""
        needed = ts.wanted_by or ts.waiters
        if not needed:
            self._forget(ts)
            return
        if ts.spec is None:
            ts.state = WAITING  # out of MEMORY, or _fail would take it for finished and skip it
            where = f" on {ws.name}" if ws is not None else ""
            self._fail(
                ts,
                _error_frames(
                    "DataLost",
                    f"{ts.key!r} lived only{where}, which is gone, and has no lineage "
                    "(scattered data) to recompute it from",
                ),
            )
            return
        self._make_ready_or_wait(ts)

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
        ts.who_has.add(ws)
        ws.has_what.add(ts)
        ws.nbytes += ts.nbytes
        if ts.waiters:
            ws.waiting_nbytes += ts.nbytes

    def _unhold(self, ts: TaskState, ws: WorkerState) -> None:
        ts.who_has.discard(ws)
        ws.has_what.discard(ts)
        ws.nbytes -= ts.nbytes
        if ts.waiters:
            ws.waiting_nbytes -= ts.nbytes

    def _add_waiter(self, dts: TaskState, ts: TaskState) -> None:
        if not dts.waiters:
            for ws in dts.who_has:
                ws.waiting_nbytes += dts.nbytes
        dts.waiters.add(ts)

    def _discard_waiter(self, dts: TaskState, ts: TaskState) -> None:
        if ts in dts.waiters:
            dts.waiters.discard(ts)
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
            self._free(ws, ts.key)
        for dts in ts.dependencies:
            dts.dependents.discard(ts)
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

    # --- placement ---------------------------------------------------------------------------

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
            self._chain(ws, slot)
            if self._open_slot(ws, capacity) < 0:
                open_workers.discard(ws)
        for entry in deferred:
            heapq.heappush(self._ready, entry)

    def _steal(self) -> None:
        """Idle slots take tasks queued behind running ones (DESIGN: idle workers steal).

        Without this a task prefetched behind a long one waits for it even while other workers
        sit idle — e.g. everything submitted while only the first worker had joined. The task is
        recalled (CancelCompute); once its worker confirms it had not started, it goes to the
        thief (:meth:`_worker_cancel_reply`).
        """
        idle = [
            (ws, i)
            for ws in self.workers.values()
            for i in ws.ready_slots
            if not ws.slots[i] and (ws.id, i) not in self._thieves
        ]
        if not idle:
            return
        queued = [
            ts
            for ws in self.workers.values()
            for queue in ws.slots
            if len(queue) > 1
            for ts in itertools.islice(queue, 1, None)
            if ts.recall is None
        ]
        if not queued:
            return
        queued.sort(key=lambda t: t.priority)
        for thief, slot in idle:
            for ts in queued:
                if (
                    ts.recall is None
                    and ts.processing_on is not None
                    and not ts.waiting_on  # chained behind its inputs: it must stay with them
                    and self._fits(ts, thief)
                    and self._has_room(ts, thief)
                    and self._missing_bytes(ts, thief) <= STEAL_MAX_BYTES
                ):
                    ts.recall = _Recall(cancel=False, thief=(thief.id, slot))
                    self._thieves.add((thief.id, slot))
                    self._send(ts.processing_on.id, m.CancelCompute(0, ts.key, ts.slot))
                    break

    @staticmethod
    def _missing_bytes(ts: TaskState, ws: WorkerState) -> int:
        return sum(d.nbytes for d in ts.dependencies if ws not in d.who_has)

    def _chain(self, ws: WorkerState, slot: int) -> None:
        """Queue dependents right behind their inputs in a slot.

        A waiting task whose unfinished inputs are all queued in one slot can go to that slot
        now: slots run in order, so its inputs are in the worker's store when it starts. A chain
        ``x = submit(f, x)`` then runs without a scheduler round trip per link. A dependent queued
        this way whose input fails or is cancelled is withdrawn with CancelCompute.
        """
        queue = ws.slots[slot]
        capacity = self._room(ws, slot, self.slot_capacity())
        index = 0
        while index < len(queue) and len(queue) < capacity:
            for dep in list(queue[index].dependents):
                if len(queue) >= capacity:
                    return
                if dep.state == WAITING and self._chainable(dep, ws, slot):
                    self._assign(dep, ws, slot)
            index += 1

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
            f"{ws.id}/{slot}", m.Compute(ts.key, ts.priority, deps, ts.options, ts.spec or [])
        )

    def _send(self, peer: str, msg: Any) -> None:
        self._out.append((peer, msg))

    def _free(self, ws: WorkerState, key: Any) -> None:
        """Tell ``ws`` to drop ``key``: one FreeKeys per worker per step, sent to a slot.

        A slot reads its messages in order before it starts a task, so the keys are gone before
        the slot makes anything new, however late the worker's control thread gets to run (under
        load it lagged the slots by up to 0.2 s, while they made ten more 10 MB results). When
        that slot has work in hand, the control connection is told too (freeing twice is
        harmless), so the memory does not wait for a long task to end.
        """
        msg = self._frees.get(ws.id)
        if msg is not None:
            msg.keys.append(key)
            return
        msg = self._frees[ws.id] = m.FreeKeys([key])
        slot = min(ws.ready_slots, key=lambda i: len(ws.slots[i]), default=-1)
        if slot >= 0:
            self._send(f"{ws.id}/{slot}", msg)
        if slot < 0 or ws.slots[slot]:
            self._send(ws.id, msg)

    def _flush(self) -> Outgoing:
        out, self._out = self._out, []
        self._frees.clear()
        return out

    # --- introspection (tests) ---------------------------------------------------------------

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
                assert ts.waiting_on == {d for d in ts.dependencies if d.state != MEMORY}, ts
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


def _error_frames(kind: str, detail: Any) -> list:
    """Exception frames built from builtins only: the caller's side rebuilds meshpool's class."""
    from ..transport.header import dumps_header

    return [dumps_header(("meshpool-error", kind, detail))]


def _missing_dependency_error(key: Any, dep_key: Any) -> list:
    return _error_frames(
        "KeyError",
        f"task {key!r} depends on {dep_key!r}, which the scheduler does not know "
        "(released or never submitted)",
    )
