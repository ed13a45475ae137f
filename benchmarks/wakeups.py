"""How long one thread takes to wake another in this process, through a lock and through a pipe.

Two threads hand control back and forth N times (a ping-pong); the median round trip is two
hand-overs. On this project's 2-vCPU VM a lock's waiter is woken on the other (idle) CPU, an
inter-processor interrupt and a VM exit, while a pipe's reader is woken "synchronously", on the
writer's CPU (BENCHMARKS.md, session 6, says what this did and did not mean for round trips)::

    python benchmarks/wakeups.py [N]
"""

from __future__ import annotations

import os
import statistics
import sys
import threading
import time


def lock_ping_pong(n: int) -> float:
    ping, pong = threading.Lock(), threading.Lock()
    ping.acquire()
    pong.acquire()

    def other() -> None:
        for _ in range(n):
            ping.acquire()
            pong.release()

    thread = threading.Thread(target=other)
    thread.start()
    times = []
    for _ in range(n):
        start = time.perf_counter_ns()
        ping.release()
        pong.acquire()
        times.append(time.perf_counter_ns() - start)
    thread.join()
    return statistics.median(times) / 1000


def pipe_ping_pong(n: int) -> float:
    ping_r, ping_w = os.pipe()
    pong_r, pong_w = os.pipe()

    def other() -> None:
        for _ in range(n):
            os.read(ping_r, 1)
            os.write(pong_w, b"x")

    thread = threading.Thread(target=other)
    thread.start()
    times = []
    for _ in range(n):
        start = time.perf_counter_ns()
        os.write(ping_w, b"x")
        os.read(pong_r, 1)
        times.append(time.perf_counter_ns() - start)
    thread.join()
    for fd in (ping_r, ping_w, pong_r, pong_w):
        os.close(fd)
    return statistics.median(times) / 1000


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 3000
    for _ in range(3):
        lock, pipe = lock_ping_pong(n), pipe_ping_pong(n)
        print(f"round trip between two threads, median: lock {lock:.1f} µs, pipe {pipe:.1f} µs")


if __name__ == "__main__":
    main()
