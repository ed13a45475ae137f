"""``as_completed`` and ``wait`` over any futures (meshpool's or the stdlib's).

``as_completed`` here is the stdlib's plus two things: futures can be ``add``-ed while iterating,
and it supports ``async for`` (which never blocks the event loop). Duplicates are yielded once.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import AsyncIterator, Iterable, Iterator
from concurrent import futures as cf
from typing import TYPE_CHECKING, Any

from .future import Future, install_waiter, remove_waiter, wait_in_task

if TYPE_CHECKING:
    import asyncio

FIRST_COMPLETED = cf.FIRST_COMPLETED
FIRST_EXCEPTION = cf.FIRST_EXCEPTION
ALL_COMPLETED = cf.ALL_COMPLETED


def wait(
    fs: Iterable[cf.Future], timeout: float | None = None, return_when: str = ALL_COMPLETED
) -> cf._base.DoneAndNotDoneFutures:
    """The stdlib's ``concurrent.futures.wait``; meshpool futures are real stdlib futures.

    On meshpool futures it makes no per-future Condition (the stdlib's makes one for each: most
    of a future's memory). Inside a task on a worker, the waiting thread gives its slot back
    meanwhile."""
    fs = list(fs)
    timeout = wait_in_task(fs, timeout, return_when)
    unique = {f for f in fs if isinstance(f, Future)}
    if len(unique) != len(set(fs)):
        return cf.wait(fs, timeout=timeout, return_when=return_when)
    waiter = _Waiter(return_when)
    installed = [f for f in unique if install_waiter(f, waiter)]
    try:
        if waiter.arm(
            len(installed), _satisfied_already(unique.difference(installed), return_when)
        ):
            waiter.event.wait(timeout)
    finally:
        for f in installed:
            remove_waiter(f, waiter)
    done: set = {f for f in unique if f._state in _FINISHED_STATES}
    not_done: set = set(unique) - done
    return cf._base.DoneAndNotDoneFutures(done, not_done)


_FINISHED_STATES = frozenset(
    (cf._base.CANCELLED, cf._base.CANCELLED_AND_NOTIFIED, cf._base.FINISHED)
)


def _satisfied_already(finished: set, return_when: str) -> bool:
    """Do futures finished before the wait began already end it?"""
    if return_when == FIRST_COMPLETED:
        return bool(finished)
    if return_when == FIRST_EXCEPTION:
        return any(not f.cancelled() and f._exception is not None for f in finished)
    return False


class _Waiter:
    """Counts completions of the futures it was installed on (stdlib waiter protocol)."""

    def __init__(self, return_when: str) -> None:
        self.event = threading.Event()
        self._lock = threading.Lock()
        self._return_when = return_when
        self._pending = 0  # installed futures not finished yet
        self._armed = False

    def arm(self, installed: int, satisfied: bool) -> bool:
        """Installation is over; True if there is something to wait for."""
        with self._lock:
            self._pending += installed  # (completions so far have already counted down)
            self._armed = True
            return not satisfied and self._pending > 0

    def add_result(self, fut: cf.Future) -> None:
        self._finished(failed=False)

    def add_exception(self, fut: cf.Future) -> None:
        self._finished(failed=True)

    def add_cancelled(self, fut: cf.Future) -> None:
        self._finished(failed=False)

    def _finished(self, failed: bool) -> None:
        with self._lock:
            self._pending -= 1
            if (
                self._return_when == FIRST_COMPLETED
                or (failed and self._return_when == FIRST_EXCEPTION)
                or (self._armed and self._pending <= 0)
            ):
                self.event.set()


class as_completed(Iterator[cf.Future], AsyncIterator[cf.Future]):  # noqa: N801 - stdlib name
    """Iterate over futures as they finish; ``add()`` more while iterating."""

    def __init__(self, fs: Iterable[cf.Future] = (), timeout: float | None = None) -> None:
        self._lock = threading.Lock()
        self._done: queue.SimpleQueue = queue.SimpleQueue()
        self._added: set[int] = set()
        self._outstanding = 0
        self._total = 0
        self._timeout = timeout
        self._end: float | None = None
        self._async: tuple[asyncio.AbstractEventLoop, asyncio.Queue] | None = None
        for fut in fs:
            self.add(fut)

    def add(self, fut: cf.Future) -> None:
        with self._lock:
            if id(fut) in self._added:
                return
            self._added.add(id(fut))
            self._outstanding += 1
            self._total += 1
        fut.add_done_callback(self._on_done)

    def update(self, fs: Iterable[cf.Future]) -> None:
        for fut in fs:
            self.add(fut)

    def count(self) -> int:
        """Futures not yet yielded."""
        return self._outstanding

    def _on_done(self, fut: cf.Future) -> None:
        with self._lock:
            target = self._async
        if target is None:
            self._done.put(fut)
        else:
            loop, aqueue = target
            try:
                loop.call_soon_threadsafe(aqueue.put_nowait, fut)
            except RuntimeError:  # loop closed
                self._done.put(fut)

    # --- sync --------------------------------------------------------------------------------

    def __iter__(self) -> as_completed:
        if self._timeout is not None and self._end is None:
            self._end = time.monotonic() + self._timeout
        return self

    def __next__(self) -> cf.Future:
        if self._outstanding <= 0:
            raise StopIteration
        remaining = None if self._end is None else self._end - time.monotonic()
        try:
            if remaining is not None and remaining <= 0:
                fut = self._done.get_nowait()
            else:
                fut = self._done.get(timeout=remaining)
        except queue.Empty:
            raise TimeoutError(
                f"{self._outstanding} (of {self._total}) futures unfinished"
            ) from None
        self._outstanding -= 1
        return fut

    # --- async -------------------------------------------------------------------------------

    def __aiter__(self) -> as_completed:
        import asyncio  # (imported lazily: it costs ~60 ms at start-up)

        loop = asyncio.get_running_loop()
        aqueue: asyncio.Queue = asyncio.Queue()
        with self._lock:
            while True:
                try:
                    aqueue.put_nowait(self._done.get_nowait())
                except queue.Empty:
                    break
            self._async = (loop, aqueue)
        if self._timeout is not None and self._end is None:
            self._end = time.monotonic() + self._timeout
        return self

    async def __anext__(self) -> cf.Future:
        if self._outstanding <= 0:
            raise StopAsyncIteration
        assert self._async is not None, "use `async for` (which calls __aiter__) first"
        import asyncio

        remaining = None if self._end is None else max(0.0, self._end - time.monotonic())
        try:
            fut = await asyncio.wait_for(self._async[1].get(), remaining)
        except asyncio.TimeoutError:
            raise TimeoutError(
                f"{self._outstanding} (of {self._total}) futures unfinished"
            ) from None
        self._outstanding -= 1
        return fut

    def __repr__(self) -> str:
        return f"<meshpool.as_completed {self._outstanding} of {self._total} outstanding>"


def _noop(*_: Any) -> None:
    pass
