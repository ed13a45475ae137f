"""Recalls: taking back a task queued on a slot, for a client's cancel or an idle slot's steal.

The worker decides whether the task had started (its control thread answers CancelCompute
at once); until it answers the task stays PROCESSING with ``recall`` set (``state.py``'s
docstring has the whole story).
"""

from __future__ import annotations

import itertools
import logging

from .. import messages as m
from .model import (
    NO_WORKER,
    PROCESSING,
    READY,
    WAITING,
    TaskState,
    WorkerState,
    _CancelRequest,
    _Recall,
)
from .placement import STEAL_MAX_BYTES, Placement

logger = logging.getLogger("meshpool.scheduler")


class Recalls(Placement):
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
