"""Hostile input on the wire: random and out-of-order frames from an authenticated peer.

The fuzzer connects with the cluster's own credentials (so the frames reach the decoders) to the
scheduler's socket and to a worker's data socket, throws random frames, valid headers with wrong
fields, and valid messages in the wrong order; then a task must still complete.
"""

from __future__ import annotations

import functools
import pickle
import random
import time

import pytest
import zmq
from cli_cluster import CliCluster
from helpers import wait_until
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tasks import inc

import meshpool
from meshpool import messages as m
from meshpool.transport.header import dumps_header
from meshpool.transport.sockets import MAX_FRAME_BYTES

OPS = [cls.op for cls in m._REGISTRY.values()]


def _builtin_values() -> st.SearchStrategy:
    scalars = st.one_of(
        st.none(),
        st.booleans(),
        st.integers(-(2**40), 2**40),
        st.floats(allow_nan=True),
        st.text(max_size=20),
        st.binary(max_size=40),
    )
    return st.recursive(
        scalars,
        lambda inner: st.one_of(
            st.lists(inner, max_size=4),
            st.tuples(inner, inner),
            st.dictionaries(st.text(max_size=5), inner, max_size=3),
        ),
        max_leaves=10,
    )


def _frames() -> st.SearchStrategy:
    random_frames = st.lists(st.binary(max_size=200), min_size=0, max_size=5)
    header = st.builds(
        lambda op, fields: [dumps_header((op, *fields))],
        st.sampled_from(OPS),
        st.lists(_builtin_values(), max_size=9),
    )
    with_payload = st.builds(
        lambda h, payload: h + payload, header, st.lists(st.binary(max_size=100), max_size=4)
    )
    evil = st.sampled_from(
        [
            [pickle.dumps(("submit", [("k", [], 1, (0,), None)]))[:-3]],  # truncated
            [b"\x80\x05cos\nsystem\n(S'echo pwned'\ntR."],  # names a global
            [dumps_header(("compute-done", ["unhashable"], 10, True, 0.1))],
            [dumps_header(("get-data", 1, [["unhashable"], {"a": 1}]))],
            [dumps_header(("register", "x", "x", "tcp://1.2.3.4:5", -5, 0, {}, {}, 1))],
            [dumps_header(("slot-hello", "nobody", 10**9))],
            [b"\x80\x05" + b"\x00" * 100],
        ]
    )
    return st.one_of(random_frames, header, with_payload, evil)


@pytest.fixture(scope="module")
def fuzz_cluster():
    with meshpool.Executor(2) as ex:
        ex.wait_for_workers(2, timeout=60)
        ex.original_pids = sorted(w["pid"] for w in ex.workers())
        yield ex


def _dealer(address: str, identity: bytes | None = None) -> zmq.Socket:
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    if identity is not None:
        sock.setsockopt(zmq.IDENTITY, identity)
    sock.connect(address)
    return sock


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(frames=_frames(), target=st.sampled_from(["scheduler", "worker-data", "as-worker"]))
def test_random_frames_do_not_break_the_cluster(fuzz_cluster, frames, target):
    ex = fuzz_cluster
    workers = ex.workers()
    if target == "scheduler":
        sock = _dealer(ex.address)
    elif target == "as-worker":  # pretend to be one of a real worker's slots
        sock = _dealer(ex.address, f"{workers[0]['id']}/{random.randint(0, 50)}".encode())
    else:
        sock = _dealer(random.choice(workers)["address"])
    try:
        if frames:
            sock.send_multipart(frames)
        else:
            sock.send(b"")
        time.sleep(0.002)
    finally:
        sock.close()


def test_cluster_still_works_after_fuzzing(fuzz_cluster):
    ex = fuzz_cluster
    assert sorted(w["pid"] for w in ex.workers()) == ex.original_pids  # none crashed
    assert ex.submit(inc, 41).result(timeout=30) == 42
    a = ex.submit(inc, 1)
    assert ex.submit(inc, a).result(timeout=30) == 3


def test_oversized_header_is_refused(fuzz_cluster):
    ex = fuzz_cluster
    sock = _dealer(ex.address)
    try:
        sock.send_multipart([b"\x80\x05" + b"x" * (20 * 2**20)])
    finally:
        sock.close()
    assert ex.submit(inc, 1).result(timeout=30) == 2
    assert sorted(w["pid"] for w in ex.workers()) == ex.original_pids


def test_unauthenticated_peer_cannot_reach_an_unpickler(tmp_path):
    """A secured scheduler: a peer without the keys never gets a frame decoded."""
    with CliCluster(tmp_path) as cluster:
        cluster.start_scheduler("--log-level", "INFO")
        sock = _dealer(cluster.address)
        sock.send_multipart([b"\x80\x05cos\nsystem\n(S'touch /tmp/pwned'\ntR."])
        time.sleep(0.3)
        sock.close()
        with cluster.executor(timeout=10) as client:
            assert client.workers() == []
    out = cluster.log("scheduler")
    assert "malformed" not in out and "dropping" not in out, out


# --- frame sizes: the scheduler's connections cap frames (transport/sockets.py) -----------------


def test_oversized_frame_drops_only_that_connection(fuzz_cluster, caplog):
    """A client that said hello, then sends a frame over the cap: libzmq drops its connection
    (seen by the sender's monitor), the scheduler logs the client gone and serves the rest."""
    ex = fuzz_cluster
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.IDENTITY, b"fuzz-big-frame")
    sock.setsockopt(zmq.RECONNECT_IVL, -1)  # stay dropped (a DEALER would reconnect at once)
    monitor = sock.get_monitor_socket(zmq.EVENT_DISCONNECTED)
    sock.connect(ex.address)
    try:
        sock.send_multipart(m.encode(m.HelloClient("fuzz-big-frame", m.versions())))
        assert sock.poll(30_000), "no hello reply"
        sock.recv_multipart()
        with caplog.at_level("WARNING", logger="meshpool.scheduler"):
            header = dumps_header(("submit", [], []))
            sock.send_multipart([header, b"x" * (MAX_FRAME_BYTES + 1)])
            assert monitor.poll(30_000), "the scheduler kept the connection"
            wait_until(
                lambda: "client fuzz-big-frame gone" in caplog.text, 30, "the scheduler's log"
            )
    finally:
        sock.disable_monitor()
        monitor.close(linger=0)
        sock.close()
    assert ex.submit(inc, 1).result(timeout=30) == 2
    assert sorted(w["pid"] for w in ex.workers()) == ex.original_pids


def test_function_too_big_for_the_scheduler_is_refused_at_submit(fuzz_cluster):
    ex = fuzz_cluster
    payload = b"x" * (MAX_FRAME_BYTES + 2**24)

    def closure():
        return len(payload)

    with pytest.raises(meshpool.SerializationError, match="Pass that data as an argument"):
        ex.submit(closure)
    with pytest.raises(meshpool.SerializationError, match="MiB"):
        ex.submit(functools.partial(len, payload))
    assert ex.submit(len, payload).result(timeout=60) == len(payload)  # the remedy
    with pytest.raises(meshpool.SerializationError, match="initializer load large data"):
        meshpool.Executor(1, initializer=len, initargs=(bytearray(payload),))


def raise_holding(nbytes: int) -> None:
    raise ValueError(b"x" * nbytes)


def test_exception_too_big_for_the_scheduler_arrives_as_text(fuzz_cluster):
    ex = fuzz_cluster
    error = ex.submit(raise_holding, MAX_FRAME_BYTES + 1).exception(timeout=60)
    assert isinstance(error, meshpool.RemoteError), error
    assert error.type_name == "builtins.ValueError" and "characters cut" in str(error)
    assert ex.submit(inc, 1).result(timeout=30) == 2
