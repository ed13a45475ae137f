"""Large buffers between peers on one host: private files in ``/dev/shm`` instead of sockets.

A socket copies every byte through the kernel twice, in small chunks; between two processes that
share a host (and a network namespace, so a test's "hosts" stay apart, and a user) a big frame
goes like this instead::

    sender:   os.write(buffer) into a new 0600 file /dev/shm/meshpool-<uid>-<pid>-<tag>-<random>
    message:  carries (frame index, name, size) in place of the frame (the ``shm`` field)
    receiver: mmap(MAP_SHARED) the file, unlink it, unpickle over the mapping

One copy in all (into tmpfs); the receiver's mapping is the data. Once unlinked, the file is the
receiver's alone, so a shared mapping is private in effect: arrays rebuilt on it are writable
without copy-on-write faults, and the mapping outlives the name for as long as they do.
Measured for 100 MB (CPU time, ``docs/architecture.md``): ``os.write`` into tmpfs 79 ms, against
137-150 ms for copying through an ``mmap`` of a truncated file (its pages are zeroed first);
mapping and reading on the receiver 47 ms lazily, 53 ms with ``MAP_POPULATE`` (file faults map
16 pages at a time already, and populating would only move that work into the receiving I/O
thread); a ``MAP_PRIVATE`` writable mapping with ``MAP_POPULATE`` copies every page (100 ms).

Who removes a file: its receiver, at once (every received message is unpacked as soon as it is
decoded, even one the receiver then ignores). A file whose message never arrived is removed by its
owner after :data:`EXPIRY` seconds (:func:`expire_own`) or when the owner exits (:func:`remove_own`),
and files of processes that died are removed by :func:`remove_orphans`, which the local cluster
and nannies run when a worker exits and when they stop.

Shared memory is used only between peers whose :func:`host_key` is the same non-empty string; it
is empty when ``MESHPOOL_SHM=0`` or ``/dev/shm`` is unusable. :func:`export` declines (the frame
goes through the socket) when ``/dev/shm`` would keep less than ``MESHPOOL_SHM_RESERVE`` bytes
(default 64 MiB) free.
"""

from __future__ import annotations

import mmap
import os
import threading
import time
import uuid
from functools import lru_cache
from typing import Any

SHM_DIR = "/dev/shm"
THRESHOLD = 1 << 20  # frames at least this big take the shared-memory path
FREE_MARGIN = 64 << 20  # leave this much of /dev/shm free for everybody else
EXPIRY = 300.0  # seconds after which an owner removes a file nobody attached

_counts_lock = threading.Lock()
_counts = {"sent": 0, "received": 0}  # bytes through shared memory, this process


class SharedMemoryLost(OSError):
    """A shared-memory file named in a message was gone (expired, or its owner died)."""


def host_key() -> str:
    """Identifies "same host, network namespace and user"; "" where shared memory is off."""
    if os.environ.get("MESHPOOL_SHM", "1") == "0":
        return ""
    return _host_identity()


@lru_cache(maxsize=1)
def _host_identity() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
        netns = os.stat("/proc/self/ns/net").st_ino
        shm = os.stat(SHM_DIR)
    except OSError:
        return ""
    if not os.access(SHM_DIR, os.W_OK):
        return ""
    return f"{boot}:{netns}:{shm.st_dev}:{shm.st_ino}:{os.getuid()}"


def statistics() -> dict:
    """Bytes this process sent and received through shared memory."""
    with _counts_lock:
        return dict(_counts)


def _count(what: str, size: int) -> None:
    with _counts_lock:
        _counts[what] += size


def _prefix(tag: str = "p") -> str:
    return f"meshpool-{os.getuid()}-{os.getpid()}-{tag}-"


def _free_margin() -> int:
    try:
        return int(os.environ.get("MESHPOOL_SHM_RESERVE", FREE_MARGIN))
    except ValueError:
        return FREE_MARGIN


def export(buffer: Any, tag: str = "p") -> tuple[str, int] | None:
    """Copy a buffer into a new private shared-memory file; None if there is no room."""
    view = memoryview(buffer).cast("B")
    size = view.nbytes
    try:
        stats = os.statvfs(SHM_DIR)
    except OSError:
        return None
    if stats.f_bavail * stats.f_frsize < size + _free_margin():
        return None
    name = _prefix(tag) + uuid.uuid4().hex
    path = os.path.join(SHM_DIR, name)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError:
        return None
    try:
        written = 0
        while written < size:
            written += os.write(fd, view[written:])
    except OSError:  # full after all (a race with another writer)
        _unlink(path)
        return None
    finally:
        os.close(fd)
    _count("sent", size)
    return name, size


def attach(name: str, size: int) -> memoryview:
    """Map an exported file and unlink it; the mapping outlives the name."""
    if "/" in name or not name.startswith("meshpool-"):
        raise ValueError(f"not a meshpool shared-memory name: {name!r}")
    path = os.path.join(SHM_DIR, name)
    try:
        fd = os.open(path, os.O_RDWR)
    except FileNotFoundError:
        raise SharedMemoryLost(f"shared-memory file {name} is gone") from None
    try:
        if os.fstat(fd).st_size != size:
            raise SharedMemoryLost(f"shared-memory file {name} is not {size} bytes")
        mapping = mmap.mmap(
            fd,
            size,
            flags=mmap.MAP_SHARED,
            prot=mmap.PROT_READ | mmap.PROT_WRITE,
        )
    finally:
        os.close(fd)
        _unlink(path)
    _count("received", size)
    return memoryview(mapping)


def discard(name: str) -> None:
    """Remove an exported file nobody will attach (the send failed)."""
    if "/" not in name and name.startswith("meshpool-"):
        _unlink(os.path.join(SHM_DIR, name))


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def _names() -> list[str]:
    try:
        return os.listdir(SHM_DIR)
    except OSError:
        return []


def remove_orphans() -> int:
    """Remove this user's files whose creating process no longer exists; return how many."""
    mine = f"meshpool-{os.getuid()}-"
    removed = 0
    for name in _names():
        if not name.startswith(mine):
            continue
        pid_text = name[len(mine) :].split("-", 1)[0]
        if not pid_text.isdigit() or _alive(int(pid_text)):
            continue
        _unlink(os.path.join(SHM_DIR, name))
        removed += 1
    return removed


def remove_own(tag: str | None = None) -> None:
    """Remove the files this process exported (with ``tag``, only those)."""
    prefix = _prefix(tag) if tag is not None else _prefix("")[:-1]
    for name in _names():
        if name.startswith(prefix):
            _unlink(os.path.join(SHM_DIR, name))


def expire_own(max_age: float = EXPIRY) -> None:
    """Remove this process's files older than ``max_age``: their receiver never came."""
    prefix = _prefix("")[:-1]
    cutoff = time.time() - max_age
    for name in _names():
        if not name.startswith(prefix):
            continue
        path = os.path.join(SHM_DIR, name)
        try:
            if os.stat(path).st_mtime < cutoff:
                os.unlink(path)
        except OSError:
            pass


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# --- frames <-> shared memory ------------------------------------------------------------------


def pack_frames(frames: list, peer_host: str, tag: str = "p") -> tuple[list, list]:
    """Move a message's big frames to shared memory if the peer shares our host key.

    Returns the frames still to send and the shared-memory spec ``[(index, name, size)]`` (empty
    when nothing moved); ``index`` is the frame's place in ``frames``.
    """
    if not peer_host or peer_host != host_key():
        return frames, []
    spec = []
    kept = []
    for index, frame in enumerate(frames):
        size = frame.nbytes if isinstance(frame, memoryview) else len(frame)
        exported = export(frame, tag) if size >= THRESHOLD else None
        if exported is None:
            kept.append(frame)
        else:
            spec.append((index, exported[0], exported[1]))
    return (kept, spec) if spec else (frames, [])


def unpack_frames(kept: list, spec: list) -> list:
    """Rebuild a message's frames from those received and its shared-memory spec.

    Every file in ``spec`` is attached (or, after a failure, removed) before this returns, so a
    message nobody wanted leaves nothing behind; a lost file raises :class:`SharedMemoryLost`,
    a malformed spec ValueError.
    """
    if not spec:
        return kept
    rows = _check_spec(spec, len(kept) + len(spec))
    attached: dict[int, memoryview] = {}
    error: BaseException | None = None
    for index, name, size in rows:
        if error is not None:
            discard(name)
            continue
        try:
            attached[index] = attach(name, size)
        except (OSError, ValueError) as exc:
            error = exc
    if error is not None:
        raise SharedMemoryLost(f"shared-memory frame lost: {error}") from error
    rest = iter(kept)
    return [attached[i] if i in attached else next(rest) for i in range(len(kept) + len(rows))]


def _check_spec(spec: Any, count: int) -> list[tuple[int, str, int]]:
    rows = [(int(index), str(name), int(size)) for index, name, size in spec]
    indices = {index for index, _, _ in rows}
    if len(indices) != len(rows) or not indices <= set(range(count)):
        raise ValueError("malformed shared-memory spec")
    return rows


def total(spec: list) -> int:
    """Bytes a shared-memory spec carries."""
    return sum(int(size) for _, _, size in spec)
