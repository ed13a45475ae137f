"""Execution threads: take ready tasks by priority, run them, report through an inproc socket.

Each thread owns one PUSH socket to the worker loop's PULL socket (zmq sockets are never shared
between threads) and sends it finished messages already encoded, so the loop only forwards
frames. A thread announces each task it starts (so the scheduler blames a worker's death only on
tasks that were really executing) and then runs it to completion: the function and its arguments
are unpickled here, never in the loop thread, and so is the result pickled.
"""

from __future__ import annotations

import heapq
import threading
import time
from collections.abc import Callable
from typing import Any

import zmq

from .. import messages as m
from ..transport import serialize
from ..transport.sockets import make_socket
from .store import DataStore

SMALL_RESULT = 64 * 1024  # results up to this size ride with the completion message
STARTED = b"started"
FINISHED = b"finished"


class ReadyQueue:
    """Tasks whose inputs are all local, best priority first; removable until taken."""

    def __init__(self) -> None:
        self._heap: list = []
        self._entries: dict[Any, tuple] = {}
        self._seq = 0
        self._cond = threading.Condition(threading.Lock())
        self._closed = False

    def put(self, key: Any, priority: Any, item: Any) -> None:
        with self._cond:
            self._seq += 1
            entry = (priority, self._seq, key, item)
            self._entries[key] = entry
            heapq.heappush(self._heap, entry)
            self._cond.notify()

    def get(self) -> tuple[Any, Any] | None:
        """Block until a task is ready; None once closed."""
        with self._cond:
            while True:
                while self._heap:
                    entry = heapq.heappop(self._heap)
                    if self._entries.get(entry[2]) is entry:
                        del self._entries[entry[2]]
                        return entry[2], entry[3]
                if self._closed:
                    return None
                self._cond.wait()

    def remove(self, key: Any) -> bool:
        """Take a task out before any thread started it; False if it already started."""
        with self._cond:
            return self._entries.pop(key, None) is not None

    def __len__(self) -> int:
        return len(self._entries)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()


class TaskRunner(threading.Thread):
    """One execution thread."""

    def __init__(
        self,
        index: int,
        queue: ReadyQueue,
        store: DataStore,
        functions: serialize.LoadedFunctions,
        results_address: str,
        on_thread_start: Callable[[], None] | None = None,
    ) -> None:
        super().__init__(name=f"meshpool-exec-{index}", daemon=True)
        self.queue = queue
        self.store = store
        self.functions = functions
        self.results_address = results_address
        self.current: Any = None

    def run(self) -> None:
        sock = make_socket(zmq.PUSH)
        sock.connect(self.results_address)
        try:
            while True:
                item = self.queue.get()
                if item is None:
                    return
                key, compute = item
                self.current = key
                sock.send_multipart([STARTED, *m.encode(m.TaskStarted([key]))])
                frames = self.execute(compute)
                self.current = None
                sock.send_multipart([FINISHED, *frames])
        finally:
            sock.close(linger=0)

    def execute(self, compute: m.Compute) -> list:
        """Run one task; return the encoded ComputeDone or ComputeErred message."""
        start = time.perf_counter()
        try:
            fn, args, kwargs = self._unpack(compute)
            value = fn(*args, **kwargs)
        except BaseException as exc:  # SystemExit and friends fail this task only
            return m.encode(
                m.ComputeErred(compute.key, time.perf_counter() - start, _dump_error(exc))
            )
        duration = time.perf_counter() - start
        try:
            frames = serialize.dumps(value, what=f"result of {_fn_name(fn)}")
        except Exception as exc:
            return m.encode(m.ComputeErred(compute.key, duration, _dump_error(exc)))
        size = self.store.put_result(compute.key, value, frames)
        small = size <= SMALL_RESULT
        return m.encode(m.ComputeDone(compute.key, size, small, duration, frames if small else []))

    def _unpack(self, compute: m.Compute) -> tuple:
        fn_bytes, *arg_frames = compute.frames
        fn = self.functions.loads(bytes(fn_bytes))
        options = compute.options
        args_key = options.get("args_key") if options else None
        if args_key is not None:  # large arguments came as a data key, straight from the caller
            frames = self.store.frames(args_key)
            if frames is None:
                raise KeyError(args_key)
            args, kwargs = serialize.loads(frames, resolve=self.store.value)
        elif compute.dependencies:
            args, kwargs = serialize.loads(arg_frames, resolve=self.store.value)
        else:
            args, kwargs = serialize.loads(arg_frames)
        return fn, args, kwargs


def _fn_name(fn: Any) -> str:
    return getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None) or repr(fn)


def _dump_error(exc: BaseException) -> list:
    try:
        return serialize.dumps_exception(exc)
    except Exception as err:  # pragma: no cover - dumps_exception already falls back
        return serialize.dumps_exception(RuntimeError(f"unreportable error: {err}"))
