"""Large buffers between peers on one host: private files in ``/dev/shm`` instead of sockets.

A socket copies every byte through the kernel twice; between two processes that share a host
(and a network namespace, so a test's "hosts" stay apart) a big frame instead goes like this::

    sender:   os.write(buffer) into a new 0600 file /dev/shm/meshpool-<uid>-<pid>-<random>
    message:  carries (name, size) in place of the frame
    receiver: mmap(MAP_PRIVATE) the file, unlink it, unpickle over the mapping (no copy)

The mapping is copy-on-write, so arrays rebuilt on it are writable, and it lives as long as they
do. A file is unlinked by its receiver at once; one whose receiver never came (it died) is
removed by :func:`remove_orphans`, which the local cluster and nannies run when a process dies or
the cluster stops: files of processes that no longer exist are orphans. When ``/dev/shm`` is
missing or too full, :func:`export` declines and the frame goes through the socket.
"""

from __future__ import annotations

import mmap
import os
import uuid
from functools import lru_cache
from typing import Any

SHM_DIR = "/dev/shm"
THRESHOLD = 1 << 20  # frames at least this big take the shared-memory path
FREE_MARGIN = 64 << 20  # leave this much of /dev/shm free for everybody else


@lru_cache(maxsize=1)
def host_key() -> str:
    """Identifies "the same host and network namespace"; "" where shared memory is unusable."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
        netns = os.stat("/proc/self/ns/net").st_ino
        shm = os.stat(SHM_DIR)
    except OSError:
        return ""
    if not os.access(SHM_DIR, os.W_OK):
        return ""
    return f"{boot}:{netns}:{shm.st_dev}"


def _prefix() -> str:
    return f"meshpool-{os.getuid()}-{os.getpid()}-"


def export(buffer: Any) -> tuple[str, int] | None:
    """Copy a buffer into a new private shared-memory file; None if there is no room."""
    view = memoryview(buffer).cast("B")
    size = view.nbytes
    try:
        stats = os.statvfs(SHM_DIR)
    except OSError:
        return None
    if stats.f_bavail * stats.f_frsize < size + FREE_MARGIN:
        return None
    name = _prefix() + uuid.uuid4().hex
    path = os.path.join(SHM_DIR, name)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError:
        return None
    try:
        written = 0
        while written < size:
            written += os.write(fd, view[written:])
    except OSError:
        os.close(fd)
        _unlink(path)
        return None
    os.close(fd)
    return name, size


def attach(name: str, size: int) -> memoryview:
    """Map an exported file copy-on-write and unlink it; the mapping outlives the name."""
    if "/" in name or not name.startswith("meshpool-"):
        raise ValueError(f"not a meshpool shared-memory name: {name!r}")
    path = os.path.join(SHM_DIR, name)
    fd = os.open(path, os.O_RDONLY)
    try:
        if size == 0:
            return memoryview(b"")
        mapping = mmap.mmap(fd, size, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    finally:
        os.close(fd)
        _unlink(path)
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


def remove_orphans() -> int:
    """Remove this user's files whose creating process no longer exists; return how many."""
    mine = f"meshpool-{os.getuid()}-"
    removed = 0
    try:
        names = os.listdir(SHM_DIR)
    except OSError:
        return 0
    for name in names:
        if not name.startswith(mine):
            continue
        pid_text = name[len(mine) :].split("-", 1)[0]
        if not pid_text.isdigit() or _alive(int(pid_text)):
            continue
        _unlink(os.path.join(SHM_DIR, name))
        removed += 1
    return removed


def remove_own() -> None:
    """Remove every file this process exported (at exit)."""
    prefix = _prefix()
    try:
        names = os.listdir(SHM_DIR)
    except OSError:
        return
    for name in names:
        if name.startswith(prefix):
            _unlink(os.path.join(SHM_DIR, name))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# --- frames <-> shared memory ------------------------------------------------------------------


def pack_frames(frames: list, peer_host: str) -> tuple[list, list | None]:
    """Move big frames of one value to shared memory if the peer shares our host.

    Returns the frames still to send and the shared-memory spec ``[(index, name, size)]`` (None
    when nothing moved).
    """
    if not peer_host or peer_host != host_key():
        return frames, None
    spec = []
    kept = []
    for index, frame in enumerate(frames):
        size = frame.nbytes if isinstance(frame, memoryview) else len(frame)
        exported = export(frame) if size >= THRESHOLD else None
        if exported is None:
            kept.append(frame)
        else:
            spec.append((index, exported[0], exported[1]))
    return (kept, spec) if spec else (frames, None)


def unpack_frames(kept: list, spec: list | None) -> list:
    """Rebuild a value's frames from those received and its shared-memory spec."""
    if not spec:
        return kept
    total = len(kept) + len(spec)
    by_index = {index: (name, size) for index, name, size in spec}
    rest = iter(kept)
    return [
        attach(*by_index[i]) if i in by_index else next(rest)  # type: ignore[misc]
        for i in range(total)
    ]
