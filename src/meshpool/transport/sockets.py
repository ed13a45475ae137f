"""Socket construction with deliberate options, and the private ipc directory.

Every socket gets ``LINGER`` (shutdown never waits forever for unsent messages); ROUTER sockets get
``ROUTER_MANDATORY`` (a message to a vanished peer is an error we see, not a silent drop — the way
Parsl lost tasks) and generous high-water marks. All sockets of a process share one context;
a process that forks gets a fresh one (a zmq context must never cross ``fork()``).

Control connections (to and from the scheduler) also get:

* **ZMTP heartbeats** (:func:`enable_heartbeats`): libzmq PINGs the peer every
  :data:`HEARTBEAT_INTERVAL` and closes a connection that stays silent for the heartbeat timeout
  (:data:`HEARTBEAT_TIMEOUT`, or ``MESHPOOL_HEARTBEAT_TIMEOUT`` seconds). That catches a host
  that vanished without closing its TCP connections (power loss, pulled cable, partition, a
  frozen process), which otherwise looks like a slow peer forever. libzmq answers PINGs from its
  own I/O thread, without the GIL, so a task holding the GIL for minutes does not trip it.
* **A frame cap** (:func:`limit_frames`, ``MAXMSGSIZE`` = :data:`MAX_FRAME_BYTES`, which libzmq
  checks per frame): a peer sending a bigger frame has its connection dropped before the frame
  is buffered. The scheduler only ever carries metadata, small arguments and small results.

Data sockets (a worker's data ROUTER and the DEALERs that fetch from it) carry user data of any
size: they are neither capped nor heartbeated. A heartbeat reply waits behind whatever frame is
in flight on its connection, so a 1 GB transfer over a slow link would look like a dead peer;
their requests have timeouts of their own instead.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from typing import Any

import zmq

logger = logging.getLogger("meshpool.transport")

LINGER_MS = 200  # unsent messages a closing socket may still flush; then they are dropped
HWM = 1_000_000  # messages queued per peer before zmq pushes back; we never want a silent drop
MAX_FRAME_BYTES = 64 * 2**20  # per frame on control connections; data sockets are uncapped
HEARTBEAT_INTERVAL = 1.0  # seconds between ZMTP PINGs on a control connection
HEARTBEAT_TIMEOUT = 10.0  # seconds of silence after a PING before the connection is closed
HEARTBEAT_TIMEOUT_ENV = "MESHPOOL_HEARTBEAT_TIMEOUT"  # override, in seconds (tests use ~2)

_context: zmq.Context | None = None
_context_pid = 0


def context() -> zmq.Context:
    """This process's zmq context (a new one after fork)."""
    global _context, _context_pid
    if _context is None or _context_pid != os.getpid():
        _context = zmq.Context()
        _context_pid = os.getpid()
    return _context


def make_socket(kind: int, identity: bytes | None = None) -> zmq.Socket:
    sock = context().socket(kind)
    sock.setsockopt(zmq.LINGER, LINGER_MS)
    sock.setsockopt(zmq.SNDHWM, HWM)
    sock.setsockopt(zmq.RCVHWM, HWM)
    if kind == zmq.ROUTER:
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
    if identity is not None:
        sock.setsockopt(zmq.IDENTITY, identity)
    return sock


def control_socket(kind: int, identity: bytes | None = None) -> zmq.Socket:
    """A socket for a connection to or from the scheduler: heartbeats and a frame cap."""
    sock = make_socket(kind, identity)
    enable_heartbeats(sock)
    limit_frames(sock)
    return sock


def heartbeat_timeout() -> float:
    """Seconds of silence after which a control connection is closed (the environment may
    shorten it: ``MESHPOOL_HEARTBEAT_TIMEOUT``; a bad value is reported and ignored)."""
    value = os.environ.get(HEARTBEAT_TIMEOUT_ENV, "").strip()
    if not value:
        return HEARTBEAT_TIMEOUT
    try:
        seconds = float(value)
    except ValueError:
        seconds = 0.0
    if not 0.1 <= seconds <= 3600:
        logger.warning(
            "ignoring %s=%r (want seconds between 0.1 and 3600); using %g",
            HEARTBEAT_TIMEOUT_ENV,
            value,
            HEARTBEAT_TIMEOUT,
        )
        return HEARTBEAT_TIMEOUT
    return seconds


def enable_heartbeats(sock: zmq.Socket) -> None:
    """ZMTP heartbeats on ``sock``'s connections (set before connect/bind: libzmq applies
    options to connections made afterwards). Both ends PING; the TTL asks the peer to drop us
    too if it stops hearing from us. A short timeout PINGs more often (three per timeout)."""
    timeout_ms = int(heartbeat_timeout() * 1000)
    interval_ms = min(int(HEARTBEAT_INTERVAL * 1000), timeout_ms // 3)
    sock.setsockopt(zmq.HEARTBEAT_IVL, max(1, interval_ms))
    sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, timeout_ms)
    sock.setsockopt(zmq.HEARTBEAT_TTL, timeout_ms)


def limit_frames(sock: zmq.Socket, max_bytes: int = MAX_FRAME_BYTES) -> None:
    """Drop the connection of a peer that sends a frame over ``max_bytes`` (libzmq checks each
    frame as it arrives, so the frame is never buffered)."""
    sock.setsockopt(zmq.MAXMSGSIZE, max_bytes)


def connect_to_data(address: str, security: Any = None) -> zmq.Socket:
    """A DEALER connected to a worker's data socket (CURVE on TCP when we hold credentials;
    ipc peers are authenticated by the private directory's permissions)."""
    sock = make_socket(zmq.DEALER)
    if security is not None and address.startswith("tcp://"):
        security.client(sock, address)
    sock.connect(address)
    return sock


def bind(sock: zmq.Socket, address: str) -> str:
    """Bind ``address`` (a ``tcp://host:0`` picks a free port) and return the bound address."""
    if address.startswith("tcp://") and address.endswith(":0"):
        host = address[len("tcp://") : -len(":0")]
        port = sock.bind_to_random_port(f"tcp://{host}")
        return f"tcp://{host}:{port}"
    sock.bind(address)
    return address


def private_directory(prefix: str = "meshpool-") -> str:
    """A new directory only this user can enter (0700), for ipc sockets."""
    path = tempfile.mkdtemp(prefix=prefix)
    os.chmod(path, 0o700)
    return path


def remove_directory(path: str) -> None:
    shutil.rmtree(path, ignore_errors=True)
