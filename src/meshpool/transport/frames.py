"""Sending and receiving multipart messages on the hot path, with plain-int flags.

pyzmq's ``send_multipart``/``recv_multipart`` wrap every frame's flags in ``enum.Flag``
arithmetic and, with ``copy=False``, build a ``zmq.Frame`` per frame: measured here, a four-frame
message costs ~60–70 µs to send that way against ~8–11 µs frame by frame with int flags (a
4-frame receive, ~13–31 µs against ~11 µs). Small frames are copied (cheaper than tracking them);
large buffers go zero-copy, as before.
"""

from __future__ import annotations

from typing import Any

import zmq

SNDMORE = int(zmq.SNDMORE)
NOBLOCK = int(zmq.NOBLOCK)
ZERO_COPY_BYTES = 1024 * 1024  # frames at least this big are sent without a copy


def frame_size(frame: Any) -> int:
    """Bytes in one frame (bytes, or anything with the buffer protocol)."""
    return len(frame) if type(frame) is bytes else memoryview(frame).nbytes


def send_frames(sock: zmq.Socket, frames: list, flags: int = 0) -> None:
    """Send ``frames`` as one multipart message (``flags``: 0 or :data:`NOBLOCK`).

    With NOBLOCK, zmq.Again can only come from the first frame: once a message has begun, zmq
    queues its remaining frames.
    """
    send = sock.send
    last = len(frames) - 1
    for i, frame in enumerate(frames):
        more = SNDMORE if i < last else 0
        send(frame, flags | more, copy=frame_size(frame) < ZERO_COPY_BYTES)


def recv_frames(sock: zmq.Socket, flags: int = 0) -> list[bytes]:
    """Receive one multipart message as a list of bytes (for sockets that carry small frames:
    large payloads arrive on data sockets, read with ``copy=False``).

    Frames are read as ``zmq.Frame`` for their ``more`` flag: ``getsockopt(RCVMORE)`` looks its
    option up in an ``enum`` on every call, and measured here a 3-frame receive took 13–19 µs
    that way against 5–12 µs.
    """
    recv = sock.recv
    frame = recv(flags, copy=False)
    frames = [frame.bytes]
    while frame.more:
        frame = recv(flags, copy=False)
        frames.append(frame.bytes)
    return frames
