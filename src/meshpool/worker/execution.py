"""Execution slots: threads that each own a socket to the scheduler and run its tasks in order.

Theory of operation::

    scheduler ──Compute / RunInitializer──▶ slot i (DEALER "worker-id/i")
              ◀──ComputeDone / ComputeErred / MissingData / AddKeys──┘

Each execution thread is a *slot*: the scheduler sends a slot its tasks directly, and the slot
runs them strictly in arrival order and answers on the same socket. A task therefore costs the
worker one thread wake-up, and the scheduler knows which task a slot is executing: the one its
run marker names (``worker/reporting.py``; without a marker, the oldest one it sent there that
has not finished). So a worker's death is blamed only on tasks that were executing
(KilledWorker).

That knowledge lags, though: when a slot finishes one task it starts the next at once, while its
ComputeDone is still on the way. So taking back a queued task (a client's cancel, or an idle
worker stealing it) is decided here, by :class:`Recalls`: the worker's control thread, which never
runs user code, answers the scheduler's CancelCompute at once, under the lock each slot takes
before starting a task. A task recalled before it started never starts; one already started
(or finished) is reported as such and the scheduler lets it be.

Inputs the worker lacks are fetched by the slot itself from the peers' data sockets, trying each
holder in turn (:data:`FETCH_TIMEOUT` each); if none answers, MissingData tells the scheduler.
Functions, arguments and results are unpickled and pickled here, never in the worker's I/O loop.

Tasks that wait for tasks
-------------------------
A slot is a connection and a queue, run by one thread at a time: its *owner*. A task that waits
for other tasks (``result()``, ``meshpool.wait``, ``meshpool.get`` inside the task) must not
hold its slot meanwhile, or a one-thread pool deadlocks on its first nested task. So the wait
goes through :meth:`Slot.block_on` (``executor.future`` calls it through a hook when the waiting
thread runs a task here)::

    owner T1 runs A ── A waits ──▶ SlotBlocked(A) on the slot socket: A leaves the slot's room
                                   T1 hands socket + queue to a new owner T2 (under a lock: a
                                   zmq socket may change threads only across a memory barrier)
    T2 runs the queue: B, C...     T1 waits; when A ends, T1 sends its ComputeDone on a spare
                                   DEALER "worker-id/slot~n" (same slot to the scheduler) and exits

The scheduler keeps A on the worker as executing (KilledWorker still blames it if the worker
dies) but no longer counts it against the slot, so it sends the slot more tasks. The Recalls
stay right: A is still running as far as a CancelCompute is concerned.

Replacement threads are capped per worker (:class:`Replacements`, default
:data:`MAX_REPLACEMENTS`): past the cap a waiting owner keeps its slot and runs the slot's tasks
itself until its wait ends ("help while waiting"). That cannot deadlock (someone always runs
the queue) but nests tasks on one stack, and an outer task returns only after the inner ones;
the cap trades threads for stack depth. Tasks submitted from a task rank one priority step
above it (``worker/nested.py``), so a task tree runs depth-first and the number of tasks
waiting at once stays near its depth times the thread count.
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import logging
import os
import queue
import sys
import threading
import time
from collections.abc import Callable, Sequence
from concurrent import futures as cf
from dataclasses import dataclass
from typing import Any

import zmq

from .. import messages as m
from ..transport import lanes, serialize, shm
from ..transport.header import MalformedMessage
from ..transport.runmarker import RunMarker
from ..transport.security import Security
from ..transport.sockets import connect_to_data
from .reporting import ResultHold
from .spares import SpareSockets
from .store import DataStore

logger = logging.getLogger("meshpool.worker")

SLOT_FAILED = 7  # exit code: a slot's loop failed (outside any task)
SMALL_RESULT = 64 * 1024  # results up to this size ride with the completion message
FETCH_TIMEOUT = 10.0  # seconds a peer gets to send data before the next holder is tried
# Threads per worker that may wait inside tasks while a replacement runs their slot. More costs
# threads (and memory for their stacks); fewer makes waiting tasks run queued tasks nested on
# their own stack, which delays the outer task until the inner ones finish.
MAX_REPLACEMENTS = 64
# A helping wait runs tasks nested on its own stack. Once the stack holds this share of the
# recursion limit it hands the slot over even past MAX_REPLACEMENTS: one more thread is better
# than a RecursionError. (Nesting is not bounded by the task tree's depth: a helper may be sent a
# task from another branch, whose whole subtree then runs above the frames waiting below it.)
NESTING_STACK_SHARE = 0.5
# A helping wait gives its own task this long to resume (after it starts waiting, and after each
# task it ran) before it runs a less urgent queued task nested. The scheduler frees the slot the
# moment an awaited task finishes, so the next task can arrive before the result has reached the
# waiting task (scheduler -> client -> future); run at once, that unrelated task would pin the
# waiting one under its whole subtree. Longer: fewer such nestings; shorter: less idle time when
# the wait really needs that task.
HELP_GRACE = 0.02
POLL_MS = 250  # an idle owner re-checks whether the slot is closing this often
# Threads whose task ended after they gave their slot away wait this long, this many per worker,
# to own a slot again: starting a thread costs ~0.2 ms (Thread.start waits for it to run), a
# parked one wakes in a fraction of that. More: idle threads kept around.
PARKED_THREADS = 4
PARK_SECONDS = 30.0

_local = threading.local()  # .slot: the Slot this thread works for; .task: its innermost _Running


class Initializers:
    """Initializers run once per process, whichever slot meets them first; the others wait."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._done: set[bytes] = set()

    def run(self, frames: list) -> list | None:
        """Run an initializer once; return exception frames if it raised."""
        token = bytes(frames[0])
        with self._lock:
            if token in self._done:
                return None
            self._done.add(token)
            try:
                fn, args = serialize.loads(frames)
                fn(*args)
            except BaseException as exc:
                logger.error("initializer failed: %r", exc)
                return serialize.dumps_exception(exc)
        return None


class Recalls:
    """Tasks taken back before they started, and tasks that started (see the module docstring).

    Keyed by (key, slot): a task recalled from one slot and sent to another slot of this worker
    must not be dropped by the second one.
    """

    FINISHED_MEMORY = 4096  # finished tasks remembered: covers completions still in flight

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._cancelled: set = set()
        self._running: set = set()
        self._finished: dict = {}  # insertion-ordered, bounded

    def cancel(self, key: Any, slot: int) -> bool:
        """Control thread: True if the task had not started (and now never will)."""
        with self._lock:
            if (key, slot) in self._running or (key, slot) in self._finished:
                return False
            self._cancelled.add((key, slot))
            return True

    def start(self, key: Any, slot: int) -> bool:
        """Slot thread, before running a task: False if it was recalled."""
        with self._lock:
            if (key, slot) in self._cancelled:
                self._cancelled.discard((key, slot))
                return False
            self._running.add((key, slot))
            return True

    def finish(self, key: Any, slot: int) -> None:
        with self._lock:
            self._running.discard((key, slot))
            self._finished[(key, slot)] = None
            if len(self._finished) > self.FINISHED_MEMORY:
                del self._finished[next(iter(self._finished))]


@dataclass(frozen=True)
class ReplacementStatistics:
    """A snapshot of :class:`Replacements`."""

    limit: int
    waiting: int  # threads now waiting in a task while a replacement runs their slot
    peak: int
    replaced: int  # hand-overs so far
    helped: int  # waits that ran queued tasks themselves (the cap was reached)


class Replacements:
    """The cap on threads of one worker waiting in tasks with their slot handed over, and the
    threads parked to become owners again."""

    def __init__(self, limit: int = MAX_REPLACEMENTS) -> None:
        self.limit = max(0, int(limit))
        self._lock = threading.Lock()
        self._parked: list[tuple[threading.Thread, queue.SimpleQueue]] = []
        self._waiting = 0
        self._peak = 0
        self._replaced = 0
        self._helped = 0

    def acquire(self, force: bool = False) -> bool:
        """True if one more thread may hand its slot over (``force``: even past the limit);
        else count a wait that helps."""
        with self._lock:
            if self._waiting >= self.limit and not force:
                self._helped += 1
                return False
            self._waiting += 1
            self._replaced += 1
            self._peak = max(self._peak, self._waiting)
            return True

    def release(self) -> None:
        """A thread that handed its slot over has finished its task (and exits)."""
        with self._lock:
            self._waiting -= 1

    def take_parked(self) -> tuple[threading.Thread, queue.SimpleQueue] | None:
        """A parked thread and its inbox (put the Slot it now owns there), or None."""
        with self._lock:
            return self._parked.pop() if self._parked else None

    def park(self) -> Slot | None:
        """A thread done with its task waits here for a slot to own; None: exit instead."""
        me: tuple[threading.Thread, queue.SimpleQueue] = (
            threading.current_thread(),
            queue.SimpleQueue(),
        )
        with self._lock:
            if len(self._parked) >= PARKED_THREADS:
                return None
            self._parked.append(me)
        try:
            slot: Slot = me[1].get(timeout=PARK_SECONDS)
        except queue.Empty:
            with self._lock:
                if me in self._parked:
                    self._parked.remove(me)
                    return None
            slot = me[1].get()  # taken just as the wait ended: the slot is on its way
        return slot

    def statistics(self) -> ReplacementStatistics:
        with self._lock:
            return ReplacementStatistics(
                self.limit, self._waiting, self._peak, self._replaced, self._helped
            )


class _Running:
    """A task running on the current thread (``_local.task``); tasks nest when a wait helps."""

    __slots__ = ("key", "priority", "blocked", "submitted", "waited", "outer", "depth", "handle")

    def __init__(self, key: Any, priority: Any, outer: _Running | None) -> None:
        self.key = key
        self.priority = priority
        self.blocked = False  # SlotBlocked sent: the scheduler no longer counts it in the slot
        self.submitted = False  # submitted tasks (current_executor()) since it last blocked
        self.waited = 0.0  # seconds spent in block_on
        self.outer = outer
        self.depth: int = 0 if outer is None else outer.depth + 1  # tasks it runs nested in
        self.handle: Any = None  # what current_executor() returns in this task (nested.py)


def _owner_thread(slot: Slot, hello: bool) -> None:
    """A slot thread's life: own a slot; once it gave it away and its task ended, park until a
    slot needs a new owner (or exit)."""
    next_slot: Slot | None = slot
    try:
        while next_slot is not None and next_slot._serve(hello):
            hello = False
            threading.current_thread().name = "meshpool-parked"
            next_slot = next_slot.replacements.park()
    except BaseException:
        # a failure in the slot's own machinery (not in a task: those are caught): the slot is
        # dead, and the tasks sent to it would wait forever. Exit instead: the scheduler
        # reschedules them and the nanny starts a fresh worker.
        logger.exception("slot %d failed; the worker exits", slot.index)
        sys.stderr.flush()
        os._exit(SLOT_FAILED)


def current_task() -> _Running | None:
    """The task the calling thread runs (the innermost, when a wait runs tasks nested)."""
    return getattr(_local, "task", None)


def current_task_priority() -> Any:
    """The scheduler priority of the task the calling thread runs, or None (worker/nested.py)."""
    task = getattr(_local, "task", None)
    return None if task is None else task.priority


def note_submission() -> None:
    """The task the calling thread runs (if any) has just submitted tasks (worker/nested.py)."""
    task = getattr(_local, "task", None)
    if task is not None:
        task.submitted = True


def _no_barrier(timeout: float | None) -> None:
    pass


# Set by worker/nested.py: returns once the scheduler has seen every task this process submitted
# so far (a round trip on the submitting connection).
submissions_barrier: Callable[[float | None], None] = _no_barrier


def wait_in_slot(futures: Sequence[cf.Future], timeout: float | None, return_when: str) -> bool:
    """The hook ``executor.future`` calls before a blocking wait; True if it did the waiting.

    Only a thread running a task in a slot waits here (giving the slot back meanwhile); any
    other thread gets False and waits as usual."""
    slot: Slot | None = getattr(_local, "slot", None)
    if slot is None or getattr(_local, "task", None) is None:
        return False
    slot.block_on(futures, timeout, return_when)
    return True


class Slot:
    """One execution slot: its own connection to the scheduler, and the tasks sent there, run
    in arrival order by one thread at a time, the owner (see "Tasks that wait for tasks")."""

    def __init__(
        self,
        index: int,
        *,
        worker_id: str,
        scheduler_address: str,
        store: DataStore,
        functions: serialize.LoadedFunctions,
        initializers: Initializers,
        security: Security | None,
        recalls: Recalls | None = None,
        replacements: Replacements | None = None,
        marker: RunMarker | None = None,
    ) -> None:
        self.recalls = recalls if recalls is not None else Recalls()
        self.marker = marker
        self.hold = ResultHold()  # finished tasks' reports held back (worker/reporting.py)
        self._popped = 0  # Computes taken off the queue: the number of the one starting
        self._busy = False  # the running task had others queued behind it when it started
        self.replacements = replacements if replacements is not None else Replacements()
        self.index = index
        self.worker_id = worker_id
        self.store = store
        self.functions = functions
        self.initializers = initializers
        self.security = security
        self.queue: collections.deque = collections.deque()
        self.current: Any = None  # the key the owner runs (heartbeats count these)
        self.running = True
        self.scheduler_address = scheduler_address
        self.channel: lanes.SlotChannel = lanes.Unconnected()  # (the first owner connects)
        self._spares = SpareSockets(f"{worker_id}/{index}", scheduler_address, security)
        self._peers: dict[str, zmq.Socket] = {}
        self._request_id = 0
        self._owner: threading.Thread | None = None
        self._handover = threading.Lock()
        self._generation = itertools.count()
        # a helping wait sleeps on the slot socket and this pipe, written when a future it
        # waits for finishes
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)

    # --- owner threads -----------------------------------------------------------------------

    def start(self) -> None:
        """Start the first owner thread (it says hello: the scheduler may send it tasks)."""
        self._spawn_owner(hello=True)

    def _spawn_owner(self, hello: bool = False) -> None:
        """Make another thread (a parked one, else a new one) the owner: the socket, queue and
        peers are its from now on."""
        generation = next(self._generation)
        parked = self.replacements.take_parked() if generation else None
        if parked is None:
            thread = threading.Thread(target=_owner_thread, args=(self, hello), daemon=True)
        else:
            thread = parked[0]
        thread.name = f"meshpool-slot-{self.index}" + (f".{generation}" if generation else "")
        with self._handover:  # the barrier between the old owner's last use and the new one's
            self._owner = thread
            self.current = None
        if parked is None:
            thread.start()
        else:
            parked[1].put(self)

    @property
    def tasks_started(self) -> int:
        """Tasks this slot has taken from its queue so far."""
        return self._popped

    def _owned(self) -> bool:
        # only the owner changes the owner, so no lock is needed to ask "is it me?"
        return self._owner is threading.current_thread()

    def _serve(self, hello: bool) -> bool:
        """Run the slot's tasks while this thread owns it. True if the thread ended by giving the
        slot away (to wait in a task that has now ended): it may park and own a slot again."""
        with self._handover:  # pairs with _spawn_owner: the previous owner is done with them
            _local.slot = self
        try:
            if hello:
                self.channel = lanes.slot_channel(
                    f"{self.worker_id}/{self.index}", self.scheduler_address, self.security
                )
                self._send(m.SlotHello(self.worker_id, self.index))
            while self.running and self._owned():
                self._step(POLL_MS)
        except zmq.ContextTerminated:
            pass
        finally:
            owner = self._owned()
            if owner:  # the slot is closing
                self._close()
            else:
                self.replacements.release()
        return not owner and self.running

    def _close(self) -> None:
        # (the wake pipe stays open: a late done-callback must never write to a reused fd)
        if self.hold.held:
            with contextlib.suppress(zmq.ZMQError):
                self._send()
        self.channel.close()
        for sock in self._peers.values():
            sock.close(linger=0)
        self._spares.close()

    def _step(self, poll_ms: int) -> None:
        """Owner: read what the scheduler sent, then run the next task (if any)."""
        if not self.queue and not self.channel.poll(poll_ms):
            return
        self._drain()
        if self.queue:
            self._run_task(self.queue.popleft())
        if not self.queue and self.hold.held:  # (the next task was taken back, say)
            self._send()

    def _run_task(self, compute: m.Compute) -> None:
        self._busy = bool(self.queue)  # more work was here: a burst, whose reports may be held
        self._popped += 1
        seq = self._popped
        if not self.recalls.start(compute.key, self.index):
            return  # taken back by the scheduler before it started
        outer = getattr(_local, "task", None)
        _local.task = _Running(compute.key, compute.priority, outer)
        self.current = compute.key
        marker = self.marker
        previous = 0
        if marker is not None:
            previous = marker.get(self.index)
            marker.set(self.index, seq)
        try:
            start = time.perf_counter()
            report = self.execute(compute)
            self.hold.note_duration(time.perf_counter() - start)
            if self._owned():
                self._report(compute, report)
                # (only once reported: a slot that dies sending it blames this task, as before;
                # and not by a thread that gave the slot away: the marker is the owner's now)
                if marker is not None:
                    marker.set(self.index, previous)
            else:  # it gave the slot away while waiting; the owner's socket is not ours
                self._spares.send(m.encode(report))
        finally:
            _local.task = outer
            if self._owned():
                self.current = outer.key if outer is not None else None
            self.recalls.finish(compute.key, self.index)

    def _report(self, compute: m.Compute, report: Any) -> None:
        """Send a task's report, or hold a ComputeDone while the next tiny task runs."""
        at_most_once = bool(compute.options and compute.options.get("at_most_once"))
        if type(report) is m.ComputeDone and self.hold.possible(at_most_once):
            if not self.queue and self._busy:
                # (a look for the next task only in a burst: one caller waiting on each result
                # gets it sooner without, as nothing is ever queued then)
                self._drain()
            if self.hold.keep(report, bool(self.queue)):
                return
        self._send(report)

    def _send(self, msg: Any = None) -> None:
        """Send ``msg`` (None: nothing new) after what the slot holds, in one message."""
        frames = m.encode_many(self.hold.take(msg)) if self.hold.held else None
        if msg is not None and frames is None:
            frames = m.encode(msg)
        if frames is not None:
            try:
                self.channel.send(frames)
            except lanes.LaneClosed:  # the scheduler is gone: the worker learns it and leaves
                logger.debug("slot %d: scheduler lane closed; report dropped", self.index)

    def _drain(self) -> None:
        """Read everything waiting: queue computes, run initializers."""
        try:
            received = self.channel.receive()
        except (lanes.LaneClosed, MalformedMessage) as exc:
            logger.debug("slot %d: scheduler lane closed (%s)", self.index, exc)
            return
        for frames in received:
            try:
                msgs = m.decode_all(frames)
            except MalformedMessage as exc:
                logger.warning("dropping malformed message from the scheduler: %s", exc)
                continue
            for msg in msgs:
                self._take(msg)

    def _take(self, msg: Any) -> None:
        """Queue a compute, free keys, run an initializer (in arrival order)."""
        if isinstance(msg, m.Compute):
            self.queue.append(msg)
        elif isinstance(msg, m.FreeKeys):  # sent here so they go before the next task
            for key in msg.keys:
                self.store.free(key)
        elif isinstance(msg, m.RunInitializer):
            error = self.initializers.run(msg.frames)
            if error is not None:
                self._send(m.InitializerErred(error))
        elif isinstance(msg, m.Reply):
            pass  # liveness ping
        else:
            logger.warning("slot dropping unexpected %s", type(msg).__name__)

    # --- waiting inside a task ---------------------------------------------------------------

    def block_on(
        self, futures: Sequence[cf.Future], timeout: float | None, return_when: str
    ) -> None:
        """Wait for ``futures`` inside the task this thread runs, giving its slot back meanwhile
        (see "Tasks that wait for tasks"). Returns when satisfied or when ``timeout`` passed."""
        task: _Running = _local.task
        start = time.perf_counter()
        try:
            if not self._owned() or _satisfied(futures, return_when):
                cf.wait(futures, timeout, return_when)  # not holding the slot: nothing to give
            else:
                self._give_way(task, futures, timeout, return_when)
        finally:
            task.waited += time.perf_counter() - start

    def _give_way(
        self, task: _Running, futures: Sequence[cf.Future], timeout: float | None, return_when: str
    ) -> None:
        if not task.blocked:
            if task.submitted:
                # the tasks it submitted must reach the scheduler before SlotBlocked frees the
                # slot, or the slot is sent an older, less urgent task (the two travel on
                # different connections): breadth-first again
                task.submitted = False
                submissions_barrier(timeout)
            task.blocked = True
            self._send(m.SlotBlocked(task.key))
        if self.replacements.acquire(force=not _stack_room()):
            self._spawn_owner()
            cf.wait(futures, timeout, return_when)
        else:
            self._help_until(task, futures, timeout, return_when)

    def _help_until(
        self, task: _Running, futures: Sequence[cf.Future], timeout: float | None, return_when: str
    ) -> None:
        """Run the slot's tasks on this thread until ``futures`` satisfy ``return_when``."""
        deadline = None if timeout is None else time.monotonic() + timeout
        grace_until = time.monotonic() + HELP_GRACE
        for fut in futures:
            fut.add_done_callback(self._wake)
        poller = zmq.Poller()
        poller.register(self.channel.pollable, zmq.POLLIN)
        poller.register(self._wake_r, zmq.POLLIN)
        while not _satisfied(futures, return_when) and self.running:
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                return
            if not self._owned():  # a nested wait gave the slot away: wait like anyone else
                cf.wait(futures, remaining, return_when)
                return
            if self.queue and not self._defer(task, grace_until):
                self._run_task(self.queue.popleft())
                grace_until = time.monotonic() + HELP_GRACE  # its result may be on the way
                continue
            wait_ms = POLL_MS if remaining is None else min(POLL_MS, int(remaining * 1000) + 1)
            if self.queue:  # deferred: sleep only until the grace period ends
                wait_ms = min(wait_ms, int((grace_until - time.monotonic()) * 1000) + 1)
            events = dict(poller.poll(wait_ms))
            if self._wake_r in events:
                _drain_pipe(self._wake_r)
            if self.channel.pollable in events:
                self._drain()
                if self.channel.closed:  # (the scheduler is gone: its end of file stays readable)
                    poller.unregister(self.channel.pollable)

    def _defer(self, task: _Running, grace_until: float) -> bool:
        """Whether the next queued task should wait for ``task`` to resume (HELP_GRACE)."""
        if time.monotonic() >= grace_until:
            return False
        try:
            return bool(self.queue[0].priority > task.priority)  # less urgent
        except TypeError:  # priorities of unlike shapes: no opinion
            return False

    def _wake(self, _fut: cf.Future) -> None:
        try:
            os.write(self._wake_w, b"x")
        except OSError:  # full (a wake-up is pending anyway) or closed
            pass

    # --- running a task ----------------------------------------------------------------------

    def execute(self, compute: m.Compute) -> Any:
        """Run one task; return its ComputeDone / ComputeErred / MissingData."""
        missing = self._fetch_missing(compute)
        if missing is not None:
            return m.MissingData(compute.key, missing[0], missing[1])
        start = time.perf_counter()
        fn = None
        try:
            fn, args, kwargs = self._unpack(compute)
            value = fn(*args, **kwargs)
        except BaseException as exc:  # SystemExit and friends fail this task only
            return m.ComputeErred(compute.key, _busy(start), _dump_error(exc))
        duration = _busy(start)
        try:
            frames = serialize.dumps(value, what=f"result of {_fn_name(fn)}")
        except Exception as exc:
            return m.ComputeErred(compute.key, duration, _dump_error(exc))
        size = self.store.put_result(compute.key, value, frames)
        small = size <= SMALL_RESULT
        return m.ComputeDone(compute.key, size, small, duration, frames if small else [])

    def _unpack(self, compute: m.Compute) -> tuple:
        fn_bytes, *arg_frames = compute.frames
        fn = self.functions.loads(fn_bytes)
        options = compute.options
        args_key = options.get("args_key") if options else None
        if args_key is not None:  # large arguments came as a data key, straight from the caller
            frames = self.store.frames(args_key)
            if frames is None:
                raise KeyError(args_key)
            args, kwargs = serialize.loads(frames, resolve=self.store.value)
        elif compute.dependencies:
            args, kwargs = serialize.loads(arg_frames, resolve=self.store.value)
        else:
            args, kwargs = serialize.loads(arg_frames)
        return fn, args, kwargs

    # --- fetching inputs ---------------------------------------------------------------------

    def _fetch_missing(self, compute: m.Compute) -> tuple[Any, str] | None:
        """Fetch inputs held elsewhere; on failure return (key, last address tried)."""
        wanted = [(k, list(a)) for k, a in compute.dependencies if k not in self.store]
        added = []
        while wanted:
            by_address: dict[str, list] = {}
            for key, addresses in wanted:
                if not addresses:
                    return key, ""
                by_address.setdefault(addresses[0], []).append(key)
            still: list = []
            for address, keys in by_address.items():
                got = self._get(address, keys)
                for key in keys:
                    if key in got:
                        added.append((key, self.store.put_frames(key, got[key])))
                    else:
                        addresses = next(a for k, a in wanted if k == key)
                        addresses.pop(0)
                        if not addresses:
                            if added:
                                self._send(m.AddKeys(added))
                            return key, address
                        still.append((key, addresses))
            wanted = still
        if added:
            self._send(m.AddKeys(added))
        return None

    def _get(self, address: str, keys: list) -> dict:
        """Ask one peer for keys; return what it sent (nothing if it did not answer in time)."""
        sock = self._peers.get(address)
        if sock is None:
            sock = self._peers[address] = connect_to_data(address, self.security)
        self._request_id += 1
        sock.send_multipart(m.encode(m.GetData(self._request_id, keys, shm.host_key())))
        deadline = time.monotonic() + FETCH_TIMEOUT
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not sock.poll(int(remaining * 1000) + 1):
                logger.warning("peer %s did not send %r in time", address, keys)
                self._peers.pop(address, None)
                sock.close(linger=0)
                return {}
            frames = sock.recv_multipart(copy=False)
            try:
                msg = m.decode([frames[0].bytes, *[_buffer(f) for f in frames[1:]]])
                if isinstance(msg, m.Data):  # (a late answer too: its files are taken in)
                    msg.frames = shm.unpack_frames(msg.frames, msg.shm)
            except (MalformedMessage, ValueError, TypeError, OSError) as exc:
                logger.warning("dropping malformed data reply from %s: %s", address, exc)
                continue
            if not isinstance(msg, m.Data) or msg.request_id != self._request_id:
                continue  # a late answer to an earlier request
            got = {}
            offset = 0
            for key, nframes in msg.items:
                if nframes >= 0:
                    got[key] = msg.frames[offset : offset + nframes]
                    offset += nframes
            return got


def _buffer(frame: Any) -> Any:
    """A received frame for pickle: small ones as bytes, big ones zero-copy."""
    if isinstance(frame, zmq.Frame):
        return frame.buffer if len(frame) >= serialize.OOB_THRESHOLD else frame.bytes
    return frame


def _fn_name(fn: Any) -> str:
    return getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None) or repr(fn)


def _dump_error(exc: BaseException) -> list:
    try:
        return serialize.dumps_exception(exc)
    except Exception as err:  # pragma: no cover - dumps_exception already falls back
        return serialize.dumps_exception(RuntimeError(f"unreportable error: {err}"))


def _busy(start: float) -> float:
    """Seconds the current task has run since ``start``, less what it spent waiting for other
    tasks (the scheduler sizes prefetch by task durations: waits are no work)."""
    task: _Running | None = getattr(_local, "task", None)
    return time.perf_counter() - start - (task.waited if task is not None else 0.0)


def _stack_room() -> bool:
    """Whether this thread's stack may grow by another nested task (NESTING_STACK_SHARE)."""
    limit = int(sys.getrecursionlimit() * NESTING_STACK_SHARE)
    frame = sys._getframe()
    depth = 0
    while frame is not None and depth < limit:
        frame = frame.f_back  # type: ignore[assignment]
        depth += 1
    return depth < limit


def _satisfied(futures: Sequence[cf.Future], return_when: str) -> bool:
    """Whether ``cf.wait(futures, return_when=...)`` would return now."""
    if return_when == cf.FIRST_COMPLETED:
        return any(f.done() for f in futures) or not futures
    if return_when == cf.FIRST_EXCEPTION:
        for f in futures:
            if f.done() and not f.cancelled() and f.exception(0) is not None:
                return True
    return all(f.done() for f in futures)


def _drain_pipe(fd: int) -> None:
    try:
        while os.read(fd, 4096):
            pass
    except OSError:  # empty (BlockingIOError) or closed
        pass
