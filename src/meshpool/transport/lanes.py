"""Lanes: plain unix-socket connections between a scheduler and the slots of its local workers.

Over zmq, a message from the scheduler's thread to a slot's thread passes two more threads on
the way, libzmq's I/O threads in the sending and in the receiving process, and each is a
wake-up. On this project's 2-core machine those wake-ups were most of a round trip's time
(BENCHMARKS.md, "One round trip, hop by hop"). A lane is a unix stream socket that the sending
thread writes and the receiving thread reads: one wake-up per hop.

Who uses them: a scheduler bound to ``ipc://PATH`` also listens on ``PATH.lane``
(:class:`LaneListener`), in the same private directory, whose permissions authenticate peers as
they do for the ipc socket. A slot whose scheduler address is ``ipc://`` connects there
(:func:`slot_channel`) and names itself in its first message; everything between that slot
and the scheduler then goes on the lane. Any other slot (a TCP scheduler, a refused connect,
``MESHPOOL_LANES=0``) uses its zmq socket (:class:`ZmqChannel`), as before.

Framing: a message is a little-endian ``uint32`` frame count, a ``uint32`` length per frame,
then the frames. Frames over :data:`~meshpool.transport.sockets.MAX_FRAME_BYTES`, or a count
over :data:`MAX_FRAMES`, close the lane (as libzmq's frame cap drops a connection). A lane's
sender never blocks in the scheduler: what the kernel does not take waits in the lane until its
socket is writable (:attr:`Lane.wants_write`). A slot's send waits until all is written.
"""

from __future__ import annotations

import contextlib
import os
import select
import socket
import struct
import time
from typing import Any

import zmq

from .frames import NOBLOCK, frame_size, recv_frames, send_frames
from .header import MalformedMessage
from .sockets import MAX_FRAME_BYTES, control_socket

LANES_ENV = "MESHPOOL_LANES"  # "0": no lanes (zmq for every slot)
HELLO = b"meshpool-lane-1"  # first frame of a lane's first message; the second is the peer id
MAX_FRAMES = 1 << 20  # frames in one message
READ_BYTES = 256 * 1024  # one read from the socket
SOCKET_BUFFER = 4 * 2**20  # asked of the kernel for each direction
MAX_IOV = 512  # buffers per sendmsg (the kernel's limit is 1024)
BIND_WAIT = 10.0  # seconds a slot waits for its scheduler's socket to appear, then uses zmq

_U32 = struct.Struct("<I")


class LaneClosed(Exception):
    """The other end closed the lane, or it broke."""


def enabled() -> bool:
    return os.environ.get(LANES_ENV, "1").strip() != "0"


def lane_path(address: str) -> str | None:
    """The lane path that goes with a scheduler address (``ipc://`` only)."""
    if not address.startswith("ipc://"):
        return None
    return address[len("ipc://") :] + ".lane"


def pack(frames: list) -> list:
    """``frames`` as the buffers to write: the lengths, then the frames themselves."""
    head = struct.pack(f"<{len(frames) + 1}I", len(frames), *[frame_size(f) for f in frames])
    if len(frames) < MAX_IOV:
        return [head, *frames]
    return [head + b"".join(frames)]


class Lane:
    """One end of a lane: non-blocking reads of whole messages, writes that never block unless
    ``blocking_send`` (a slot's, which may wait for the scheduler to read)."""

    def __init__(self, sock: socket.socket, *, blocking_send: bool = False) -> None:
        sock.setblocking(False)
        for option in (socket.SO_SNDBUF, socket.SO_RCVBUF):
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, option, SOCKET_BUFFER)
        self.sock = sock
        self.fd = sock.fileno()
        self.peer = ""  # the peer's id, once known (the scheduler's end learns it from HELLO)
        self.closed = False  # the other end went (end of file, broken pipe), or was dropped
        self._blocking_send = blocking_send
        self._inbox: bytearray | None = None  # the start of a message not yet whole
        self._chunk = memoryview(bytearray(READ_BYTES))  # (recv() would allocate this per call)
        self._outbox: list[memoryview] = []  # what the kernel has not taken yet
        self._poll = select.poll()
        self._poll.register(self.fd, select.POLLIN)

    @property
    def wants_write(self) -> bool:
        return bool(self._outbox)

    @property
    def pollable(self) -> int:
        """What a ``zmq.Poller`` registers to wait for this lane."""
        return self.fd

    # --- sending -----------------------------------------------------------------------------

    def send(self, frames: list) -> None:
        """Write one message (raises :class:`LaneClosed` if the lane broke)."""
        if self.closed:
            raise LaneClosed(f"lane to {self.peer or 'the scheduler'} is closed")
        buffers = pack(frames)
        if self._outbox:
            self._outbox.extend(memoryview(b).cast("B") for b in buffers)
        else:
            self._write(buffers)
        if self._blocking_send:
            while self._outbox:
                self._wait_writable()
                self.flush()

    def flush(self) -> None:
        """Write what waits (the scheduler's loop calls this when the socket is writable)."""
        if self._outbox:
            outbox, self._outbox = self._outbox, []
            self._write(outbox)

    def _write(self, buffers: list) -> None:
        while buffers:
            try:
                written = self.sock.sendmsg(buffers[:MAX_IOV])
            except (BlockingIOError, InterruptedError):
                written = 0
            except (BrokenPipeError, ConnectionResetError) as exc:  # (other errors are ours)
                self.closed = True
                raise LaneClosed(f"lane to {self.peer or 'the scheduler'}: {exc}") from exc
            if not written:
                self._outbox.extend(memoryview(b).cast("B") for b in buffers)
                return
            buffers = _advance(buffers, written)

    def _wait_writable(self) -> None:
        poll = select.poll()
        poll.register(self.fd, select.POLLOUT)
        poll.poll(1000)

    # --- receiving ---------------------------------------------------------------------------

    def poll(self, timeout_ms: int) -> bool:
        """Whether there is something to read within ``timeout_ms``."""
        if self.closed:
            time.sleep(timeout_ms / 1000)
            return False
        return bool(self._poll.poll(timeout_ms))

    def receive(self) -> list[list[bytes]]:
        """Every whole message that has arrived (reads until the socket is empty). Raises
        :class:`LaneClosed` at end of file, or when a message breaks the framing rules."""
        if self.closed:
            raise LaneClosed(f"lane to {self.peer or 'the scheduler'} is closed")
        inbox = self._inbox or bytearray()
        ended = False
        chunk = self._chunk
        while True:
            try:
                size = self.sock.recv_into(chunk)
            except (BlockingIOError, InterruptedError):
                break
            except ConnectionResetError:
                ended = True
                break
            if not size:
                ended = True
                break
            inbox += chunk[:size]
            if size < READ_BYTES:
                break
        try:
            messages = _split(inbox)
        except MalformedMessage:
            self.closed = True
            raise
        # an empty inbox is dropped, not kept: kept, it (or the small buffer it is left
        # with) would outlive a burst of messages in one of the burst's pymalloc arenas and
        # keep that whole arena from going back to the system
        self._inbox = inbox or None
        if ended and not messages:
            self.closed = True
            raise LaneClosed(f"lane to {self.peer or 'the scheduler'} closed by its other end")
        return messages

    def close(self) -> None:
        """Close the socket (its owner's call: it may be registered in a poller until then;
        a lane whose other end went is only marked :attr:`closed`). Using a lane closed here
        raises ``OSError``, not :class:`LaneClosed`: that is our bug, not a peer gone."""
        with contextlib.suppress(OSError):
            self.sock.close()


def _advance(buffers: list, written: int) -> list:
    """What is left of ``buffers`` after ``written`` bytes went out."""
    for i, buffer in enumerate(buffers):
        size = frame_size(buffer)
        if written < size:
            return [memoryview(buffer).cast("B")[written:], *buffers[i + 1 :]]
        written -= size
    return []


def _split(inbox: bytearray) -> list[list[bytes]]:
    """Take the whole messages off the front of ``inbox`` (copied out once they are whole:
    a big message arriving in pieces is not copied per piece)."""
    layouts = []  # (offset of the first frame, frame sizes) per whole message
    start = 0
    end = len(inbox)
    while end - start >= 4:
        (count,) = _U32.unpack_from(inbox, start)
        if not 0 < count <= MAX_FRAMES:
            raise MalformedMessage(f"lane message with {count} frames")
        head = 4 + 4 * count
        if end - start < head:
            break
        sizes = struct.unpack_from(f"<{count}I", inbox, start + 4)
        if max(sizes) > MAX_FRAME_BYTES:
            raise MalformedMessage(f"lane frame of {max(sizes)} bytes (cap {MAX_FRAME_BYTES})")
        if end - start < head + sum(sizes):
            break
        layouts.append((start + head, sizes))
        start += head + sum(sizes)
    if not layouts:
        return []
    with memoryview(inbox) as view:  # (one copy; released before the bytearray shrinks)
        data = bytes(view[:start])
    del inbox[:start]
    messages = []
    for position, sizes in layouts:
        frames = []
        for size in sizes:
            frames.append(data[position : position + size])
            position += size
        messages.append(frames)
    return messages


class LaneListener:
    """The scheduler's end: accepts lanes at ``path`` (owner-only permissions)."""

    def __init__(self, path: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)  # a former scheduler's
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old_umask = os.umask(0o177)
        try:
            self.sock.bind(path)
        finally:
            os.umask(old_umask)
        self.sock.listen(256)
        self.sock.setblocking(False)
        self.fd = self.sock.fileno()

    def accept(self) -> list[Lane]:
        lanes: list[Lane] = []
        while True:
            try:
                conn, _ = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return lanes
            except OSError:  # (out of file descriptors, say): the peer falls back to nothing
                return lanes
            lanes.append(Lane(conn))

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()
        with contextlib.suppress(OSError):
            os.unlink(self.path)


def _connect_lane(identity: str, path: str) -> Lane | None:
    """A slot's lane to the scheduler listening at ``path``, or None if it cannot be had."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(path)
    except OSError:
        sock.close()
        return None
    lane = Lane(sock, blocking_send=True)
    try:
        lane.send([HELLO, identity.encode()])
    except LaneClosed:
        return None
    return lane


class ZmqChannel:
    """A slot's zmq DEALER to the scheduler, with a lane's methods."""

    closed = False  # (zmq reconnects by itself)

    def __init__(self, identity: str, scheduler_address: str, security: Any) -> None:
        self.sock = control_socket(zmq.DEALER, identity=identity.encode())
        if security is not None:
            security.client(self.sock, scheduler_address)
        self.sock.connect(scheduler_address)

    @property
    def pollable(self) -> zmq.Socket:
        return self.sock

    def send(self, frames: list) -> None:
        send_frames(self.sock, frames)

    def poll(self, timeout_ms: int) -> bool:
        return bool(self.sock.poll(timeout_ms))

    def receive(self) -> list[list[bytes]]:
        messages = []
        while True:
            try:
                messages.append(recv_frames(self.sock, NOBLOCK))
            except zmq.Again:
                return messages

    def close(self) -> None:
        self.sock.close(linger=0)


class Unconnected:
    """A slot's channel before its owner thread connects it."""

    closed = True
    pollable: Any = None

    def send(self, frames: list) -> None:
        raise LaneClosed("not connected yet")

    def poll(self, timeout_ms: int) -> bool:
        time.sleep(timeout_ms / 1000)
        return False

    def receive(self) -> list[list[bytes]]:
        return []

    def close(self) -> None:
        pass


SlotChannel = Lane | ZmqChannel | Unconnected


def slot_channel(identity: str, scheduler_address: str, security: Any) -> Lane | ZmqChannel:
    """A slot's connection to its scheduler: a lane where one can be had, else zmq.

    A local cluster's workers start while its scheduler is still being set up; a scheduler
    listens for lanes before it binds its ipc socket, so once that socket's file exists the
    lane's is there too (and is listening). Meanwhile the slot waits, up to :data:`BIND_WAIT`.
    """
    path = lane_path(scheduler_address)
    if path is not None and enabled():
        ipc_file = scheduler_address[len("ipc://") :]
        deadline = time.monotonic() + BIND_WAIT
        while not os.path.exists(ipc_file) and time.monotonic() < deadline:
            time.sleep(0.005)
        lane = _connect_lane(identity, path)
        if lane is not None:
            return lane
    return ZmqChannel(identity, scheduler_address, security)
