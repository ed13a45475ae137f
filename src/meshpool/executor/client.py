"""The client's I/O thread: the one owner of an executor's sockets.

Theory of operation::

    caller threads ──commands (SimpleQueue) + wake pipe──▶ I/O thread ──▶ scheduler
                                                            │   (embedded: SchedulerServer in
                                                            │    this thread, no extra hop)
    futures ◀── set_result(Packed | Remote) / set_exception ┘◀── done / erred / cancelled
    result() of a large value ──fetch──▶ who-has ──▶ GetData to the worker's data socket  (fetching.py)

As in the stdlib's ``process.py``, ``submit()`` only serializes (in the caller's thread, so a
pickling error is raised there), records work and wakes the I/O thread. The I/O thread never runs
user code: it forwards frames, completes futures and hands callbacks to the callback thread. It
holds pending futures strongly and finished ones not at all, so a dropped future releases its key
once finished, and never before.

The thread stops when it is told to close (``shutdown``), when its executor is garbage-collected,
or at interpreter exit — in every case only after pending tasks have finished, and after fetching
large results that live futures still reference (so ``result()`` works after ``shutdown()``).
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import queue
import sys
import threading
import time
import uuid
import weakref
from concurrent.futures import Future as PlainFuture
from concurrent.futures import InvalidStateError
from typing import Any

import zmq

from .. import errors
from .. import messages as m
from ..pinning import renewed, since, stamp
from ..scheduler.model import shrunk
from ..transport import serialize, shm
from ..transport.frames import NOBLOCK, recv_frames, send_frames
from ..transport.header import MalformedMessage
from ..transport.security import Security
from ..transport.shmpool import SegmentPool
from ..transport.sockets import (
    private_directory,
    remove_directory,
)
from .commands import INLINE_COMMANDS, merge_runs
from .connecting import connect_to_scheduler
from .fetching import FETCH_TIMEOUT, Fetching, FetchRequest
from .future import Future, Packed, Remote
from .inline import InlineState
from .reaping import Reaper

logger = logging.getLogger("meshpool.client")

SCHEDULER_SILENCE = 10.0  # no word from a remote scheduler this long: it is lost
POLL_MS = 100
RELEASES_BEFORE_WAKE = 256  # queued commands at which a release wakes the I/O thread
# what a caller's thread running the state inline may handle itself: these only complete
# futures; the rest (fetches, a broken cluster) may touch zmq sockets, and wait for the loop
_INLINE_MESSAGES = frozenset({m.TaskDone, m.TaskErred, m.TasksCancelled, m.CancelReply, m.Reply})
COMPACT_INTERVAL = 1.0  # seconds between checks for emptied-out tables

_live_cores: weakref.WeakSet = weakref.WeakSet()
_exiting = False


class ClientCore(Fetching, InlineState):
    """Everything one executor shares with its I/O thread."""

    def __init__(
        self,
        address: str | None,
        *,
        nworkers: int,
        threads_per_worker: int,
        security: Security | None,
        timeout: float,
        memory_limit: int | None,
    ) -> None:
        self.client_id = f"client-{uuid.uuid4().hex[:12]}"
        self.prefix = uuid.uuid4().hex[:8]
        self.shm_pool = SegmentPool(self.prefix)  # big arguments go through these segments
        self.address = address
        self.security = security
        self.timeout = timeout
        self.pid = os.getpid()
        self.commands: queue.SimpleQueue = queue.SimpleQueue()
        self._deferred: list = []  # commands an inline submit left for the I/O thread, in order
        self._results: list | None = None  # (future, result) to complete at the end of a turn
        self._inline = False  # a caller's thread runs the state (an idle submit, a reaping wait)
        self._deferred_messages: list = []  # what an inline run got that touches zmq sockets
        self._reaper: Reaper | None = None  # embedded: result() reads the lanes (reaping.py)
        # held by whoever runs the client's state: the I/O thread each time it wakes, or a
        # caller submitting to an idle local cluster (see command())
        self._loop_lock = threading.Lock()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._wake_pending = False
        self._fds_closed = False
        self._stopped = False  # the I/O thread has torn down: commands are no longer run
        self.pending: dict[Any, Future] = {}
        # key -> dependency keys while the key is held (written by callers at submit, pruned
        # here on release): what visualize() draws for futures
        self.lineage: dict[Any, list] = {}
        # a pending task's large arguments (args key -> frames, written by callers at submit,
        # dropped here when the task ends): sent again if their worker dies first (ResendData)
        self.kept: dict[Any, list] = {}
        self._holding = False  # remote: messages wait in _held until _release (batched)
        self._last_compact = 0  # (instants kept as pinning.stamp()s)
        self._held: list = []
        self.remote_done: weakref.WeakValueDictionary = weakref.WeakValueDictionary()
        self.requests: dict[int, PlainFuture] = {}
        self.fetches: dict[int, FetchRequest] = {}
        self.data_requests: dict[int, tuple[int, str, float]] = {}  # data req -> (fetch, address)
        self.data_socks: dict[str, zmq.Socket] = {}
        self.broken: BaseException | None = None
        self.closing = False
        self.cancel_on_close = False
        self.executor_alive = True
        self.counter = itertools.count(1)
        self._ids = itertools.count(1)
        self.stats = {
            "submitted": 0,
            "finished": 0,
            "client_bytes_sent": 0,
            "client_bytes_received": 0,
            "shm_bytes_sent": 0,
            "shm_bytes_received": 0,
        }
        self.directory: str | None = None
        self.server: Any = None
        self.cluster: Any = None
        self._spawner: threading.Thread | None = None
        self._spawn_error: Exception | None = None
        self.dealer: zmq.Socket | None = None
        self._last_from_scheduler = stamp(time.monotonic())
        self.thread = threading.Thread(target=self._run, name="meshpool-io", daemon=True)
        if address is None:
            self._start_local(nworkers, threads_per_worker, memory_limit)
        else:
            self._connect(address)
        _live_cores.add(self)
        self.thread.start()

    # --- set-up ------------------------------------------------------------------------------

    def _start_local(
        self, nworkers: int, threads_per_worker: int, memory_limit: int | None
    ) -> None:
        from ..cluster.local import LocalWorkers

        self.directory = private_directory()
        address = f"ipc://{self.directory}/scheduler"
        self.cluster = LocalWorkers(
            count=nworkers,
            scheduler_address=address,
            directory=self.directory,
            prefix=self.prefix,
            nthreads=threads_per_worker,
            memory_limit=memory_limit,
            on_exit=self._worker_exited,
        )
        # The workers start first, from a thread of their own: their interpreters start up while
        # this one sets up the scheduler (they connect once it is bound), and the caller's
        # thread spawns nothing (``async with Executor()`` keeps its event loop free).
        self._spawner = threading.Thread(
            target=self._spawn_workers, name="meshpool-spawn", daemon=True
        )
        self._spawner.start()
        try:
            from ..scheduler.server import SchedulerServer

            self.server = SchedulerServer(
                address, local_client=self.client_id, deliver_local=self._on_message
            )
        except BaseException:
            self._spawner.join()
            self.cluster.close()
            remove_directory(self.directory)
            raise
        self.server.on_worker_added = self._worker_registered
        if self.server.has_lanes:
            self._reaper = Reaper()
            self.server.watch_lanes(self._reaper.epoll)

    def _spawn_workers(self) -> None:
        try:
            self.cluster.start()
        except Exception as exc:
            self._spawn_error = exc

    def _connect(self, address: str) -> None:
        self.dealer = connect_to_scheduler(self.client_id, address, self.security, self.timeout)

    # --- called from any thread --------------------------------------------------------------

    def wake(self) -> None:
        if not self._wake_pending and not self._fds_closed:
            self._wake_pending = True
            try:
                os.write(self._wake_w, b"x")
            except OSError:  # pipe full (already awake) or closed
                pass

    def command(self, *item: Any) -> None:
        self.commands.put(item)
        if self._stopped:  # nobody will run it: what waits for an answer gets the reason now
            self._fail_queued()
        elif item[0] != "submit" or not self._submit_inline():
            self.wake()

    def _fail_queued(self) -> None:
        """The I/O thread has stopped: queued commands' replies fail with why it stopped (a
        caller asking ``workers()`` after ``shutdown()`` waited out its timeout before)."""
        exc = self.broken
        if exc is None or type(exc) is RuntimeError:  # (shut down, not broken)
            exc = RuntimeError("this meshpool.Executor is shut down: it has no cluster to ask")
        for item in self._take_commands():
            for arg in item[1:]:
                if isinstance(arg, PlainFuture) and not arg.done():
                    with contextlib.suppress(InvalidStateError):
                        arg.set_exception(exc)

    def release_soon(self, key: Any) -> None:
        """Called by future finalizers (anywhere, any time): only enqueue. The I/O thread reads
        the queue each time it wakes, at least every POLL_MS; it is woken for releases only
        when they pile up (a caller dropping each result before its next submit would wake it
        once per round trip)."""
        if os.getpid() != self.pid or self.thread is None:
            return
        self.commands.put(("release", key))
        if self.commands.qsize() >= RELEASES_BEFORE_WAKE:
            self.wake()

    def request(self, msg_factory: Any, timeout: float | None) -> Any:
        """Send a request built by ``msg_factory(request_id)`` and wait for its reply value."""
        reply: PlainFuture = PlainFuture()
        self.command("request", msg_factory, reply)
        return reply.result(timeout)

    def cancel(self, futures: list[Future], timeout: float) -> set:
        reply: PlainFuture = PlainFuture()
        self.command("cancel", [f.key for f in futures], reply)
        try:
            return set(reply.result(timeout))
        except Exception:
            return set()

    def fetch(self, key: Any, timeout: float | None) -> list:
        return self.fetch_async(key).result(timeout)[key]

    def fetch_async(self, key: Any) -> PlainFuture:
        reply: PlainFuture = PlainFuture()
        self.command("fetch", [key], reply)
        return reply

    def fetch_many(self, keys: list) -> PlainFuture:
        reply: PlainFuture = PlainFuture()
        self.command("fetch", keys, reply)
        return reply

    def graph_of(self, keys: list) -> dict:
        """``{key: (function name, dependency keys)}`` for ``keys`` and what they were made of,
        as far as this client still remembers (dependencies of live futures)."""
        lineage = dict(self.lineage)  # a snapshot: the I/O thread may be updating it
        graph: dict = {}
        stack = list(keys)
        while stack:
            key = stack.pop()
            if key in graph:
                continue
            deps = list(lineage.get(key, ()))
            graph[key] = (_function_name(key), deps)
            stack.extend(deps)
        return graph

    def close(self, wait: bool, cancel_futures: bool) -> None:
        self.command("close", cancel_futures)
        if wait and threading.current_thread() is not self.thread:
            self.thread.join()

    # --- the I/O thread ----------------------------------------------------------------------

    def _run(self) -> None:
        if self._spawner is not None:
            self._spawner.join()
            if self._spawn_error is not None:
                self._break(
                    errors.WorkerStartError(
                        f"could not start worker processes: {self._spawn_error}"
                    )
                )
        poller = zmq.Poller()
        poller.register(self._wake_r, zmq.POLLIN)
        if self.server is not None:
            self.server.attach(poller)
        if self.dealer is not None:
            poller.register(self.dealer, zmq.POLLIN)
        self._poller = poller
        try:
            while True:
                events = dict(poller.poll(POLL_MS))
                with self._loop_lock:
                    if self._iterate(events):
                        break
        except Exception as exc:  # a bug in here must not hang callers
            logger.exception("meshpool I/O thread failed")
            self._break(errors.SchedulerLost(f"the executor's I/O thread failed: {exc!r}"))
        finally:
            with self._loop_lock:
                self._teardown()

    def _iterate(self, events: dict) -> bool:
        """One turn of the I/O loop; True when it should stop. Small results complete their
        futures last, just before the loop sleeps: a caller woken earlier would find the GIL
        still held and sleep again until it is free, a second wake-up on the round trip."""
        self._results = []
        try:
            return self._turn(events)
        finally:
            results, self._results = self._results, None
            for fut, value in results:
                fut.set_result(value)

    def _turn(self, events: dict) -> bool:
        if self._wake_r in events:
            try:
                while os.read(self._wake_r, 4096):
                    pass
            except (BlockingIOError, OSError):
                pass
            # only now: cleared before the read, a wake() in between would set it
            # again with its byte read here, and the next wake() would write nothing
            # (a command stuck until the poll timeout)
            self._wake_pending = False
        if self._deferred_messages:  # (left by an inline run, in order)
            deferred, self._deferred_messages = self._deferred_messages, []
            for msg in deferred:
                self._on_message(msg)
        self._hold()  # what the commands send goes out batched
        try:
            self._drain_commands()
        finally:
            self._release()
        self._handle_sockets(events)
        now = time.monotonic()
        self._on_tick(now)
        return self._should_stop()

    def _handle_sockets(self, events: dict) -> None:
        if self.server is not None and events:
            self.server.handle_events(events)
        if self.dealer is not None and self.dealer in events:
            self._drain_dealer()
        for sock in [s for s in self.data_socks.values() if s in events]:
            self._drain_data(sock)

    def _should_stop(self) -> bool:
        if not (self.closing or not self.executor_alive or _exiting or self.broken):
            return False
        if self.broken is not None:
            return True
        if self.pending:
            return False
        return not self.fetches

    def _drain_commands(self, inline: bool = False) -> None:
        """Run the queued commands in order, merging runs of submits and of releases into one
        message each (a loop of ``submit()`` calls reaches the scheduler as one SubmitTasks).
        Inline (on a caller's thread), only up to the first that may touch a zmq socket: that
        one and the rest wait, in order, for the I/O thread."""
        items = self._take_commands()
        if inline:
            for i, item in enumerate(items):
                if item[0] not in INLINE_COMMANDS:
                    self._deferred.extend(items[i:])
                    items = items[:i]
                    break
        # (in order, sent at the end: work after a lane write delays the woken slot, measured
        # here, so the write is the last thing the caller does before it waits)
        self._run_commands(items)

    def _take_commands(self) -> list:
        """What an inline submit left for the I/O thread, then what is queued, in order."""
        # (the same list kept, emptied: a new one per turn, the last one living on, would pin
        # one of a burst's pymalloc arenas, as for the scheduler's tables)
        items = self._deferred.copy()
        self._deferred.clear()
        while True:
            try:
                items.append(self.commands.get_nowait())
            except queue.Empty:
                return items

    def _run_commands(self, items: list) -> None:
        for item in merge_runs(items):
            try:
                # interned: the type's method cache keeps a reference to every distinct name
                # string looked up, so a fresh string per command pinned a pymalloc arena each
                getattr(self, sys.intern("_cmd_" + item[0].replace("-", "_")))(*item[1:])
            except Exception:
                logger.exception("error handling command %s", item[0])

    def _hold(self) -> None:
        """Keep messages for the scheduler (and, embedded, its messages to workers) until
        :meth:`_release`, which sends them batched: one send per peer."""
        if self.server is not None:
            self.server.hold()
        else:
            self._holding = True

    def _release(self) -> None:
        if self.server is not None:
            self.server.release()
            return
        self._holding = False
        held, self._held = self._held, []
        if held:
            self._send_frames(m.encode_many(held))

    def _send(self, msg: Any) -> None:
        if self.server is not None:
            self.server.handle_local(msg)
        elif self._holding:
            self._held.append(msg)
        else:
            self._send_frames(m.encode(msg))

    def _send_frames(self, frames: list) -> None:
        if self.dealer is None:
            return
        self.stats["client_bytes_sent"] += serialize.nbytes(frames)
        send_frames(self.dealer, frames)

    # --- commands ----------------------------------------------------------------------------

    def _cmd_submit(self, rows: list, frames: list, futures: list[Future]) -> None:
        if self.broken is not None:
            for fut in futures:
                fut.set_exception(self.broken)
            return
        for fut in futures:
            self.pending[fut.key] = fut
        self.stats["submitted"] += len(futures)
        self._send(m.SubmitTasks(rows, frames))

    def _cmd_release(self, key: Any) -> None:
        self._cmd_release_keys([key])

    def _cmd_release_keys(self, keys: list) -> None:
        """Futures dropped (their finalizers): release those that are not pending."""
        for key in keys:
            self.lineage.pop(key, None)
        keys = [k for k in keys if k not in self.pending]
        if self.broken is None and keys:
            self._send(m.ReleaseKeys(keys))

    def _cmd_release_many(self, keys: list) -> None:
        for key in keys:
            self.lineage.pop(key, None)
        if self.broken is None:
            self._send(m.ReleaseKeys(keys))

    def _cmd_cancel(self, keys: list, reply: PlainFuture) -> None:
        request_id = next(self._ids)
        self.requests[request_id] = reply
        self._send(m.CancelKeys(request_id, keys))

    def _cmd_request(self, factory: Any, reply: PlainFuture) -> None:
        request_id = next(self._ids)
        self.requests[request_id] = reply
        self._send(factory(request_id))

    def _cmd_initializer(self, frames: list) -> None:
        self._send(m.SetInitializer(frames))

    def _cmd_store(
        self,
        address: str,
        items: list,
        frames: list,
        spec: list,
        scatter_rows: list,
        kept: bool = False,
    ) -> None:
        """Tell the scheduler, then send data straight to a worker's data socket. ``spec``:
        frames the caller already put in shared memory (``shm.pack_frames``)."""
        self._send(m.Scatter(scatter_rows, kept))
        if self._holding:  # the scheduler must know the keys before the worker reports them
            self._release()
            self._holding = True
        self._send_data(address, m.StoreData(items, spec, frames))

    def _cmd_fetch(self, keys: list, reply: PlainFuture) -> None:
        fetch_id = next(self._ids)
        fetch = FetchRequest(list(keys), reply)
        fetch.deadline = time.monotonic() + FETCH_TIMEOUT
        self.fetches[fetch_id] = fetch
        self._ask_who_has(fetch_id)

    def _cmd_worker_exited(self, worker_id: str, code: int) -> None:
        if self.server is None:
            return
        gone = self.server.state.workers.get(worker_id)
        if gone is not None:  # requests to it will never be answered: ask again at once
            for data_id, (_, address, _) in list(self.data_requests.items()):
                if address == gone.address:
                    self._abandon_data_request(data_id, address)
        retired = worker_id in self.server.state._retired
        self.server.remove_worker(worker_id, f"process exited with code {code}")
        if not self.cluster.exited(worker_id, restart=not retired):
            self._break(
                errors.WorkerStartError(
                    f"worker processes failed to start {self.cluster.failed_starts} times in a "
                    f"row (last exit code {code}); see their output above"
                )
            )

    def _cmd_close(self, cancel_futures: bool) -> None:
        self.closing = True
        if cancel_futures and self.pending:
            request_id = next(self._ids)
            self.requests[request_id] = PlainFuture()
            self._send(m.CancelKeys(request_id, list(self.pending)))

    def _cmd_executor_gone(self) -> None:
        self.executor_alive = False

    def _cmd_call(self, fn: Any) -> None:
        fn(self)

    # --- messages from the scheduler ---------------------------------------------------------

    def _drain_dealer(self) -> None:
        assert self.dealer is not None
        for _ in range(2000):
            try:
                frames = recv_frames(self.dealer, NOBLOCK)
            except zmq.Again:
                return
            self._last_from_scheduler = stamp(time.monotonic())
            self.stats["client_bytes_received"] += sum(len(f) for f in frames)
            try:
                msgs = m.decode_all(frames)
            except MalformedMessage as exc:
                logger.warning("dropping malformed message from the scheduler: %s", exc)
                continue
            for msg in msgs:
                self._on_message(msg)

    def _on_message(self, msg: Any) -> None:
        if self._inline and (self._deferred_messages or type(msg) not in _INLINE_MESSAGES):
            # (for the loop, see _turn; and what follows one, to keep their order)
            self._deferred_messages.append(msg)
            return
        handler = self._handlers.get(type(msg))
        if handler is None:
            logger.warning("dropping unexpected %s from the scheduler", type(msg).__name__)
            return
        handler(self, msg)

    def _end_pending(self, key: Any) -> Future | None:
        """The future of a task that ended, if pending; its kept arguments are not needed now."""
        if self.kept:
            self.kept.pop(("args", key), None)
        return self.pending.pop(key, None)

    def _on_done(self, msg: m.TaskDone) -> None:
        fut = self._end_pending(msg.key)
        if fut is None:
            return
        self.stats["finished"] += 1
        if msg.has_value:
            if self._results is not None:
                self._results.append((fut, Packed(msg.frames)))
            else:
                fut.set_result(Packed(msg.frames))
        else:
            fut.set_result(Remote(msg.nbytes))
            self.remote_done[msg.key] = fut

    def _on_erred(self, msg: m.TaskErred) -> None:
        fut = self._end_pending(msg.key)
        if fut is None:
            return
        self.stats["finished"] += 1
        fut.set_exception(serialize.loads_exception(msg.frames))

    def _on_cancelled(self, msg: m.TasksCancelled) -> None:
        for key in msg.keys:
            fut = self._end_pending(key)
            if fut is not None:
                self.stats["finished"] += 1
                fut._mark_cancelled()

    def _on_cancel_reply(self, msg: m.CancelReply) -> None:
        self._on_cancelled(m.TasksCancelled(msg.cancelled))
        self._reply(msg.request_id, msg.cancelled)

    def _on_reply(self, msg: m.Reply) -> None:
        if msg.request_id > 0:
            self._reply(msg.request_id, msg.value)

    def _on_broken(self, msg: m.ClusterBroken) -> None:
        if msg.kind == "initializer":
            exc = serialize.loads_exception(msg.frames) if msg.frames else None
            err: BaseException = errors.InitializerFailed(f"{msg.reason}: {exc!r}")
            err.__cause__ = exc
        elif msg.kind == "scheduler":
            err = errors.SchedulerLost(msg.reason)
        else:
            err = errors.CommError(msg.reason)
        self._break(err)

    _handlers: dict[type, Any] = {
        m.TaskDone: _on_done,
        m.TaskErred: _on_erred,
        m.TasksCancelled: _on_cancelled,
        m.CancelReply: _on_cancel_reply,
        m.Reply: _on_reply,
        m.ClusterBroken: _on_broken,
        m.WhoHasReply: Fetching._on_who_has,
        m.ResendData: Fetching._on_resend,
    }

    def _reply(self, request_id: int, value: Any) -> None:
        reply = self.requests.pop(request_id, None)
        if reply is not None and not reply.done():
            reply.set_result(value)

    def _on_tick(self, now: float) -> None:
        if since(now, self._last_compact) > COMPACT_INTERVAL:
            # emptied tables back to the allocator, counters to its current pool
            self._last_compact = stamp(now)
            for name, count in self.stats.items():
                self.stats[name] = renewed(count)  # (see pinning.py)
            self.pending = shrunk(self.pending)  # (only this thread writes it)
            self.shm_pool.trim()  # segments freed by dead workers, idle ones
            shm.prune_mappings()  # workers' segments whose file is gone
        if self.server is not None:
            self.server.on_tick(now)
        elif self.dealer is not None and since(now, self._last_from_scheduler) > SCHEDULER_SILENCE:
            self._break(
                errors.SchedulerLost(
                    f"no word from the scheduler at {self.address} for {SCHEDULER_SILENCE:g} s"
                )
            )
            return
        for data_id, (_, address, started) in list(self.data_requests.items()):
            if now - started > FETCH_TIMEOUT:
                self._abandon_data_request(data_id, address)
        for fetch_id, fetch in list(self.fetches.items()):
            if fetch.attempts and not fetch.requests and not fetch.asking:
                self._ask_who_has(fetch_id)

    # --- local cluster events (from waiter threads) -------------------------------------------

    def _worker_exited(self, worker_id: str, code: int) -> None:
        self.command("worker-exited", worker_id, code)

    def _worker_registered(self, worker_id: str) -> None:
        if self.cluster is not None:
            self.cluster.registered(worker_id)

    # --- failure and teardown ----------------------------------------------------------------

    def _break(self, exc: BaseException) -> None:
        if self.broken is not None:
            return
        self.broken = exc
        pending, self.pending = self.pending, {}
        self.kept.clear()
        for fut in pending.values():
            if not fut.done():
                fut.set_exception(exc)
        for reply in list(self.requests.values()):
            if not reply.done():
                reply.set_exception(exc)
        self.requests.clear()
        for fetch_id in list(self.fetches):
            self._finish_fetch(fetch_id, exc)

    def _keep_large_results(self) -> None:
        """Before the workers go, bring home large results that live futures still hold."""
        # only futures whose result was never fetched: result() already unpacked the others
        live = [(k, f) for k, f in list(self.remote_done.items()) if type(f._result) is Remote]
        if not live or self.broken is not None:
            return
        reply: PlainFuture = PlainFuture()
        fetch_id = next(self._ids)
        self.fetches[fetch_id] = FetchRequest([k for k, _ in live], reply)
        self.fetches[fetch_id].deadline = time.monotonic() + FETCH_TIMEOUT
        self._ask_who_has(fetch_id)
        deadline = time.monotonic() + FETCH_TIMEOUT
        while not reply.done() and time.monotonic() < deadline:
            self._handle_sockets(dict(self._poller.poll(POLL_MS)))
        if reply.done() and reply.exception() is None:
            frames_by_key = reply.result()
            for key, fut in live:
                if key in frames_by_key:
                    with fut._condition:
                        fut._result = Packed(frames_by_key[key])

    def _teardown(self) -> None:
        try:
            self._keep_large_results()
        except Exception:
            logger.exception("could not bring large results home before shutdown")
        if self.broken is None:
            self.broken = RuntimeError("cannot schedule new futures after shutdown")
        self._stopped = True  # (before the queue is emptied: see command())
        self._fail_queued()
        for sock in self.data_socks.values():
            sock.close(linger=0)
        self.data_socks.clear()
        if self.dealer is not None:
            try:
                self.dealer.send_multipart(m.encode(m.ClientClosing()), zmq.NOBLOCK)
            except zmq.ZMQError:
                pass
            self.dealer.close(linger=100)
        if self.cluster is not None:
            self.cluster.close()
        if self.server is not None:
            self.server.close()
        if self._reaper is not None:
            self._reaper.close()
        self.shm_pool.close()
        shm.remove_own(self.prefix)  # data sent to workers that never took it in
        shm.prune_mappings(force=True)  # workers' segments mapped here: no tick will prune them
        if self.directory is not None:
            remove_directory(self.directory)
        self._fds_closed = True
        for fd in (self._wake_r, self._wake_w):
            try:
                os.close(fd)
            except OSError:
                pass
        _live_cores.discard(self)


def _function_name(key: Any) -> str:
    """Task keys read ``name-prefix-n``; graph keys ``(token, key)``."""
    if isinstance(key, tuple) and len(key) == 2 and str(key[0]).startswith("graph-"):
        return str(key[1])
    text = str(key)
    return text.rsplit("-", 2)[0] if text.count("-") >= 2 else text


def _python_exit() -> None:
    """At interpreter exit: let every I/O thread finish pending work, then stop it."""
    global _exiting
    _exiting = True
    cores = list(_live_cores)
    for core in cores:
        core.wake()
    for core in cores:
        if core.thread.is_alive():
            core.thread.join()


threading._register_atexit(_python_exit)  # type: ignore[attr-defined]
