"""The worker's data store: results and scattered data by key.

Each entry keeps the serialized frames (what peers and clients fetch, served without pickling
again) and the value (what local tasks use), either of which may be filled lazily: a computed
result has both at once; data received from a peer or a client has frames only until a task
needs its value. Values are deserialized in execution threads, never in the I/O loop.

Execution threads read and write entries while the loop thread serves and frees them. Reads are
single dict accesses, atomic under the GIL; writes also keep the running total of bytes held, so
they take a lock (iterating the entries from one thread while another adds one raised
"dictionary changed size during iteration" and used to kill the worker's loop).
"""

from __future__ import annotations

import threading
from typing import Any

from ..transport.serialize import loads, nbytes

_MISSING = object()


class _Entry:
    __slots__ = ("value", "frames", "nbytes")

    def __init__(self, value: Any, frames: list, size: int) -> None:
        self.value = value
        self.frames = frames
        self.nbytes = size


class DataStore:
    def __init__(self) -> None:
        self._entries: dict[Any, _Entry] = {}
        self._total = 0  # bytes held (the sum of the entries' nbytes)
        self._lock = threading.Lock()  # for writes: an entry and the total change together

    def __contains__(self, key: Any) -> bool:
        return key in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def put_result(self, key: Any, value: Any, frames: list) -> int:
        return self._put(key, _Entry(value, frames, nbytes(frames)))

    def put_frames(self, key: Any, frames: list) -> int:
        return self._put(key, _Entry(_MISSING, frames, nbytes(frames)))

    def _put(self, key: Any, entry: _Entry) -> int:
        with self._lock:
            old = self._entries.get(key)
            self._entries[key] = entry
            self._total += entry.nbytes - (old.nbytes if old is not None else 0)
        return entry.nbytes

    def value(self, key: Any) -> Any:
        """The value of ``key``, deserializing it on first use. KeyError if not held."""
        entry = self._entries[key]
        if entry.value is _MISSING:
            entry.value = loads(entry.frames)
        return entry.value

    def frames(self, key: Any) -> list | None:
        entry = self._entries.get(key)
        return None if entry is None else entry.frames

    def free(self, key: Any) -> None:
        with self._lock:
            entry = self._entries.pop(key, None)
            if entry is not None:
                self._total -= entry.nbytes

    def total_bytes(self) -> int:
        return self._total

    def keys(self) -> list:
        with self._lock:
            return list(self._entries)
