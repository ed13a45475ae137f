"""Dict task graphs in the dask tuple format: what a key, a task and a reference are.

Theory of operation
-------------------
A graph is a ``Mapping[key, computation]``. A *key* is a ``str``, ``bytes``, ``int``, ``float``
or a tuple of those. A *computation* is read by one rule, applied recursively (it is the rule of
``dask.core`` as ``dask.get`` runs it today, via ``dask._task_spec.convert_legacy_task``):

1. a **task** -- a non-empty ``tuple`` whose first element is callable -- means "call it":
   ``(func, *args)`` evaluates every arg and returns ``func(*args)``;
2. a **reference** -- an ``int``/``float``/``str``/``bytes``/``tuple`` that is a key of the graph
   -- means "the value of that key" (``bool`` counts as ``int``, as in dask: ``True`` refers to
   the key ``1`` if there is one). Exception: a value that is exactly its own key, as in
   ``{0: 0}``, is a literal (dask calls that a cycle);
3. a ``list``, non-task ``tuple``, ``set`` or ``frozenset`` is rebuilt, same type, from its
   evaluated items (so ``[k1, k2]`` is the list of both values; a namedtuple stays one);
4. anything else -- ``dict`` included -- is a literal and stands for itself. Wrap a value that
   would otherwise be read by rules 1-3 as ``quote(value)``, a task returning it unchanged.

Rule 2 is tried before rule 3, so a tuple key is a reference, not a container. The same rule
finds a computation's dependencies (:func:`get_dependencies`), evaluates it
(:func:`execute_task`) and swaps references for other objects (:func:`substitute_keys`), so the
three never disagree. Deliberate differences from ``dask.core``: ``bytes`` keys are allowed, and
a reference inside a ``dict`` is not a dependency (dask lists it but never substitutes it).

Everything that walks a whole graph (:func:`get_deps`, :func:`toposort`) is iterative, so a
300,000-task chain needs no recursion; only one computation's nesting recurses, and that is
shallow. :func:`toposort` names the cycle it finds in a :class:`CycleError`.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable, Iterator, Mapping, Sequence
from functools import partial
from typing import Any, TypeAlias

Key: TypeAlias = Hashable
"""A graph key: ``str``, ``bytes``, ``int``, ``float`` or a tuple of those."""

Graph: TypeAlias = Mapping[Hashable, Any]
"""A dict graph: key -> computation (task tuple, reference, container or literal)."""

_KEY_TYPES = (str, bytes, int, float)
_REF_TYPES = (int, float, str, bytes, tuple)  # what may *refer* to a key (rule 2)
_EXACT_REF_TYPES = frozenset(_REF_TYPES)
_SCALAR_KEY_TYPES = frozenset(_KEY_TYPES)
_CONTAINERS = (list, tuple, set, frozenset)  # rebuilt from evaluated items (rule 3)
_WALKED = (*_REF_TYPES, *_CONTAINERS)  # what may hold a reference
_NO_TASK = object()


class CycleError(ValueError, RuntimeError):
    """The graph is not a DAG. ``cycle`` lists the keys, first == last, each depending on the next.

    Also a ``RuntimeError``, which is what dask raises for a cycle.

    >>> str(CycleError(['a', 'b', 'a']))
    "cycle in graph: 'a' -> 'b' -> 'a'"
    """

    def __init__(self, cycle: Sequence[Key]) -> None:
        self.cycle = list(cycle)
        super().__init__("cycle in graph: " + " -> ".join(repr(k) for k in self.cycle))

    def __reduce__(self) -> tuple[Any, ...]:
        return (CycleError, (self.cycle,))


class Literal:
    """A callable returning a fixed value: ``(Literal(x),)`` is a task whose value is ``x``.

    >>> Literal((len, 'abc'))()
    (<built-in function len>, 'abc')
    """

    __slots__ = ("data",)

    def __init__(self, data: Any) -> None:
        self.data = data

    def __call__(self) -> Any:
        return self.data

    def __repr__(self) -> str:
        return f"Literal<{type(self.data).__name__}>"

    def __reduce__(self) -> tuple[Any, ...]:
        return (Literal, (self.data,))


def quote(x: Any) -> Any:
    """Protect a value that the graph rules would otherwise interpret (tasks, containers, keys).

    >>> quote((len, 'abc'))
    (Literal<tuple>,)
    >>> quote(3)
    3
    >>> execute_task(quote(['a']), {'a': 1})
    ['a']
    """
    if isinstance(x, (*_CONTAINERS, str, bytes)):
        return (Literal(x),)
    return x


def apply(func: Callable[..., Any], args: Sequence[Any] = (), kwargs: Any = None) -> Any:
    """Call ``func(*args, **kwargs)``: the head of tasks that need keyword arguments.

    >>> execute_task((apply, divmod, ['a', 3], (dict, [])), {'a': 7})
    (2, 1)
    >>> apply(int, ['10'], {'base': 2})
    2
    """
    return func(*args, **(kwargs or {}))


def istask(x: Any) -> bool:
    """Is ``x`` a runnable task: a non-empty tuple with a callable first element?

    >>> istask((len, 'abc'))
    True
    >>> istask(('x', 1)), istask([len, 'abc']), istask(())
    (False, False, False)
    """
    return type(x) is tuple and bool(x) and callable(x[0])


def iskey(x: Any) -> bool:
    """Could ``x`` be a key: ``str``, ``bytes``, ``int``, ``float`` or a tuple of those?

    >>> iskey('x'), iskey(('x', 0)), iskey(b'k'), iskey(1.5)
    (True, True, True, True)
    >>> iskey(['x']), iskey(('x', [0])), iskey(None)
    (False, False, False)
    """
    typ = type(x)
    if typ is tuple:
        return all(iskey(i) for i in x)
    return typ in _KEY_TYPES


def _is_ref(x: Any, keys: Any) -> bool:
    """Rule 2: is ``x`` a reference to one of ``keys`` (a container supporting ``in``)?"""
    if isinstance(x, _REF_TYPES):
        try:
            return x in keys
        except TypeError:  # a tuple holding something unhashable
            return False
    return False


def _refs(comp: Any, keys: Any) -> list[Key]:
    """The references in ``comp``, left to right, repeats included.

    The hot path of graph analysis: the arguments of a flat task that are plain keys are
    checked here; anything nested goes to :func:`_walk_refs`.
    """
    typ = type(comp)
    if typ in _SCALAR_KEY_TYPES:
        return [comp] if comp in keys else []
    if not (typ is tuple and comp and callable(comp[0])):
        return _walk_refs(comp, keys) if isinstance(comp, _WALKED) else []
    out: list[Key] = []
    for x in comp[1:]:
        typ = type(x)
        if typ in _SCALAR_KEY_TYPES:
            if x in keys:
                out.append(x)
        elif typ is tuple and x and not callable(x[0]) and _is_ref(x, keys):
            out.append(x)
        elif typ is list or isinstance(x, _WALKED):
            out.extend(_walk_refs(x, keys))
    return out


def _walk_refs(comp: Any, keys: Any) -> list[Key]:
    """The references anywhere in ``comp``, left to right, repeats included (iterative)."""
    stack = [comp]
    out: list[Key] = []
    while stack:
        x = stack.pop()
        typ = type(x)
        if typ is tuple and x and callable(x[0]):
            stack.extend(x[:0:-1])
            continue
        if typ in _EXACT_REF_TYPES or isinstance(x, _REF_TYPES):
            try:
                if x in keys:
                    out.append(x)
                    continue
            except TypeError:  # a tuple holding something unhashable
                pass
        if typ is list:
            stack.extend(x[::-1])
        elif isinstance(x, _CONTAINERS):
            stack.extend(reversed(list(x)))
    return out


def _key_refs(dsk: Graph, key: Key, comp: Any) -> list[Key]:
    """The references in ``dsk[key] == comp``; a value that *is* its own key is a literal."""
    if type(comp) is type(key) and comp == key:  # {0: 0}: dask reports a cycle; we take 0
        return []
    return _refs(comp, dsk)


def get_dependencies(
    dsk: Graph,
    key: Key | None = None,
    task: Any = _NO_TASK,
    as_list: bool = False,
) -> Any:
    """The keys that ``dsk[key]`` (or the computation ``task``) refers to directly.

    Returns a set, or with ``as_list`` a list in order of first appearance without repeats.

    >>> inc = lambda x: x + 1
    >>> add = lambda x, y: x + y
    >>> dsk = {'x': 1, 'y': (inc, 'x'), 'z': (add, 'x', 'y'), 'w': (inc, 'z'),
    ...        'a': (add, (inc, 'x'), 1), 'l': ['w', ('a', 'nokey')]}
    >>> get_dependencies(dsk, 'x')
    set()
    >>> get_dependencies(dsk, 'w')  # only direct dependencies
    {'z'}
    >>> get_dependencies(dsk, 'z', as_list=True)
    ['x', 'y']
    >>> get_dependencies(dsk, 'l', as_list=True)  # inside lists and plain tuples too
    ['w', 'a']
    >>> get_dependencies(dsk, task=(inc, 'x'))
    {'x'}
    """
    if key is not None:
        refs = _key_refs(dsk, key, dsk[key])
    elif task is not _NO_TASK:
        refs = _refs(task, dsk)
    else:
        raise ValueError("provide either key or task")
    return list(dict.fromkeys(refs)) if as_list else set(refs)


def reverse_dict(d: Mapping[Key, Iterable[Key]]) -> dict[Key, set[Key]]:
    """Invert a dependency mapping: every key (and every value) maps to the keys that list it.

    >>> reverse_dict({'a': [], 'b': ['a'], 'c': ['a', 'b']}) == {'a': {'b', 'c'}, 'b': {'c'}, 'c': set()}
    True
    """
    result: dict[Key, set[Key]] = {k: set() for k in d}
    for k, vals in d.items():
        for v in vals:
            if v in result:
                result[v].add(k)
            else:
                result[v] = {k}
    return result


def get_deps(dsk: Graph) -> tuple[dict[Key, set[Key]], dict[Key, set[Key]]]:
    """Dependencies and dependents of every key, computed once.

    >>> inc = lambda x: x + 1
    >>> dependencies, dependents = get_deps({'a': 1, 'b': (inc, 'a'), 'c': (inc, 'b')})
    >>> dependencies
    {'a': set(), 'b': {'a'}, 'c': {'b'}}
    >>> dependents
    {'a': {'b'}, 'b': {'c'}, 'c': set()}
    """
    dependencies = {k: set(_key_refs(dsk, k, v)) for k, v in dsk.items()}
    return dependencies, reverse_dict(dependencies)


def _dfs_postorder(
    roots: Iterable[Key],
    dependencies: Mapping[Key, Iterable[Key]],
) -> list[Key]:
    """Keys reachable from ``roots``, each after all its dependencies; raise on a cycle.

    Dependencies are entered in their iteration order. The stack holds bare keys (a key is
    seen twice: first to push its dependencies, then, with them done, to emit it), so the walk
    allocates nothing per node -- this is the hot loop of :func:`toposort` and ``order``.
    """
    ordered: list[Key] = []
    emit = ordered.append
    state: dict[Key, int] = {}  # 1: dependencies pushed, 2: emitted
    get_state = state.get
    get_deps = dependencies.get
    stack: list[Key] = []
    push, pop = stack.append, stack.pop
    for root in roots:
        if root in state:
            continue
        push(root)
        while stack:
            node = stack[-1]
            s = get_state(node)
            if s is None:
                state[node] = 1
                deps = get_deps(node)
                if deps:
                    mark = len(stack)
                    for d in deps:
                        sd = get_state(d)
                        if sd is None:
                            push(d)
                        elif sd == 1:  # pushed, not emitted: an ancestor of node
                            raise CycleError(_cycle_from(d, dependencies))
                    if len(stack) - mark > 1:
                        stack[mark:] = stack[: mark - 1 : -1]  # first dependency on top
            else:
                pop()
                if s == 1:  # (s == 2: a stale copy, pushed by a second dependent)
                    state[node] = 2
                    emit(node)
    return ordered


def _cycle_from(start: Key, dependencies: Mapping[Key, Iterable[Key]]) -> list[Key]:
    """A cycle reachable from ``start`` (which is on one), as ``[k0, ..., k0]``."""
    on_path = {start}
    stack: list[tuple[Key, Iterator[Key]]] = [(start, iter(dependencies.get(start, ())))]
    finished: set[Key] = set()
    while stack:
        node, deps = stack[-1]
        for dep in deps:
            if dep in on_path:
                path = [k for k, _ in stack]
                return [*path[path.index(dep) :], dep]
            if dep not in finished:
                on_path.add(dep)
                stack.append((dep, iter(dependencies.get(dep, ()))))
                break
        else:
            stack.pop()
            on_path.discard(node)
            finished.add(node)
    raise AssertionError("no cycle found from a node on a cycle")  # pragma: no cover


def toposort(dsk: Graph, dependencies: Mapping[Key, Iterable[Key]] | None = None) -> list[Key]:
    """All keys of ``dsk``, each after its dependencies (depth-first, iterative).

    Raises :class:`CycleError` naming the cycle if there is one.

    >>> inc = lambda x: x + 1
    >>> toposort({'c': (inc, 'b'), 'b': (inc, 'a'), 'a': 1})
    ['a', 'b', 'c']
    >>> toposort({'a': (inc, 'b'), 'b': (inc, 'a')})
    Traceback (most recent call last):
    ...
    meshpool.graph.core.CycleError: cycle in graph: 'a' -> 'b' -> 'a'
    """
    if dependencies is None:  # lists, not sets: the same order in every process
        dependencies = {k: _key_refs(dsk, k, v) for k, v in dsk.items()}
    return _dfs_postorder(dsk, dependencies)


def find_cycle(dsk: Graph, dependencies: Mapping[Key, Iterable[Key]] | None = None) -> list[Key]:
    """A cycle in ``dsk`` as ``[k0, k1, ..., k0]`` (each depends on the next), or ``[]``.

    >>> inc = lambda x: x + 1
    >>> find_cycle({'x': (inc, 'z'), 'y': (inc, 'x'), 'z': (inc, 'y')})
    ['x', 'z', 'y', 'x']
    >>> find_cycle({'x': 1, 'y': (inc, 'x')})
    []
    """
    try:
        toposort(dsk, dependencies)
    except CycleError as e:
        return e.cycle
    return []


def flatten(seq: Any, container: type | tuple[type, ...] = list) -> Iterator[Any]:
    """Flatten nested lists (not tuples: a tuple is a key). A string is one item.

    >>> list(flatten([[1, 2], [[3], 4]]))
    [1, 2, 3, 4]
    >>> list(flatten([('x', 0), ['y']]))
    [('x', 0), 'y']
    """
    if isinstance(seq, str):
        yield seq
        return
    for item in seq:
        if isinstance(item, container):
            yield from flatten(item, container)
        else:
            yield item


def validate_keys(dsk: Graph, keys: Any) -> None:
    """Raise ``KeyError`` naming the first of ``keys`` (a key or nested list) not in ``dsk``.

    >>> validate_keys({'a': 1}, ['a', ['a']])
    >>> validate_keys({'a': 1}, ['a', ('x', 1)])
    Traceback (most recent call last):
    ...
    KeyError: "('x', 1) is not a key in the graph"
    """
    for k in flatten([keys]):
        try:
            present = k in dsk
        except TypeError:  # unhashable
            present = False
        if not present:
            raise KeyError(f"{k!r} is not a key in the graph")


def execute_task(comp: Any, cache: Mapping[Key, Any]) -> Any:
    """Evaluate a computation, given the values of the keys it refers to in ``cache``.

    >>> inc = lambda x: x + 1
    >>> execute_task((inc, 'x'), {'x': 1})
    2
    >>> execute_task((sum, ['x', (inc, 'x'), 10]), {'x': 1})
    13
    >>> execute_task(('x', {'x': 'y'}, {'x'}), {'x': 1})  # a plain tuple; dicts are literals
    (1, {'x': 'y'}, {1})
    >>> execute_task('y', {'x': 1})  # not a key in cache: a literal string
    'y'
    """
    typ = type(comp)
    if typ is tuple and comp and callable(comp[0]):
        return comp[0](*[execute_task(a, cache) for a in comp[1:]])
    if _is_ref(comp, cache):
        return cache[comp]
    if isinstance(comp, _CONTAINERS):
        items = [execute_task(a, cache) for a in comp]
        if typ is list:
            return items
        if isinstance(comp, tuple) and hasattr(comp, "_fields"):  # namedtuple
            return typ(*items)
        return typ(items)
    return comp


def run_task(comp: Any, keys: Sequence[Key], *values: Any) -> Any:
    """Evaluate ``comp`` where ``keys[i]`` has the value ``values[i]``: the call a worker makes.

    Meant for ``submit(run_task, comp, deps, *futures_of_deps)`` with
    ``deps = get_dependencies(dsk, key, as_list=True)``: the futures are plain top-level
    arguments, and values stay values (one that looks like a task is not run again).

    >>> run_task((divmod, 'a', 'b'), ['a', 'b'], 7, 2)
    (3, 1)
    >>> run_task((list, 'a'), ['a'], (len, 'xyz'))  # the value is not interpreted
    [<built-in function len>, 'xyz']
    """
    return execute_task(comp, dict(zip(keys, values, strict=True)))


def substitute_keys(comp: Any, mapping: Mapping[Key, Any]) -> Any:
    """Replace every reference to a key of ``mapping`` in ``comp`` by ``mapping[key]``.

    The inserted objects are not looked into. Structure is kept: tasks stay tasks, containers
    are rebuilt with their type, literals (and dicts) are returned as they are.

    >>> inc = lambda x: x + 1
    >>> t = substitute_keys((inc, ['x', ('x', 'y')], {'x': 0}), {'x': 'X!', 'y': ['y']})
    >>> t[1:]
    (['X!', ('X!', ['y'])], {'x': 0})
    """
    typ = type(comp)
    if typ is tuple and comp and callable(comp[0]):
        return (comp[0], *[substitute_keys(a, mapping) for a in comp[1:]])
    if _is_ref(comp, mapping):
        return mapping[comp]
    if isinstance(comp, _CONTAINERS):
        items = [substitute_keys(a, mapping) for a in comp]
        if typ is list:
            return items
        if isinstance(comp, tuple) and hasattr(comp, "_fields"):
            return typ(*items)
        return typ(items)
    return comp


def subs(task: Any, key: Key, val: Any) -> Any:
    """Substitute one key: ``substitute_keys(task, {key: val})``.

    >>> def inc(x):
    ...     return x + 1
    >>> subs((inc, 'x'), 'x', 1)  # doctest: +ELLIPSIS
    (<function inc at ...>, 1)
    """
    return substitute_keys(task, {key: val})


def funcname(func: Any) -> str:
    """A short, readable name for a callable (for labels and generated keys).

    >>> funcname(len), funcname(lambda: 0), funcname(partial(int, base=2))
    ('len', 'lambda', 'int')
    """
    while isinstance(func, partial):
        func = func.func
    name = getattr(func, "__name__", None)
    if not isinstance(name, str):
        name = type(func).__name__
    if name == "<lambda>":
        return "lambda"
    return name[:50]


def task_label(comp: Any) -> str | None:
    """The function name a task is drawn with, or ``None`` for a non-task.

    Looks through :func:`apply` to the function it calls.

    >>> task_label((apply, divmod, [7, 2])), task_label((len, 'x')), task_label([1])
    ('divmod', 'len', None)
    """
    if not istask(comp):
        return None
    func = comp[0]
    if func is apply and len(comp) > 1 and callable(comp[1]):
        func = comp[1]
    return funcname(func)
