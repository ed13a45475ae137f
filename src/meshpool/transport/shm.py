"""Large buffers between peers on one host: private files in ``/dev/shm`` instead of sockets.

A socket copies every byte through the kernel twice, in small chunks; between two processes that
share a host (and network and pid namespaces, so a test's "hosts" stay apart, and a user) a big
frame goes like this instead, as a one-off file (what workers and clients send through reused
segments is below)::

    sender:   os.write(buffer) into a new 0600 file /dev/shm/meshpool-<uid>-<pid>-<tag>-<random>
    message:  carries (frame index, name, size, 0) in place of the frame (the ``shm`` field)
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

Reused segments
---------------
Workers and clients send through a :class:`~meshpool.transport.shmpool.SegmentPool` first: files
that stay, are written again and again (one ``memcpy`` into pages allocated long ago, instead of
new tmpfs pages per transfer) and carry a header the receiver writes to. Their spec rows carry a
*generation* (one-off files: 0). The receiver side is here (:func:`attach_segment`): it maps a
segment once and keeps the mapping (so later transfers through it take no page faults either),
marks the segment taken with its pid, and hands out a view whose last reference, when dropped,
marks the segment free for its sender to reuse. Header (first :data:`HEADER` bytes)::

    0 magic | 8 state (FREE, SENT, TAKEN) | 12 receiver pid | 16 generation | 24 size | 32 sent at
"""

from __future__ import annotations

import ctypes
import mmap
import os
import struct
import threading
import time
import uuid
import weakref
from functools import lru_cache
from typing import Any

from ..pinning import since, stamp

SHM_DIR = "/dev/shm"
THRESHOLD = 1 << 20  # frames at least this big take the shared-memory path
FREE_MARGIN = 64 << 20  # leave this much of /dev/shm free for everybody else
EXPIRY = 300.0  # seconds after which an owner removes a file nobody attached

HEADER = 4096  # a segment's header page; its data starts here (page-aligned)
MAGIC = b"MPSEG001"
FREE, SENT, TAKEN = 0, 1, 2  # a segment's state byte (offset 8)
_STATE = 8
_PID = struct.Struct("<I")  # at 12: the receiver that took it
_SENT = struct.Struct("<QQd")  # at 16: generation, size, time.time() it was sent
POOL_MARK = "-pool-"  # in segment names: files of a pool, which expire_own leaves alone

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
        # the pid namespace too: orphans are found, and pool segments reclaimed, by the pids of
        # their processes, which mean nothing across pid namespaces
        pidns = os.stat("/proc/self/ns/pid").st_ino
        shm = os.stat(SHM_DIR)
    except OSError:
        return ""
    if not os.access(SHM_DIR, os.W_OK):
        return ""
    return f"{boot}:{netns}:{pidns}:{shm.st_dev}:{shm.st_ino}:{os.getuid()}"


def statistics() -> dict:
    """Bytes this process sent and received through shared memory."""
    with _counts_lock:
        return dict(_counts)


def _count(what: str, size: int) -> None:
    with _counts_lock:
        _counts[what] += size


def file_prefix(tag: str = "p") -> str:
    """Names of this process's files in SHM_DIR start so (uid, pid: the sweeps for dead
    processes' files find them by it)."""
    return f"meshpool-{os.getuid()}-{os.getpid()}-{tag}-"


def _free_margin() -> int:
    try:
        return int(os.environ.get("MESHPOOL_SHM_RESERVE", FREE_MARGIN))
    except ValueError:
        return FREE_MARGIN


def has_room(size: int) -> bool:
    """Whether ``size`` more bytes leave ``/dev/shm`` its reserve (``MESHPOOL_SHM_RESERVE``)."""
    try:
        stats = os.statvfs(SHM_DIR)
    except OSError:
        return False
    return stats.f_bavail * stats.f_frsize >= size + _free_margin()


def write_all(fd: int, view: memoryview, offset: int = 0) -> None:
    """``pwrite`` all of ``view`` at ``offset`` (tmpfs pages allocated without zeroing them)."""
    written = 0
    while written < view.nbytes:
        written += os.pwrite(fd, view[written:], offset + written)


def export(buffer: Any, tag: str = "p") -> tuple[str, int] | None:
    """Copy a buffer into a new private shared-memory file; None if there is no room."""
    view = memoryview(buffer).cast("B")
    size = view.nbytes
    if not has_room(size):
        return None
    name = file_prefix(tag) + uuid.uuid4().hex
    path = os.path.join(SHM_DIR, name)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError:
        return None
    try:
        write_all(fd, view)
    except OSError:  # full after all (a race with another writer)
        _unlink(path)
        return None
    finally:
        os.close(fd)
    _count("sent", size)
    return name, size


def attach(name: str, size: int) -> memoryview:
    """Map an exported file and unlink it; the mapping outlives the name."""
    _check_name(name)
    path = os.path.join(SHM_DIR, name)
    fd = _open_existing(path, "file")
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


def _open_existing(path: str, what: str) -> int:
    """A read-write descriptor of a file a peer named; SharedMemoryLost if it is gone."""
    try:
        return os.open(path, os.O_RDWR)
    except FileNotFoundError:
        raise SharedMemoryLost(f"shared-memory {what} {os.path.basename(path)} is gone") from None


def discard(name: str) -> None:
    """Remove an exported file nobody will attach (the send failed)."""
    if "/" not in name and name.startswith("meshpool-"):
        _unlink(os.path.join(SHM_DIR, name))


# --- the receiving side of pool segments ---------------------------------------------------------


class _Mapped:
    """A segment this process mapped: kept for the next transfer through it (its page tables
    stay filled), dropped once it holds no live view and its file is gone."""

    __slots__ = ("name", "mapping", "inode", "live", "region_type")

    def __init__(self, name: str, mapping: mmap.mmap, inode: int) -> None:
        self.name = name
        self.mapping = mapping
        self.inode = inode
        self.live = 0  # views handed out and not yet released
        # a ctypes array over the data: a buffer that can carry a weakref finalizer (a
        # memoryview cannot); capacities are size classes, so few such types exist
        self.region_type = ctypes.c_char * (len(mapping) - HEADER)


_mapped: dict[str, _Mapped] = {}
_mapped_lock = threading.RLock()  # (a release may run in a finalizer while the lock is held)
_last_prune = 0  # (a pinning.stamp())
PRUNE_INTERVAL = 1.0  # seconds between looks for mapped segments whose file is gone


def attach_segment(name: str, size: int, generation: int) -> memoryview:
    """A view of the ``size`` bytes a pool segment carries for us, valid as long as it lives.

    The segment is marked taken (with our pid, so its sender can reclaim it if we die), and
    free again when the view and everything built on it (arrays) are gone.
    """
    _check_name(name)
    with _mapped_lock:
        entry = _mapped.get(name) or _map_segment(name)
        mapping = entry.mapping
        if bytes(mapping[:8]) != MAGIC or size > len(mapping) - HEADER:
            raise SharedMemoryLost(f"shared-memory segment {name} is not one of ours")
        state = mapping[_STATE]
        sent_generation, sent_size, _ = _SENT.unpack_from(mapping, 16)
        if state != SENT or sent_generation != generation or sent_size != size:
            raise SharedMemoryLost(f"shared-memory segment {name} no longer holds our data")
        _PID.pack_into(mapping, 12, os.getpid())  # (before the state: a sender reading TAKEN
        mapping[_STATE] = TAKEN  # finds the pid that took it)
        region = entry.region_type.from_buffer(mapping, HEADER)
        entry.live += 1
    weakref.finalize(region, _release, entry, generation, os.getpid())
    _count("received", size)
    return memoryview(region).cast("B")[:size]


def _map_segment(name: str) -> _Mapped:
    fd = _open_existing(os.path.join(SHM_DIR, name), "segment")
    try:
        stat = os.fstat(fd)
        if stat.st_size <= HEADER:
            raise SharedMemoryLost(f"shared-memory segment {name} is truncated")
        mapping = mmap.mmap(fd, stat.st_size, flags=mmap.MAP_SHARED)
    finally:
        os.close(fd)
    entry = _mapped[name] = _Mapped(name, mapping, stat.st_ino)
    return entry


def _release(entry: _Mapped, generation: int, pid: int) -> None:
    """The last view of a transfer is gone: its sender may reuse the segment. (Not in a forked
    child: its exit runs finalizers for views its parent still uses.) A segment whose sender
    removed it meanwhile is forgotten at once: no tick may come to prune it (views outlive
    their executor)."""
    if os.getpid() != pid:
        return
    with _mapped_lock:
        entry.live -= 1
        mapping = entry.mapping
        if mapping[_STATE] == TAKEN and _SENT.unpack_from(mapping, 16)[0] == generation:
            mapping[_STATE] = FREE
        gone = entry.live == 0 and not _same_file(entry.name, entry.inode)
        if gone and _mapped.get(entry.name) is entry:
            del _mapped[entry.name]


def decline_segment(name: str, generation: int) -> None:
    """Hand back a segment sent to us that we will not take (the message failed)."""
    try:
        _check_name(name)
        with _mapped_lock:
            entry = _mapped.get(name) or _map_segment(name)
            mapping = entry.mapping
            if mapping[_STATE] == SENT and _SENT.unpack_from(mapping, 16)[0] == generation:
                mapping[_STATE] = FREE
    except (OSError, ValueError):
        pass


def prune_mappings(force: bool = False) -> None:
    """Forget mapped segments that hold no live view and whose sender removed the file (the
    mapping alone would keep its memory); with ``force``, every one with no live view (memory
    pressure: the next transfer through it maps it again). Throttled to :data:`PRUNE_INTERVAL`."""
    global _last_prune
    now = time.monotonic()
    if not force and since(now, _last_prune) < PRUNE_INTERVAL:
        return
    _last_prune = stamp(now)
    with _mapped_lock:
        for name, entry in list(_mapped.items()):
            if entry.live == 0 and (force or not _same_file(name, entry.inode)):
                del _mapped[name]  # (closed when the finalizers holding it are gone too)


def _same_file(name: str, inode: int) -> bool:
    try:
        return os.stat(os.path.join(SHM_DIR, name)).st_ino == inode
    except OSError:
        return False


def _check_name(name: str) -> None:
    if "/" in name or not name.startswith("meshpool-"):
        raise ValueError(f"not a meshpool shared-memory name: {name!r}")


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
    prefix = file_prefix(tag) if tag is not None else file_prefix("")[:-1]
    for name in _names():
        if name.startswith(prefix):
            _unlink(os.path.join(SHM_DIR, name))


def expire_own(max_age: float = EXPIRY) -> None:
    """Remove this process's files older than ``max_age``: their receiver never came. (Pool
    segments are their pool's to expire.)"""
    prefix = file_prefix("")[:-1]
    cutoff = time.time() - max_age
    for name in _names():
        if not name.startswith(prefix) or POOL_MARK in name:
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


def pack_frames(
    frames: list, peer_host: str, tag: str = "p", pool: Any = None
) -> tuple[list, list]:
    """Move a message's big frames to shared memory if the peer shares our host key: into
    segments of ``pool`` (a :class:`~meshpool.transport.shmpool.SegmentPool`) if it has or can
    make one, else into one-off files.

    Returns the frames still to send and the shared-memory spec ``[(index, name, size,
    generation)]`` (empty when nothing moved); ``index`` is the frame's place in ``frames``,
    ``generation`` 0 for a one-off file.
    """
    if not peer_host or peer_host != host_key():
        return frames, []
    spec = []
    kept = []
    for index, frame in enumerate(frames):
        size = frame.nbytes if isinstance(frame, memoryview) else len(frame)
        row = _export_frame(frame, tag, pool) if size >= THRESHOLD else None
        if row is None:
            kept.append(frame)
        else:
            spec.append((index, *row))
    return (kept, spec) if spec else (frames, [])


def _export_frame(frame: Any, tag: str, pool: Any) -> tuple[str, int, int] | None:
    if pool is not None:
        row = pool.export(frame)
        if row is not None:
            return row  # type: ignore[no-any-return]
    exported = export(frame, tag)
    return None if exported is None else (exported[0], exported[1], 0)


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
    for index, name, size, generation in rows:
        if error is not None:
            _give_up(name, generation)
            continue
        try:
            attached[index] = (
                attach_segment(name, size, generation) if generation else attach(name, size)
            )
        except (OSError, ValueError) as exc:
            error = exc
    if error is not None:
        raise SharedMemoryLost(f"shared-memory frame lost: {error}") from error
    rest = iter(kept)
    return [attached[i] if i in attached else next(rest) for i in range(len(kept) + len(rows))]


def _give_up(name: str, generation: int) -> None:
    """A receiver's side of a file or segment it will not take in."""
    if generation:
        decline_segment(name, generation)
    else:
        discard(name)


def discard_spec(spec: list, pool: Any = None) -> None:
    """A sender's side of a message that could not be sent: its files and ``pool``'s segments
    are free again."""
    for _, name, _, generation in spec:
        if generation and pool is not None:
            pool.cancel(name, generation)
        elif not generation:
            discard(name)


def _check_spec(spec: Any, count: int) -> list[tuple[int, str, int, int]]:
    rows = [(int(i), str(name), int(size), int(gen)) for i, name, size, gen in spec]
    indices = {row[0] for row in rows}
    if len(indices) != len(rows) or not indices <= set(range(count)):
        raise ValueError("malformed shared-memory spec")
    return rows


def total(spec: list) -> int:
    """Bytes a shared-memory spec carries."""
    return sum(int(row[2]) for row in spec)
