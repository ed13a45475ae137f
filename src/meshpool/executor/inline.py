"""The two ways a caller's thread runs the client's state itself, instead of waking the I/O
thread: an idle ``submit()`` (to the lanes) and a ``result()`` (off them, ``reaping.py``).
Both run under the loop lock, with signals held (``interrupts.py``), and leave what may touch a
zmq socket to the I/O thread (docs/architecture.md, "Idle submits run on the caller's thread",
"Waiting callers read their results")."""

from __future__ import annotations

import os
import threading
from typing import TYPE_CHECKING, Any

from .interrupts import HeldInterrupts
from .reaping import Reaper

if TYPE_CHECKING:
    from .future import Future


class InlineState:
    """The inline half of :class:`~meshpool.executor.client.ClientCore`."""

    server: Any
    pending: dict
    broken: BaseException | None
    closing: bool
    pid: int
    thread: threading.Thread
    _loop_lock: threading.Lock
    _inline: bool
    _stopped: bool
    _deferred: list
    _deferred_messages: list
    _reaper: Reaper | None

    def wake(self) -> None:
        raise NotImplementedError

    def _drain_commands(self, inline: bool = False) -> None:
        raise NotImplementedError

    def _submit_inline(self) -> bool:
        """Idle, with the cluster embedded: run the queued submit on the caller's thread, from
        the state machine to the lanes, instead of waking the I/O thread to do it. A round trip
        is then one thread wake-up shorter (each costs tens of µs, more on a busy machine).
        Busy (tasks pending), submits go to the I/O thread, which batches them. True if nothing
        is left for the I/O thread to do."""
        if self.server is None or self.pending or self.broken is not None or self.closing:
            return False
        # (signals held from before the lock is taken: a handler raising between the acquire
        # and the try would leave it taken, and the I/O thread stuck for good)
        with HeldInterrupts():
            if not self._loop_lock.acquire(blocking=False):
                return False
            try:
                more = self._run_inline(self._drain_commands, True)
                return not (more or self._deferred or self._deferred_messages)
            finally:
                self._loop_lock.release()

    def reap(self, fut: Future, timeout: float | None) -> bool:
        """``result()`` with the cluster embedded: wait for ``fut`` on the lanes, in this thread
        (``reaping.py``). True when it is done or ``timeout`` passed; False: wait as usual."""
        reaper = self._reaper
        if (
            reaper is None
            or self.broken is not None
            or os.getpid() != self.pid
            or threading.current_thread() is self.thread
        ):
            return False
        return reaper.wait(fut, timeout, self._reap_lanes)

    def _reap_lanes(self, events: list[tuple[int, int]]) -> bool:
        """Run what arrived on ready lanes through the state machine, here; False if the I/O
        thread has stopped (nothing runs the state any more)."""
        with self._loop_lock:  # (signals are held: see Reaper.wait)
            if self._stopped:
                return False
            more = self._run_inline(self.server.handle_lane_events, events)
        if more or self._deferred_messages:
            self.wake()
        return True

    def _run_inline(self, work: Any, arg: Any) -> bool:
        """``work(arg)`` on this thread, under the loop lock: what goes to lanes is sent, what
        goes to zmq peers or needs the loop waits for it; True if the loop has work left."""
        self._inline = True
        self.server.inline_begin()
        try:
            work(arg)
        finally:
            more = self.server.inline_end()
            self._inline = False
        return bool(more)
