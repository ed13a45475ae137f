"""CPU time per small task, per process: where a no-op task's cost lands.

    python benchmarks/cpu_per_task.py [--system meshpool|processpool] [--tasks 10000] [--rounds 5]

Submits ``--tasks`` no-op tasks and waits for all results, ``--rounds`` times, and reports the
user and system CPU time each process of the executor spent per task (the caller first, which
for meshpool holds the embedded scheduler; then the workers). On a shared machine CPU time moves
far less than wall time, so it shows where a change saves work when throughput figures are
drowned in noise.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import psutil

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from tasks import noop  # noqa: E402


def _cpu(procs: list[psutil.Process]) -> list[tuple[float, float]]:
    times = []
    for proc in procs:
        try:
            t = proc.cpu_times()
            times.append((t.user, t.system))
        except psutil.Error:
            times.append((0.0, 0.0))
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--system", default="meshpool", choices=["meshpool", "processpool"])
    parser.add_argument("--tasks", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    if args.system == "meshpool":
        import meshpool

        ex = meshpool.Executor(2)
    else:
        from concurrent.futures import ProcessPoolExecutor

        ex = ProcessPoolExecutor(2)
    with ex:
        [f.result() for f in [ex.submit(noop, i) for i in range(2_000)]]  # warm up
        me = psutil.Process()
        procs = [me, *me.children(recursive=True)]
        before = _cpu(procs)
        start = time.perf_counter()
        for _ in range(args.rounds):
            [f.result() for f in [ex.submit(noop, i) for i in range(args.tasks)]]
        elapsed = time.perf_counter() - start
        after = _cpu(procs)
    n = args.tasks * args.rounds
    print(f"{args.system}: {n / elapsed:,.0f} tasks/s; CPU µs per task (user + system):")
    for i, (b, a) in enumerate(zip(before, after, strict=True)):
        name = "caller" if i == 0 else f"process {i}"
        user, system = (a[0] - b[0]) / n * 1e6, (a[1] - b[1]) / n * 1e6
        print(f"  {name:10s} {user:6.0f} + {system:4.0f} = {user + system:6.0f}")


if __name__ == "__main__":
    main()
