"""A static priority for every task: the order a one-thread scheduler would run them in.

Theory of operation
-------------------
Among tasks that are ready at the same time, a scheduler runs the one with the smallest
priority first. What we want from that order is low memory: finish what has been started before
starting something independent, so intermediate results are consumed -- and freed -- soon after
they are made. ``order`` gets this from a depth-first walk of the graph *from its outputs*
(keys nothing depends on) down through dependencies, numbering each task after all of its
dependencies (post-order)::

        s0123               numbering:  x0 x1 s01 x2 x3 s23 s0123
       /     \\                          0  1  2   3  4  5   6
     s01     s23
    /  \\    /  \\        each pair's sum follows its two leaves at once, so at most
   x0  x1  x2  x3         one leaf result per level waits in memory.

Two choices make the walk deterministic and good:

- **Outputs** are walked in key order (``('x', 2)`` before ``('x', 10)``: numbers inside
  tuple keys compare as numbers), so neighbouring outputs, which tend to share inputs, are
  finished one after the other.
- **Dependencies** of a task are entered tallest first (longest chain of dependencies below
  them), ties broken by key order. Entering the bigger subtree first is the Sethi-Ullman rule:
  while it runs, nothing from the smaller sibling is held yet; the smaller one runs after, with
  only the big result waiting. Tallest-first also starts the critical path early.

Cost: one toposort and one walk, ``O(E)``, plus one sort of all keys and one sort of each
task's dependencies, so ``O(n log n)`` overall -- about a second for 300,000 tasks. All loops
are iterative.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from typing import Any

from .core import Graph, Key, _dfs_postorder, _key_refs


def sort_key(key: Key) -> tuple[Any, ...]:
    """A total order over keys of mixed types: numbers < strings < bytes < tuples.

    >>> sorted([('x', 10), 'b', ('x', 2), 3, b'a', 1.5], key=sort_key)
    [1.5, 3, 'b', b'a', ('x', 2), ('x', 10)]
    """
    if isinstance(key, tuple):
        return (3, tuple(sort_key(k) for k in key))
    if isinstance(key, (int, float)):
        return (0, key)
    if isinstance(key, str):
        return (1, key)
    if isinstance(key, bytes):
        return (2, key)
    return (4, type(key).__name__, repr(key))


def sorted_keys(keys: Iterable[Key]) -> list[Key]:
    """``keys`` sorted by :func:`sort_key`, fast when the keys compare natively.

    >>> sorted_keys([('x', 10), ('x', 2)]), sorted_keys(['b', ('a', 1), 'a'])
    ([('x', 2), ('x', 10)], ['a', 'b', ('a', 1)])
    """
    keys = list[Any](keys)
    try:  # one shape of key (all str, or all ('name', i, j)): compare as they are
        return sorted(keys)  # type: ignore[type-var]
    except TypeError:
        return sorted(keys, key=sort_key)


def heights(topo: Iterable[Key], dependencies: Mapping[Key, Iterable[Key]]) -> dict[Key, int]:
    """The longest chain of dependencies below each key (0 for a leaf); ``topo`` is toposorted.

    >>> heights(['a', 'b', 'c', 'd'], {'a': [], 'b': ['a'], 'c': [], 'd': ['b', 'c']})
    {'a': 0, 'b': 1, 'c': 0, 'd': 2}
    """
    h: dict[Key, int] = {}
    get = h.__getitem__
    for k in topo:
        deps = dependencies.get(k)
        h[k] = 1 + max(map(get, deps)) if deps else 0
    return h


def order(dsk: Graph, dependencies: Mapping[Key, Iterable[Key]] | None = None) -> dict[Key, int]:
    """Priority of every key of ``dsk`` (0 runs first); dependencies always come first.

    Raises :class:`~meshpool.graph.core.CycleError` on a cycle. ``dependencies`` may be passed
    when already known (only keys of ``dsk`` are considered).

    A binary reduction finishes each pair before starting the next::

        >>> add = lambda *a: sum(a)
        >>> dsk = {'x0': 1, 'x1': 1, 'x2': 1, 'x3': 1, 's01': (add, 'x0', 'x1'),
        ...        's23': (add, 'x2', 'x3'), 's': (add, 's01', 's23')}
        >>> o = order(dsk)
        >>> sorted(dsk, key=o.get)
        ['x0', 'x1', 's01', 'x2', 'x3', 's23', 's']
    """
    deps: Mapping[Key, Collection[Key]]
    if dependencies is None:
        deps = {k: _key_refs(dsk, k, v) for k, v in dsk.items()}  # repeats are harmless
    elif all(d in dsk for ds in dependencies.values() for d in ds):
        deps = {k: dependencies.get(k, ()) for k in dsk}  # type: ignore[misc]
    else:
        deps = {k: [d for d in dependencies.get(k, ()) if d in dsk] for k in dsk}
    topo = _dfs_postorder(dsk, deps)  # raises CycleError
    height = heights(topo, deps)
    ranked = sorted_keys(dsk)
    # One global rank -- tallest first, then key order -- so each node's children sort by int.
    rank = {k: i for i, k in enumerate(sorted(ranked, key=height.__getitem__, reverse=True))}
    by_rank = rank.__getitem__
    children = {k: sorted(ds, key=by_rank) if len(ds) > 1 else ds for k, ds in deps.items()}
    referenced = set().union(*deps.values())
    outputs = [k for k in ranked if k not in referenced]
    # Every key is below some output in a DAG, so this walk numbers all of them.
    return {k: i for i, k in enumerate(_dfs_postorder(outputs, children))}
