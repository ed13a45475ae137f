"""Graceful retirement: a worker hands off the results only it holds, then is told to close."""

from __future__ import annotations

import logging

from .. import messages as m
from .model import (
    MEMORY,
    WorkerState,
)
from .recalls import Recalls

logger = logging.getLogger("meshpool.scheduler")


class Retirement(Recalls):
    """A retiring worker gets no new tasks (its slots are no longer open) and finishes those it
    has; every result it alone holds is copied to another worker (ReplicateKeys: the other
    worker fetches it from the retiring one's data socket and answers AddKeys). Once it runs
    nothing and holds nothing only it has, it is told to close: no future loses its value."""

    def _client_retire(self, client_id: str, msg: m.RetireWorkers) -> None:
        names = set(msg.names)
        targets = [ws for ws in self.workers.values() if ws.name in names or ws.id in names]
        if not targets:
            self._out.append((client_id, m.Reply(msg.request_id, [])))
            return
        request = (client_id, msg.request_id, [ws.name for ws in targets])
        for ws in targets:
            self._start_retire(ws, request)

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
            sole = [ts for ts in ws.has_what if ts.who_has is ws and ts.state == MEMORY]
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
