"""A ThreadPoolExecutor program made parallel across processes by changing one line.

Run it:  python examples/quickstart.py

Counting primes is pure Python, so threads share one core (the GIL); meshpool's worker
processes use them all. The only change is the executor line.
"""

import time

import meshpool

# from concurrent.futures import ThreadPoolExecutor


def count_primes(start: int, stop: int) -> int:
    """Primes in [start, stop), by trial division: deliberately CPU-bound."""
    count = 0
    for n in range(max(start, 2), stop):
        if all(n % d for d in range(2, int(n**0.5) + 1)):
            count += 1
    return count


def main() -> None:
    chunks = [(i, i + 25_000) for i in range(0, 200_000, 25_000)]
    started = time.perf_counter()
    # with ThreadPoolExecutor(4) as executor:        # before: one core, because of the GIL
    with meshpool.Executor(4) as executor:  # after: four worker processes
        counts = list(executor.map(count_primes, *zip(*chunks, strict=True)))
        # meshpool extra: futures passed as arguments make a task graph, run on the workers
        parts = [executor.submit(count_primes, a, b) for a, b in chunks]
        total = executor.submit(sum, parts).result()
    print(f"{total} primes below 200,000 in {time.perf_counter() - started:.2f} s")
    print("per chunk:", counts)


main()  # no `if __name__ == "__main__":` guard needed: workers are fresh interpreters
