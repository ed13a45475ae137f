"""Turning Python objects into frames and back.

Theory of operation:

* ``dumps(obj)`` returns a list of frames: a pickle (protocol 5) followed by the out-of-band
  buffers of large buffer objects (NumPy arrays, bytes over :data:`OOB_THRESHOLD`), which travel as
  zmq frames without being copied into the pickle.
* Plain ``pickle`` is tried first (~1 µs for a small call) and ``cloudpickle`` only when pickle
  refuses the object or the pickle names ``__main__`` (a class or function defined in a script,
  notebook or REPL, which a worker could not import): cloudpickle ships those by value.
* Callables are pickled once and their bytes cached (cloudpickle costs ~15 µs a call).
* Futures inside arguments are replaced by their keys through pickle's persistent ids; the
  receiving worker resolves them from its data store (``loads(..., resolve=store.__getitem__)``).
* Exceptions travel with their traceback via tblib; one that cannot be pickled or unpickled becomes
  a :class:`meshpool.RemoteError` with type name, message and traceback text.
* Functions and exceptions travel through the scheduler, whose connections cap frames at
  ``sockets.MAX_FRAME_BYTES``: a function that pickles bigger is refused with a clear error (it
  captures data, which should be an argument), and an exception that big is sent as its text.
"""

from __future__ import annotations

import copyreg
import io
import pickle
import traceback
from collections.abc import Callable
from typing import Any

import cloudpickle

from ..errors import RemoteError, SerializationError
from .sockets import MAX_FRAME_BYTES

OOB_THRESHOLD = 64 * 1024  # buffers at least this big go out of band (zmq copies smaller anyway)
MAX_ERROR_TEXT = 2**20  # characters of an exception's message or traceback text sent at most
_FN_CACHE_SIZE = 1024

Frames = list  # list[bytes | memoryview | zmq.Frame]


def _oob_collector(buffers: list) -> Callable[[pickle.PickleBuffer], bool]:
    def callback(buf: pickle.PickleBuffer) -> bool:
        view = buf.raw()
        if view.nbytes < OOB_THRESHOLD:
            return True  # keep small buffers in band
        buffers.append(view)
        return False

    return callback


class _KeyPickler(pickle.Pickler):
    """Pickles objects of ``ref_type`` as persistent ids (their ``key``)."""

    ref_type: type | tuple = type(None)

    def persistent_id(self, obj: Any) -> Any:  # noqa: D401 - pickle hook
        if isinstance(obj, self.ref_type):
            return obj.key  # type: ignore[union-attr]
        return None


class _KeyCloudPickler(cloudpickle.CloudPickler):
    ref_type: type | tuple = type(None)

    def persistent_id(self, obj: Any) -> Any:
        if isinstance(obj, self.ref_type):
            return obj.key  # type: ignore[union-attr]
        return None


def _dump_with(pickler_cls: type, obj: Any, buffers: list, ref_type: Any) -> bytes:
    out = io.BytesIO()
    pickler = pickler_cls(out, protocol=5, buffer_callback=_oob_collector(buffers))
    if ref_type is not None:
        pickler.ref_type = ref_type
    pickler.dump(obj)
    return out.getvalue()


def dumps(obj: Any, ref_type: Any = None, what: str = "object") -> Frames:
    """Serialize ``obj`` into ``[pickle, *buffers]``; raise SerializationError naming it."""
    buffers: list = []
    try:
        if ref_type is None:
            data = pickle.dumps(obj, protocol=5, buffer_callback=_oob_collector(buffers))
        else:
            data = _dump_with(_KeyPickler, obj, buffers, ref_type)
        if b"__main__" not in data:
            return [data, *buffers]
    except Exception:
        pass
    buffers = []
    try:
        if ref_type is None:
            data = cloudpickle.dumps(obj, protocol=5, buffer_callback=_oob_collector(buffers))
        else:
            data = _dump_with(_KeyCloudPickler, obj, buffers, ref_type)
    except Exception as exc:
        raise SerializationError(
            f"cannot pickle {what} {_describe(obj)}: {type(exc).__name__}: {exc}"
        ) from exc
    return [data, *buffers]


def dumps_plain(obj: Any) -> Frames | None:
    """The fast path: plain pickle only. None when it refuses the object (a future inside it,
    a lambda...) or names ``__main__`` — the caller then takes the full path (:func:`dumps`)."""
    buffers: list = []
    try:
        data = pickle.dumps(obj, protocol=5, buffer_callback=_oob_collector(buffers))
    except Exception:
        return None
    if b"__main__" in data:
        return None
    return [data, *buffers]


def _describe(obj: Any) -> str:
    try:
        text = repr(obj)
    except Exception:
        text = f"<{type(obj).__qualname__} object>"
    if len(text) > 200:
        text = text[:200] + "..."
    return f"{text} of type {type(obj).__module__}.{type(obj).__qualname__}"


class _ResolvingUnpickler(pickle.Unpickler):
    resolve: Callable[[Any], Any]

    def persistent_load(self, pid: Any) -> Any:
        return self.resolve(pid)


def loads(frames: Frames, resolve: Callable[[Any], Any] | None = None) -> Any:
    """Rebuild an object from ``[pickle, *buffers]``; ``resolve`` maps persistent ids to values."""
    data, *buffers = frames
    if resolve is None:
        return pickle.loads(data, buffers=buffers)
    unpickler = _ResolvingUnpickler(io.BytesIO(data), buffers=buffers)
    unpickler.resolve = resolve
    return unpickler.load()


def nbytes(frames: Frames) -> int:
    if len(frames) == 1 and type(frames[0]) is bytes:  # the common case, once per submit
        return len(frames[0])
    return sum(len(f) if not isinstance(f, memoryview) else f.nbytes for f in frames)


class FunctionCache:
    """Pickled bytes of callables, computed once each (cloudpickle is slow per call).

    Keyed by ``id()`` with the callable kept alive beside its bytes, so an id is never reused
    while cached; bounded, oldest dropped first.
    """

    def __init__(self, size: int = _FN_CACHE_SIZE) -> None:
        self._size = size
        self._entries: dict[int, tuple[Any, bytes]] = {}

    def dumps(self, fn: Callable) -> bytes:
        entry = self._entries.get(id(fn))
        if entry is not None and entry[0] is fn:
            return entry[1]
        data = self._pickle(fn)
        if len(self._entries) >= self._size:
            self._entries.pop(next(iter(self._entries)))
        self._entries[id(fn)] = (fn, data)
        return data

    @staticmethod
    def _pickle(fn: Callable) -> bytes:
        data = FunctionCache._pickle_any(fn)
        if len(data) > MAX_FRAME_BYTES:
            raise SerializationError(_function_too_big(fn, len(data)))
        return data

    @staticmethod
    def _pickle_any(fn: Callable) -> bytes:
        try:
            data = pickle.dumps(fn, protocol=5)
            if b"__main__" not in data:
                return data
        except Exception:
            pass
        try:
            return cloudpickle.dumps(fn, protocol=5)
        except Exception as exc:
            raise SerializationError(
                f"cannot pickle function {_describe(fn)}: {type(exc).__name__}: {exc}"
            ) from exc


def _function_too_big(fn: Callable, nbytes: int) -> str:
    return (
        f"function {_describe(fn)} pickles to {nbytes / 2**20:.0f} MiB, over the "
        f"{MAX_FRAME_BYTES // 2**20} MiB a function may take (functions travel through the "
        "scheduler): it carries data by value, e.g. a closure variable, a global of __main__, "
        "a bound method's instance or a partial's arguments. Pass that data as an argument "
        "instead (large arguments go straight to a worker), or scatter() it and pass the future"
    )


class LoadedFunctions:
    """Worker side of FunctionCache: unpickled callables keyed by their bytes."""

    def __init__(self, size: int = _FN_CACHE_SIZE) -> None:
        self._size = size
        self._entries: dict[bytes, Callable] = {}

    def loads(self, data: bytes) -> Callable:
        fn = self._entries.get(data)
        if fn is None:
            fn = pickle.loads(data)
            if len(self._entries) >= self._size:
                self._entries.pop(next(iter(self._entries)))
            self._entries[data] = fn
        return fn


# --- exceptions -------------------------------------------------------------------------------


def dumps_exception(exc: BaseException) -> Frames:
    """Frames for a task's exception: the exception itself with its traceback when it pickles,
    else a RemoteError carrying its type name, message and traceback text."""
    from tblib import Traceback

    tb_text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    tb_dict = None
    if exc.__traceback__ is not None:
        try:
            tb_dict = Traceback(exc.__traceback__).to_dict()
        except Exception:
            tb_dict = None
    tb_text = _clip(tb_text)
    remote = _remote_error(exc, tb_text)
    try:
        out = io.BytesIO()
        _ExceptionPickler(out, protocol=5).dump(exc)
        payload = out.getvalue()
        if len(payload) > MAX_FRAME_BYTES:  # it holds data: send its text (see the top)
            raise ValueError("too big")
        pickle.loads(payload)  # an exception that cannot be rebuilt must not travel as itself
    except Exception:
        payload = pickle.dumps(remote, protocol=5)
    # type name and message ride in builtins too: if the caller cannot unpickle the exception
    # (its class is importable only on the worker), its RemoteError still names them
    info = (tb_dict, tb_text, remote.type_name, remote.message)
    return [pickle.dumps(info, protocol=5), payload]


class _ExceptionPickler(cloudpickle.Pickler):
    """cloudpickle, but exceptions pickle by their own ``__reduce__``, ignoring reducers that
    a library registered globally with copyreg: ``tblib.pickling_support.install()`` (which
    importing ``dask.multiprocessing`` calls) rebuilds SystemExit without its ``code`` and
    StopIteration without its ``value``. The traceback travels apart anyway (tblib dict)."""

    def reducer_override(self, obj: Any) -> Any:
        if isinstance(obj, BaseException) and type(obj) in copyreg.dispatch_table:
            return obj.__reduce_ex__(5)
        return super().reducer_override(obj)


def _clip(text: str, limit: int = MAX_ERROR_TEXT) -> str:
    if len(text) <= limit:
        return text
    return (
        f"{text[: limit // 2]}\n... ({len(text) - limit} characters cut) ...\n{text[-limit // 2 :]}"
    )


def _remote_error(exc: BaseException, tb_text: str) -> RemoteError:
    try:
        message = _clip(str(exc))
    except Exception:
        message = "<unprintable message>"
    return RemoteError(f"{type(exc).__module__}.{type(exc).__qualname__}", message, tb_text)


def loads_exception(frames: Frames) -> BaseException:
    """Rebuild a task's exception with its remote traceback (or a RemoteError)."""
    from tblib import Traceback

    if len(frames) == 1:
        return _scheduler_error(frames[0])
    try:
        tb_dict, tb_text, type_name, message = pickle.loads(frames[0])
    except Exception:
        tb_dict, tb_text, type_name, message = None, "", "<unknown>", ""
    try:
        exc = pickle.loads(frames[1])
        if not isinstance(exc, BaseException):
            raise TypeError(f"not an exception: {type(exc).__name__}")
    except Exception as err:
        return RemoteError(
            type_name,
            f"{message} (the exception could not be unpickled here: {type(err).__name__}: {err})",
            tb_text,
        )
    if tb_dict is not None:
        try:
            exc = exc.with_traceback(Traceback.from_dict(tb_dict).as_traceback())
        except Exception:
            pass
    return exc


def _scheduler_error(frame: bytes) -> BaseException:
    """Errors the scheduler makes itself travel as builtins: ("meshpool-error", kind, detail)."""
    from .. import errors
    from .header import loads_header

    try:
        _, kind, detail = loads_header(frame)
    except Exception:
        return RemoteError("<unknown>", "the scheduler sent an undecodable error")
    if kind == "KilledWorker":
        return errors.KilledWorker(*detail)
    if kind == "KeyError":
        return KeyError(detail)
    cls = getattr(errors, kind, None)
    if isinstance(cls, type) and issubclass(cls, BaseException):
        return cls(detail)
    return RemoteError(kind, str(detail))
