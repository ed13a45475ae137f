"""Execution slots: threads that each own a socket to the scheduler and run its tasks in order.

Theory of operation::

    scheduler ──Compute / RunInitializer──▶ slot i (DEALER "worker-id/i")
              ◀──ComputeDone / ComputeErred / MissingData / AddKeys──┘

Each execution thread is a *slot*: the scheduler sends a slot its tasks directly, and the slot
runs them strictly in arrival order and answers on the same socket. A task therefore costs the
worker one thread wake-up, and the scheduler knows which task a slot is executing: the oldest one
it sent there that has not finished. So a worker's death is blamed only on tasks that were
executing (KilledWorker).

That knowledge lags, though: when a slot finishes one task it starts the next at once, while its
ComputeDone is still on the way. So taking back a queued task (a client's cancel, or an idle
worker stealing it) is decided here, by :class:`Recalls`: the worker's control thread, which never
runs user code, answers the scheduler's CancelCompute at once, under the lock each slot takes
before starting a task. A task recalled before it started never starts; one already started
(or finished) is reported as such and the scheduler lets it be.

Inputs the worker lacks are fetched by the slot itself from the peers' data sockets, trying each
holder in turn (:data:`FETCH_TIMEOUT` each); if none answers, MissingData tells the scheduler.
Functions, arguments and results are unpickled and pickled here, never in the worker's I/O loop.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from typing import Any

import zmq

from .. import messages as m
from ..transport import serialize
from ..transport.header import MalformedMessage
from ..transport.security import Security
from ..transport.sockets import make_socket
from .store import DataStore

logger = logging.getLogger("meshpool.worker")

SMALL_RESULT = 64 * 1024  # results up to this size ride with the completion message
FETCH_TIMEOUT = 10.0  # seconds a peer gets to send data before the next holder is tried


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


class Slot(threading.Thread):
    """One execution thread with its own connection to the scheduler."""

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
    ) -> None:
        super().__init__(name=f"meshpool-slot-{index}", daemon=True)
        self.recalls = recalls if recalls is not None else Recalls()
        self.index = index
        self.worker_id = worker_id
        self.store = store
        self.functions = functions
        self.initializers = initializers
        self.security = security
        self.queue: collections.deque = collections.deque()
        self.current: Any = None
        self.running = True
        self.sock = make_socket(zmq.DEALER, identity=f"{worker_id}/{index}".encode())
        if security is not None:
            security.client(self.sock, scheduler_address)
        self.sock.connect(scheduler_address)
        self._peers: dict[str, zmq.Socket] = {}
        self._request_id = 0

    def run(self) -> None:
        self._send(m.SlotHello(self.worker_id, self.index))
        try:
            while self.running:
                if not self.queue and not self.sock.poll(250):
                    continue
                self._drain()
                if self.queue:
                    compute = self.queue.popleft()
                    if not self.recalls.start(compute.key, self.index):
                        continue  # taken back by the scheduler before it started
                    self.current = compute.key
                    try:
                        self._send_frames(self.execute(compute))
                    finally:
                        self.current = None
                        self.recalls.finish(compute.key, self.index)
        except zmq.ContextTerminated:
            pass
        finally:
            for sock in [self.sock, *self._peers.values()]:
                sock.close(linger=0)

    def _send(self, msg: Any) -> None:
        self.sock.send_multipart(m.encode(msg), copy=False)

    def _send_frames(self, frames: list) -> None:
        self.sock.send_multipart(frames, copy=False)

    def _drain(self) -> None:
        """Read everything waiting: queue computes, run initializers."""
        while True:
            try:
                frames = self.sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                msg = m.decode(frames)
            except MalformedMessage as exc:
                logger.warning("dropping malformed message from the scheduler: %s", exc)
                continue
            if isinstance(msg, m.Compute):
                self.queue.append(msg)
            elif isinstance(msg, m.RunInitializer):
                error = self.initializers.run(msg.frames)
                if error is not None:
                    self._send(m.InitializerErred(error))
            elif isinstance(msg, m.Reply):
                pass  # liveness ping
            else:
                logger.warning("slot dropping unexpected %s", type(msg).__name__)

    # --- running a task ----------------------------------------------------------------------

    def execute(self, compute: m.Compute) -> list:
        """Run one task; return the encoded ComputeDone / ComputeErred / MissingData."""
        missing = self._fetch_missing(compute)
        if missing is not None:
            return m.encode(m.MissingData(compute.key, missing[0], missing[1]))
        start = time.perf_counter()
        fn = None
        try:
            fn, args, kwargs = self._unpack(compute)
            value = fn(*args, **kwargs)
        except BaseException as exc:  # SystemExit and friends fail this task only
            return m.encode(
                m.ComputeErred(compute.key, time.perf_counter() - start, _dump_error(exc))
            )
        duration = time.perf_counter() - start
        try:
            frames = serialize.dumps(value, what=f"result of {_fn_name(fn)}")
        except Exception as exc:
            return m.encode(m.ComputeErred(compute.key, duration, _dump_error(exc)))
        size = self.store.put_result(compute.key, value, frames)
        small = size <= SMALL_RESULT
        return m.encode(m.ComputeDone(compute.key, size, small, duration, frames if small else []))

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
            sock = self._peers[address] = make_socket(zmq.DEALER)
            if self.security is not None and address.startswith("tcp://"):
                self.security.client(sock, address)
            sock.connect(address)
        self._request_id += 1
        sock.send_multipart(m.encode(m.GetData(self._request_id, keys)))
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
            except MalformedMessage as exc:
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
