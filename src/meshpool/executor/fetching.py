"""Fetching results from the workers that hold them, and sending data to workers: the client
I/O thread's data path.

    result() of a large value ──fetch──▶ WhoHas (scheduler) ──▶ GetData to the holder's data socket
    large arguments ──StoreData──▶ a worker's data socket (again on ResendData, if it died first)

A fetch asks the scheduler where its keys are, then each holder for its share; a holder that does
not answer within :data:`FETCH_TIMEOUT` is given up on and the scheduler asked again (the data may
have moved, or be recomputed), up to :data:`FETCH_UNANSWERED` times; keys nobody holds are asked
about again on the next tick, up to :data:`FETCH_RETRIES` times, then the fetch fails with
DataLost. Large frames between peers on one host arrive as shared-memory files.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import Future as PlainFuture
from typing import Any

import zmq

from .. import errors
from .. import messages as m
from ..transport import serialize, shm
from ..transport.header import MalformedMessage
from ..transport.security import Security
from ..transport.sockets import connect_to_data

logger = logging.getLogger("meshpool.client")

FETCH_TIMEOUT = 10.0  # a worker that has not sent requested data by then is asked about again
FETCH_UNANSWERED = 3  # ...and after this many unanswered rounds, the fetch fails
FETCH_RETRIES = 20  # who-has rounds for data that is moving (or being recomputed)


class FetchRequest:
    __slots__ = ("keys", "reply", "frames", "attempts", "requests", "deadline", "asking")

    def __init__(self, keys: list, reply: PlainFuture) -> None:
        self.keys = keys
        self.reply = reply
        self.frames: dict = {}
        self.attempts = 0
        self.requests: set[int] = set()
        self.deadline = 0.0
        self.asking = False


class Fetching:
    """The fetch half of :class:`~meshpool.executor.client.ClientCore` (run in its I/O thread)."""

    fetches: dict[int, FetchRequest]
    data_requests: dict[int, tuple[int, str, float]]  # GetData id -> (fetch id, address, sent)
    data_socks: dict[str, zmq.Socket]
    kept: dict[Any, list]  # pending tasks' large arguments, by data key
    security: Security | None
    stats: dict[str, int]
    _ids: Any
    _poller: zmq.Poller

    def _send(self, msg: Any) -> None:
        raise NotImplementedError

    def _on_who_has(self, msg: m.WhoHasReply) -> None:
        fetch = self.fetches.get(msg.request_id)
        if fetch is None:
            return
        fetch.asking = False
        by_address: dict[str, list] = {}
        missing = []
        for key in fetch.keys:
            if key in fetch.frames:
                continue
            addresses = msg.locations.get(key) or []
            if addresses:
                by_address.setdefault(addresses[0], []).append(key)
            else:
                missing.append(key)
        if missing and not by_address:
            fetch.attempts += 1
            if fetch.attempts > FETCH_RETRIES:
                self._finish_fetch(
                    msg.request_id,
                    errors.DataLost(f"no worker holds {missing[0]!r} (released or lost)"),
                )
            return  # the tick asks again
        for address, keys in by_address.items():
            data_id = next(self._ids)
            self.data_requests[data_id] = (msg.request_id, address, time.monotonic())
            fetch.requests.add(data_id)
            self._data_sock(address).send_multipart(
                m.encode(m.GetData(data_id, keys, shm.host_key()))
            )

    def _send_data(self, address: str, msg: m.StoreData) -> None:
        out = m.encode(msg)
        self.stats["client_bytes_sent"] += serialize.nbytes(out)
        self.stats["shm_bytes_sent"] += shm.total(msg.shm)
        self._data_sock(address).send_multipart(out, copy=False)

    def _on_resend(self, msg: m.ResendData) -> None:
        """The worker holding (or receiving) a pending task's large arguments died: send our
        copy to the worker the scheduler named, through its socket (this thread copies
        nothing into shared memory)."""
        if msg.gone:  # what still waits in our queue for the dead worker goes with its socket
            for data_id, (_, address, _) in list(self.data_requests.items()):
                if address == msg.gone:
                    self._abandon_data_request(data_id, address)
            self._drop_data_sock(msg.gone)
        missing = []
        for key, _worker_id, address in msg.items:
            frames = self.kept.get(key)
            if frames is None:
                missing.append(key)
            else:
                self._send_data(address, m.StoreData([(key, len(frames))], [], frames))
        if missing:
            self._send(m.DataNotKept(missing))

    def _ask_who_has(self, fetch_id: int) -> None:
        fetch = self.fetches[fetch_id]
        keys = [k for k in fetch.keys if k not in fetch.frames]
        fetch.asking = True
        self._send(m.WhoHas(fetch_id, keys))

    def _data_sock(self, address: str) -> zmq.Socket:
        sock = self.data_socks.get(address)
        if sock is None:
            sock = self.data_socks[address] = connect_to_data(address, self.security)
            self._poller.register(sock, zmq.POLLIN)
        return sock

    def _drop_data_sock(self, address: str) -> None:
        sock = self.data_socks.pop(address, None)
        if sock is not None:
            self._poller.unregister(sock)
            sock.close(linger=0)

    def _drain_data(self, sock: zmq.Socket) -> None:
        for _ in range(100):
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            self.stats["client_bytes_received"] += sum(len(f) for f in frames)
            try:
                msg = m.decode([frames[0].bytes, *[_bytes_or_buffer(f) for f in frames[1:]]])
                if isinstance(msg, m.Data) and msg.shm:  # (a late answer too: files taken in)
                    msg.frames = shm.unpack_frames(msg.frames, msg.shm)
                    self.stats["shm_bytes_received"] += shm.total(msg.shm)
            except (MalformedMessage, ValueError, TypeError, OSError) as exc:
                logger.warning("dropping malformed data reply: %s", exc)
                continue
            if not isinstance(msg, m.Data):
                continue
            entry = self.data_requests.pop(msg.request_id, None)
            if entry is None:
                continue
            fetch_id = entry[0]
            fetch = self.fetches.get(fetch_id)
            if fetch is None:
                continue
            fetch.requests.discard(msg.request_id)
            offset = 0
            for key, nframes in msg.items:
                if nframes >= 0:
                    fetch.frames[key] = msg.frames[offset : offset + nframes]
                    offset += nframes
            if len(fetch.frames) == len(set(fetch.keys)):
                self._finish_fetch(fetch_id, None)
            elif not fetch.requests:
                fetch.attempts += 1
                self._ask_who_has(fetch_id)

    def _abandon_data_request(self, data_id: int, address: str) -> None:
        """A worker did not answer (or is gone): ask the scheduler again where the data is,
        a few times (it may have moved, or be recomputed), then fail naming the address."""
        fetch_id = self.data_requests.pop(data_id)[0]
        self._drop_data_sock(address)
        fetch = self.fetches.get(fetch_id)
        if fetch is None:
            return
        fetch.requests.discard(data_id)
        fetch.attempts += 1
        if fetch.attempts > FETCH_UNANSWERED:
            self._finish_fetch(
                fetch_id,
                errors.CommError(f"worker at {address} did not send the data it holds"),
            )
        elif not fetch.requests:
            self._ask_who_has(fetch_id)

    def _finish_fetch(self, fetch_id: int, error: BaseException | None) -> None:
        fetch = self.fetches.pop(fetch_id, None)
        if fetch is None or fetch.reply.done():
            return
        if error is not None:
            fetch.reply.set_exception(error)
        else:
            fetch.reply.set_result(fetch.frames)


def _bytes_or_buffer(frame: zmq.Frame) -> Any:
    return frame.buffer if len(frame) >= serialize.OOB_THRESHOLD else frame.bytes
