"""The seeds' tree sum: add neighbours pairwise until one value remains, as plain Python.

Run it:  python examples/tree_reduction.py

Each ``submit(add, a, b)`` takes two futures: the addition runs on a worker once both inputs
exist, where they already are, and the partial sums never come back to this process. Only the
final ``result()`` does.
"""

import time

import meshpool


def load(i: int) -> int:
    time.sleep(0.01)  # stands for reading a file or a database row
    return i


def add(x: int, y: int) -> int:
    time.sleep(0.005)
    return x + y


def main() -> None:
    with meshpool.Executor() as ex:
        values = [ex.submit(load, i) for i in range(16)]
        levels = [values]  # kept only to draw the whole tree below
        while len(values) > 1:  # the seeds' demo: pair up neighbours, level by level
            pairs = zip(values[0::2], values[1::2], strict=False)
            leftover = [values[-1]] if len(values) % 2 else []
            values = [ex.submit(add, a, b) for a, b in pairs] + leftover
            levels.append(values)
        total = values[0].result()
        print(f"sum of 0..15 = {total} (expected {sum(range(16))})")
        written = meshpool.visualize(values, filename="tree_reduction.svg")
        print("the task graph:", ", ".join(written))


main()
