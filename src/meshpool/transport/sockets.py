"""Socket construction with deliberate options, and the private ipc directory.

Every socket gets ``LINGER`` (shutdown never waits forever for unsent messages); ROUTER sockets get
``ROUTER_MANDATORY`` (a message to a vanished peer is an error we see, not a silent drop — the way
Parsl lost tasks) and generous high-water marks. All sockets of a process share one context;
a process that forks gets a fresh one (a zmq context must never cross ``fork()``).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from typing import Any

import zmq

LINGER_MS = 200  # unsent messages a closing socket may still flush; then they are dropped
HWM = 1_000_000  # messages queued per peer before zmq pushes back; we never want a silent drop
MAX_MESSAGE_BYTES = -1  # unlimited per message: data transfers can be large; headers are capped

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
