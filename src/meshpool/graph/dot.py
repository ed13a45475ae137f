"""Graphviz DOT text for task graphs, and ``visualize`` to write (and render) it.

Theory of operation
-------------------
Drawing goes through one small intermediate form, the *spec*: ``{key: (label, [deps])}``,
where ``label`` is the function name of a task or ``None`` for plain data. A dict graph gives
its spec with :func:`graph_spec`; the executor's futures hand theirs over directly through
``__meshpool_graph__()``. :func:`spec_to_dot` then draws, like dask's ``visualize``::

    dependency data  ->  (task: circle, function name)  ->  [key: box]

Every key is a box labelled with the key; a key computed by a task also gets a circle labelled
with the function, pointing at its box; each dependency's box points at the circle that uses it.
A key whose value is a bare reference or a container of references is drawn with a circle
labelled ``alias``/``list``/``tuple``/... Keys named only as dependencies (results outside the
drawn graph) are boxes with a dashed outline. Output is deterministic: nodes appear in the order
of the spec. Only :func:`visualize` touches files and runs ``dot``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import warnings
from collections.abc import Mapping
from typing import Any

from .core import Graph, Key, _is_ref, get_dependencies, task_label
from .dask_compat import to_plain_graph
from .delayed import Delayed

GraphSpec = dict[Key, tuple[str | None, list[Key]]]
"""``{key: (function name or None for data, [dependency keys])}``: what gets drawn."""

RENDER_FORMATS = frozenset({"svg", "png", "pdf", "jpg", "jpeg", "gif", "ps", "eps", "bmp"})


def graph_spec(dsk: Graph) -> GraphSpec:
    """The drawing spec of a dict graph.

    >>> inc = lambda x: x + 1
    >>> graph_spec({'x': 1, 'y': (inc, 'x'), 'z': ['x', 'y'], 'w': 'z'})
    {'x': (None, []), 'y': ('lambda', ['x']), 'z': ('list', ['x', 'y']), 'w': ('alias', ['z'])}
    """
    spec: GraphSpec = {}
    for k, v in dsk.items():
        deps = get_dependencies(dsk, k, as_list=True)
        label = task_label(v)
        if label is None and deps:
            label = "alias" if _is_ref(v, dsk) else type(v).__name__
        spec[k] = (label, deps)
    return spec


def _escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def key_label(key: Key, max_length: int = 40) -> str:
    """A key as a label: strings bare, other keys as their repr, cut to ``max_length``.

    >>> key_label('x'), key_label(('x', 0)), key_label('a' * 50, 10)
    ('x', "('x', 0)", 'aaaaaaa...')
    """
    text = key if isinstance(key, str) else repr(key)
    if len(text) > max_length:
        text = text[: max(max_length - 3, 1)] + "..."
    return text


def spec_to_dot(
    spec: Mapping[Key, tuple[str | None, list[Key]]],
    *,
    name: str = "meshpool",
    rankdir: str = "BT",
    max_label: int = 40,
) -> str:
    """DOT text for a spec (see the module docstring for what is drawn).

    >>> print(spec_to_dot({'x': (None, []), 'y': ('inc', ['x'])}))
    digraph "meshpool" {
      graph [rankdir=BT];
      node [fontname="Helvetica"];
      d0 [label="x", shape=box];
      d1 [label="y", shape=box];
      t1 [label="inc", shape=circle];
      t1 -> d1;
      d0 -> t1;
    }
    """
    ids: dict[Key, int] = {}
    for k in spec:
        ids.setdefault(k, len(ids))
    for _, deps in spec.values():
        for d in deps:
            ids.setdefault(d, len(ids))
    lines = [
        f'digraph "{_escape(name)}" {{',
        f"  graph [rankdir={rankdir}];",
        '  node [fontname="Helvetica"];',
    ]
    edges: list[str] = []
    for k, i in ids.items():
        label = _escape(key_label(k, max_label))
        external = "" if k in spec else ", style=dashed"
        lines.append(f'  d{i} [label="{label}", shape=box{external}];')
        func, deps = spec.get(k, (None, []))
        if func is None and not deps:
            continue
        lines.append(f'  t{i} [label="{_escape(func or "task")}", shape=circle];')
        edges.append(f"  t{i} -> d{i};")
        edges.extend(f"  d{ids[d]} -> t{i};" for d in deps)
    return "\n".join([*lines, *edges, "}"])


def to_dot(dsk: Any, **kwargs: Any) -> str:
    """DOT text for a dict graph (dask graphs too); keyword arguments go to :func:`spec_to_dot`.

    >>> 'label="len", shape=circle' in to_dot({'a': 'xyz', 'n': (len, 'a')})
    True
    """
    return spec_to_dot(graph_spec(to_plain_graph(dsk)), **kwargs)


def collect_spec(obj: Any) -> GraphSpec:
    """The spec of a dict graph, a ``Delayed``, an object with ``__meshpool_graph__()``, a dask
    collection, or a list/tuple/set of those (merged).

    >>> class Fut:
    ...     def __meshpool_graph__(self):
    ...         return {'f-1': ('load', []), 'f-2': ('inc', ['f-1'])}
    >>> collect_spec([Fut(), {'x': 1}])
    {'f-1': ('load', []), 'f-2': ('inc', ['f-1']), 'x': (None, [])}
    """
    if isinstance(obj, Delayed):
        return graph_spec(obj.dask)
    if isinstance(obj, Mapping):
        return graph_spec(to_plain_graph(obj))
    if hasattr(obj, "__meshpool_graph__"):
        return {k: (func, list(deps)) for k, (func, deps) in obj.__meshpool_graph__().items()}
    if hasattr(obj, "__dask_graph__"):
        return graph_spec(to_plain_graph(obj.__dask_graph__()))
    if isinstance(obj, (list, tuple, set, frozenset)):
        spec: GraphSpec = {}
        for item in obj:
            spec.update(collect_spec(item))
        return spec
    raise TypeError(f"cannot draw a {type(obj).__name__}: not a graph, Delayed or future")


def visualize(obj: Any, filename: str = "graph", format: str | None = None) -> list[str]:
    """Write ``obj``'s graph as ``<filename>.dot``; render it too if a format is asked for.

    The format is ``format`` or the extension of ``filename`` (``'graph.svg'``); rendering
    needs Graphviz's ``dot`` on ``PATH`` (without it a warning is issued and only the ``.dot``
    file is written). Returns the paths written, the ``.dot`` file first.
    """
    base, ext = os.path.splitext(os.fspath(filename))
    ext_fmt: str | None = ext.lstrip(".").lower()
    if ext_fmt not in RENDER_FORMATS | {"dot", "gv"}:
        base, ext_fmt = base + ext, None  # 'graph.v1': a dot inside the name, not an extension
    fmt = format or ext_fmt
    if fmt in ("dot", "gv"):
        fmt = None
    dot_path = base + ".dot"
    with open(dot_path, "w", encoding="utf-8") as f:
        f.write(spec_to_dot(collect_spec(obj)) + "\n")
    written = [dot_path]
    if fmt is None:
        return written
    dot = shutil.which("dot")
    if dot is None:
        warnings.warn(f"Graphviz 'dot' is not on PATH: wrote {dot_path} but no {fmt}", stacklevel=2)
        return written
    out_path = f"{base}.{fmt}"
    subprocess.run([dot, f"-T{fmt}", dot_path, "-o", out_path], check=True)
    written.append(out_path)
    return written
