"""Numbers the I/O thread keeps for a long time, written so they do not pin released memory.

After a burst of tasks is released, one live object in a 1 MiB pymalloc arena keeps the whole
arena resident. ``benchmarks/pinned_arenas.py`` found the arenas left after 100,000 released
futures each kept by a number or two written while the burst ran or was released: counters
(``stats['finished']``, the scheduler's sequence number, bytes received) and timestamps
(``_last_seen``, ``_last_ping``...). So:

- instants kept across ticks are integer milliseconds (:func:`stamp`), not floats: a new float
  comes first from CPython's float free list, which after a release hands out the burst's own
  blocks, scattered over its arenas, while a new int comes from the allocator's current pool,
  where the others are too;
- counters are copied afresh on the compaction tick (:func:`renewed`), which moves the ones
  written mid-burst into that same pool.

Measured: arenas left after 100,000 released futures 13 -> 7-9 (``benchmarks/pinned_arenas.py``);
memory returned, six runs of ``run.py --workloads memory``: median 87.7 % -> 92 %.
"""

from __future__ import annotations


def stamp(now: float) -> int:
    """``now`` (seconds, ``time.monotonic()``) as an instant to keep."""
    return int(now * 1000)


def since(now: float, stamped: int) -> float:
    """Seconds from the instant ``stamped`` to ``now``."""
    return now - stamped / 1000


def renewed(count: int) -> int:
    """``count`` as a new int object, from the allocator's current pool (ints up to 256 are
    shared ones, and stay as they are)."""
    return count + 0
