"""A multi-stage NumPy pipeline: each stage's output feeds the next on the workers.

Run it:  python examples/pipeline.py

Every stage returns arrays of several megabytes. They stay on the workers (moving worker to
worker when a stage runs elsewhere); this process only sends small task descriptions and
receives one number per chunk. ``Executor.statistics()`` shows how little it moved.
"""

import numpy as np

import meshpool


def generate(seed: int, n: int = 1_000_000) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=n)


def normalize(x: np.ndarray) -> np.ndarray:
    return (x - x.mean()) / x.std()


def smooth(x: np.ndarray, width: int = 50) -> np.ndarray:
    return np.convolve(x, np.ones(width) / width, mode="same")


def energy(x: np.ndarray) -> float:
    return float(np.sum(x * x))


def main() -> None:
    with meshpool.Executor() as ex:
        raw = [ex.submit(generate, seed) for seed in range(16)]
        normed = [ex.submit(normalize, x) for x in raw]
        smoothed = [ex.submit(smooth, x) for x in normed]
        energies = [ex.submit(energy, x) for x in smoothed]
        del raw, normed, smoothed  # intermediates are freed on the workers once consumed
        results = ex.gather(energies)
        stats = ex.statistics()
    moved = 16 * 3 * 8_000_000
    print("energy per chunk:", [round(e) for e in results])
    print(
        f"arrays made on the workers: {moved / 1e6:.0f} MB; this process received "
        f"{stats.client_bytes_received / 1e6:.2f} MB and the scheduler moved "
        f"{(stats.scheduler_bytes_sent + stats.scheduler_bytes_received) / 1e6:.2f} MB"
    )


main()
