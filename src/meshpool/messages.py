"""The messages scheduler, workers and clients exchange, and their one codec.

Every message is a small slotted dataclass. On the wire it is a multipart zmq message::

    [header, *frames]      header = dumps_header((op, field1, field2, ...))

where the header holds the builtin-typed fields and ``frames`` (when the class has them) are the
opaque payload: pickled functions, arguments, results, exceptions. The scheduler routes payload
frames without ever unpickling them (DESIGN.md rule 2). ``decode`` checks the operation name and
the arity, so a malformed message fails as :class:`MalformedMessage` before any handler sees it.

A task's *spec* frames are ``[function, arguments pickle, *argument buffers]``.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from dataclasses import MISSING, Field, field
from typing import TYPE_CHECKING, Any, ClassVar

from .transport.header import MalformedMessage, dumps_header, loads_header

Key = Any  # str, or a tuple of builtins (dask-style keys)

_REGISTRY: dict[str, Any] = {}
BATCH = "batch"  # the operation name of several messages sent as one (encode_batch)
JOIN_BELOW = 64 * 1024  # a batch joins its payload frames smaller than this into one frame


def _register(cls: Any) -> Any:
    """``cls`` as the slotted class ``dataclass(slots=True)`` would make (its annotated fields in
    order, defaults, ``field(default_factory=...)``), without the dataclass machinery: every
    process makes ~45 message classes at start-up, and ``dataclass()`` cost 15-25 ms of it.
    ``__eq__`` and ``__repr__`` are shared functions."""
    annotations = cls.__dict__.get("__annotations__", {})
    names = tuple(n for n, t in annotations.items() if not str(t).startswith("ClassVar"))
    namespace = {k: v for k, v in cls.__dict__.items() if k not in names}
    namespace.pop("__dict__", None)
    namespace.pop("__weakref__", None)
    namespace.update(
        __slots__=names,
        __init__=_make_init(cls.__qualname__, names, cls.__dict__),
        __eq__=_eq,
        __repr__=_repr,
        __hash__=None,  # as a dataclass with eq: mutable, unhashable
        _fields=names,
    )
    cls = type(cls)(cls.__name__, cls.__bases__, namespace)
    header_names = [name for name in names if name != "frames"]
    cls._header_fields = tuple(header_names)
    cls._getter = operator.attrgetter(*header_names) if header_names else None
    cls._has_frames = "frames" in names
    _REGISTRY[cls.op] = cls
    return cls


def _make_init(qualname: str, names: tuple, defaults: Any) -> Any:
    """``__init__(self, <names>)`` storing each argument, defaults taken from ``defaults``."""
    scope: dict[str, Any] = {"MISSING": MISSING}
    params = []
    body = []
    for name in names:
        default = defaults.get(name, MISSING)
        value = name
        if isinstance(default, Field):
            if default.default_factory is not MISSING:
                scope[f"{name}_factory"] = default.default_factory
                value = f"{name}_factory() if {name} is MISSING else {name}"
            default = default.default
        if default is MISSING and value == name:
            params.append(name)
        else:
            scope[f"{name}_default"] = default
            params.append(f"{name}={name}_default")
        body.append(f"    self.{name} = {value}")
    exec(f"def __init__(self, {', '.join(params)}):\n" + ("\n".join(body) or "    pass"), scope)
    init = scope["__init__"]
    init.__qualname__ = f"{qualname}.__init__"
    return init


def _eq(self: Any, other: Any) -> Any:
    if other.__class__ is not self.__class__:
        return NotImplemented
    return _values(self) == _values(other)


def _repr(self: Any) -> str:
    text = ", ".join(f"{name}={getattr(self, name)!r}" for name in self._fields)
    return f"{type(self).__qualname__}({text})"


def _values(msg: Any) -> tuple:
    return tuple(getattr(msg, name) for name in msg._fields)


if TYPE_CHECKING:  # type checkers see the dataclass (typed constructors, fields)
    from dataclasses import dataclass as _message
else:
    _message = _register


def encode(msg: Any) -> list:
    if type(msg)._has_frames:
        return [dumps_header(_header(msg)), *msg.frames]
    return [dumps_header(_header(msg))]


def decode(frames: list) -> Any:
    header = loads_header(frames[0])
    return _build(header, frames[1:])


def _build(header: tuple, payload: list) -> Any:
    cls = _REGISTRY.get(header[0])
    if cls is None:
        raise MalformedMessage(f"unknown operation {header[0]!r}")
    if len(header) - 1 != len(cls._header_fields):
        raise MalformedMessage(f"{header[0]}: expected {len(cls._header_fields)} fields")
    if cls._has_frames:
        return cls(*header[1:], frames=payload)
    if payload:
        raise MalformedMessage(f"{header[0]}: unexpected payload frames")
    return cls(*header[1:])


def _header(msg: Any) -> tuple:
    cls: Any = type(msg)
    getter = cls._getter
    if getter is None:
        return (cls.op,)
    if len(cls._header_fields) == 1:
        return (cls.op, getter(msg))
    return (cls.op, *getter(msg))


def encode_batch(msgs: list) -> list:
    """Several messages for one peer as one zmq message: one send, one wake-up, and their small
    payload frames joined into one (each frame is a GIL-releasing call on both sides)::

        [dumps_header(("batch", [header, ...], [payload frame count, ...], [frame size, ...])),
         joined small frames, *large frames]

    A frame's size is -1 when it travels as a frame of its own (:data:`JOIN_BELOW` and over).
    """
    headers = []
    counts = []
    sizes = []
    small: list = []
    large: list = []
    for msg in msgs:
        headers.append(_header(msg))
        payload = msg.frames if type(msg)._has_frames else ()
        counts.append(len(payload))
        for frame in payload:
            size = len(frame) if type(frame) is bytes else memoryview(frame).nbytes
            if size < JOIN_BELOW:
                sizes.append(size)
                small.append(frame)
            else:
                sizes.append(-1)
                large.append(frame)
    header = dumps_header((BATCH, headers, counts, sizes))
    return [header, b"".join(small), *large]


def encode_many(msgs: list) -> list:
    """One or more messages for one peer, in the fewest frames: a lone message with at most one
    payload frame as itself, anything else as a batch."""
    if len(msgs) == 1 and (not type(msgs[0])._has_frames or len(msgs[0].frames) <= 1):
        return encode(msgs[0])
    return encode_batch(msgs)


def decode_all(frames: list) -> list:
    """The messages in ``frames``: one, or those of a batch (see :func:`encode_batch`)."""
    header = loads_header(frames[0])
    if header[0] != BATCH:
        return [_build(header, frames[1:])]
    headers, counts, payload = _batch_parts(header, frames)
    msgs = []
    offset = 0
    for sub, count in zip(headers, counts, strict=True):
        if type(sub) is not tuple or not sub or type(sub[0]) is not str or sub[0] == BATCH:
            raise MalformedMessage("batch: a part is not a message header")
        msgs.append(_build(sub, payload[offset : offset + count]))
        offset += count
    return msgs


def _batch_parts(header: tuple, frames: list) -> tuple[list, list, list]:
    """Check a batch's layout; return its headers, frame counts and payload frames."""
    if len(header) != 4 or not all(type(part) is list for part in header[1:]) or len(frames) < 2:
        raise MalformedMessage("batch: expected headers, frame counts and frame sizes")
    headers, counts, sizes = header[1], header[2], header[3]
    if len(headers) != len(counts) or any(type(c) is not int or c < 0 for c in counts):
        raise MalformedMessage("batch: frame counts do not match the headers")
    if sum(counts) != len(sizes) or any(type(n) is not int or n < -1 for n in sizes):
        raise MalformedMessage("batch: frame sizes do not match the frame counts")
    joined = frames[1]
    large = iter(frames[2:])
    if sizes.count(-1) != len(frames) - 2 or sum(n for n in sizes if n > 0) != len(joined):
        raise MalformedMessage("batch: frame sizes do not add up to the frames sent")
    payload = []
    start = 0
    for size in sizes:
        if size < 0:
            payload.append(next(large))
        else:
            payload.append(joined[start : start + size])
            start += size
    return headers, counts, payload


# --- client -> scheduler ----------------------------------------------------------------------


@_message
class HelloClient:
    op: ClassVar[str] = "hello-client"
    client_id: str
    versions: dict


@_message
class SubmitTasks:
    """Tasks to run. ``tasks`` rows: (key, dependency keys, frame count, priority, options)."""

    op: ClassVar[str] = "submit"
    tasks: list
    frames: list = field(default_factory=list)


@_message
class ReleaseKeys:
    op: ClassVar[str] = "release"
    keys: list


@_message
class CancelKeys:
    op: ClassVar[str] = "cancel"
    request_id: int
    keys: list


@_message
class IsRunning:
    """Does a worker run this task now? (``Future.running()`` asks; Reply carries a bool.)"""

    op: ClassVar[str] = "is-running"
    request_id: int
    key: Key


@_message
class WhoHas:
    op: ClassVar[str] = "who-has"
    request_id: int
    keys: list


@_message
class SetInitializer:
    op: ClassVar[str] = "initializer"
    frames: list = field(default_factory=list)


@_message
class Scatter:
    """Data a client sends straight to workers' data sockets: rows (key, worker id). ``kept``:
    the client keeps a copy (a task's large arguments, until the task ends) and sends it again
    if the worker dies before the task ran (ResendData)."""

    op: ClassVar[str] = "scatter"
    items: list
    kept: bool = False


@_message
class DataNotKept:
    """The answer to a ResendData for keys the client no longer holds a copy of."""

    op: ClassVar[str] = "data-not-kept"
    keys: list


@_message
class ClientClosing:
    op: ClassVar[str] = "client-closing"


@_message
class Ping:
    op: ClassVar[str] = "ping"
    request_id: int


@_message
class GetSchedulerInfo:
    """Answered by the scheduler's shell: pid, bytes moved, task and worker counts."""

    op: ClassVar[str] = "get-scheduler-info"
    request_id: int


@_message
class GetWorkers:
    op: ClassVar[str] = "get-workers"
    request_id: int


@_message
class RetireWorkers:
    op: ClassVar[str] = "retire-workers"
    request_id: int
    names: list


# --- scheduler -> client ----------------------------------------------------------------------


@_message
class TaskDone:
    """A finished task. ``frames`` hold the pickled result when it is small enough to ride."""

    op: ClassVar[str] = "done"
    key: Key
    nbytes: int
    has_value: bool
    frames: list = field(default_factory=list)


@_message
class TaskErred:
    op: ClassVar[str] = "erred"
    key: Key
    frames: list = field(default_factory=list)


@_message
class TasksCancelled:
    op: ClassVar[str] = "cancelled"
    keys: list


@_message
class CancelReply:
    op: ClassVar[str] = "cancel-reply"
    request_id: int
    cancelled: list  # keys that were cancelled


@_message
class WhoHasReply:
    op: ClassVar[str] = "who-has-reply"
    request_id: int
    locations: dict  # key -> list of data addresses


@_message
class Reply:
    """A generic answer to a request carrying builtins (pong, worker lists...)."""

    op: ClassVar[str] = "reply"
    request_id: int
    value: Any


@_message
class ResendData:
    """Kept data (``Scatter.kept``) was lost with its worker, or before it arrived: send it
    again. Rows: (key, worker id, data address). ``gone``: the data address of the worker that
    died ("" if none), whose messages still queued in the client can be dropped."""

    op: ClassVar[str] = "resend-data"
    gone: str
    items: list


@_message
class ClusterBroken:
    op: ClassVar[str] = "broken"
    kind: str  # "initializer" | "worker-start" | "scheduler"
    reason: str
    frames: list = field(default_factory=list)


# --- scheduler -> worker ----------------------------------------------------------------------


@_message
class Compute:
    """Run a task. ``dependencies`` rows: (key, [data addresses holding it])."""

    op: ClassVar[str] = "compute"
    key: Key
    priority: Any
    dependencies: list
    options: Any
    frames: Sequence = field(default_factory=list)  # the scheduler's stored spec: a tuple


@_message
class FreeKeys:
    op: ClassVar[str] = "free"
    keys: list


@_message
class CancelCompute:
    """Take back a task sent to ``slot`` if it has not started (sent to the worker's control
    connection, whose thread never runs user code, so it answers at once)."""

    op: ClassVar[str] = "cancel-compute"
    request_id: int
    key: Key
    slot: int


@_message
class RunInitializer:
    op: ClassVar[str] = "run-initializer"
    frames: list = field(default_factory=list)


@_message
class StoreData:
    """Data to hold (scattered by a client). Rows: (key, frame count). ``shm`` rows
    (frame index, name, size, generation): frames sent through shared memory, a pool segment's
    generation or 0 for a one-off file (``transport/shm.py``)."""

    op: ClassVar[str] = "store"
    items: list
    shm: list
    frames: list = field(default_factory=list)


@_message
class ReplicateKeys:
    """Fetch these keys from where they are (a retiring worker) and keep them.

    Rows: (key, [data addresses])."""

    op: ClassVar[str] = "replicate"
    items: list


@_message
class CloseWorker:
    """Leave now. ``restart``: the scheduler removed this worker (it went silent, then came
    back); its nanny starts a fresh one instead of counting a failure."""

    op: ClassVar[str] = "close"
    reason: str
    restart: bool = False


# --- worker -> scheduler ----------------------------------------------------------------------


@_message
class RegisterWorker:
    op: ClassVar[str] = "register"
    worker_id: str
    name: str
    data_address: str
    nthreads: int
    memory_limit: int
    resources: dict
    versions: dict
    pid: int
    host: str = ""  # shared-memory host key (transport/shm.py): "" for none
    marker: str = ""  # run marker file (transport/runmarker.py): "" for none


@_message
class ComputeDone:
    op: ClassVar[str] = "compute-done"
    key: Key
    nbytes: int
    has_value: bool
    duration: float
    frames: list = field(default_factory=list)


@_message
class ComputeErred:
    op: ClassVar[str] = "compute-erred"
    key: Key
    duration: float
    frames: list = field(default_factory=list)


@_message
class MissingData:
    """A dependency could not be fetched from where the scheduler said it was."""

    op: ClassVar[str] = "missing-data"
    key: Key
    dependency: Key
    address: str


@_message
class CancelComputeReply:
    """The answer to a CancelCompute: ``cancelled`` if the task had not started (it never will)."""

    op: ClassVar[str] = "cancel-compute-reply"
    key: Key
    slot: int
    cancelled: bool


@_message
class InitializerErred:
    op: ClassVar[str] = "initializer-erred"
    frames: list = field(default_factory=list)


@_message
class AddKeys:
    """The worker now holds these keys (data a client stored on it). Rows: (key, nbytes)."""

    op: ClassVar[str] = "add-keys"
    items: list


@_message
class SlotHello:
    """An execution slot's socket is connected: the scheduler may send it tasks."""

    op: ClassVar[str] = "slot-hello"
    worker_id: str
    slot: int


@_message
class SlotBlocked:
    """The task a slot runs is waiting for other tasks (a ``result()`` inside the task): it no
    longer counts against the slot's room, so the slot may be sent more work meanwhile."""

    op: ClassVar[str] = "slot-blocked"
    key: Key


@_message
class RetireMe:
    """A worker asks to leave gracefully (its nanny got SIGTERM): hand off its data first."""

    op: ClassVar[str] = "retire-me"
    reason: str


@_message
class Heartbeat:
    op: ClassVar[str] = "heartbeat"
    executing: int
    memory: int


# --- data sockets (worker <-> worker, client -> worker) ----------------------------------------


@_message
class GetData:
    """``host``: the requester's shared-memory host key; big frames of the answer come as
    shared-memory files if it is the server's too (``transport/shm.py``)."""

    op: ClassVar[str] = "get-data"
    request_id: int
    keys: list
    host: str = ""


@_message
class Data:
    """Values for a GetData. Rows: (key, frame count), frame count -1 for a key not held.
    ``shm`` rows (frame index, name, size, generation): frames sent through shared memory."""

    op: ClassVar[str] = "data"
    request_id: int
    items: list
    shm: list
    frames: list = field(default_factory=list)


def versions() -> dict:
    import sys

    import cloudpickle

    from ._version import __version__

    return {
        "meshpool": __version__,
        "python": "{}.{}".format(*sys.version_info[:2]),
        "cloudpickle": cloudpickle.__version__,
    }


def version_mismatch(ours: dict, theirs: Any) -> str | None:
    """A message naming both sides' versions if by-value code could break between them."""
    if not isinstance(theirs, dict):
        return "peer sent no version information"
    bad = [k for k in ("meshpool", "python", "cloudpickle") if theirs.get(k) != ours.get(k)]
    if not bad:
        return None
    pairs = ", ".join(f"{k} {ours.get(k)} here vs {theirs.get(k)} there" for k in bad)
    return f"version mismatch: {pairs}"
