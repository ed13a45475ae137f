"""``meshpool.Future``: a real ``concurrent.futures.Future`` for a task on the cluster.

It subclasses the stdlib's Future and is completed through ``set_result`` / ``set_exception`` /
``set_running_or_notify_cancel``, so the stdlib's ``wait`` and ``as_completed``,
``asyncio.wrap_future`` and ``loop.run_in_executor`` see it like any other.

Results arrive *packed*: the I/O thread stores the result's frames (small results ride with the
completion message) or a marker that the value stays on a worker (large results). ``result()``
unpacks in the caller's thread — the I/O thread never runs user unpickling code — fetching from the
worker first when needed; ``await fut`` fetches without blocking the event loop.

Done-callbacks run on a callback thread, never on the I/O thread (DESIGN.md rule 7). Dropping the
last reference to a future releases its key on the cluster (its finalizer only enqueues); it never
cancels the task.

Inside a task on a worker, a wait (``result()``, ``exception()``, ``meshpool.wait``) on a future
that is not done first goes through :data:`task_wait_hook`, which the worker process installs:
the waiting thread gives its execution slot back until the wait ends (``worker/execution.py``),
so tasks that wait for the tasks they submit cannot deadlock the pool.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import _base
from typing import TYPE_CHECKING, Any

from .. import messages as m
from ..errors import SerializationError
from ..transport import serialize

if TYPE_CHECKING:
    import asyncio

    from .client import ClientCore

CANCEL_TIMEOUT = 5.0  # seconds cancel() waits for the scheduler (and a worker) to answer

# Set in worker processes: ``hook(futures, timeout, return_when)`` waits for ``futures`` if the
# calling thread runs a task (handing its slot over meanwhile) and returns True; else False.
task_wait_hook: Callable[[Sequence[_base.Future], float | None, str], bool] | None = None


def wait_in_task(
    futures: Sequence[_base.Future], timeout: float | None, return_when: str = _base.ALL_COMPLETED
) -> float | None:
    """Before a blocking wait: let :data:`task_wait_hook` do it if this thread runs a task.

    Returns what is left of ``timeout`` for the caller's own (then immediate) wait."""
    hook = task_wait_hook
    if hook is None:
        return timeout
    start = time.monotonic()
    if not hook(futures, timeout, return_when) or timeout is None:
        return timeout
    return max(0.0, timeout - (time.monotonic() - start))


class Packed:
    """A result's frames, unpickled on first use in the caller's thread."""

    __slots__ = ("frames",)

    def __init__(self, frames: list) -> None:
        self.frames = frames


class Remote:
    """A result held by workers, fetched on first use."""

    __slots__ = ("nbytes",)

    def __init__(self, nbytes: int) -> None:
        self.nbytes = nbytes


class KeyRef:
    """A reference to an internal key of a submitted graph (pickled as its key, like a Future)."""

    __slots__ = ("key",)

    def __init__(self, key: Any) -> None:
        self.key = key


class Future(_base.Future):
    """The future of a task running on a meshpool cluster.

    ``key`` names the task on the cluster. Besides the stdlib's methods it is awaitable.
    """

    def __init__(self, key: Any, client: ClientCore) -> None:
        # not _base.Future.__init__: the Condition (most of a stdlib future's ~1.6 KB) is made
        # only when a thread waits or registers a callback; see the `_condition` property
        self._cond: threading.Condition | None = None
        self._state = _base.PENDING
        self._result = None
        self._exception = None
        self._waiters: list = []
        self._done_callbacks: list = []
        self.key = key
        self._client = client

    # --- a lazily made Condition ---------------------------------------------------------------
    #
    # The stdlib's methods, wait() and as_completed() reach the condition through
    # ``self._condition``, which makes it on first use under one global lock. The I/O thread
    # completes a future under that same lock when no condition exists yet: then no thread can
    # be waiting on it (waiting needs the condition), and any later waiter finds it finished.

    @property
    def _condition(self) -> threading.Condition:
        cond = self._cond
        if cond is None:
            with _creation_lock:
                cond = self._cond
                if cond is None:
                    cond = self._cond = threading.Condition()
        return cond

    @_condition.setter
    def _condition(self, value: threading.Condition) -> None:
        self._cond = value

    def done(self) -> bool:
        return self._state in _DONE_STATES

    def exception(self, timeout: float | None = None) -> BaseException | None:
        if self._state == _base.FINISHED:
            return self._exception
        if task_wait_hook is not None and self._state not in _DONE_STATES:
            timeout = wait_in_task((self,), timeout)
        return super().exception(timeout)

    def cancelled(self) -> bool:
        return self._state in _CANCELLED_STATES

    def running(self) -> bool:
        """True while a worker runs the task. A pending future asks the scheduler (a bounded
        wait, like cancel()); the hot path sends no message per task for this."""
        if self._state != _base.PENDING:
            return self._state == _base.RUNNING
        try:
            return bool(
                self._client.request(lambda rid: m.IsRunning(rid, self.key), CANCEL_TIMEOUT)
            )
        except Exception:
            return False

    def set_result(self, result: Any) -> None:
        if not self._complete_unwatched(result, None):
            super().set_result(result)

    def set_exception(self, exception: BaseException | None) -> None:
        if not self._complete_unwatched(None, exception):
            super().set_exception(exception)

    def _complete_unwatched(self, result: Any, exception: BaseException | None) -> bool:
        """Finish without a Condition if none exists; False if there is one (use it).
        Waiters installed without one (:func:`install_waiter`) are told, as the stdlib does."""
        with _creation_lock:
            if self._cond is not None:
                return False
            if self._state in _DONE_STATES:
                raise _base.InvalidStateError(f"{self._state}: {self!r}")
            self._result = result
            self._exception = exception
            self._state = _base.FINISHED
            for waiter in self._waiters:
                if exception is None:
                    waiter.add_result(self)
                else:
                    waiter.add_exception(self)
        self._invoke_callbacks()
        return True

    def add_done_callback(self, fn: Callable[[_base.Future], object]) -> None:
        """The stdlib's, without making a Condition (for a pending future, or a done one: it
        calls ``fn`` at once, as the stdlib does)."""
        with _creation_lock:
            if self._cond is not None:
                finished = None
            else:
                finished = self._state in _DONE_STATES
                if not finished:
                    self._done_callbacks.append(fn)
                    return
        if finished is None:
            super().add_done_callback(fn)
            return
        try:
            fn(self)
        except Exception:
            _base.LOGGER.exception("exception calling callback for %r", self)

    def __repr__(self) -> str:
        return f"<meshpool.Future {self.key!r} {self._state.lower()}>"

    def __del__(self) -> None:
        client = self.__dict__.get("_client")
        if client is not None:
            client.release_soon(self.key)

    def __reduce__(self) -> Any:
        raise TypeError(
            "a meshpool.Future can be passed as an argument of submit() on its own executor "
            "(it becomes a dependency), but not pickled elsewhere"
        )

    # --- results -----------------------------------------------------------------------------

    def result(self, timeout: float | None = None) -> Any:
        if self._state == _base.FINISHED:  # set after _result/_exception: no lock needed
            if self._exception is not None:
                raise self._exception
            value = self._result
        else:
            if task_wait_hook is not None and self._state not in _DONE_STATES:
                timeout = wait_in_task((self,), timeout)
            value = self._wait(timeout) if self._cond is None else super().result(timeout)
        if type(value) is Packed:
            value = self._unpack(value.frames)
        elif type(value) is Remote:
            value = self._unpack(self._client.fetch(self.key, timeout))
        return value

    def _wait(self, timeout: float | None) -> Any:
        """``result()`` of a future nobody made a Condition for: wait on a lock of our own that
        its completion releases, as a stdlib waiter. A Condition, made and waited on, was ~5 %
        of the caller's py-spy samples in a round-trip loop, and stayed on the future (~1 KB)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        if not self._client.reap(self, timeout):  # (embedded: read the lanes in this thread)
            waiter = _ResultWaiter()
            if install_waiter(self, waiter):
                try:
                    left = -1 if deadline is None else max(0.0, deadline - time.monotonic())
                    waiter.lock.acquire(timeout=left)
                finally:
                    remove_waiter(self, waiter)
        state = self._state
        if state == _base.FINISHED:
            if self._exception is not None:
                raise self._exception
            return self._result
        if state in _CANCELLED_STATES:
            raise _base.CancelledError()
        raise _base.TimeoutError()

    def _unpack(self, frames: list) -> Any:
        try:
            value = serialize.loads(frames)
        except Exception as exc:
            raise SerializationError(
                f"the result of task {self.key!r} could not be unpickled here: "
                f"{type(exc).__name__}: {exc}"
            ) from exc
        self._result = value
        return value

    def __await__(self) -> Any:
        return self._await().__await__()

    async def _await(self) -> Any:
        import asyncio  # (imported lazily: it costs ~60 ms at start-up)

        if not self.done():
            loop = asyncio.get_running_loop()
            waiter = loop.create_future()

            def wake(_: Any) -> None:
                loop.call_soon_threadsafe(_set_done, waiter)

            self.add_done_callback(wake)
            try:
                await waiter
            except asyncio.CancelledError:
                await asyncio.to_thread(self.cancel)
                raise
        value = super().result(0)
        if type(value) is Packed:
            return self._unpack(value.frames)
        if type(value) is Remote:
            frames_by_key = await asyncio.wrap_future(self._client.fetch_async(self.key))
            return self._unpack(frames_by_key[self.key])
        return value

    # --- cancellation ------------------------------------------------------------------------

    def cancel(self) -> bool:
        """Cancel the task if no worker has started it; True if it is now cancelled."""
        with self._condition:
            if self._state in (_base.CANCELLED, _base.CANCELLED_AND_NOTIFIED):
                return True
            if self._state == _base.FINISHED:
                return False
        cancelled = self._client.cancel([self], CANCEL_TIMEOUT)
        return self.key in cancelled or self.cancelled()

    def _mark_cancelled(self) -> None:
        """Cancelled on the cluster: make stdlib waiters see it at once."""
        if _base.Future.cancel(self):
            with self._condition:
                if self._state == _base.CANCELLED:
                    self.set_running_or_notify_cancel()

    # --- callbacks off the I/O thread --------------------------------------------------------

    def _invoke_callbacks(self) -> None:
        if self._done_callbacks:
            _callbacks().put(self)

    def _run_callbacks(self) -> None:
        _base.Future._invoke_callbacks(self)  # type: ignore[attr-defined]

    # --- graph pictures ----------------------------------------------------------------------

    def __meshpool_graph__(self) -> dict:
        return self._client.graph_of([self.key])


def _set_done(waiter: asyncio.Future) -> None:
    if not waiter.done():
        waiter.set_result(None)


_creation_lock = threading.Lock()
_DONE_STATES = frozenset((_base.CANCELLED, _base.CANCELLED_AND_NOTIFIED, _base.FINISHED))


class _ResultWaiter:
    """A stdlib-style waiter for one thread in ``result()``: a lock held until the future ends."""

    __slots__ = ("lock",)

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.lock.acquire()

    def add_result(self, future: Any) -> None:
        self.lock.release()

    add_exception = add_cancelled = add_result


def install_waiter(fut: Future, waiter: Any) -> bool:
    """Add a stdlib-style waiter (``add_result``/``add_exception``/``add_cancelled``) to a
    pending future, under its Condition if it has one, else under the creation lock (no
    Condition is made); False if the future is already done."""
    with _creation_lock:
        if fut._cond is None:
            if fut._state in _DONE_STATES:
                return False
            fut._waiters.append(waiter)
            return True
    with fut._condition:  # (made before the lock above was taken: it cannot go away)
        if fut._state in _DONE_STATES:
            return False
        fut._waiters.append(waiter)
        return True


def remove_waiter(fut: Future, waiter: Any) -> None:
    with _creation_lock:
        if fut._cond is None:
            fut._waiters.remove(waiter)
            return
    with fut._condition:
        fut._waiters.remove(waiter)


_CANCELLED_STATES = frozenset((_base.CANCELLED, _base.CANCELLED_AND_NOTIFIED))

_callback_queue: queue.SimpleQueue | None = None
_callback_lock = threading.Lock()


def _callbacks() -> queue.SimpleQueue:
    """The process's callback queue, served by one daemon thread (started on first use)."""
    global _callback_queue
    if _callback_queue is None:
        with _callback_lock:
            if _callback_queue is None:
                q: queue.SimpleQueue = queue.SimpleQueue()
                threading.Thread(
                    target=_run_callbacks, args=(q,), name="meshpool-callbacks", daemon=True
                ).start()
                _callback_queue = q
    return _callback_queue


def _run_callbacks(q: queue.SimpleQueue) -> None:
    while True:
        fut = q.get()
        try:
            fut._run_callbacks()
        except Exception:  # the stdlib already logs each callback's exception
            pass
        del fut
