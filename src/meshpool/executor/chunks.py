"""Chunks of ``map(..., chunksize=n)``: how the caller cuts them and how a worker runs them.

A module of its own, importing nothing heavy: a worker imports it to run the first chunk, and
importing ``executor.executor`` there (the whole client) cost ~80 ms of the first chunked map.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Iterator


def chunks_of_tuples(iterables: tuple, chunksize: int) -> Iterator[tuple]:
    """Argument tuples of a many-iterable ``map``, ``chunksize`` at a time."""
    it = zip(*iterables, strict=False)
    while True:
        chunk = tuple(itertools.islice(it, chunksize))
        if not chunk:
            return
        yield chunk


def run_chunk_of_tuples(fn: Callable, chunk: tuple) -> list:
    return [fn(*args) for args in chunk]


def chunks_of_items(iterable: Iterable, chunksize: int) -> Iterator[list]:
    """Items of a one-iterable ``map``, ``chunksize`` at a time."""
    it = iter(iterable)
    while True:
        chunk = list(itertools.islice(it, chunksize))
        if not chunk:
            return
        yield chunk


def run_chunk_of_items(fn: Callable, chunk: list) -> list:
    return [fn(item) for item in chunk]
