"""The worker's data store: results and scattered data by key.

Each entry keeps the serialized frames (what peers and clients fetch, served without pickling
again) and the value (what local tasks use), either of which may be filled lazily: a computed
result has both at once; data received from a peer or a client has frames only until a task
needs its value. Values are deserialized in execution threads, never in the I/O loop.

Execution threads read and write entries while the loop thread serves and frees them; every
operation is a single dict access, atomic under the GIL.
"""

from __future__ import annotations

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

    def __contains__(self, key: Any) -> bool:
        return key in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def put_result(self, key: Any, value: Any, frames: list) -> int:
        size = nbytes(frames)
        self._entries[key] = _Entry(value, frames, size)
        return size

    def put_frames(self, key: Any, frames: list) -> int:
        size = nbytes(frames)
        self._entries[key] = _Entry(_MISSING, frames, size)
        return size

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
        self._entries.pop(key, None)

    def total_bytes(self) -> int:
        return sum(e.nbytes for e in self._entries.values())

    def keys(self) -> list:
        return list(self._entries)
