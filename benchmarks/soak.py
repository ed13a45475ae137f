"""Soak: memory over time while tasks are submitted and released, and along a long chain.

    python benchmarks/soak.py [--tasks 1000000] [--chain 1000000] [--every 100000]

Prints, every ``--every`` tasks, the RSS of the caller (which holds the embedded scheduler)
and of each worker, then the growth per 100,000 tasks after the first sample (warm-up).
Not part of CI: a million tasks take several minutes here.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time

import psutil

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from tasks import noop  # noqa: E402

import meshpool  # noqa: E402


def step(x: int) -> int:
    return x + 1


def _rss(pids: list[int]) -> list[float]:
    return [psutil.Process(p).memory_info().rss / 2**20 for p in pids]


def _report(name: str, samples: list[tuple[int, list[float]]]) -> None:
    print(f"\n{name}: tasks, RSS MB [caller+scheduler, workers...]")
    for done, rss in samples:
        print(f"  {done:>9,}  " + "  ".join(f"{r:7.1f}" for r in rss))
    if len(samples) >= 3:
        (n0, first), (n1, last) = samples[1], samples[-1]
        per = (n1 - n0) / 100_000
        growth = [(b - a) / a * 100 / per for a, b in zip(first, last, strict=True)]
        print(
            "  growth per 100,000 tasks after warm-up: " + ", ".join(f"{g:+.2f}%" for g in growth)
        )


def soak_submit_release(ex: meshpool.Executor, total: int, every: int, pids: list[int]) -> None:
    samples = []
    done = 0
    batch = 10_000
    while done < total:
        futures = [ex.submit(noop, i) for i in range(batch)]
        meshpool.wait(futures)
        del futures
        done += batch
        if done % every == 0:
            gc.collect()
            samples.append((done, _rss(pids)))
    _report("submit and release", samples)


def soak_chain(ex: meshpool.Executor, total: int, every: int, pids: list[int]) -> None:
    samples = []
    x = ex.submit(step, 0)
    for done in range(1, total + 1):
        x = ex.submit(step, x)
        if done % 10_000 == 0:
            meshpool.wait([x])  # keep the backlog bounded, as a real loop would
        if done % every == 0:
            gc.collect()
            samples.append((done, _rss(pids)))
    assert x.result() == total + 1
    _report("x = submit(step, x)", samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=1_000_000)
    parser.add_argument("--chain", type=int, default=1_000_000)
    parser.add_argument("--every", type=int, default=100_000)
    args = parser.parse_args()
    started = time.perf_counter()
    with meshpool.Executor(2) as ex:
        ex.wait_for_workers(2)
        pids = [os.getpid()] + [w["pid"] for w in ex.workers()]
        if args.tasks:
            soak_submit_release(ex, args.tasks, args.every, pids)
        if args.chain:
            soak_chain(ex, args.chain, args.every, pids)
    print(f"\n{time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
