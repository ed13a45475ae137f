"""Task graphs as pure data: dict graphs in the dask tuple format, ordering, delayed, DOT.

Nothing here imports zmq or another meshpool subpackage. The pieces:

- :mod:`.core`: keys, tasks, dependencies, toposort, evaluation, substitution;
- :mod:`.order`: a static, memory-friendly priority for every task;
- :mod:`.local`: ``get_local``, a thread-pool scheduler (like ``dask.threaded.get``);
- :mod:`.delayed`: ``delayed`` / ``Delayed`` / ``compute``;
- :mod:`.scheduling`: where ``compute()`` runs by default;
- :mod:`.dot`: Graphviz output;
- :mod:`.dask_compat`: graphs handed over by ``dask.compute(..., scheduler=get_local)``.
"""

from .core import (
    CycleError,
    Graph,
    Key,
    Literal,
    apply,
    execute_task,
    find_cycle,
    flatten,
    funcname,
    get_dependencies,
    get_deps,
    iskey,
    istask,
    quote,
    reverse_dict,
    run_task,
    subs,
    substitute_keys,
    toposort,
    validate_keys,
)
from .dask_compat import to_plain_graph
from .delayed import Delayed, collections_to_dsk, compute, delayed, tokenize
from .dot import graph_spec, spec_to_dot, to_dot, visualize
from .local import cull, get_local, pack_results
from .order import order
from .scheduling import get_scheduler, resolve_scheduler, set_get_provider

__all__ = [
    "CycleError",
    "Delayed",
    "Graph",
    "Key",
    "Literal",
    "apply",
    "collections_to_dsk",
    "compute",
    "cull",
    "delayed",
    "execute_task",
    "find_cycle",
    "flatten",
    "funcname",
    "get_dependencies",
    "get_deps",
    "get_local",
    "get_scheduler",
    "graph_spec",
    "iskey",
    "istask",
    "order",
    "pack_results",
    "quote",
    "resolve_scheduler",
    "reverse_dict",
    "run_task",
    "set_get_provider",
    "spec_to_dot",
    "subs",
    "substitute_keys",
    "to_dot",
    "to_plain_graph",
    "tokenize",
    "toposort",
    "validate_keys",
    "visualize",
]
