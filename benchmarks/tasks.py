"""Functions executed by benchmark tasks.

This module must be importable by every worker process of every system: the
runner puts ``benchmarks/`` on ``sys.path`` and on ``PYTHONPATH`` before any
executor starts.  It deliberately imports nothing heavy at module level (NumPy
is imported inside the array functions) so that the ``startup`` workload does
not pay for NumPy.
"""

from __future__ import annotations


def noop(x=None):
    """A no-op task: returns its argument unchanged."""
    return x


def inc(x):
    return x + 1


def leaf(i):
    return i


def add(a, b):
    return a + b


def apply_chunk(fn, chunk):
    """Run ``fn`` over a list of items inside one task (manual chunking for
    systems whose map has no ``chunksize``)."""
    return [fn(x) for x in chunk]


def make_array(n_items, seed=0):
    """A fresh float64 array of ``n_items`` uniform random numbers (random so
    that no transport compression can shrink it)."""
    import numpy as np

    return np.random.default_rng(seed).random(n_items)


def total_sum(arr):
    """Sum of an array (what a consumer task computes)."""
    return float(arr.sum())
