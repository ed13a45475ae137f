"""Round trips of two meshpool source trees and ProcessPoolExecutor, side by side.

On a shared, noisy machine a change of 5-10 % in a round trip only shows when the versions run
alternately, many times: each round runs the old tree, the new tree and ProcessPoolExecutor, each
in a fresh process doing ``n`` sequential ``submit(noop, i).result()`` calls (after a warm-up),
and the rounds are compared pair by pair. The host's steal time per round (``/proc/stat``) is
reported too: rounds with little of it are the ones to trust.

    git worktree add /tmp/old <commit>
    python benchmarks/ab_latency.py --old /tmp/old/src --new src --rounds 24

Prints each round (µs: old p50/p99, new p50/p99, ProcessPool p50/p99, steal ticks) and a summary.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))

PROBE = """
import statistics, sys, time
sys.path.insert(0, {src!r}); sys.path.insert(1, {here!r})
import tasks
if {src!r}:
    import meshpool
    assert meshpool.__file__.startswith({src!r}), meshpool.__file__
    ex = meshpool.Executor(2)
    ex.wait_for_workers(2, timeout=60)
else:
    from concurrent.futures import ProcessPoolExecutor
    ex = ProcessPoolExecutor(2)
for i in range(100):
    ex.submit(tasks.noop, i).result()
lat = []
for i in range({n}):
    t0 = time.perf_counter()
    ex.submit(tasks.noop, i).result()
    lat.append(time.perf_counter() - t0)
lat.sort()
print(round(statistics.median(lat) * 1e6), round(lat[int(len(lat) * 0.99)] * 1e6))
ex.shutdown()
"""


def probe(src: str, n: int) -> tuple[int, int]:
    code = PROBE.format(src=os.path.abspath(src) if src else "", here=HERE, n=n)
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True
    )
    p50, p99 = out.stdout.split()
    return int(p50), int(p99)


def steal_ticks() -> int:
    with open("/proc/stat") as f:
        return int(f.readline().split()[8])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--old", required=True, help="the old tree's src directory")
    parser.add_argument("--new", default=os.path.join(HERE, "..", "src"))
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("-n", type=int, default=1500, help="round trips per run")
    args = parser.parse_args()
    rows = []
    for _ in range(args.rounds):
        before = steal_ticks()
        row = (*probe(args.old, args.n), *probe(args.new, args.n), *probe("", args.n))
        rows.append((*row, steal_ticks() - before))
        print(*rows[-1], flush=True)
    med = statistics.median
    for name, i in (("old", 0), ("new", 2), ("ProcessPool", 4)):
        print(
            f"{name}: p50 {med(r[i] for r in rows):.0f} µs, p99 {med(r[i + 1] for r in rows):.0f}"
        )
    print(
        f"new/old {med(r[2] / r[0] for r in rows):.3f} (faster in "
        f"{sum(r[2] < r[0] for r in rows)} of {len(rows)}); new/ProcessPool "
        f"{med(r[2] / r[4] for r in rows):.3f} (faster in {sum(r[2] < r[4] for r in rows)}); "
        f"old/ProcessPool {med(r[0] / r[4] for r in rows):.3f}"
    )
    calm = [r for r in rows if r[6] < 30]
    if calm:
        print(
            f"{len(calm)} rounds with < 30 steal ticks: new/old "
            f"{med(r[2] / r[0] for r in calm):.3f}, new/ProcessPool {med(r[2] / r[4] for r in calm):.3f}"
        )


if __name__ == "__main__":
    main()
