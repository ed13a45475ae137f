"""A sender's pool of reused shared-memory segments (the receiving side is in ``shm.py``).

Writing 100 MB into a new tmpfs file costs ~80 ms of CPU here, nearly all of it allocating 4 KiB
pages (on this VM touching memory the process has not used lately costs more still); a
``memcpy`` into pages allocated before costs ~8 ms. So a worker or client keeps the files it sent
big frames through, and sends the next frames through them again::

    export:   a free segment big enough?  memcpy into our mapping of it, mark it SENT
              none?                        a new file (pwrite: allocation without zeroing)
    receiver: maps it (once; the mapping is kept), marks it TAKEN with its pid, builds the value
              on the mapping; the last reference to that view gone, marks it FREE
    trim:     (on the owner's tick) a TAKEN segment whose receiver died is free again; one SENT
              and never taken within shm.EXPIRY is removed (never reused: a receiver may still
              be reading it); free segments idle for POOL_IDLE s, or beyond MESHPOOL_SHM_POOL
              bytes of them, are removed
    arena:    (:meth:`SegmentPool.add_arena`, workers only, ``arena.py``) one free segment
              whose pages an idle-priority child process makes ahead, so that even the first
              big transfer copies into existing pages: kept until idle for ARENA_IDLE s, the
              owner exits, or memory runs short

A segment is written only while FREE, so a view handed to a receiver stays valid for as long as
the receiver holds it, however long that is; meanwhile other transfers use other segments. Names
follow ``shm``'s (``meshpool-<uid>-<pid>-<tag>-pool-<random>``): the owner's ``remove_own`` and
the orphan sweep of dead pids remove them like one-off files, and a receiver's mapping outlives
the name. A receiver's pid can be reused after it died, which keeps its segment taken until the
owner exits (never freed too early).
"""

from __future__ import annotations

import errno
import mmap
import os
import threading
import time
import uuid
from typing import Any

from ..pinning import since, stamp
from . import shm

POOL_IDLE = 60.0  # seconds a free segment is kept for reuse
ARENA_IDLE = 600.0  # ...and the arena (an idle cluster gives its memory back)
POOL_BYTES = 1 << 30  # free segments kept at most, per pool (or an eighth of /dev/shm if less)
TRIM_INTERVAL = 1.0  # seconds between trims on the owner's tick
MADV_POPULATE_READ = 22  # Linux 5.14+ (the mmap module names them from Python 3.13 only)
MADV_POPULATE_WRITE = 23


def pool_bytes() -> int:
    """``MESHPOOL_SHM_POOL``: bytes of free segments a pool keeps; 0 turns pools off. By default
    :data:`POOL_BYTES`, or an eighth of ``/dev/shm`` if that is less (every worker has a pool)."""
    try:
        return int(os.environ["MESHPOOL_SHM_POOL"])
    except (KeyError, ValueError):
        pass
    try:
        stats = os.statvfs(shm.SHM_DIR)
    except OSError:
        return 0
    return min(POOL_BYTES, stats.f_blocks * stats.f_frsize // 8)


def capacity_for(size: int) -> int:
    """Segment sizes come in steps of 1/8 of a power of two (at most 12.5 % unused), so that a
    segment fits the next transfer of about the same size and receivers make few ctypes types."""
    step = max(mmap.PAGESIZE, 1 << max(0, size.bit_length() - 4))
    return -(-size // step) * step


class _Segment:
    __slots__ = (
        "name",
        "capacity",
        "mapping",
        "generation",
        "busy",
        "sent_at",
        "idle_since",
        "written",
        "populated",
        "inode",
        "arena",
    )

    def __init__(
        self, name: str, capacity: int, mapping: mmap.mmap, written: int, inode: int
    ) -> None:
        self.name = name
        self.inode = inode
        self.capacity = capacity
        self.mapping = mapping
        self.written = written  # data bytes whose pages exist (pwrite made them)
        self.populated = 0  # data bytes our mapping has page-table entries for
        self.generation = 1
        self.busy = True  # handed out; free again when its receiver says so
        self.sent_at = time.time()
        self.idle_since = 0  # (a pinning.stamp())
        self.arena = False  # the arena (add_arena): kept while idle, taken by smaller frames


def _same_file(segment: _Segment) -> bool:
    try:
        return os.stat(os.path.join(shm.SHM_DIR, segment.name)).st_ino == segment.inode
    except OSError:
        return False


def _populate(segment: _Segment, size: int) -> None:
    """Fill our mapping's page tables for the existing pages a transfer of ``size`` bytes will
    write: 35 ms for 200 MB, where the write faults of a plain memcpy would cost ~125 ms. Only
    as far as this transfer goes: a 32 MB frame through the 256 MiB arena maps 32 MB."""
    end = min(size, segment.written)
    start = segment.populated // mmap.PAGESIZE * mmap.PAGESIZE
    if end <= start:
        return
    segment.populated = end
    try:
        segment.mapping.madvise(MADV_POPULATE_READ, shm.HEADER + start, end - start)
    except (OSError, ValueError):  # an older kernel: the copy faults them in
        pass


def _allocate(segment: _Segment, size: int) -> bool:
    """Make the pages up to ``size`` that no transfer has written yet (a bigger frame than
    before, or an arena only partly made) before copying into them, where /dev/shm running
    full is an error rather than the SIGBUS a copy into the mapping would get. False if full."""
    start = (shm.HEADER + segment.written) // mmap.PAGESIZE * mmap.PAGESIZE
    try:
        segment.mapping.madvise(MADV_POPULATE_WRITE, start, shm.HEADER + size - start)
    except OSError as exc:  # full; or an older kernel (EINVAL): then the copy faults them in
        return exc.errno in (errno.EINVAL, errno.ENOSYS)
    segment.written = segment.populated = size
    return True


class SegmentPool:
    """The segments one worker or client sends big frames through (thread-safe)."""

    def __init__(self, tag: str, keep: int | None = None) -> None:
        self.tag = tag
        self.keep = pool_bytes() if keep is None else keep
        self._segments: dict[str, _Segment] = {}
        self._lock = threading.Lock()
        self._last_trim = 0  # (instants kept as pinning.stamp()s)
        self.closed = False

    @property
    def enabled(self) -> bool:
        return self.keep > 0 and not self.closed

    def export(self, buffer: Any) -> tuple[str, int, int] | None:
        """Copy ``buffer`` into a segment and mark it sent: ``(name, size, generation)``, or
        None (pools off, or no room in ``/dev/shm`` for a new segment)."""
        if not self.enabled:
            return None
        view = memoryview(buffer).cast("B")
        size = view.nbytes
        with self._lock:
            segment = self._take_free(size)
        if segment is None:
            return self._create(view)
        if segment.populated < size:
            _populate(segment, size)
        if size > segment.written and not _allocate(segment, size):
            self.cancel(segment.name, segment.generation)
            return self._create(view)
        with memoryview(segment.mapping) as target:  # (no receiver knows this generation yet)
            target[shm.HEADER : shm.HEADER + size] = view
        segment.written = max(segment.written, size)
        shm._count("sent", size)
        return segment.name, size, segment.generation

    def _take_free(self, size: int) -> _Segment | None:
        """The smallest free segment that fits, marked sent (under the lock: a trim must not
        take it for free while it is being filled)."""
        while True:
            best = self._smallest_free(size)
            if best is None or _same_file(best):
                break
            self._drop(best)  # its file was removed under us: receivers could not open it
        if best is not None:
            best.busy = True
            best.generation += 1
            self._mark_sent(best, size)
        return best

    def _smallest_free(self, size: int) -> _Segment | None:
        """Not one over twice the size this transfer would get (the arena: over eight times): a
        small value held for long would tie up a big segment."""
        best = None
        most = 2 * capacity_for(size)
        for segment in self._segments.values():
            if segment.busy and segment.mapping[shm._STATE] == shm.FREE:
                self._now_free(segment)
            limit = max(most, 8 * size) if segment.arena else most
            fits = not segment.busy and size <= segment.capacity <= limit
            if fits and (best is None or segment.capacity < best.capacity):
                best = segment
        return best

    def _now_free(self, segment: _Segment) -> None:
        segment.busy = False
        segment.idle_since = stamp(time.monotonic())

    def _mark_sent(self, segment: _Segment, size: int) -> None:
        segment.sent_at = now = time.time()
        mapping = segment.mapping
        shm._PID.pack_into(mapping, 12, 0)
        shm._SENT.pack_into(mapping, 16, segment.generation, size, now)
        mapping[shm._STATE] = shm.SENT

    def _create(self, view: memoryview) -> tuple[str, int, int] | None:
        segment = self._new_segment(capacity_for(view.nbytes), view)
        if segment is None:
            return None
        shm._count("sent", view.nbytes)
        return segment.name, view.nbytes, segment.generation

    def _new_segment(self, capacity: int, view: memoryview | None) -> _Segment | None:
        """A new file of ``capacity`` data bytes, registered: sent with ``view`` written into it
        (``pwrite``: tmpfs pages allocated without zeroing), or with ``view`` None the arena,
        free and with no pages yet. None without room, or if the pool closed meanwhile."""
        if not shm.has_room(shm.HEADER + capacity):
            return None
        kind = "" if view is not None else "arena-"
        name = f"{shm.file_prefix(self.tag)}{shm.POOL_MARK[1:]}{kind}{uuid.uuid4().hex}"
        path = os.path.join(shm.SHM_DIR, name)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        except OSError:
            return None
        size = 0 if view is None else view.nbytes
        try:
            os.ftruncate(fd, shm.HEADER + capacity)
            header = bytearray(shm.HEADER)
            header[:8] = shm.MAGIC
            if view is not None:
                header[shm._STATE] = shm.SENT
                shm._SENT.pack_into(header, 16, 1, size, time.time())
            os.pwrite(fd, header, 0)
            if view is not None:
                shm.write_all(fd, view, shm.HEADER)
            mapping = mmap.mmap(fd, shm.HEADER + capacity, flags=mmap.MAP_SHARED)
            inode = os.fstat(fd).st_ino
        except OSError:  # full after all (a race with another writer)
            shm._unlink(path)
            return None
        finally:
            os.close(fd)
        segment = _Segment(name, capacity, mapping, size, inode)
        if view is None:
            segment.arena = True
            self._now_free(segment)
        with self._lock:
            if self.closed:  # closed meanwhile: this one goes too
                self._remove(segment)
                return None
            self._segments[name] = segment
        return segment

    def cancel(self, name: str, generation: int) -> None:
        """A message naming this segment could not be sent: it is free again."""
        with self._lock:
            segment = self._segments.get(name)
            if segment is None or not segment.busy or segment.generation != generation:
                return
            if segment.mapping[shm._STATE] == shm.SENT:
                segment.mapping[shm._STATE] = shm.FREE
                self._now_free(segment)

    def trim(self, force: bool = False) -> None:
        """:meth:`tidy` at most every :data:`TRIM_INTERVAL` (unless ``force``)."""
        now = time.monotonic()
        if force or since(now, self._last_trim) >= TRIM_INTERVAL:
            self._last_trim = stamp(now)
            self.tidy(force)

    def tidy(self, force: bool = False) -> None:
        """Reclaim what dead receivers held, expire what nobody took, drop idle segments; with
        ``force``, every free segment (memory pressure)."""
        now = time.monotonic()
        with self._lock:
            for segment in list(self._segments.values()):
                if segment.busy:
                    self._check_busy(segment)
            free = sorted(
                (s for s in self._segments.values() if not s.busy), key=lambda s: s.idle_since
            )
            kept = sum(s.capacity for s in free if not s.arena)
            for segment in free:  # oldest first
                idle = since(now, segment.idle_since)
                if segment.arena:  # (not counted in the pool's bytes, kept longer)
                    if force or idle > ARENA_IDLE:
                        self._drop(segment)
                elif force or kept > self.keep or idle > POOL_IDLE:
                    kept -= segment.capacity
                    self._drop(segment)

    def _check_busy(self, segment: _Segment) -> None:
        mapping = segment.mapping
        state = mapping[shm._STATE]
        if state == shm.FREE:
            self._now_free(segment)
        elif state == shm.TAKEN:
            pid = shm._PID.unpack_from(mapping, 12)[0]
            if pid and not shm._alive(pid):  # the receiver died holding it
                mapping[shm._STATE] = shm.FREE
                self._now_free(segment)
        elif time.time() - segment.sent_at > shm.EXPIRY:  # SENT, never taken
            self._drop(segment)

    def _drop(self, segment: _Segment) -> None:
        del self._segments[segment.name]
        self._remove(segment)

    @staticmethod
    def _remove(segment: _Segment) -> None:
        shm._unlink(os.path.join(shm.SHM_DIR, segment.name))
        try:
            segment.mapping.close()  # (receivers keep their own mappings)
        except BufferError:  # being filled (closed at exit): unmapped when the copy is done
            pass

    def add_arena(self, nbytes: int) -> str | None:
        """Register the arena: a free segment of ``nbytes`` (rounded up to a capacity) whose
        pages someone is about to allocate (``transport/arena.py``), so that even the first big
        transfer through it copies into existing pages. Its path, or None (no room, no pool).

        Trims keep it until it has been free for :data:`ARENA_IDLE` s (other segments: POOL_IDLE)
        or memory runs short (``tidy(force=True)``). A transfer may take it before its pages are
        all made: :func:`_allocate` makes the rest."""
        segment = self._new_segment(capacity_for(nbytes), None) if self.enabled else None
        return None if segment is None else os.path.join(shm.SHM_DIR, segment.name)

    def arena_made(self, path: str, made: bool) -> None:
        """The arena's pages are all allocated (``made``), or could not be (/dev/shm is full:
        the arena goes, unless a transfer holds it)."""
        with self._lock:
            segment = self._segments.get(os.path.basename(path))
            if segment is None:
                return
            if made:
                segment.written = segment.capacity
            elif not segment.busy:
                self._drop(segment)

    def close(self) -> None:
        """Remove every segment (at the owner's exit); receivers' views stay valid."""
        with self._lock:
            self.closed = True
            for segment in list(self._segments.values()):
                self._drop(segment)

    def statistics(self) -> dict:
        with self._lock:
            segments = list(self._segments.values())
        return {
            "segments": len(segments),
            "bytes": sum(s.capacity for s in segments),
            "free_bytes": sum(s.capacity for s in segments if not s.busy),
        }
