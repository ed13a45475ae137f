"""Turn whatever ``dask.compute(..., scheduler=get)`` hands to ``get`` into a plain dict graph.

Theory of operation
-------------------
dask passes its scheduler ``get(graph, keys, **kwargs)`` one of:

- a plain ``dict`` in the tuple format -- returned as it is;
- a ``HighLevelGraph`` or any other ``Mapping`` -- copied into a dict;
- an expression (dask >= 2025: ``FinalizeCompute``), which is not a mapping but has
  ``__dask_graph__()``; and since dask 2024.12 the values are ``dask._task_spec`` objects
  (``Task``, ``Alias``, ``DataNode``, ``List``/``Dict``/... containers holding ``TaskRef``\\ s).

Rather than teach our evaluator dask's classes, each ``GraphNode`` becomes a tuple task::

    Task / container   ->  (NodeCall(node, deps), *deps)   NodeCall(...)(*values) = node(dict)
    Alias(k -> t)      ->  t                              a plain reference
    DataNode(v)        ->  v, or quote(v) if the rules would read v as a task/reference

A ``dask`` ``GraphNode`` is callable with the values of its dependencies -- the documented way
to run it -- so ``NodeCall`` just rebuilds that dict from positional values: ``get_local`` and a
cluster both run it like any task, and its dependencies are the plain keys that follow it.
Graphs that mix legacy tuples with ``GraphNode``\\ s are first normalised with dask's own
``convert_legacy_graph`` so that both kinds follow dask's reading. dask is imported only when the
graph holds dask objects; nodes are recognised by class name (``dask._task_spec.GraphNode``)
without importing dask.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from .core import Graph, Key, funcname, istask, quote

_node_types: dict[type, bool] = {}


def _is_graph_node(x: Any) -> bool:
    """Is ``x`` an instance of ``dask._task_spec.GraphNode`` (without importing dask)?"""
    typ = type(x)
    known = _node_types.get(typ)
    if known is None:
        known = any(
            c.__name__ == "GraphNode" and c.__module__ == "dask._task_spec" for c in typ.__mro__
        )
        _node_types[typ] = known
    return known


def has_task_spec(dsk: Mapping[Any, Any]) -> bool:
    """Does ``dsk`` hold any ``dask._task_spec`` node as a value?

    >>> has_task_spec({'a': 1, 'b': (len, 'a')})
    False
    """
    return any(_is_graph_node(v) for v in dsk.values())


class NodeCall:
    """Calls a dask ``GraphNode`` with its dependencies' values passed positionally.

    ``(NodeCall(node, ['a', 'b']), 'a', 'b')`` is a tuple task equivalent to ``node``.
    Picklable whenever the node is (dask nodes are).
    """

    __slots__ = ("node", "keys")

    def __init__(self, node: Any, keys: Sequence[Key]) -> None:
        self.node = node
        self.keys = tuple(keys)

    def __call__(self, *values: Any) -> Any:
        return self.node(dict(zip(self.keys, values, strict=True)))

    @property
    def __name__(self) -> str:  # read by funcname() for labels
        func = getattr(self.node, "func", None)
        return funcname(func) if func is not None else type(self.node).__name__

    def __repr__(self) -> str:
        return f"NodeCall({self.node!r})"

    def __reduce__(self) -> tuple[Any, ...]:
        return (NodeCall, (self.node, self.keys))


def _needs_quote(value: Any, dsk: Mapping[Any, Any]) -> bool:
    if istask(value) or isinstance(value, (list, tuple, set, frozenset)):
        return True
    try:
        return isinstance(value, (str, bytes, int, float)) and value in dsk
    except TypeError:
        return False


def node_to_tuple(key: Key, node: Any, dsk: Mapping[Any, Any]) -> Any:
    """The tuple-format computation equivalent to one dask ``GraphNode`` in graph ``dsk``.

    Raises ``KeyError`` naming a dependency that is not in ``dsk``.
    """
    kind = type(node).__name__
    if kind == "DataNode":
        value = node.value
        return quote(value) if _needs_quote(value, dsk) else value
    deps = sorted(node.dependencies, key=repr)
    for d in deps:
        if d not in dsk:
            raise KeyError(f"{d!r} is not a key in the graph (needed by {key!r})")
    if kind == "Alias":
        return node.target
    return (NodeCall(node, deps), *deps)


def to_plain_graph(graph: Any) -> dict[Key, Any]:
    """A plain dict graph in the tuple format from a dict, mapping, HighLevelGraph or dask expr.

    >>> dsk = {'a': 1, 'b': (len, 'a')}
    >>> to_plain_graph(dsk) is dsk
    True
    """
    if type(graph) is dict and not has_task_spec(graph):
        return graph
    if not isinstance(graph, Mapping):
        if hasattr(graph, "__dask_graph__"):
            graph = graph.__dask_graph__()
        elif hasattr(graph, "to_dict"):
            graph = graph.to_dict()
        else:
            raise TypeError(f"not a task graph: {type(graph).__name__}")
    if not isinstance(graph, dict) and hasattr(graph, "to_dict"):
        graph = graph.to_dict()  # HighLevelGraph: faster than iterating its layers as a Mapping
    dsk: Graph = dict(graph)
    if not has_task_spec(dsk):
        return dict(dsk)
    from dask._task_spec import convert_legacy_graph  # dask is installed: we hold its objects

    nodes = convert_legacy_graph(dsk)
    out: dict[Key, Any] = {}
    for k, node in nodes.items():
        out[k] = node_to_tuple(k, node, nodes)
    return out
