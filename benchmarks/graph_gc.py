"""How much of the graph-scaling workload is Python's garbage collector.

    python benchmarks/graph_gc.py [--off]

Runs ``Executor.get`` on the ``graph_scale`` workload's reduction trees of 30,000 and 300,000
tasks and prints the time per task of each; ``--off`` disables the cyclic collector around each
``get()``. Cost that grows with the graph only when the collector runs is the collector's: each
full collection scans every live object, and a big graph keeps more of them alive.
"""

from __future__ import annotations

import gc
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import tasks  # noqa: E402
import workloads  # noqa: E402

import meshpool  # noqa: E402


def main() -> None:
    off = "--off" in sys.argv[1:]
    with meshpool.Executor(2) as ex:
        ex.submit(tasks.noop, 1).result()
        for n in (30_000, 300_000):
            dsk, root = workloads._fan_in_graph(n)
            gc.collect()
            if off:
                gc.disable()
            try:
                t0 = time.perf_counter()
                ex.get(dsk, root)
                elapsed = time.perf_counter() - t0
            finally:
                gc.enable()
            label = "gc off" if off else "gc on"
            print(
                f"{label}: {len(dsk):,} tasks in {elapsed:.2f} s, {elapsed / len(dsk) * 1e6:.0f} us/task"
            )
            del dsk


if __name__ == "__main__":
    main()
