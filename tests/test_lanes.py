"""Lanes: local slots talk to the scheduler over plain unix sockets (``transport/lanes.py``),
and an idle caller submits on its own thread (``ClientCore._submit_inline``)."""

from __future__ import annotations

import os
import socket
import struct
import threading

import pytest
from helpers import wait_until
from tasks import getpid, inc, initializer, slow_inc

import meshpool
from meshpool.transport import lanes
from meshpool.transport.header import MalformedMessage
from meshpool.transport.sockets import MAX_FRAME_BYTES


def _pair() -> tuple[lanes.Lane, lanes.Lane]:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    return lanes.Lane(a), lanes.Lane(b)


def _receive_all(lane: lanes.Lane, count: int) -> list:
    got: list = []
    while len(got) < count:
        assert lane.poll(5000), f"only {len(got)} of {count} messages arrived"
        got.extend(lane.receive())
    return got


@pytest.mark.timeout(30)
def test_messages_arrive_whole_and_in_order():
    sender, receiver = _pair()
    messages = [[b"h%d" % i, b"x" * i, b""] for i in range(200)]
    for frames in messages:
        sender.send(frames)
    assert _receive_all(receiver, 200) == messages


@pytest.mark.timeout(30)
def test_a_full_socket_never_blocks_the_sender_and_flushes_later():
    sender, receiver = _pair()
    big = os.urandom(3 * lanes.SOCKET_BUFFER)  # more than the kernel buffers take
    sender.send([b"head", big])
    sender.send([b"after"])
    assert sender.wants_write  # the rest waits in the lane, not in a blocked call
    got: list = []
    while len(got) < 2:
        got.extend(receiver.receive())
        sender.flush()
    assert got == [[b"head", big], [b"after"]]
    assert not sender.wants_write


@pytest.mark.timeout(30)
def test_end_of_file_and_broken_framing_are_errors():
    sender, receiver = _pair()
    sender.send([b"last"])
    sender.close()
    assert receiver.receive() == [[b"last"]]
    with pytest.raises(lanes.LaneClosed):
        receiver.receive()
    assert receiver.closed
    with pytest.raises(lanes.LaneClosed):
        receiver.send([b"to nobody"])

    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    lane = lanes.Lane(b)
    a.sendall(struct.pack("<II", 1, MAX_FRAME_BYTES + 1))  # a frame over the cap, announced
    with pytest.raises(MalformedMessage):
        lane.receive()
    a2, b2 = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    a2.sendall(struct.pack("<I", 0))  # a message of no frames
    with pytest.raises(MalformedMessage):
        lanes.Lane(b2).receive()


@pytest.mark.timeout(90)
def test_local_slots_use_lanes():
    with meshpool.Executor(2, threads_per_worker=2) as ex:
        assert sorted(ex.map(inc, range(50))) == list(range(1, 51))
        server = ex._core.server
        wait_until(lambda: len(server._lanes) == 4, what="a lane per slot")
        assert all("/" in peer for peer in server._lanes)
        assert ex.submit(getpid).result() != os.getpid()


@pytest.mark.timeout(90)
def test_without_lanes_slots_use_zmq(monkeypatch):
    monkeypatch.setenv(lanes.LANES_ENV, "0")
    with meshpool.Executor(2) as ex:
        assert ex.submit(inc, 1).result() == 2
        assert sorted(ex.map(inc, range(50))) == list(range(1, 51))
        assert ex._core.server._lanes == {}
        assert ex._core.server._listener is None


@pytest.mark.timeout(90)
def test_a_stranger_on_the_lane_socket_is_dropped_and_nothing_else_is_harmed():
    with meshpool.Executor(1) as ex:
        assert ex.submit(inc, 1).result() == 2
        path = lanes.lane_path(ex._core.server.address)
        assert path is not None and os.stat(path).st_mode & 0o077 == 0  # owner only
        junk = [
            struct.pack("<II", 1, 7) + b"garbage",  # whole, but not a hello
            struct.pack("<III", 2, 3, 0) + b"bad",  # a hello's shape, not its words
            struct.pack("<I", 1 << 30),  # too many frames
        ]
        for data in junk:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as stranger:
                stranger.connect(path)
                stranger.sendall(data)
                stranger.settimeout(10)
                assert stranger.recv(10) == b""  # the scheduler closed it
        assert ex.submit(inc, 2).result() == 3
        assert len(ex._core.server._lanes) == 1


@pytest.mark.timeout(120)
def test_callers_submitting_and_waiting_from_many_threads():
    """Idle submits run on the caller's thread while the I/O thread runs the rest: both paths
    at once, with releases in between, lose nothing and keep each caller's order."""
    errors: list = []

    def caller(ex: meshpool.Executor, start: int) -> None:
        try:
            for i in range(start, start + 150):
                assert ex.submit(inc, i).result(30) == i + 1
            assert ex.submit(slow_inc, start, 0.01).result(30) == start + 1
        except BaseException as exc:  # noqa: BLE001 (reported below)
            errors.append(exc)

    with meshpool.Executor(2) as ex:
        threads = [threading.Thread(target=caller, args=(ex, 1000 * n)) for n in range(6)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(100)
        assert not any(t.is_alive() for t in threads)
        assert errors == []
        assert ex.submit(inc, 1).result() == 2
        stats = ex.statistics()
        assert stats.submitted == stats.finished == 6 * 151 + 1


@pytest.mark.timeout(90)
def test_a_worker_killed_while_its_lane_is_busy_has_its_task_rerun():
    with meshpool.Executor(2) as ex:
        victim = ex.submit(getpid).result()
        slow = [ex.submit(slow_inc, i, 0.2) for i in range(4)]
        os.kill(victim, 9)
        assert [f.result(60) for f in slow] == [1, 2, 3, 4]
        assert ex.submit(inc, 1).result(60) == 2


def _initialized_size(*_: object) -> int:
    import tasks as worker_tasks

    return len(worker_tasks.INITIALIZED)


@pytest.mark.timeout(120)
def test_a_message_bigger_than_the_socket_buffers_waits_in_the_lane_and_arrives(monkeypatch):
    """An initializer's arguments, twice what the kernel buffers, go to each slot on its lane:
    past the buffers the scheduler keeps the rest (never blocking) and writes it as the slot
    reads."""
    flushes: list = []
    real_flush = lanes.Lane.flush

    def counting_flush(lane: lanes.Lane) -> None:
        flushes.append(lane.wants_write)
        real_flush(lane)

    monkeypatch.setattr(lanes.Lane, "flush", counting_flush)
    a, b = _pair()  # (what the kernel grants a lane here, both ends)
    granted = a.sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) + b.sock.getsockopt(
        socket.SOL_SOCKET, socket.SO_RCVBUF
    )
    a.close()
    b.close()
    if 2 * granted > MAX_FRAME_BYTES // 2:
        pytest.skip(f"socket buffers of {granted} bytes: a message to fill them is over the cap")
    big = os.urandom(2 * granted)
    with meshpool.Executor(1, threads_per_worker=2, initializer=initializer, initargs=(big,)) as ex:
        assert [ex.submit(_initialized_size).result(60) for _ in range(4)] == [len(big)] * 4
        assert len(ex._core.server._lanes) == 2
    assert True in flushes  # the lanes did fill: their rest went out once writable
