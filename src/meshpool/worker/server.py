"""The worker process's loop: one thread owns every socket.

Theory of operation::

    scheduler ──Compute──▶ ctrl (DEALER) ─▶ inputs all here? ─yes─▶ ReadyQueue ─▶ exec threads
                                             │ no                                   │
                                             ▼                                      ▼
                             GetData to the peers holding them          results (PULL, inproc)
                             (peer DEALERs) ─Data─▶ store ─▶ ReadyQueue     │ forwarded as is
    scheduler ◀──ComputeDone / ComputeErred / TaskStarted ─────────────────┘
    peers, clients ──GetData / StoreData──▶ data (ROUTER) ─▶ frames from the store, no pickling

The loop never runs user code and never unpickles user data: execution threads do that. Fetches
from peers time out (:data:`FETCH_TIMEOUT`) and fall back to the next holder, then report
MissingData so the scheduler reschedules. Heartbeats ride the control connection.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

import zmq

from .. import messages as m
from ..transport import serialize
from ..transport.header import MalformedMessage
from ..transport.security import Security
from ..transport.sockets import bind, make_socket
from .execution import ReadyQueue, TaskRunner
from .store import DataStore

logger = logging.getLogger("meshpool.worker")

HEARTBEAT_INTERVAL = 1.0  # seconds between heartbeats on the control connection
FETCH_TIMEOUT = 10.0  # a peer that has not answered a data request by then is given up on
SCHEDULER_SILENCE = 30.0  # no word from the scheduler this long (despite heartbeats): exit
POLL_MS = 250


class _Fetch:
    __slots__ = ("key", "addresses", "address", "waiting", "started")

    def __init__(self, key: Any, addresses: list[str]) -> None:
        self.key = key
        self.addresses = list(addresses)
        self.address = ""
        self.waiting: set = set()
        self.started = 0.0


class Worker:
    def __init__(
        self,
        scheduler_address: str,
        *,
        worker_id: str,
        name: str,
        nthreads: int = 1,
        data_address: str = "tcp://127.0.0.1:0",
        memory_limit: int = 0,
        resources: dict | None = None,
        security: Security | None = None,
    ) -> None:
        self.scheduler_address = scheduler_address
        self.worker_id = worker_id
        self.name = name
        self.nthreads = nthreads
        self.memory_limit = memory_limit
        self.resources = resources or {}
        self.security = security
        self.store = DataStore()
        self.queue = ReadyQueue()
        self.functions = serialize.LoadedFunctions()
        self.waiting: dict[Any, tuple[m.Compute, set]] = {}  # task key -> (compute, missing)
        self.fetches: dict[Any, _Fetch] = {}
        self.requests: dict[int, tuple[str, list]] = {}  # request id -> (address, keys)
        self.peers: dict[str, zmq.Socket] = {}
        self.running = True
        self._request_id = 0
        self._last_heartbeat = 0.0
        self._last_from_scheduler = time.monotonic()

        self.ctrl = make_socket(zmq.DEALER, identity=worker_id.encode())
        if security is not None:
            security.client(self.ctrl, scheduler_address)
        self.ctrl.connect(scheduler_address)
        self.data = make_socket(zmq.ROUTER)
        if security is not None and data_address.startswith("tcp://"):
            security.server(self.data)
        self.data_address = bind(self.data, data_address)
        self.results_address = f"inproc://meshpool-results-{id(self)}"
        self.results = make_socket(zmq.PULL)
        self.results.bind(self.results_address)
        self.runners = [
            TaskRunner(i, self.queue, self.store, self.functions, self.results_address)
            for i in range(nthreads)
        ]

    # --- the loop ----------------------------------------------------------------------------

    def run(self) -> None:
        for runner in self.runners:
            runner.start()
        self._send(
            m.RegisterWorker(
                self.worker_id,
                self.name,
                self.data_address,
                self.nthreads,
                self.memory_limit,
                self.resources,
                m.versions(),
                os.getpid(),
            )
        )
        poller = zmq.Poller()
        poller.register(self.ctrl, zmq.POLLIN)
        poller.register(self.data, zmq.POLLIN)
        poller.register(self.results, zmq.POLLIN)
        self._poller = poller
        try:
            while self.running:
                events = dict(poller.poll(POLL_MS))
                if self.results in events:
                    self._drain_results()
                if self.ctrl in events:
                    self._drain_ctrl()
                if self.data in events:
                    self._drain_data()
                for sock in [s for s in self.peers.values() if s in events]:
                    self._drain_peer(sock)
                self._on_tick(time.monotonic())
        finally:
            self.close()

    def close(self) -> None:
        self.running = False
        self.queue.close()
        for sock in [self.ctrl, self.data, self.results, *self.peers.values()]:
            sock.close(linger=0)
        self.peers.clear()

    def _send(self, msg: Any) -> None:
        self.ctrl.send_multipart(m.encode(msg), copy=False)

    def _on_tick(self, now: float) -> None:
        if now - self._last_heartbeat >= HEARTBEAT_INTERVAL:
            self._last_heartbeat = now
            executing = sum(1 for r in self.runners if r.current is not None)
            self._send(m.Heartbeat(executing, self.store.total_bytes()))
        for fetch in [f for f in self.fetches.values() if now - f.started > FETCH_TIMEOUT]:
            logger.warning("peer %s did not answer for %r in time", fetch.address, fetch.key)
            self._drop_peer(fetch.address)
            self._retry(fetch)

    def _drain_results(self) -> None:
        for _ in range(1000):
            try:
                frames = self.results.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            self.ctrl.send_multipart(frames[1:])

    def _drain_ctrl(self) -> None:
        for _ in range(1000):
            try:
                frames = self.ctrl.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            self._last_from_scheduler = time.monotonic()
            try:
                msg = m.decode(frames)
                handler = self._ctrl_handlers[type(msg)]
            except (MalformedMessage, KeyError) as exc:
                logger.warning("dropping malformed message from the scheduler: %s", exc)
                continue
            try:
                handler(self, msg)
            except Exception:
                logger.exception("error handling %s", type(msg).__name__)

    def _drain_data(self) -> None:
        for _ in range(1000):
            try:
                frames = self.data.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            if len(frames) < 2:
                continue
            identity = frames[0].bytes
            try:
                msg = m.decode([frames[1].bytes, *frames[2:]])
            except MalformedMessage as exc:
                logger.warning("dropping malformed data request: %s", exc)
                continue
            if isinstance(msg, m.GetData):
                self._serve(identity, msg)
            elif isinstance(msg, m.StoreData):
                self._store_data(msg)
            else:
                logger.warning("dropping unexpected %s on the data socket", type(msg).__name__)

    # --- scheduler messages ------------------------------------------------------------------

    def _on_compute(self, msg: m.Compute) -> None:
        missing = {key for key, _ in msg.dependencies if key not in self.store}
        if not missing:
            self.queue.put(msg.key, msg.priority, msg)
            return
        self.waiting[msg.key] = (msg, missing)
        by_address: dict[str, list] = {}
        for key, addresses in msg.dependencies:
            if key not in missing:
                continue
            fetch = self.fetches.get(key)
            if fetch is None:
                fetch = self.fetches[key] = _Fetch(key, addresses)
                if not self._next_address(fetch):
                    self._fetch_failed(fetch)
                    continue
                by_address.setdefault(fetch.address, []).append(key)
            fetch.waiting.add(msg.key)
        for address, keys in by_address.items():
            self._request(address, keys)

    def _on_free(self, msg: m.FreeKeys) -> None:
        for key in msg.keys:
            self.store.free(key)
            self.queue.remove(key)
            self._forget_waiting(key)

    def _on_cancel(self, msg: m.CancelCompute) -> None:
        removed = self.queue.remove(msg.key) or self._forget_waiting(msg.key)
        self._send(m.CancelComputeReply(msg.request_id, msg.key, removed))

    def _on_initializer(self, msg: m.RunInitializer) -> None:
        try:
            fn, args = serialize.loads(msg.frames)
            fn(*args)
        except BaseException as exc:
            logger.error("initializer failed: %r", exc)
            self._send(m.InitializerErred(serialize.dumps_exception(exc)))

    def _on_close(self, msg: m.CloseWorker) -> None:
        logger.info("worker %s closing: %s", self.name, msg.reason)
        self.running = False

    def _on_reply(self, msg: m.Reply) -> None:
        pass  # the scheduler's answer to a heartbeat: traffic is liveness

    _ctrl_handlers = {
        m.Compute: _on_compute,
        m.FreeKeys: _on_free,
        m.CancelCompute: _on_cancel,
        m.RunInitializer: _on_initializer,
        m.CloseWorker: _on_close,
        m.Reply: _on_reply,
    }

    def _forget_waiting(self, key: Any) -> bool:
        entry = self.waiting.pop(key, None)
        if entry is None:
            return False
        for dep in entry[1]:
            fetch = self.fetches.get(dep)
            if fetch is not None:
                fetch.waiting.discard(key)
        return True

    # --- data: serving -----------------------------------------------------------------------

    def _serve(self, identity: bytes, msg: m.GetData) -> None:
        items = []
        frames: list = []
        for key in msg.keys:
            held = self.store.frames(key)
            if held is None:
                items.append((key, -1))
            else:
                items.append((key, len(held)))
                frames.extend(held)
        reply = m.encode(m.Data(msg.request_id, items, frames))
        try:
            self.data.send_multipart([identity, *reply], copy=False)
        except zmq.ZMQError as exc:
            logger.warning("could not answer a data request: %s", exc)

    def _store_data(self, msg: m.StoreData) -> None:
        offset = 0
        added = []
        for key, nframes in msg.items:
            frames = [_buffer(f) for f in msg.frames[offset : offset + nframes]]
            offset += nframes
            added.append((key, self.store.put_frames(key, frames)))
        self._send(m.AddKeys(added))

    # --- data: fetching from peers -------------------------------------------------------------

    def _next_address(self, fetch: _Fetch) -> bool:
        if not fetch.addresses:
            return False
        fetch.address = fetch.addresses.pop(0)
        fetch.started = time.monotonic()
        return True

    def _request(self, address: str, keys: list) -> None:
        self._request_id += 1
        self.requests[self._request_id] = (address, keys)
        sock = self.peers.get(address)
        if sock is None:
            sock = self.peers[address] = make_socket(zmq.DEALER)
            if self.security is not None and address.startswith("tcp://"):
                self.security.client(sock, address)
            sock.connect(address)
            self._poller.register(sock, zmq.POLLIN)
        sock.send_multipart(m.encode(m.GetData(self._request_id, keys)))

    def _drop_peer(self, address: str) -> None:
        sock = self.peers.pop(address, None)
        if sock is not None:
            self._poller.unregister(sock)
            sock.close(linger=0)

    def _drain_peer(self, sock: zmq.Socket) -> None:
        for _ in range(100):
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            try:
                msg = m.decode([frames[0].bytes, *frames[1:]])
            except MalformedMessage as exc:
                logger.warning("dropping malformed data reply: %s", exc)
                continue
            if not isinstance(msg, m.Data):
                continue
            self.requests.pop(msg.request_id, None)
            offset = 0
            added = []
            for key, nframes in msg.items:
                fetch = self.fetches.get(key)
                if nframes < 0:
                    if fetch is not None:
                        self._retry(fetch)
                    continue
                frames_of_key = [_buffer(f) for f in msg.frames[offset : offset + nframes]]
                offset += nframes
                if fetch is None:
                    continue
                del self.fetches[key]
                if fetch.waiting:
                    added.append((key, self.store.put_frames(key, frames_of_key)))
                self._arrived(fetch)
            if added:
                self._send(m.AddKeys(added))

    def _arrived(self, fetch: _Fetch) -> None:
        for task_key in fetch.waiting:
            entry = self.waiting.get(task_key)
            if entry is None:
                continue
            entry[1].discard(fetch.key)
            if not entry[1]:
                del self.waiting[task_key]
                self.queue.put(task_key, entry[0].priority, entry[0])

    def _retry(self, fetch: _Fetch) -> None:
        if self._next_address(fetch):
            self._request(fetch.address, [fetch.key])
        else:
            self._fetch_failed(fetch)

    def _fetch_failed(self, fetch: _Fetch) -> None:
        self.fetches.pop(fetch.key, None)
        for task_key in fetch.waiting:
            entry = self.waiting.pop(task_key, None)
            if entry is not None:
                self._send(m.MissingData(task_key, fetch.key, fetch.address))


def _buffer(frame: Any) -> Any:
    """A received frame as something pickle can take: small ones as bytes, big ones zero-copy."""
    if isinstance(frame, zmq.Frame):
        return frame.buffer if len(frame) >= serialize.OOB_THRESHOLD else frame.bytes
    return frame
