"""The worker process: a control loop, a data socket, and execution slots.

Theory of operation::

    scheduler ◀─Register / Heartbeat / AddKeys─▶ ctrl (DEALER "worker-id")  ◀─ FreeKeys, Close,
                                                                             CancelCompute
    scheduler ◀──── tasks and their results ───▶ slot 0..n-1 (execution.py, one thread each)
    peers, clients ──GetData / StoreData──▶ data (ROUTER): frames from the store, no pickling

The loop thread never runs user code and never unpickles user data; it serves stored frames,
registers data that clients send straight here, frees keys, and beats. Heartbeats and every other
message ride the control connection; the scheduler's pings coming back are its proof of life.

The control and slot connections carry ZMTP heartbeats and a frame cap (``transport/sockets.py``).
A scheduler that vanished (host gone, partition) has its connections closed by the heartbeat
timeout; they keep reconnecting, and after :data:`SCHEDULER_SILENCE` the worker exits with
:data:`SCHEDULER_LOST` (its nanny exits too). A loop that itself stalled (the process was frozen)
gives the scheduler a fresh silence window rather than taking its own stall for the scheduler's.
A worker the scheduler removed meanwhile, or a scheduler restarted on the same address that never
knew it, tells it to leave when it is heard again: it exits with :data:`RESTART_ME`, and its nanny
starts a fresh one.

The scheduler's first message (its answer to RegisterWorker, then pings) proves the worker is
registered: ``on_registered`` is called once then, which tells the nanny that this start worked.

A task waiting for other tasks gives its slot to a replacement thread; ``max_replacements`` caps
those per worker, past which a waiting task runs its slot's queue itself (execution.py).
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from collections.abc import Callable
from typing import Any

import zmq

from .. import messages as m
from ..transport import arena, runmarker, serialize, shm
from ..transport.frames import NOBLOCK, recv_frames, send_frames
from ..transport.header import MalformedMessage
from ..transport.runmarker import RunMarker
from ..transport.security import Security
from ..transport.shmpool import SegmentPool
from ..transport.sockets import bind, connect_to_data, control_socket, make_socket
from . import reporting
from .execution import MAX_REPLACEMENTS, Initializers, Recalls, Replacements, Slot, _buffer
from .store import DataStore

logger = logging.getLogger("meshpool.worker")

HEARTBEAT_INTERVAL = 1.0  # seconds between heartbeats on the control connection
MEMORY_CHECK_INTERVAL = 0.1  # seconds between RSS checks when a memory limit is set
MEMORY_EXCEEDED = 4  # exit code: over the memory limit (the nanny restarts the worker)
CREDENTIALS_REFUSED = 3  # exit code: the nanny does not restart a worker the scheduler refused
RESTART_ME = 5  # exit code: the scheduler removed us (we went silent); the nanny starts a fresh one
SCHEDULER_LOST = 6  # exit code: no word from the scheduler for SCHEDULER_SILENCE; the nanny stops
REPLICA_TIMEOUT = 60.0  # a retiring peer that has not sent its data by then is given up on
SCHEDULER_SILENCE = 30.0  # no word from the scheduler this long: it is gone, and so do we
LOOP_STALL = 5.0  # seconds between two ticks of our own loop that mean we were frozen
POLL_MS = 250
SHM_SWEEP_INTERVAL = 30.0  # seconds between looks for shared-memory files nobody attached


class Worker:
    def __init__(
        self,
        scheduler_address: str,
        *,
        worker_id: str,
        name: str,
        nthreads: int = 1,
        data_address: str = "tcp://127.0.0.1:0",
        contact_address: str | None = None,
        memory_limit: int = 0,
        resources: dict | None = None,
        security: Security | None = None,
        scheduler_silence: float = SCHEDULER_SILENCE,
        max_replacements: int = MAX_REPLACEMENTS,
        on_registered: Callable[[], None] | None = None,
    ) -> None:
        self.scheduler_address = scheduler_address
        self.worker_id = worker_id
        self.name = name
        self.nthreads = nthreads
        self.memory_limit = memory_limit
        self.resources = resources or {}
        self.scheduler_silence = scheduler_silence
        self.on_registered = on_registered
        self.registered = False
        self.store = DataStore()
        self.running = True
        self.exit_reason = ""
        self.exit_code = 0
        self._unsent: list = []  # control messages waiting for a connection
        self._last_memory_check = 0.0
        self._last_heartbeat = 0.0
        self._last_from_scheduler = self._last_tick = time.monotonic()
        self.security = security
        self._retire_requested = False
        self._retire_sent = False
        self._replica_peers: dict[str, zmq.Socket] = {}
        self._replica_started: dict[str, float] = {}
        self._replica_request = 0
        self._shm_tag = uuid.uuid4().hex[:8]  # names this worker's shared-memory files
        self._shm_pool = SegmentPool(self._shm_tag)  # ...and the segments it reuses
        local = scheduler_address.startswith("ipc://")  # (a local cluster: all on this host)
        self._arena = arena.Arena(self._shm_pool, time.monotonic(), local)  # (made once idle)
        self._last_shm_sweep = time.monotonic()

        self.ctrl = control_socket(zmq.DEALER, identity=worker_id.encode())
        if security is not None:
            security.client(self.ctrl, scheduler_address)
        # a refused security handshake is reported by the socket monitor: exit at once with a
        # clear message (and CREDENTIALS_REFUSED, which tells the nanny not to retry)
        self._monitor = self.ctrl.get_monitor_socket(
            zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
            | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
            | zmq.EVENT_HANDSHAKE_FAILED_AUTH
            | zmq.EVENT_HANDSHAKE_SUCCEEDED
            | zmq.EVENT_DISCONNECTED
        )
        self._handshake_ok = False
        self._early_drops = 0  # connections dropped before any handshake succeeded
        self.ctrl.connect(scheduler_address)
        self.data = make_socket(zmq.ROUTER)
        if security is not None and data_address.startswith("tcp://"):
            security.server(self.data)
        bound = bind(self.data, data_address)
        if contact_address:  # NAT / multi-homed hosts: advertise what peers can reach
            bound = f"tcp://{contact_address}:{bound.rsplit(':', 1)[1]}"
        elif bound.startswith(("tcp://0.0.0.0:", "tcp://*:")):
            bound = f"tcp://{_route_ip(scheduler_address)}:{bound.rsplit(':', 1)[1]}"
        self.data_address = bound
        functions = serialize.LoadedFunctions()
        initializers = Initializers()
        self.recalls = Recalls()
        self.replacements = Replacements(max_replacements)
        self.marker = RunMarker(nthreads)  # which task each slot runs (worker/reporting.py)
        self.slots = [
            Slot(
                i,
                worker_id=worker_id,
                scheduler_address=scheduler_address,
                store=self.store,
                functions=functions,
                initializers=initializers,
                security=security,
                recalls=self.recalls,
                replacements=self.replacements,
                marker=self.marker,
            )
            for i in range(nthreads)
        ]

    def run(self) -> None:
        # a limit below what a bare worker takes can never work: exiting before we register
        # makes this a failed start, so the nanny gives up instead of restarting us forever
        self._check_memory()
        if not self.running:
            self.close()
            return
        for slot in self.slots:
            slot.start()
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
                shm.host_key(),
                self.marker.path,
            )
        )
        poller = self._poller = zmq.Poller()
        poller.register(self.ctrl, zmq.POLLIN)
        poller.register(self.data, zmq.POLLIN)
        poller.register(self._monitor, zmq.POLLIN)
        try:
            while self.running:
                events = dict(poller.poll(POLL_MS))
                if self._monitor in events:
                    self._check_handshake()
                if self.ctrl in events:
                    self._drain_ctrl()
                if self.data in events:
                    self._drain_data()
                for address, sock in list(self._replica_peers.items()):
                    if sock in events:
                        self._drain_replicas(address, sock)
                self._on_tick(time.monotonic())
        finally:
            self.close()

    def _check_handshake(self) -> None:
        from zmq.utils.monitor import recv_monitor_message

        while self._monitor.poll(0):
            event = recv_monitor_message(self._monitor)["event"]
            if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                self._handshake_ok = True
                continue
            if event == zmq.EVENT_DISCONNECTED:
                # a mechanism mismatch (plain against CURVE) may show only as the scheduler
                # dropping us before any handshake succeeded, again and again
                if self._handshake_ok:
                    continue
                self._early_drops += 1
                if self._early_drops < 3:
                    continue
            secured = "our credentials are not the cluster's"
            self.exit_reason = (
                f"the scheduler at {self.scheduler_address} refused the connection: "
                + (secured if self.security is not None else "it requires credentials")
            )
            self.exit_code = CREDENTIALS_REFUSED
            logger.error("worker %s: %s", self.name, self.exit_reason)
            self.running = False
            return

    def request_retire(self) -> None:
        """Signal handler (SIGTERM from the nanny): leave once our data is safe elsewhere."""
        self._retire_requested = True

    # --- copies of a retiring peer's data (ReplicateKeys) --------------------------------------

    def _on_replicate(self, msg: m.ReplicateKeys) -> None:
        by_address: dict[str, list] = {}
        for key, addresses in msg.items:
            if key not in self.store and addresses:
                by_address.setdefault(addresses[0], []).append(key)
        for address, keys in by_address.items():
            sock = self._replica_peers.get(address)
            if sock is None:
                sock = self._replica_peers[address] = connect_to_data(address, self.security)
                self._poller.register(sock, zmq.POLLIN)
            self._replica_request += 1
            self._replica_started[address] = time.monotonic()
            sock.send_multipart(m.encode(m.GetData(self._replica_request, keys, shm.host_key())))

    def _drain_replicas(self, address: str, sock: zmq.Socket) -> None:
        while True:
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            try:
                msg = m.decode([frames[0].bytes, *[_buffer(f) for f in frames[1:]]])
                msg.frames = shm.unpack_frames(msg.frames, msg.shm)
                added = []
                offset = 0
                for key, nframes in msg.items:
                    if nframes >= 0:
                        value_frames = msg.frames[offset : offset + nframes]
                        offset += nframes
                        added.append((key, self.store.put_frames(key, value_frames)))
            except Exception as exc:
                logger.warning("dropping a bad replica reply from %s: %r", address, exc)
                continue
            if added:
                self._send(m.AddKeys(added))

    def _drop_replica_peers(self, now: float) -> None:
        for address, started in list(self._replica_started.items()):
            if now - started > REPLICA_TIMEOUT:
                del self._replica_started[address]
                sock = self._replica_peers.pop(address, None)
                if sock is not None:
                    self._poller.unregister(sock)
                    sock.close(linger=0)

    def close(self) -> None:
        self.running = False
        for slot in self.slots:
            slot.running = False
        self._monitor.close(linger=0)  # (no disable_monitor(): it can block on a full pipe)
        for sock in self._replica_peers.values():
            sock.close(linger=0)
        self.ctrl.close(linger=200)  # let a last message (AddKeys) go out
        self.data.close(linger=0)
        self._arena.stop()
        self._shm_pool.close()
        self.marker.unlink()
        shm.remove_own(self._shm_tag)  # answers nobody took in: they never will now

    def _send(self, msg: Any) -> None:
        """Never block the loop: with no connection to the scheduler (not yet up, or it refused
        our handshake) a message is kept for retry on the next tick, or dropped if it is a
        heartbeat (the next one says the same)."""
        try:
            send_frames(self.ctrl, m.encode(msg), NOBLOCK)
        except zmq.Again:
            if not isinstance(msg, m.Heartbeat):
                self._unsent.append(msg)

    def _check_memory(self) -> None:
        """Over its memory limit, the worker exits; its nanny starts a fresh one and the
        scheduler reschedules its tasks (the one running is blamed: KilledWorker after 3)."""
        rss = _rss()
        if self.memory_limit and rss > self.memory_limit:
            # shared memory kept for reuse (ours, and peers' segments mapped here) goes first
            self._shm_pool.trim(force=True)
            shm.prune_mappings(force=True)
            rss = _rss()
        if self.memory_limit and rss > self.memory_limit:
            self.exit_reason = (
                f"memory {rss / 2**20:.0f} MiB exceeds the limit of "
                f"{self.memory_limit / 2**20:.0f} MiB"
            )
            self.exit_code = MEMORY_EXCEEDED
            logger.error("worker %s: %s; restarting", self.name, self.exit_reason)
            self.running = False

    def _on_tick(self, now: float) -> None:
        if self.memory_limit and now - self._last_memory_check >= MEMORY_CHECK_INTERVAL:
            self._last_memory_check = now
            self._check_memory()
        if self._unsent:
            unsent, self._unsent = self._unsent, []
            for msg in unsent:
                self._send(msg)
        if self.registered and not self._arena.tried:
            started = sum(slot.tasks_started for slot in self.slots)
            self._arena.tick(now, started, any(s.current is not None for s in self.slots))
        self._arena.poll()  # (its pages made yet?)
        self._shm_pool.trim()  # (throttled: segments freed by dead receivers, idle ones)
        shm.prune_mappings()  # (throttled: peers' segments whose file is gone)
        if now - self._last_shm_sweep >= SHM_SWEEP_INTERVAL:
            self._last_shm_sweep = now
            shm.expire_own()  # files whose receiver never came (it died, or gave up)
        if self._retire_requested and not self._retire_sent:
            self._retire_sent = True
            self._send(m.RetireMe("the worker was asked to stop (SIGTERM)"))
        if self._replica_started:
            self._drop_replica_peers(now)
        if now - self._last_heartbeat >= HEARTBEAT_INTERVAL:
            self._last_heartbeat = now
            executing = sum(1 for s in self.slots if s.current is not None)
            self._send(m.Heartbeat(executing, self.store.total_bytes()))
        self._check_scheduler_silence(now)

    def _check_scheduler_silence(self, now: float) -> None:
        if now - self._last_tick > LOOP_STALL:  # we were frozen: the silence may be ours
            self._last_from_scheduler = now
        self._last_tick = now
        if now - self._last_from_scheduler > self.scheduler_silence:
            self.exit_reason = f"no word from the scheduler for {self.scheduler_silence:g} s"
            self.exit_code = SCHEDULER_LOST
            logger.error("worker %s: %s; exiting", self.name, self.exit_reason)
            self.running = False

    def _drain_ctrl(self) -> None:
        for _ in range(1000):
            try:
                frames = recv_frames(self.ctrl, NOBLOCK)
            except zmq.Again:
                return
            self._last_from_scheduler = time.monotonic()
            try:
                msgs = m.decode_all(frames)
            except MalformedMessage as exc:
                logger.warning("dropping malformed message from the scheduler: %s", exc)
                continue
            for msg in msgs:
                try:
                    self._on_ctrl(msg)
                except Exception as exc:  # well-formed, nonsense inside: drop it, keep serving
                    logger.warning(
                        "dropping bad %s from the scheduler: %r", type(msg).__name__, exc
                    )

    def _on_ctrl(self, msg: Any) -> None:
        if isinstance(msg, m.FreeKeys):
            for key in msg.keys:
                self.store.free(key)
        elif isinstance(msg, m.CancelCompute):
            cancelled = self.recalls.cancel(msg.key, msg.slot)
            self._send(m.CancelComputeReply(msg.key, msg.slot, cancelled))
        elif isinstance(msg, m.ReplicateKeys):
            self._on_replicate(msg)
        elif isinstance(msg, m.CloseWorker):
            logger.info("worker %s closing: %s", self.name, msg.reason)
            self.exit_reason = msg.reason
            if msg.restart:
                self.exit_code = RESTART_ME
            self.running = False
        elif isinstance(msg, m.Reply):
            if not self.registered:
                self._note_marker(msg.value == runmarker.MAPPED)
            self._note_registered()
        else:
            logger.warning("dropping unexpected %s on the control socket", type(msg).__name__)

    def _note_marker(self, mapped: bool) -> None:
        """The scheduler maps our run marker (it reads it if we die): slots may hold results."""
        self.marker.unlink()  # mapped or not, the scheduler is done with the file
        if mapped and reporting.allowed():
            for slot in self.slots:
                slot.hold.enabled = True

    def _note_registered(self) -> None:
        """The scheduler answers (and pings) only workers it registered."""
        if not self.registered:
            self.registered = True
            if self.on_registered is not None:
                self.on_registered()

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
                msg = m.decode([frames[1].bytes, *[_buffer(f) for f in frames[2:]]])
            except MalformedMessage as exc:
                logger.warning("dropping malformed data request: %s", exc)
                continue
            try:
                if isinstance(msg, m.GetData):
                    self._serve(identity, msg)
                elif isinstance(msg, m.StoreData):
                    self._store_data(msg)
                else:
                    logger.warning("dropping unexpected %s on the data socket", type(msg).__name__)
            except Exception as exc:  # a well-formed message with nonsense inside (fuzzing)
                logger.warning("dropping bad %s on the data socket: %r", type(msg).__name__, exc)

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
        # a peer on this host gets big frames through shared memory
        frames, spec = shm.pack_frames(frames, msg.host, self._shm_tag, self._shm_pool)
        try:
            self.data.send_multipart(
                [identity, *m.encode(m.Data(msg.request_id, items, spec, frames))], copy=False
            )
        except zmq.ZMQError as exc:
            logger.warning("could not answer a data request: %s", exc)
            shm.discard_spec(spec, self._shm_pool)

    def _store_data(self, msg: m.StoreData) -> None:
        offset = 0
        added = []
        all_frames = shm.unpack_frames(msg.frames, msg.shm)
        for key, nframes in msg.items:
            frames = all_frames[offset : offset + nframes]
            offset += nframes
            added.append((key, self.store.put_frames(key, frames)))
        self._send(m.AddKeys(added))


def _route_ip(address: str) -> str:
    """This host's IP on the route to ``address`` (a UDP connect sends no packet)."""
    import socket

    host, _, port = address.split("://", 1)[-1].rpartition(":")
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.connect((host.strip("[]"), int(port)))
            return str(probe.getsockname()[0])
    except OSError:
        return socket.gethostname()


def _rss() -> int:
    """This process's resident memory in bytes (Linux /proc; elsewhere the peak, from
    getrusage, which errs on the side of restarting)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        import resource
        import sys

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024
