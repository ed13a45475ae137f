"""Spare connections for results a slot's former owner sends (see "Tasks that wait for tasks"
in ``worker/execution.py``)."""

from __future__ import annotations

import itertools
import threading

import zmq

from ..transport.frames import send_frames
from ..transport.security import Security
from ..transport.sockets import control_socket


class SpareSockets:
    """DEALERs ``worker-id/slot~n`` on which threads that gave their slot away send results.

    The scheduler reads the slot index before ``~``, so a result counts as coming from its slot.
    Sockets are reused (a connection per result would cost a handshake each); each is used by
    one thread at a time, taken and returned under the lock (the memory barrier zmq needs).
    """

    def __init__(self, identity: str, address: str, security: Security | None) -> None:
        self._identity = identity
        self._address = address
        self._security = security
        self._lock = threading.Lock()
        self._idle: list[zmq.Socket] = []
        self._numbers = itertools.count(1)

    def send(self, frames: list) -> None:
        with self._lock:
            sock = self._idle.pop() if self._idle else None
            number = next(self._numbers) if sock is None else 0
        if sock is None:
            sock = control_socket(zmq.DEALER, identity=f"{self._identity}~{number}".encode())
            if self._security is not None:
                self._security.client(sock, self._address)
            sock.connect(self._address)
        try:
            send_frames(sock, frames)
        finally:
            with self._lock:
                self._idle.append(sock)

    def close(self) -> None:
        with self._lock:
            for sock in self._idle:
                sock.close(linger=0)
            self._idle.clear()
