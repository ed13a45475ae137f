"""The scheduler's shell: one ROUTER socket, the state machine, and liveness.

``SchedulerServer`` receives, calls :class:`SchedulerState`, and sends; it holds no scheduling
logic. It runs either inside a client's I/O thread (the local cluster: messages for that client are
handed over in-process by ``deliver_local``, without encoding) or behind its own loop in a
``meshpool scheduler`` process (:func:`serve_forever`).

Peers are told apart by their zmq identity: a worker's is its worker id, a client's its client id.
A worker's slots are ``worker-id/n``; a thread that gave its slot away while its task waited sends
the task's result from a helper connection ``worker-id/n~k``, accepted once the worker has
registered (such peers are never sent anything, so they are not tracked).
Liveness: every :data:`PING_INTERVAL` the server pings each peer. Because the ROUTER socket is
``ROUTER_MANDATORY``, a ping to a peer whose connection has dropped fails at once
(EHOSTUNREACH): that peer is gone. A connection drops when the peer's process dies (its kernel
closes it), and also when the peer's host vanishes without closing anything (power loss,
partition, a frozen process): ZMTP heartbeats (``transport/sockets.py``) close a connection that
stays silent for the heartbeat timeout. A worker removed while it had been silent that long
*vanished*: its running tasks are rescheduled without blame (KilledWorker counts crashes, and
silence is not one). A removed worker that comes back (partition healed, SIGCONT), or one of a
former scheduler on this address, is told to leave (``CloseWorker(restart=True)``) and its nanny
starts a fresh one; what its slots still send is dropped (at debug level). Silence alone, with the
connection up, only marks a worker unresponsive (:data:`UNRESPONSIVE_AFTER`): a task may hold
the GIL for minutes while libzmq keeps answering heartbeats.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

import zmq

from .. import messages as m
from ..pinning import renewed, since, stamp
from ..transport import lanes, runmarker, shm
from ..transport.frames import NOBLOCK, recv_frames, send_frames
from ..transport.header import MalformedMessage
from ..transport.security import Security
from ..transport.sockets import MAX_FRAME_BYTES, bind, control_socket, heartbeat_timeout
from .state import SchedulerState

logger = logging.getLogger("meshpool.scheduler")

# plain ints: pyzmq's flags are an IntFlag, and ``int & IntFlag`` runs enum code (~1 µs each, on
# every lane event; py-spy found them in 5 % of the I/O thread's samples of a round-trip loop)
_POLLOUT = int(zmq.POLLOUT)
_POLLIN_OR_ERR = int(zmq.POLLIN | zmq.POLLERR)
# a lane's readiness in the epoll sets below (exclusive: see ``watch_lanes``)
_LANE_READABLE = select.EPOLLIN | select.EPOLLEXCLUSIVE

PING_INTERVAL = 0.5  # seconds between liveness pings to every peer
UNRESPONSIVE_AFTER = 60.0  # a worker silent this long is reported unresponsive (not dead)
MAX_BATCH = 2000  # messages handled per readiness event before others get a turn
VANISHED_SILENCE = 0.9  # a dropped worker silent this share of the heartbeat timeout vanished
REMEMBER_REMOVED = 10_000  # removed worker ids kept, to say "removed and back" when one returns


class SchedulerServer:
    def __init__(
        self,
        address: str,
        *,
        security: Security | None = None,
        local_client: str | None = None,
        deliver_local: Callable[[Any], None] | None = None,
    ) -> None:
        self.state = SchedulerState()
        self.router = control_socket(zmq.ROUTER)
        self._vanished_after = VANISHED_SILENCE * heartbeat_timeout()
        if security is not None and address.startswith("tcp://"):
            security.server(self.router)
        # before the ipc socket: its file appearing tells local slots the lane is listening
        self._listener = _listen_for_lanes(address)
        self.address = bind(self.router, address)
        self._lanes: dict[str, lanes.Lane] = {}  # slot peer id -> its lane (transport/lanes.py)
        self._lane_fds: dict[int, lanes.Lane] = {}  # every open lane, named or not yet
        self._writing: set[int] = set()  # lanes watched for POLLOUT (their kernel buffer filled)
        # lanes' readability: the loop's poller watches ``_lane_epoll``; a caller's thread may
        # wait on an epoll set of its own, registered first (see watch_lanes)
        self._lane_epoll = select.epoll() if self._listener is not None else None
        self._lane_watchers: list[select.epoll] = []
        self._dropped_inline: list[lanes.Lane] = []  # lanes an inline send found closed
        self._poller: zmq.Poller | None = None
        self.local_client = local_client
        self.deliver_local = deliver_local
        self._last_ping = 0  # (instants kept as pinning.stamp()s)
        self._last_seen: dict[str, int] = {}
        self._kind: dict[str, str] = {}  # peer id -> "worker" | "client"
        self._unresponsive: set[str] = set()
        self._worker_peers: dict[str, set[str]] = {}  # worker id -> its control + slot peers
        self._early_slots: dict[str, list] = {}  # slot hellos that beat their worker's register
        self._holding = 0  # > 0 inside hold()/release(): messages to peers wait in _held
        self._held: dict[str, list] = {}
        self._inline = False  # inside inline(): only lanes may be written (see there)
        self._hosts: dict[str, str] = {}  # worker id -> shared-memory host key (transport/shm.py)
        self._markers: dict[str, runmarker.MarkerReader] = {}  # worker id -> its run marker
        self._removed: dict[str, None] = {}  # the latest removed worker ids, oldest first
        self.bytes_received = 0
        self.messages_received = 0
        self.bytes_sent = 0
        self.on_worker_removed: Callable[[str, str], None] | None = None
        self.on_worker_added: Callable[[str], None] | None = None

    def close(self) -> None:
        self.router.close(linger=0)
        if self._listener is not None:
            self._listener.close()
        for lane in list(self._lane_fds.values()):
            self._drop_lane(lane)
        if self._lane_epoll is not None:
            self._lane_epoll.close()
        for marker in self._markers.values():
            marker.close()
        self._markers.clear()

    def info(self) -> dict:
        return {
            "pid": os.getpid(),
            "address": self.address,
            "bytes_sent": self.bytes_sent,
            "bytes_received": self.bytes_received,
            "messages_received": self.messages_received,
            "tasks": len(self.state.tasks),
            "workers": len(self.state.workers),
        }

    # --- in-process client -------------------------------------------------------------------

    def handle_local(self, msg: Any) -> None:
        assert self.local_client is not None
        self._handle_client(self.local_client, msg)

    def remove_worker(self, worker_id: str, reason: str, blame: bool = True) -> None:
        self._removed[worker_id] = None
        if len(self._removed) > REMEMBER_REMOVED:
            del self._removed[next(iter(self._removed))]
        for peer in self._worker_peers.pop(worker_id, {worker_id}):
            self._kind.pop(peer, None)
            self._last_seen.pop(peer, None)
        self._early_slots.pop(worker_id, None)
        self._hosts.pop(worker_id, None)
        marker = self._markers.pop(worker_id, None)
        running = None
        if marker is not None:
            running = marker.running()
            marker.close()
        self._send_all(self.state.remove_worker(worker_id, reason, blame=blame, running=running))
        if self.on_worker_removed is not None:
            self.on_worker_removed(worker_id, reason)

    # --- sockets -----------------------------------------------------------------------------

    def attach(self, poller: zmq.Poller) -> None:
        """Register the ROUTER and the lane listener in the loop's ``poller`` (lanes register
        themselves as they come); the loop then passes its events to :meth:`handle_events`."""
        self._poller = poller
        poller.register(self.router, zmq.POLLIN)
        if self._listener is not None:
            poller.register(self._listener.fd, zmq.POLLIN)
        if self._lane_epoll is not None:
            poller.register(self._lane_epoll.fileno(), zmq.POLLIN)

    @property
    def has_lanes(self) -> bool:
        return self._lane_epoll is not None

    def watch_lanes(self, epoll: select.epoll) -> None:
        """Register every lane, from now on, in ``epoll`` too, before the loop's own set: a
        thread waiting in ``epoll.poll`` then reads what arrives and the loop's thread is not
        woken. The lanes are registered exclusive (``EPOLLEXCLUSIVE``) in both sets, and the
        kernel offers a wake-up to each set in the order registered until one has a thread
        waiting; with none waiting on ``epoll`` it goes on to the loop's. What the waiting
        thread is told about it must handle (:meth:`handle_lane_events`, inline): the loop's
        set is not told. Call before lanes connect (lanes already there are not added)."""
        self._lane_watchers.append(epoll)

    def handle_events(self, events: dict) -> None:
        """Handle what has arrived (up to :data:`MAX_BATCH` messages from the ROUTER, and what
        each ready lane holds), holding back what the state machine sends meanwhile and sending
        it at the end, one message per peer: busy, a slot gets its next tasks in one send; idle,
        a lone message goes out at once."""
        self.hold()
        try:
            now = time.monotonic()
            if self.router in events:
                self._receive_batch(now)
            if self._listener is not None and self._listener.fd in events:
                self._accept_lanes()
            if self._lane_epoll is not None and self._lane_epoll.fileno() in events:
                self._on_lane_events(self._lane_epoll.poll(0), now)
            for fd, flags in events.items():  # (a lane is in the poller only for POLLOUT)
                lane = self._lane_fds.get(fd) if type(fd) is int else None
                if lane is not None:
                    self._on_lane_event(lane, flags, now)
        finally:
            self.release()

    def handle_lane_events(self, events: list[tuple[int, int]]) -> None:
        """Handle lanes an epoll set of :meth:`watch_lanes` found readable (inline, on the
        thread that waited there)."""
        self._on_lane_events(events, time.monotonic())

    def _on_lane_events(self, events: list[tuple[int, int]], now: float) -> None:
        for fd, _ in events:
            lane = self._lane_fds.get(fd)
            if lane is not None and not lane.closed:
                self._on_lane_event(lane, _POLLIN_OR_ERR, now)

    def hold(self) -> None:
        """Keep what is sent to peers until the matching :meth:`release` (calls nest)."""
        self._holding += 1

    def release(self) -> None:
        self._holding -= 1
        if not self._holding:
            self._flush_held()

    def inline_begin(self) -> None:
        """From here to :meth:`inline_end`, this server runs on a thread other than its loop's
        (a caller submitting to an idle local cluster, under the client's loop lock). Lanes are
        plain sockets, so what goes to them is sent; what goes to zmq peers (whose sockets only
        the loop's thread may touch) waits for the loop."""
        self._inline = True
        self.hold()

    def inline_end(self) -> bool:
        """Send what goes on lanes; True if the loop has something left to do."""
        self._holding -= 1
        try:
            self._flush_held(lanes_only=True)
        finally:
            self._inline = False
        return bool(self._held or self._writing or self._dropped_inline)

    def _receive_batch(self, now: float) -> None:
        for _ in range(MAX_BATCH):
            try:
                frames = recv_frames(self.router, NOBLOCK)
            except zmq.Again:
                return
            if len(frames) < 2:
                continue
            try:
                peer = frames[0].decode()
            except UnicodeDecodeError as exc:
                logger.warning("dropping malformed message: %s", exc)
                continue
            self._handle_frames(peer, frames[1:], now)

    def _handle_frames(self, peer: str, frames: list, now: float) -> None:
        self.bytes_received += sum(len(f) for f in frames)
        self.messages_received += 1
        try:
            msgs = m.decode_all(frames)
        except MalformedMessage as exc:
            logger.warning("dropping malformed message: %s", exc)
            return
        # any traffic is a sign of life; a slot's ("worker-id/n") counts for its worker, as
        # slots only speak when they finish tasks (they would look "unresponsive" otherwise)
        self._last_seen[peer.partition("/")[0]] = stamp(now)
        for msg in msgs:
            try:
                self._dispatch(peer, msg)
            except Exception:
                logger.exception("error handling %s from %s; dropped", type(msg).__name__, peer)

    # --- lanes (transport/lanes.py) -----------------------------------------------------------

    def _accept_lanes(self) -> None:
        assert self._listener is not None and self._lane_epoll is not None
        for lane in self._listener.accept():
            self._lane_fds[lane.fd] = lane
            for epoll in self._lane_sets():
                epoll.register(lane.fd, _LANE_READABLE)

    def _lane_sets(self) -> list[select.epoll]:
        """The epoll sets lanes are registered in, in the order they must be (watch_lanes)."""
        if self._lane_epoll is None:
            return []
        return [*self._lane_watchers, self._lane_epoll]

    def _on_lane_event(self, lane: lanes.Lane, flags: int, now: float) -> None:
        if flags & _POLLOUT:
            self._flush_lane(lane)
        if not flags & _POLLIN_OR_ERR:
            return
        try:
            received = lane.receive()
        except (lanes.LaneClosed, MalformedMessage, OSError) as exc:
            if not isinstance(exc, lanes.LaneClosed):
                logger.warning("closing the lane of %s: %s", lane.peer or "a new peer", exc)
            self._drop_lane(lane)
            return
        for frames in received:
            if lane.peer:
                self._handle_frames(lane.peer, frames, now)
            elif not self._name_lane(lane, frames):
                self._drop_lane(lane)
                return

    def _name_lane(self, lane: lanes.Lane, frames: list) -> bool:
        """A lane's first message names its slot (``worker-id/n``)."""
        peer = frames[1].decode(errors="replace") if len(frames) == 2 else ""
        if frames[0] != lanes.HELLO or "/" not in peer or "~" in peer:
            logger.warning("closing a lane that did not introduce itself as a slot")
            return False
        stale = self._lanes.get(peer)
        if stale is not None:
            self._drop_lane(stale)
        lane.peer = peer
        self._lanes[peer] = lane
        return True

    def _flush_lane(self, lane: lanes.Lane) -> None:
        try:
            lane.flush()
        except lanes.LaneClosed:
            pass  # (the read that follows, or the next send, finds it closed)
        watching = lane.fd in self._writing
        if lane.wants_write != watching and self._poller is not None and not lane.closed:
            if lane.wants_write:
                self._poller.register(lane.fd, zmq.POLLOUT)
            else:
                self._poller.unregister(lane.fd)
            self._writing.symmetric_difference_update({lane.fd})

    def _drop_lane(self, lane: lanes.Lane) -> None:
        """Forget a lane: what its peer is sent next goes to the ROUTER, which fails for a
        peer it never knew (ROUTER_MANDATORY) and so reports the peer gone, as for zmq. (Off
        the loop's thread, it is only marked closed: the loop drops it, as its poller is the
        loop's.)"""
        if self._lanes.get(lane.peer) is lane:
            del self._lanes[lane.peer]
        for epoll in self._lane_sets():  # (any thread may)
            with contextlib.suppress(OSError, ValueError):  # (not there, or closed)
                epoll.unregister(lane.fd)
        lane.closed = True
        if self._inline:
            self._dropped_inline.append(lane)
            return
        self._lane_fds.pop(lane.fd, None)
        if lane.fd in self._writing and self._poller is not None:
            self._poller.unregister(lane.fd)
        self._writing.discard(lane.fd)
        lane.close()

    def _flush_held(self, lanes_only: bool = False) -> None:
        while True:
            # emptied, not replaced: a new dict per flush, the last one living on, kept one of
            # a released burst's pymalloc arenas in use
            held = [
                (p, msgs) for p, msgs in self._held.items() if not lanes_only or p in self._lanes
            ]
            if not held:
                return
            for peer, _ in held:
                del self._held[peer]
            for peer, msgs in held:
                self._send_encoded(peer, m.encode_many(msgs))

    def _dispatch(self, peer: str, msg: Any) -> None:
        kind = self._kind.get(peer)
        if isinstance(msg, m.RegisterWorker):
            self._register_worker(peer, msg)
        elif isinstance(msg, m.SlotHello):
            self._slot_hello(peer, msg)
        elif isinstance(msg, m.HelloClient):
            problem = m.version_mismatch(m.versions(), msg.versions)
            if problem is not None:
                self._send(peer, m.ClusterBroken("version", f"scheduler refused: {problem}"))
                return
            self._kind[peer] = "client"
            self._send(peer, m.Reply(0, {"versions": m.versions()}))
        elif kind == "worker":
            self._unresponsive.discard(peer)
            self._send_all(self.state.handle_worker(peer, msg))
        elif kind is None and self._is_slot_helper(peer):
            self._send_all(self.state.handle_worker(peer, msg))
        elif kind == "client":
            if isinstance(msg, m.GetSchedulerInfo):
                self._send(peer, m.Reply(msg.request_id, self.info()))
            elif isinstance(msg, m.ClientClosing):
                self._kind.pop(peer, None)
                self._send_all(self.state.remove_client(peer))
            else:
                self._handle_client(peer, msg)
        elif isinstance(msg, m.Heartbeat) and "/" not in peer:
            self._unknown_worker_back(peer)
        elif self._is_former_worker(peer):
            # what a removed worker finished meanwhile (its tasks ran elsewhere), or a slot of
            # a former scheduler's worker: routine, and the worker itself is told to leave
            logger.debug(
                "dropping %s from %r, a worker not registered here", type(msg).__name__, peer
            )
        else:
            logger.warning("dropping %s from unregistered peer %r", type(msg).__name__, peer)

    def _unknown_worker_back(self, peer: str) -> None:
        """A worker we removed, back (partition healed, SIGCONT), or one registered with an
        earlier scheduler on this address: its tasks ran elsewhere or are unknown here. It
        leaves, and its nanny starts a fresh one, which registers."""
        if peer in self._removed:
            logger.warning("worker %s was removed and is back; telling it to restart", peer)
            reason = "the scheduler had removed this worker (it went silent); restarting fresh"
        else:
            logger.warning("unknown worker %s (a former scheduler's?); telling it to restart", peer)
            reason = "the scheduler does not know this worker (it restarted?); restarting fresh"
        self._send(peer, m.CloseWorker(reason, restart=True))

    def _is_former_worker(self, peer: str) -> bool:
        """A removed worker's connection, or a slot (``id/n``) of a worker not registered."""
        worker_id, slash, _ = peer.partition("/")
        return worker_id in self._removed or (bool(slash) and worker_id not in self._worker_peers)

    def _handle_client(self, peer: str, msg: Any) -> None:
        out = self.state.handle_client(peer, msg)
        if isinstance(msg, m.GetWorkers):
            self._add_hosts(out)
        self._send_all(out)

    def _add_hosts(self, out: list) -> None:
        """Worker lists tell clients each worker's shared-memory host key: a client on the same
        host sends big data to it as shared-memory files (``transport/shm.py``)."""
        for _, reply in out:
            if isinstance(reply, m.Reply) and isinstance(reply.value, list):
                for info in reply.value:
                    if isinstance(info, dict):
                        info["host"] = self._hosts.get(info.get("id", ""), "")

    def _is_slot_helper(self, peer: str) -> bool:
        """``worker-id/n~k`` of a registered worker (see the module docstring)."""
        worker_id, slash, rest = peer.partition("/")
        slot, tilde, number = rest.partition("~")
        return (
            bool(slash and tilde)
            and slot.isdigit()
            and number.isdigit()
            and worker_id in self._worker_peers
        )

    def _register_worker(self, peer: str, msg: m.RegisterWorker) -> None:
        problem = m.version_mismatch(m.versions(), msg.versions)
        if problem is not None or msg.worker_id != peer or "/" in peer:
            problem = problem or "worker id does not match its connection"
            logger.error("refusing worker %s: %s", msg.name, problem)
            self._send(peer, m.CloseWorker(f"refused by the scheduler: {problem}"))
            return
        self._kind[peer] = "worker"
        self._worker_peers[peer] = {peer}
        self._hosts[peer] = msg.host if isinstance(msg.host, str) else ""
        marker = None
        if self._hosts[peer] and self._hosts[peer] == shm.host_key():
            marker = runmarker.open_marker(str(msg.marker or ""), int(msg.nthreads))
        stale = self._markers.pop(peer, None)  # (a worker registering again)
        if stale is not None:
            stale.close()
        if marker is not None:
            self._markers[peer] = marker
        # at once, not at the next ping: the worker tells its nanny that this start worked
        # before a task we are about to send it can take it over its memory limit
        self._send(peer, m.Reply(-1, runmarker.MAPPED if marker is not None else "registered"))
        self._send_all(self.state.handle_worker(peer, msg))
        if self.on_worker_added is not None:
            self.on_worker_added(peer)
        for early in self._early_slots.pop(peer, []):
            self._slot_hello(f"{peer}/{early.slot}", early)

    def _slot_hello(self, peer: str, msg: m.SlotHello) -> None:
        """A slot connects on its own socket, possibly before its worker has registered."""
        if peer != f"{msg.worker_id}/{msg.slot}":
            logger.warning("dropping slot hello with a mismatched identity %r", peer)
            return
        peers = self._worker_peers.get(msg.worker_id)
        if peers is None:
            early = self._early_slots.setdefault(msg.worker_id, [])
            if len(early) < 1024:
                early.append(msg)
            return
        self._kind[peer] = "worker"
        peers.add(peer)
        self._send_all(self.state.handle_worker(peer, msg))

    def _send_all(self, out: list) -> None:
        for peer, msg in out:
            if peer == self.local_client:
                if self.deliver_local is not None:
                    self.deliver_local(msg)
            else:
                self._send(peer, msg)

    def _send(self, peer: str, msg: Any) -> bool:
        if self._holding or self._inline or peer in self._held:  # (keeps a peer's order)
            self._held.setdefault(peer, []).append(msg)
            return True
        return self._send_encoded(peer, m.encode(msg))

    def _send_encoded(self, peer: str, frames: list) -> bool:
        lane = self._lanes.get(peer)
        try:
            if lane is not None:
                lane.send(frames)
                if lane.wants_write:
                    self._flush_lane(lane)  # (starts watching for POLLOUT)
            else:
                send_frames(self.router, [peer.encode(), *frames])
        except (lanes.LaneClosed, OSError) as exc:  # (OSError: not from zmq, a lane's)
            assert lane is not None
            self._drop_lane(lane)
            self._peer_gone(peer, str(exc))
            return False
        except zmq.ZMQError as exc:
            self._peer_gone(peer, exc.strerror)
            return False
        self.bytes_sent += sum(
            len(f) if not isinstance(f, memoryview) else f.nbytes for f in frames
        )
        return True

    def _peer_gone(self, peer: str, error: str) -> None:
        """``peer``'s connection dropped: its process died or closed it, its heartbeats timed
        out (a vanished host), or it sent a frame over the cap (libzmq drops those)."""
        kind = self._kind.get(peer)
        if kind == "worker":
            worker_id = peer.partition("/")[0]
            seen = self._last_seen.get(worker_id)
            silent = since(time.monotonic(), seen) if seen is not None else 0.0
            if silent >= self._vanished_after:
                reason = f"silent for {silent:.1f} s, connection timed out (host vanished?)"
                self.remove_worker(worker_id, reason, blame=False)
            else:
                self.remove_worker(worker_id, f"connection lost ({error})")
        elif kind == "client":
            logger.warning(
                "client %s gone: connection lost (%s; closed, timed out, or it sent a frame "
                "over %d MiB)",
                peer,
                error,
                MAX_FRAME_BYTES // 2**20,
            )
            self._kind.pop(peer, None)
            self._last_seen.pop(peer, None)
            self._send_all(self.state.remove_client(peer))

    def on_tick(self, now: float) -> None:
        if since(now, self._last_ping) < PING_INTERVAL:
            return
        self._last_ping = stamp(now)
        self.state.compact()
        self.bytes_sent = renewed(self.bytes_sent)  # (see pinning.py)
        self.bytes_received = renewed(self.bytes_received)
        self.messages_received = renewed(self.messages_received)
        while self._dropped_inline:
            self._drop_lane(self._dropped_inline.pop())  # (see inline_begin)
        for peer in [p for p in self._kind if "/" not in p]:
            if peer in self._kind:
                self._send(peer, m.Reply(-1, "ping"))
        for peer, seen in list(self._last_seen.items()):
            if (
                self._kind.get(peer) == "worker"
                and since(now, seen) > UNRESPONSIVE_AFTER
                and peer not in self._unresponsive
            ):
                self._unresponsive.add(peer)
                logger.warning("worker %s unresponsive for %.0f s", peer, since(now, seen))


def serve_forever(
    address: str,
    *,
    security: Security | None = None,
    ready: Callable[[str], None] | None = None,
    stop: threading.Event | None = None,
) -> None:
    """Run a standalone scheduler until SIGINT/SIGTERM (or ``stop`` is set)."""
    server = SchedulerServer(address, security=security)
    stop = stop or threading.Event()
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
    if ready is not None:
        ready(server.address)
    poller = zmq.Poller()
    server.attach(poller)
    try:
        while not stop.is_set():
            events = dict(poller.poll(100))
            if events:
                server.handle_events(events)
            server.on_tick(time.monotonic())
    finally:
        for peer, kind in list(server._kind.items()):
            if "/" in peer:
                continue
            if kind == "worker":
                server._send(peer, m.CloseWorker("scheduler stopping"))
            else:
                server._send(peer, m.ClusterBroken("scheduler", "the scheduler stopped"))
        server.close()


def _listen_for_lanes(address: str) -> lanes.LaneListener | None:
    """A listener for the lanes of local slots, beside an ``ipc://`` address."""
    path = lanes.lane_path(address)
    if path is None or not lanes.enabled():
        return None
    try:
        return lanes.LaneListener(path)
    except OSError as exc:
        logger.warning("no lanes for local workers (%s); they use zmq", exc)
        return None
