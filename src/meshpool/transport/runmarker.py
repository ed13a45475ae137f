"""Run markers: which task each slot of a worker is running, readable after the worker died.

A small file in ``/dev/shm``, one 8-byte counter per slot, mapped by the worker and (once it
registered) by a scheduler on the same host; see ``worker/reporting.py`` for why.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import struct
import uuid

from . import shm

# the scheduler's answer to a registration when it mapped the worker's marker (else "registered")
MAPPED = "registered, run marker mapped"
MARKER_MAGIC = b"meshpool-run-1\0\0"
_SLOT = struct.Struct("<Q")
RUN_TAG = "run"  # in the file's name, after the owner's pid


def _offset(slot: int) -> int:
    """Where slot ``slot``'s counter starts (for ``nthreads``: the file's size)."""
    return len(MARKER_MAGIC) + _SLOT.size * slot


class RunMarker:
    """The worker's side: one 8-byte counter per slot, in a file the scheduler may map."""

    def __init__(self, nthreads: int) -> None:
        self.path = ""
        self._map: mmap.mmap | None = None
        if not shm.host_key():
            return
        # named like shm's files: the sweeps for dead processes' files cover it
        path = os.path.join(shm.SHM_DIR, shm.file_prefix(RUN_TAG) + uuid.uuid4().hex)
        size = _offset(nthreads)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        except OSError:
            return
        try:
            os.ftruncate(fd, size)
            self._map = mmap.mmap(fd, size)
        except OSError:
            os.unlink(path)
            return
        finally:
            os.close(fd)
        self._map[: len(MARKER_MAGIC)] = MARKER_MAGIC
        self.path = path

    def set(self, slot: int, seq: int) -> None:
        if self._map is not None:
            _SLOT.pack_into(self._map, _offset(slot), seq)

    def get(self, slot: int) -> int:
        if self._map is None:
            return 0
        return int(_SLOT.unpack_from(self._map, _offset(slot))[0])

    def unlink(self) -> None:
        """The scheduler has answered: it mapped the file or never will."""
        if self.path:
            with contextlib.suppress(OSError):
                os.unlink(self.path)
            self.path = ""


class MarkerReader:
    """The scheduler's side: a worker's run marker, mapped read-only at registration."""

    def __init__(self, path: str, nthreads: int) -> None:
        name = os.path.basename(path)
        mine = name.startswith(f"meshpool-{os.getuid()}-") and f"-{RUN_TAG}-" in name
        if os.path.dirname(path) != shm.SHM_DIR or not mine:
            raise ValueError(f"not a run marker: {path!r}")
        size = _offset(nthreads)
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        try:
            if os.fstat(fd).st_size != size:
                raise ValueError(f"run marker {path!r} has the wrong size")
            self._map = mmap.mmap(fd, size, prot=mmap.PROT_READ)
        finally:
            os.close(fd)
        if self._map[: len(MARKER_MAGIC)] != MARKER_MAGIC:
            self._map.close()
            raise ValueError(f"run marker {path!r} has no marker header")
        self.nthreads = nthreads

    def running(self) -> list[int]:
        """The ``seq`` each slot was running (0: none)."""
        return [int(_SLOT.unpack_from(self._map, _offset(i))[0]) for i in range(self.nthreads)]

    def close(self) -> None:
        self._map.close()


def open_marker(path: str, nthreads: int) -> MarkerReader | None:
    """The marker of a worker on this host, or None (another host, or no usable file)."""
    if not path:
        return None
    try:
        return MarkerReader(path, nthreads)
    except (OSError, ValueError):
        return None
