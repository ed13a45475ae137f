"""A library function that takes any ``concurrent.futures.Executor``, run on three of them.

Run it:  python examples/library_backend.py

``parallel_word_count`` is written once against the stdlib's ``Executor`` interface (``map``)
and knows nothing about meshpool. The script runs it unchanged on a ``ThreadPoolExecutor``, on
a meshpool local cluster, and on a "remote" cluster started here with the ``meshpool`` command
(a scheduler and a worker host with two processes, plain TCP on the loopback interface), and
prints the same counts three times. Everything it starts, it stops.
"""

from __future__ import annotations

import itertools
import random
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from concurrent.futures import Executor, ThreadPoolExecutor
from contextlib import contextmanager

import meshpool

# --- the library: knows only concurrent.futures ---------------------------------------------


def count_words(texts: list[str]) -> Counter[str]:
    """Word counts of a few texts (one task)."""
    counts: Counter[str] = Counter()
    for text in texts:
        counts.update(text.lower().split())
    return counts


def parallel_word_count(
    texts: Iterable[str], executor: Executor, chunk_size: int = 200
) -> Counter[str]:
    """Count the words of ``texts`` in chunks on ``executor`` (any concurrent.futures one)."""
    it = iter(texts)
    chunks = iter(lambda: list(itertools.islice(it, chunk_size)), [])
    total: Counter[str] = Counter()
    for counts in executor.map(count_words, chunks):
        total.update(counts)
    return total


# --- the script -----------------------------------------------------------------------------

WORDS = [
    "the",
    "a",
    "cat",
    "dog",
    "sat",
    "ran",
    "on",
    "under",
    "mat",
    "log",
    "quickly",
    "slowly",
    "red",
    "blue",
]
STARTUP_TIMEOUT = 30.0  # seconds for the scheduler and workers to come up (they take ~1 s)


def sample_texts(n: int = 5000, seed: int = 1) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choices(WORDS, k=rng.randint(3, 12))) for _ in range(n)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def remote_cluster(nworkers: int) -> Iterator[str]:
    """``meshpool scheduler`` and ``meshpool worker`` as processes; yields the address."""
    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    meshpool_command = [sys.executable, "-m", "meshpool.cli"]  # the `meshpool` command
    scheduler = subprocess.Popen(
        [*meshpool_command, "scheduler", "--host", "127.0.0.1", "--port", str(port), "--insecure"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    worker = None
    try:
        assert scheduler.stdout is not None
        print("  " + scheduler.stdout.readline().strip())  # "meshpool scheduler at tcp://..."
        worker = subprocess.Popen(
            [*meshpool_command, "worker", address, "--insecure", "--nworkers", str(nworkers)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        yield address
    finally:
        for process in (worker, scheduler):  # workers first: they leave, then the scheduler
            if process is not None:
                process.terminate()
                try:
                    process.wait(STARTUP_TIMEOUT)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()


def report(name: str, counts: Counter[str]) -> None:
    top = ", ".join(f"{word}={n}" for word, n in sorted(counts.items())[:4])
    print(f"{name:>8}: {sum(counts.values())} words, {len(counts)} distinct; {top}, ...")


def main() -> None:
    started = time.perf_counter()
    texts = sample_texts()
    results: dict[str, Counter[str]] = {}

    with ThreadPoolExecutor(4) as pool:
        results["threads"] = parallel_word_count(texts, pool)
    report("threads", results["threads"])

    with meshpool.Executor(2) as executor:  # a local cluster: two worker processes
        results["local"] = parallel_word_count(texts, executor)
    report("local", results["local"])

    with remote_cluster(nworkers=2) as address, meshpool.Executor(address) as executor:
        executor.wait_for_workers(2, timeout=STARTUP_TIMEOUT)
        results["remote"] = parallel_word_count(texts, executor)
    report("remote", results["remote"])

    same = results["threads"] == results["local"] == results["remote"]
    print(f"identical results: {same} ({time.perf_counter() - started:.1f} s)")
    if not same:
        sys.exit(1)


main()  # no `if __name__ == "__main__":` guard needed: workers are fresh interpreters
