"""Transport: the header codec, the message codec, serialization with out-of-band buffers, the
function cache. Pure functions, plus one real zmq socket pair for the zero-copy path."""

from __future__ import annotations

import dataclasses
import os
import pickle
import pickletools
import sys
import threading
import types

import numpy as np
import pytest
import zmq

from meshpool import errors
from meshpool import messages as m
from meshpool.transport import serialize
from meshpool.transport.header import (
    MAX_HEADER_BYTES,
    MalformedMessage,
    dumps_header,
    loads_header,
)

# --- the header codec refuses everything but builtins ----------------------------------------------


class _RunsACommand:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_header_round_trip():
    header = ("op", 1, 2.5, "s", b"b", None, True, [1, (2, 3)], {"k": [None]})
    assert loads_header(dumps_header(header)) == header


def test_header_naming_os_system_is_refused_and_never_called(tmp_path):
    marker = tmp_path / "pwned"
    data = pickle.dumps(("op", _RunsACommand(str(marker))), protocol=5)
    assert b"system" in data
    with pytest.raises(MalformedMessage, match="global"):
        loads_header(data)
    assert not marker.exists()


@pytest.mark.parametrize("protocol", [0, 2, 5])
def test_header_naming_any_global_is_refused(protocol):
    for obj in (os.system, print, dict.fromkeys, type, dataclasses.field):
        with pytest.raises(MalformedMessage):
            loads_header(pickle.dumps(("op", obj), protocol=protocol))


def test_header_with_a_hand_crafted_global_opcode_is_refused():
    # protocol 0 text: c<module>\n<name>\n then call it with a tuple argument
    crafted = b"cos\nsystem\n(S'true'\ntR."
    with pytest.raises(MalformedMessage, match="os.system"):
        loads_header(crafted)


def test_header_with_a_persistent_id_is_refused():
    class P(pickle.Pickler):
        def persistent_id(self, obj):
            return "pid" if obj == "secret" else None

    import io

    out = io.BytesIO()
    P(out, protocol=5).dump(("op", "secret"))
    with pytest.raises(MalformedMessage, match="persistent"):
        loads_header(out.getvalue())


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"garbage that is not a pickle",
        dumps_header(("op", "field", 1))[:-3],  # truncated
        dumps_header(("op", "field", 1))[:5],
        b"\x80\x05\x95",
        pickle.dumps(["op", 1]),  # a list, not a tuple
        pickle.dumps(()),  # empty
        pickle.dumps((1, "op")),  # operation is not a string
        pickle.dumps("op"),
    ],
    ids=[
        "empty",
        "garbage",
        "truncated",
        "truncated-more",
        "bare-proto",
        "list",
        "empty-tuple",
        "int-op",
        "string",
    ],
)
def test_malformed_headers(data):
    with pytest.raises(MalformedMessage):
        loads_header(data)


def test_oversized_header_refused_before_decoding():
    with pytest.raises(MalformedMessage, match="exceeds"):
        loads_header(b"\x80" * (MAX_HEADER_BYTES + 1))


def test_dumped_headers_hold_no_globals():
    header = m.encode(m.SubmitTasks([("k", ["d"], 1, (0, 1, 0), {"retries": 1})], [b"f"]))[0]
    ops = {op.name for op, _, _ in pickletools.genops(header)}
    assert not ops & {"GLOBAL", "STACK_GLOBAL", "REDUCE", "INST", "OBJ", "NEWOBJ"}


# --- the message codec --------------------------------------------------------------------------------


def _example(cls: type):
    values = {}
    for name in cls._fields:
        if name == "frames":
            values[name] = [b"payload-1", b"payload-2"]
        else:
            values[name] = {
                "int": 7,
                "str": "s",
                "bool": True,
                "list": [1, "a"],
                "dict": {"a": 1},
                "float": 0.5,
            }.get(str(cls.__annotations__[name]), ("key", 1))
    return cls(**values)


@pytest.mark.parametrize(
    "cls", sorted(m._REGISTRY.values(), key=lambda c: c.op), ids=lambda c: c.op
)
def test_every_message_round_trips(cls):
    msg = _example(cls)
    frames = m.encode(msg)
    assert isinstance(frames[0], bytes)
    assert m.decode(frames) == msg


def test_a_batch_round_trips_with_small_frames_joined_and_large_ones_apart():
    msgs = [_example(cls) for cls in sorted(m._REGISTRY.values(), key=lambda c: c.op)]
    msgs.append(m.Compute("k", (0, 1, 0), [], None, [b"f", b"x" * (m.JOIN_BELOW + 1), b""]))
    frames = m.encode_batch(msgs)
    assert len(frames) == 3  # header, the joined small frames, the one large frame
    assert m.decode_all(frames) == msgs
    assert m.decode_all(m.encode(msgs[0])) == [msgs[0]]


@pytest.mark.parametrize(
    "header, payload",
    [
        (("batch", [("release", ["k"])], [0]), [b""]),  # no sizes
        (("batch", [("release", ["k"])], [1], [1]), [b"x"]),  # frames on a frameless message
        (("batch", [("compute", "k", 1, [], None)], [1], [5]), [b"abc"]),  # sizes too big
        (("batch", [("compute", "k", 1, [], None)], [1], [-1]), [b""]),  # large frame missing
        (("batch", [("batch", [], [], [])], [0], []), [b""]),  # nested batch
        (("batch", ["release"], [0], []), [b""]),  # a part that is not a header
    ],
)
def test_a_malformed_batch_is_refused(header, payload):
    with pytest.raises(MalformedMessage):
        m.decode_all([dumps_header(header), *payload])


def test_decode_refuses_unknown_operation():
    with pytest.raises(MalformedMessage, match="unknown operation"):
        m.decode([dumps_header(("no-such-op", 1))])


def test_decode_refuses_wrong_arity():
    with pytest.raises(MalformedMessage, match="expected"):
        m.decode([dumps_header(("release",))])
    with pytest.raises(MalformedMessage, match="expected"):
        m.decode([dumps_header(("release", ["k"], "extra"))])


def test_decode_refuses_payload_on_frameless_message():
    with pytest.raises(MalformedMessage, match="payload"):
        m.decode([dumps_header(("release", ["k"])), b"unexpected"])


def test_decode_refuses_malformed_header_frame():
    with pytest.raises(MalformedMessage):
        m.decode([b"\x00\x01junk"])


def test_payload_frames_are_never_unpickled_by_decode(tmp_path):
    marker = tmp_path / "pwned"
    evil = pickle.dumps(_RunsACommand(str(marker)))
    msg = m.decode(m.encode(m.TaskDone("k", 1, True, [evil])))
    assert msg.frames == [evil]
    assert not marker.exists()


# --- serialization ----------------------------------------------------------------------------------


def test_small_objects_travel_in_one_frame():
    frames = serialize.dumps({"a": [1, 2, 3], "b": np.arange(10)})
    assert len(frames) == 1
    value = serialize.loads(frames)
    assert value["a"] == [1, 2, 3] and value["b"].tolist() == list(range(10))


def test_large_array_travels_out_of_band():
    arr = np.arange(100_000, dtype=np.float64)  # 800 KB
    frames = serialize.dumps(arr)
    assert len(frames) == 2
    assert len(frames[0]) < 1000  # the pickle holds no data
    assert memoryview(frames[1]).nbytes == arr.nbytes
    assert np.shares_memory(np.frombuffer(frames[1], dtype=np.float64), arr)  # no copy on dump
    assert np.array_equal(serialize.loads(frames), arr)


def test_threshold_is_64_kib():
    assert serialize.OOB_THRESHOLD == 64 * 1024
    under = np.zeros(serialize.OOB_THRESHOLD - 8, dtype=np.uint8)
    over = np.zeros(serialize.OOB_THRESHOLD, dtype=np.uint8)
    assert len(serialize.dumps(under)) == 1
    assert len(serialize.dumps(over)) == 2


def test_loaded_array_uses_the_received_buffer_zero_copy():
    arr = np.arange(50_000, dtype=np.int64)
    frames = serialize.dumps(arr)
    received = bytearray(frames[1])  # stands for a frame's memory
    loaded = serialize.loads([frames[0], memoryview(received)])
    assert np.shares_memory(loaded, np.frombuffer(received, dtype=np.uint8))
    received[:8] = (12345).to_bytes(8, sys.byteorder)
    assert loaded[0] == 12345


def test_zero_copy_end_to_end_over_zmq():
    ctx = zmq.Context.instance()
    a, b = ctx.socket(zmq.PAIR), ctx.socket(zmq.PAIR)
    try:
        a.bind("inproc://meshpool-test-zero-copy")
        b.connect("inproc://meshpool-test-zero-copy")
        arr = np.random.default_rng(0).random(40_000)
        a.send_multipart(serialize.dumps(arr), copy=False)
        frames = b.recv_multipart(copy=False)
        assert len(frames) == 2
        loaded = serialize.loads([frames[0].bytes, frames[1].buffer])
        assert np.array_equal(loaded, arr)
        frame_memory = np.frombuffer(frames[1].buffer, dtype=np.uint8)
        assert np.shares_memory(loaded, frame_memory)  # the array lives in the zmq frame
    finally:
        a.close(linger=0)
        b.close(linger=0)


def test_main_objects_go_by_value():
    main = sys.modules["__main__"]
    source = "class Shipped:\n    def __init__(self, v):\n        self.v = v\n    def twice(self):\n        return 2 * self.v\n"
    namespace: dict = {"__name__": "__main__"}
    exec(source, namespace)
    cls = namespace["Shipped"]
    name = f"_meshpool_test_shipped_{os.getpid()}"
    cls.__qualname__ = cls.__name__ = name
    setattr(main, name, cls)
    try:
        frames = serialize.dumps(cls(21))
    finally:
        delattr(main, name)  # a worker's __main__ would not have it either
    assert serialize.loads(frames).twice() == 42


def test_main_functions_go_by_value():
    namespace: dict = {"__name__": "__main__"}
    exec("def f(x):\n    return x + 100\n", namespace)
    fn = namespace["f"]
    data = serialize.FunctionCache().dumps(fn)
    assert pickle.loads(data)(1) == 101


def test_unpicklable_object_raises_serialization_error_naming_it():
    with pytest.raises(errors.SerializationError, match="lock") as info:
        serialize.dumps({"held": threading.Lock()}, what="argument of f")
    assert "argument of f" in str(info.value)
    assert isinstance(info.value, TypeError)


def test_futures_become_keys_and_are_resolved():
    class Ref:
        def __init__(self, key):
            self.key = key

    frames = serialize.dumps((Ref("a"), [Ref("b"), 3]), ref_type=Ref)
    values = {"a": "value-a", "b": "value-b"}
    assert serialize.loads(frames, resolve=values.__getitem__) == ("value-a", ["value-b", 3])


def test_exception_round_trip_with_traceback():
    def inner():
        raise KeyError("missing")

    try:
        inner()
    except KeyError as exc:
        frames = serialize.dumps_exception(exc)
    rebuilt = serialize.loads_exception(frames)
    assert type(rebuilt) is KeyError and rebuilt.args == ("missing",)
    import traceback

    assert "inner" in "".join(traceback.format_exception(rebuilt))


def test_unpicklable_exception_becomes_remote_error():
    exc = ValueError("with a lock")
    exc.lock = threading.Lock()  # type: ignore[attr-defined]
    rebuilt = serialize.loads_exception(serialize.dumps_exception(exc))
    assert isinstance(rebuilt, errors.RemoteError)
    assert rebuilt.type_name == "builtins.ValueError" and rebuilt.message == "with a lock"


# --- the function cache -----------------------------------------------------------------------------


def test_function_cache_pickles_each_callable_once(monkeypatch):
    cache = serialize.FunctionCache()
    calls = []
    real = serialize.FunctionCache._pickle

    def counting(fn):
        calls.append(fn)
        return real(fn)

    monkeypatch.setattr(serialize.FunctionCache, "_pickle", staticmethod(counting))
    first = cache.dumps(len)
    assert cache.dumps(len) is first
    assert cache.dumps(len) is first
    cache.dumps(max)
    assert calls == [len, max]


def test_function_cache_is_bounded_and_tells_callables_apart():
    cache = serialize.FunctionCache(size=2)
    fns = [types.FunctionType(f.__code__, f.__globals__) for f in (lambda: 1,) * 3]
    data = [cache.dumps(f) for f in fns]
    assert len(cache._entries) == 2
    assert all(pickle.loads(d)() == 1 for d in data)


def test_function_cache_unpicklable_callable():
    class Holder:
        def __init__(self):
            self.lock = threading.Lock()

        def __call__(self):
            return 1

    with pytest.raises(errors.SerializationError, match="Holder"):
        serialize.FunctionCache().dumps(Holder())


def test_loaded_functions_cache():
    loaded = serialize.LoadedFunctions()
    data = serialize.FunctionCache().dumps(len)
    assert loaded.loads(data) is loaded.loads(data) is len


def test_exceptions_ignore_global_copyreg_reducers(monkeypatch):
    """tblib.pickling_support.install() (done by importing dask.multiprocessing) registers a
    reducer for every exception class that rebuilds SystemExit without its code."""
    import copyreg

    def lossy(exc):
        return (type(exc), ())

    monkeypatch.setitem(copyreg.dispatch_table, SystemExit, lossy)
    monkeypatch.setitem(copyreg.dispatch_table, StopIteration, lossy)
    rebuilt = serialize.loads_exception(serialize.dumps_exception(SystemExit(3)))
    assert type(rebuilt) is SystemExit and rebuilt.code == 3
    rebuilt = serialize.loads_exception(serialize.dumps_exception(StopIteration("v")))
    assert rebuilt.value == "v"
