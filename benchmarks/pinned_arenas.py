"""What keeps memory after a burst of tasks is released: the live blocks in pinned arenas.

    python benchmarks/pinned_arenas.py [N]

Submits N (100,000) no-op tasks, waits for them, releases every future, waits until the
scheduler has forgotten them, then prints the RSS left over and, for every pymalloc arena made
during the burst that is still allocated, the objects still alive in it. One live object keeps
its whole 1 MiB arena resident, which is what the ``memory`` workload's "returned" share
measures. Where an object is an attribute of the executor's client, scheduler or server, its
path is named (``ex._core.stats['finished']``).

It reads CPython's pool headers (``Objects/obmalloc.c``: 16 KiB pools, a 48-byte header with the
block count, size class and arena index) through ``ctypes``, so it runs only on 64-bit
CPython 3.10 to 3.12; a diagnostic, not a benchmark.
"""

from __future__ import annotations

import collections
import ctypes
import gc
import os
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import tasks  # noqa: E402
import workloads  # noqa: E402

import meshpool  # noqa: E402

POOL = 1 << 14
HEADER = 48
_U = ctypes.c_uint
_P = ctypes.c_void_p


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _anonymous_regions() -> list[tuple[int, int]]:
    regions = []
    with open("/proc/self/maps") as f:
        for line in f:
            parts = line.split()
            if parts[1].startswith("rw") and len(parts) < 6:  # no file name: anonymous
                lo, hi = (int(x, 16) for x in parts[0].split("-"))
                regions.append((lo, hi))
    return regions


def used_pools() -> dict[int, tuple[int, int, int]]:
    """Pool address -> (blocks in use, block size, arena index), for every pool in use."""
    found = {}
    for lo, hi in _anonymous_regions():
        address = (lo + POOL - 1) & ~(POOL - 1)
        while address + POOL <= hi:
            count = _U.from_address(address).value
            size_index = _U.from_address(address + 36).value
            next_offset = _U.from_address(address + 40).value
            max_next_offset = _U.from_address(address + 44).value
            size = (size_index + 1) * 16
            if (
                size_index < 32
                and max_next_offset == POOL - size  # (exact: what a real pool header says)
                and HEADER <= next_offset <= POOL
                and 0 < count <= (POOL - HEADER) // size
            ):
                found[address] = (count, size, _U.from_address(address + 32).value)
            address += POOL
    return found


def live_blocks(pool: int, size: int) -> list[int]:
    free = set()
    block = _P.from_address(pool + 8).value
    while block and pool <= block < pool + POOL and len(free) < POOL:
        free.add(block)
        block = _P.from_address(block).value
    end = pool + _U.from_address(pool + 40).value
    return [b for b in range(pool + HEADER, end, size) if b not in free]


def _known_types() -> dict[int, type]:
    known = {id(t): t for t in (int, float, str, bytes, tuple, list, dict, set, bytearray)}
    known.update((id(o), o) for o in gc.get_objects() if isinstance(o, type))
    return known


def describe(block: int, known: dict[int, type], names: dict[int, str]) -> str:
    """The object in ``block`` (plain, or after a GC header), if it looks like one."""
    for offset in (0, 16):
        address = block + offset
        kind = known.get(_P.from_address(address + 8).value)
        refcount = ctypes.c_ssize_t.from_address(address).value
        if kind is None or not 0 < refcount < 1 << 40:
            continue
        text = kind.__name__
        if kind in (int, float, str, bytes):
            text += " " + repr(ctypes.cast(address, ctypes.py_object).value)[:40]
        return f"{text} {names.get(address, '')}".rstrip()
    return "(not an object: a buffer)"


def _unnamed(description: str) -> bool:
    named = " ex." in description or (description.endswith(")") and " (" in description)
    return not named


def name_numbers(root: object, path: str, names: dict[int, str], depth: int = 0) -> None:
    """Record the attribute path of every int and float reachable from ``root`` (a few levels)."""
    if type(root) in (int, float):
        names.setdefault(id(root), path)
        return
    if depth > 4:
        return
    if isinstance(root, dict):
        items = [(f"[{k!r}]", v) for k, v in list(root.items())[:64]]
    elif isinstance(root, (list, tuple)):
        items = [(f"[{i}]", v) for i, v in enumerate(root[:64])]
    elif type(root).__module__.startswith("meshpool"):
        attrs = dict(getattr(root, "__dict__", {}))
        for cls in type(root).__mro__:
            attrs.update(
                (n, getattr(root, n)) for n in getattr(cls, "__slots__", ()) if hasattr(root, n)
            )
        items = [(f".{k}", v) for k, v in attrs.items()]
    else:
        return
    for suffix, value in items:
        name_numbers(value, path + suffix, names, depth + 1)


def main() -> None:
    if sys.implementation.name != "cpython" or not (3, 10) <= sys.version_info[:2] <= (3, 12):
        sys.exit("needs 64-bit CPython 3.10-3.12 (it reads pymalloc's pool headers)")
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 100_000
    with meshpool.Executor(2) as ex:
        for _ in range(3):
            ex.submit(tasks.noop, 1).result()
        gc.collect()
        before = _rss()
        arenas_before = {arena for _, _, arena in used_pools().values()}
        futures = [ex.submit(tasks.noop, i) for i in range(n)]
        meshpool.wait(futures)
        held = _rss()
        del futures
        gc.collect()
        while ex._scheduler_info()["tasks"]:
            time.sleep(0.05)
        time.sleep(0.5)
        gc.collect()
        workloads._malloc_trim()  # (as the memory workload does)
        after = _rss()
        print(
            f"{n:,} tasks: held {(held - before) / 2**20:.1f} MiB, "
            f"left {(after - before) / 2**20:.1f} MiB ({100 * (held - after) / (held - before):.1f} % returned)"
        )
        pinned = collections.defaultdict(list)  # (found before this script makes anything)
        for pool, (count, size, arena) in used_pools().items():
            if arena not in arenas_before:
                pinned[arena].append((pool, count, size, live_blocks(pool, size)))
        names: dict[int, str] = {}
        name_numbers(ex, "ex", names)
        frames = sys._current_frames()
        for thread in threading.enumerate():
            frame = frames.get(thread.ident or 0)
            while frame is not None:
                for local, value in list(frame.f_locals.items()):
                    names.setdefault(id(value), f"({thread.name}: {frame.f_code.co_name}.{local})")
                frame = frame.f_back
        known = _known_types()
        print(f"arenas made during the burst and still allocated: {len(pinned)}")
        for arena, pools in sorted(pinned.items()):
            for _, count, size, blocks in pools:
                # named objects first (the I/O thread runs meanwhile: a block listed may have
                # been freed or reused since, so "in use" counts are the pool header's)
                described = sorted((describe(b, known, names) for b in blocks), key=_unnamed)
                shown = "; ".join(described[:3])
                more = f" (+{len(described) - 3})" if len(described) > 3 else ""
                print(f"  arena {arena}, {size}-byte blocks, {count} in use: {shown}{more}")


if __name__ == "__main__":
    main()
