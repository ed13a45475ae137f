"""A caller's thread blocked in ``result()`` reads its result off the lanes itself.

With the cluster embedded, a result comes back on a lane (``transport/lanes.py``) to the
client's I/O thread, which runs it through the scheduler's state machine, completes the future
and so wakes the caller's thread: two thread wake-ups on the way back. Here the waiting thread
sleeps in an epoll set of its own over the lanes, which the kernel offers each lane's wake-up to
before the I/O thread's (``SchedulerServer.watch_lanes``), and handles what arrives inline, as
an idle ``submit()`` does on the way out: one wake-up.

One thread at a time does this (a second waits the usual way). The waiting thread is woken
through an eventfd if another thread completes its future (a failure, a cancel, a result that
came over zmq); it gives the lanes back when its future is done, and the kernel then offers
their wake-ups to the I/O thread again.
"""

from __future__ import annotations

import contextlib
import os
import select
import threading
import time
from collections.abc import Callable
from typing import Any

from .future import _DONE_STATES, install_waiter, remove_waiter
from .interrupts import HeldInterrupts

LaneHandler = Callable[[list[tuple[int, int]]], bool]


class _Signal:
    """A stdlib-style waiter: completion by another thread writes the eventfd."""

    __slots__ = ("fd", "owner")

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.owner = threading.get_ident()

    def add_result(self, future: Any) -> None:
        if threading.get_ident() != self.owner:
            with contextlib.suppress(OSError):
                os.eventfd_write(self.fd, 1)

    add_exception = add_cancelled = add_result


class Reaper:
    """The epoll set a waiting caller's thread sleeps in (register it with the server's
    ``watch_lanes`` before any lane connects), and the turn to use it."""

    def __init__(self) -> None:
        self.epoll = select.epoll()
        self._signal_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.epoll.register(self._signal_fd, select.EPOLLIN)
        self._turn = threading.Lock()  # held by the one thread reaping
        self._closed = False
        self.turns = 0  # times a waiting caller's thread handled lanes (for tests and stats)

    def wait(self, fut: Any, timeout: float | None, handle: LaneHandler) -> bool:
        """Wait for ``fut`` here, passing lane events to ``handle`` (which returns False once
        the client has stopped). True when ``fut`` is done or ``timeout`` has passed; False if
        the caller should wait the usual way (another thread reaps, or the client stopped)."""
        # (signals held for the whole wait: a handler raising between the epoll wait and the
        # handling of what it returned would lose that, the I/O thread never told; between a
        # lock's acquire and its try, it would leave the lock taken)
        with HeldInterrupts() as held:
            if not self._turn.acquire(blocking=False):
                return False
            try:
                if self._closed:
                    return False
                signal = _Signal(self._signal_fd)
                if not install_waiter(fut, signal):
                    return True
                held.wake_fd = self._signal_fd  # (a held signal ends the epoll wait)
                try:
                    return self._wait(fut, timeout, handle, held)
                finally:
                    held.wake_fd = -1
                    remove_waiter(fut, signal)
            finally:
                self._turn.release()
                if self._closed:  # (after the release: see close())
                    self.close()

    def _wait(
        self, fut: Any, timeout: float | None, handle: LaneHandler, held: HeldInterrupts
    ) -> bool:
        deadline = None if timeout is None else time.monotonic() + max(0.0, timeout)
        signal_fd = self._signal_fd
        while fut._state not in _DONE_STATES:
            wait_s = -1.0 if deadline is None else deadline - time.monotonic()
            if deadline is not None and wait_s <= 0:
                return True
            events = self.epoll.poll(wait_s)
            if any(fd == signal_fd for fd, _ in events):
                with contextlib.suppress(OSError):
                    os.eventfd_read(signal_fd)
                events = [e for e in events if e[0] != signal_fd]
            # (what the kernel woke us for, the I/O thread was not told: handled here, always)
            if events:
                self.turns += 1
            stopped = bool(events) and not handle(events)
            # (a held signal's handler runs as the hold ends; then, wait as usual)
            if stopped or self._closed or held.caught:
                return fut._state in _DONE_STATES
        return True

    def close(self) -> None:
        """The client stopped: close now, or let the thread reaping close on its way out (it
        looks after releasing its turn, so one of the two always gets the turn here)."""
        self._closed = True
        if self._turn.acquire(blocking=False):
            try:
                if not self.epoll.closed:
                    self.epoll.close()
                    os.close(self._signal_fd)
            finally:
                self._turn.release()
