"""What moving a big buffer between two processes on one host costs, step by step (CPU time).

The measurements behind ``transport/shm.py`` and ``transport/shmpool.py``
(docs/architecture.md, "Shared memory on one host"); one process plays both sides, which is what
each side pays. Medians of ``--repeat`` rounds, in ms of CPU (wall in brackets).

    python benchmarks/shm_copies.py [--mb 200] [--repeat 5]
"""

from __future__ import annotations

import argparse
import mmap
import os
import statistics
import time
import uuid

import numpy as np

HEADER = 4096
MADV_POPULATE_READ = 22


def _timed(fn, repeat: int, setup=None) -> tuple[float, float]:
    cpu, wall = [], []
    for _ in range(repeat):
        state = setup() if setup else None
        w, c = time.perf_counter(), time.process_time()
        fn(state)
        cpu.append(time.process_time() - c)
        wall.append(time.perf_counter() - w)
    return statistics.median(cpu) * 1e3, statistics.median(wall) * 1e3


def _path() -> str:
    return f"/dev/shm/meshpool-{os.getuid()}-{os.getpid()}-bench-{uuid.uuid4().hex}"


def _pwrite(fd: int, view: memoryview, offset: int = 0) -> None:
    done = 0
    while done < view.nbytes:
        done += os.pwrite(fd, view[done:], offset + done)


def _segment(view: memoryview, populate: bool) -> tuple[str, mmap.mmap]:
    """A segment as a pool leaves it after its first transfer (pages made by pwrite)."""
    path = _path()
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.ftruncate(fd, HEADER + view.nbytes)
        _pwrite(fd, view, HEADER)
        mapping = mmap.mmap(fd, HEADER + view.nbytes, flags=mmap.MAP_SHARED)
    finally:
        os.close(fd)
    if populate:
        mapping.madvise(MADV_POPULATE_READ, HEADER, view.nbytes)
    return path, mapping


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=200)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    size = args.mb * 2**20
    source = np.random.default_rng(0).random(size // 8)
    view = memoryview(source).cast("B")
    rows: list[tuple[str, tuple[float, float]]] = []

    def one_off(_):
        path = _path()
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        _pwrite(fd, view)
        os.close(fd)
        os.unlink(path)

    rows.append(("sender: write a new tmpfs file (one-off path)", _timed(one_off, args.repeat)))

    path, seg = _segment(view, populate=True)
    target = memoryview(seg)

    def reuse(_):
        target[HEADER : HEADER + size] = view

    rows.append(("sender: memcpy into a reused segment (pool)", _timed(reuse, args.repeat)))

    def first_reuse(populate: bool):
        def setup():
            return _segment(view, populate=False)

        def run(state):
            p, m = state
            if populate:
                m.madvise(MADV_POPULATE_READ, HEADER, size)
            with memoryview(m) as t:
                t[HEADER : HEADER + size] = view
            m.close()
            os.unlink(p)

        return _timed(run, args.repeat, setup)

    rows.append(("sender: first reuse, write faults", first_reuse(False)))
    rows.append(("sender: first reuse, MADV_POPULATE_READ + memcpy", first_reuse(True)))

    def fresh_map_sum(_):
        fd = os.open(path, os.O_RDWR)
        m = mmap.mmap(fd, HEADER + size, flags=mmap.MAP_SHARED)
        os.close(fd)
        np.frombuffer(m, np.float64, offset=HEADER).sum()
        m.close()

    rows.append(("receiver: map + sum (first transfer)", _timed(fresh_map_sum, args.repeat)))
    fd = os.open(path, os.O_RDWR)
    kept = mmap.mmap(fd, HEADER + size, flags=mmap.MAP_SHARED)
    os.close(fd)
    np.frombuffer(kept, np.float64, offset=HEADER).sum()

    def kept_map_sum(_):
        np.frombuffer(kept, np.float64, offset=HEADER).sum()

    rows.append(("receiver: sum over its kept mapping (pool)", _timed(kept_map_sum, args.repeat)))
    reused = np.empty(size, np.uint8)
    reused[:] = 0

    def copy_out_sum(_):
        reused[:] = np.frombuffer(kept, np.uint8, offset=HEADER)
        reused.view(np.float64).sum()

    rows.append(("receiver: copy out into reused heap + sum", _timed(copy_out_sum, args.repeat)))
    rows.append(("(heap: sum alone)", _timed(lambda _: source.sum(), args.repeat)))
    kept.close()
    target.release()
    seg.close()
    os.unlink(path)
    print(f"{args.mb} MB, median of {args.repeat}: CPU ms (wall ms)")
    for label, (cpu, wall) in rows:
        print(f"  {label:<52} {cpu:7.1f}  ({wall:.1f})")


if __name__ == "__main__":
    main()
