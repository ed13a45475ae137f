"""Lazy calls that build a dict graph: ``delayed``, ``Delayed`` and ``compute``, as in dask.

Theory of operation
-------------------
``delayed(f)(x, y=z)`` runs nothing: it returns a :class:`Delayed` -- a key plus the graph that
computes it. A ``Delayed`` anywhere in the arguments (inside lists, tuples, sets, dict values
and keyword arguments too) becomes a reference to its key, so the new task depends on it::

    f(d1, [d2, 3], k=d3)  ->  {key: (apply, f, [d1.key, [d2.key, 3]], (dict, [[q('k'), d3.key]]))}
    f(d1, 'text')         ->  {key: (f, d1.key, q('text'))}     where q('s') = (Literal('s'),)

Literal arguments the graph rules would read -- strings (they might be keys), tuples, lists,
sets, dicts -- are wrapped with :func:`~meshpool.graph.core.quote`, so they reach the function
unchanged. Numbers are passed bare.

Each ``Delayed`` stores only its own layer (usually one task) and the ``Delayed`` objects it
depends on; ``.dask`` merges the layers by an iterative walk. So building a chain of n calls
costs O(n), not O(n^2) dict copies, and 300,000 chained calls need no recursion.

Keys are ``f"{funcname}-{uuid4().hex}"``, or with ``pure=True`` a hash of the pickled call (a
``Delayed`` argument counts by its key), so equal pure calls share a key; a call that cannot be
pickled falls back to a random key. Operators (``+ - * / // % ** @ & | ^ << >>``, unary
``- + ~ abs``, comparisons, ``d[i]``) are pure. ``d.attr`` is ``getattr`` and ``d.method(...)``
calls the method on the computed object. ``bool(d)`` is an error, and iterating needs ``nout``.

Where ``compute`` runs: an explicit ``scheduler=`` (a ``get`` function, ``"threads"`` or
``"sync"``), else :func:`~meshpool.graph.scheduling.get_scheduler` -- the current executor if
one registered itself, else local threads.

A ``Delayed`` also speaks dask's collection protocol (``__dask_graph__`` and friends), so
``dask.compute(d)`` and ``dask.delayed(f)(d)`` accept it; dask's own ``Delayed`` objects are
not recognised inside meshpool calls (pass their ``.compute()`` results, or use dask there).
"""

from __future__ import annotations

import hashlib
import io
import marshal
import operator
import pickle
import types
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from functools import partial
from typing import Any

from .core import Key, apply, funcname, quote
from .scheduling import GetFunction, resolve_scheduler


class _TokenPickler(pickle.Pickler):
    """Pickles a ``Delayed`` as its key: a call's token depends on its inputs' keys only."""

    def persistent_id(self, obj: Any) -> Any:
        if isinstance(obj, Delayed):
            return ("meshpool.Delayed", obj._key)
        if isinstance(obj, types.FunctionType):
            # By content, so lambdas and local functions tokenize too (plain pickle refuses
            # them); the closure's values count, the globals the code reads do not.
            cells = tuple(c.cell_contents for c in obj.__closure__ or ())
            return ("function", obj.__module__, obj.__qualname__, marshal.dumps(obj.__code__),
                    obj.__defaults__, obj.__kwdefaults__, cells)  # fmt: skip
        return None


def tokenize(*args: Any) -> str:
    """A deterministic hex token of picklable ``args``; random when they cannot be pickled.

    >>> tokenize(1, 'a') == tokenize(1, 'a') != tokenize(1, 'b')
    True
    >>> def make():
    ...     return lambda x: x + 1
    >>> tokenize(make()) == tokenize(make())  # functions count by content
    True
    >>> import threading
    >>> tokenize(threading.Lock()) == tokenize(threading.Lock())  # unpicklable: random
    False
    >>> loop = [1]; loop.append(loop)
    >>> tokenize(loop) == tokenize(loop)
    True
    """
    try:
        text = _simple_repr(args)
    except RecursionError:  # a list holding itself, or absurdly deep nesting
        text = None
    if text is not None:  # the common case (operators on Delayed and numbers): no pickling
        data = text.encode("utf-8", "surrogatepass")
    else:
        buf = io.BytesIO()
        try:
            _TokenPickler(buf, protocol=5).dump(args)
        except Exception:
            return uuid.uuid4().hex
        data = b"p" + buf.getvalue()
    return hashlib.sha1(data, usedforsecurity=False).hexdigest()[:32]


_SIMPLE_TYPES = frozenset({str, int, float, bytes, bool, type(None)})


def _simple_repr(x: Any) -> str | None:
    """An unambiguous text for builtins-only values (and Delayed, builtin functions), else None.

    >>> _simple_repr((1, 'a', [None, b'x']))
    "(1,'a',[None,b'x'])"
    """
    typ = type(x)
    if typ in _SIMPLE_TYPES:
        return repr(x)  # strings are quoted, so no other text can look like one
    if isinstance(x, Delayed):
        return f"<D {x._key!r}>"
    if typ is tuple or typ is list:
        parts = [_simple_repr(i) for i in x]
        if None in parts:
            return None
        text = ",".join(parts)  # type: ignore[arg-type]
        return f"({text})" if typ is tuple else f"[{text}]"
    if typ is dict:
        items = [(_simple_repr(k), _simple_repr(v)) for k, v in x.items()]
        if any(k is None or v is None for k, v in items):
            return None
        return "{" + ",".join(f"{k}:{v}" for k, v in items) + "}"
    if typ is types.BuiltinFunctionType:
        return f"<B {x.__module__}.{x.__qualname__}>"
    return None


def _unpack(x: Any, deps: list[Delayed]) -> Any:
    """The graph form of an argument, appending the ``Delayed`` objects found in it to ``deps``."""
    if isinstance(x, Delayed):
        deps.append(x)
        return x._key
    typ = type(x)
    is_namedtuple = isinstance(x, tuple) and hasattr(x, "_fields")
    if typ in (list, tuple, set, frozenset, dict) or is_namedtuple:
        inner: list[Delayed] = []
        if typ is dict:
            items: list[Any] = [[quote(k), _unpack(v, inner)] for k, v in x.items()]
        else:
            items = [_unpack(i, inner) for i in x]
        if not inner:
            return quote(x)
        deps.extend(inner)
        if typ is list:
            return items
        if is_namedtuple:
            return (apply, typ, items)
        return (typ, items)
    return quote(x)


class MethodCaller:
    """``MethodCaller('m')(obj, *a, **k)`` is ``obj.m(*a, **k)``; picklable, labelled ``m``."""

    __slots__ = ("method",)

    def __init__(self, method: str) -> None:
        self.method = method

    def __call__(self, obj: Any, *args: Any, **kwargs: Any) -> Any:
        return getattr(obj, self.method)(*args, **kwargs)

    @property
    def __name__(self) -> str:
        return self.method

    def __reduce__(self) -> tuple[Any, ...]:
        return (MethodCaller, (self.method,))


def _call(
    func: Any,
    args: Sequence[Any],
    kwargs: Mapping[str, Any],
    *,
    pure: bool = False,
    key: Key | None = None,
    nout: int | None = None,
) -> Delayed:
    """The ``Delayed`` for ``func(*args, **kwargs)``; ``func`` may itself be a ``Delayed``."""
    deps: list[Delayed] = []
    targs = [_unpack(a, deps) for a in args]
    if isinstance(func, Delayed):
        deps.append(func)
        head: Any = func._key
        label = "call"
    elif callable(func):
        head, label = func, funcname(func)
    else:
        raise TypeError(f"{type(func).__name__!r} object is not callable")
    task: tuple[Any, ...]
    if kwargs:
        task = (apply, head, targs, _unpack(dict(kwargs), deps))
    elif isinstance(func, Delayed):
        task = (apply, head, targs)
    else:
        task = (head, *targs)
    if key is None:
        key = f"{label}-{tokenize(func, args, kwargs) if pure else uuid.uuid4().hex}"
    return Delayed(key, {key: task}, deps, nout)


class Delayed:
    """A lazy value: ``.key`` in the graph ``.dask``; ``.compute()`` runs it.

    >>> from operator import add
    >>> d = delayed(add)(1, 2)
    >>> (d * 10).compute(scheduler='sync')
    30
    """

    __slots__ = ("_key", "_layer", "_deps", "_nout")

    _key: Key
    _layer: Mapping[Key, Any]
    _deps: tuple[Delayed, ...]
    _nout: int | None

    def __init__(
        self,
        key: Key,
        layer: Mapping[Key, Any] | None = None,
        deps: Sequence[Delayed] = (),
        nout: int | None = None,
    ) -> None:
        setattr_ = object.__setattr__
        setattr_(self, "_key", key)
        setattr_(self, "_layer", {} if layer is None else layer)
        setattr_(self, "_deps", tuple(deps))
        setattr_(self, "_nout", nout)

    @property
    def key(self) -> Key:
        return self._key

    @property
    def dask(self) -> dict[Key, Any]:
        """The whole graph this value needs, as a dict."""
        return merge_graphs([self])

    def compute(self, scheduler: GetFunction | str | None = None, **kwargs: Any) -> Any:
        """Compute this value (see :func:`compute`)."""
        return compute(self, scheduler=scheduler, **kwargs)[0]

    def visualize(self, filename: str = "graph", format: str | None = None) -> list[str]:
        """Write this graph as DOT (and render it if Graphviz is installed)."""
        from .dot import visualize

        return visualize(self, filename=filename, format=format)

    def __getattr__(self, attr: str) -> Any:
        if attr.startswith("_"):
            raise AttributeError(f"Delayed has no attribute {attr!r}")
        return DelayedAttr(self, attr)

    def __setattr__(self, attr: str, value: Any) -> None:
        raise TypeError("Delayed objects are immutable")

    def __call__(self, *args: Any, **kwargs: Any) -> Delayed:
        pure = kwargs.pop("pure", False)
        key = kwargs.pop("dask_key_name", None)
        return _call(self, args, kwargs, pure=pure, key=key)

    def __getitem__(self, index: Any) -> Delayed:
        return _call(operator.getitem, (self, index), {}, pure=True)

    def __iter__(self) -> Iterator[Delayed]:
        if self._nout is None:
            raise TypeError("Delayed objects of unspecified length are not iterable (use nout=)")
        return (self[i] for i in range(self._nout))

    def __len__(self) -> int:
        if self._nout is None:
            raise TypeError("Delayed objects of unspecified length have no len() (use nout=)")
        return self._nout

    def __bool__(self) -> bool:
        raise TypeError("truth of Delayed objects is not supported")

    def __hash__(self) -> int:
        return hash(self._key)

    def __repr__(self) -> str:
        return f"Delayed({self._key!r})"

    def __reduce__(self) -> tuple[Any, ...]:
        # Flatten: pickling a long chain layer by layer would recurse once per link.
        return (Delayed, (self._key, self.dask, (), self._nout))

    # dask's collection protocol: dask.compute(d), and dask.delayed(f)(d), accept a Delayed.
    def __dask_graph__(self) -> dict[Key, Any]:
        return self.dask

    def __dask_keys__(self) -> list[Key]:
        return [self._key]

    def __dask_layers__(self) -> tuple[Key, ...]:
        return (self._key,)

    def __dask_tokenize__(self) -> Key:
        return self._key

    def __dask_postcompute__(self) -> tuple[Callable[..., Any], tuple[Any, ...]]:
        return (_first, ())

    def __dask_postpersist__(self) -> tuple[Callable[..., Any], tuple[Any, ...]]:
        return (_rebuild, (self._key, self._nout))

    @staticmethod
    def __dask_optimize__(dsk: Any, keys: Any, **kwargs: Any) -> Any:
        return dsk

    @staticmethod
    def __dask_scheduler__(dsk: Any, keys: Any, **kwargs: Any) -> Any:
        return resolve_scheduler(None)(dsk, keys, **kwargs)


def _first(results: Sequence[Any]) -> Any:
    return results[0]


def _rebuild(dsk: Mapping[Key, Any], key: Key, nout: int | None, rename: Any = None) -> Delayed:
    key = rename.get(key, key) if rename else key
    return Delayed(key, dict(dsk), (), nout)


def _binary(op: Callable[[Any, Any], Any]) -> Callable[[Delayed, Any], Delayed]:
    def method(self: Delayed, other: Any) -> Delayed:
        return _call(op, (self, other), {}, pure=True)

    method.__name__ = f"__{op.__name__.strip('_')}__"
    return method


def _reflected(op: Callable[[Any, Any], Any]) -> Callable[[Delayed, Any], Delayed]:
    def method(self: Delayed, other: Any) -> Delayed:
        return _call(op, (other, self), {}, pure=True)

    method.__name__ = f"__r{op.__name__.strip('_')}__"
    return method


def _unary(op: Callable[[Any], Any]) -> Callable[[Delayed], Delayed]:
    def method(self: Delayed) -> Delayed:
        return _call(op, (self,), {}, pure=True)

    method.__name__ = f"__{op.__name__.strip('_')}__"
    return method


_ARITHMETIC: dict[str, Callable[[Any, Any], Any]] = {
    "add": operator.add,
    "sub": operator.sub,
    "mul": operator.mul,
    "truediv": operator.truediv,
    "floordiv": operator.floordiv,
    "mod": operator.mod,
    "pow": operator.pow,
    "matmul": operator.matmul,
    "and": operator.and_,
    "or": operator.or_,
    "xor": operator.xor,
    "lshift": operator.lshift,
    "rshift": operator.rshift,
}
_COMPARISONS: dict[str, Callable[[Any, Any], Any]] = {
    "lt": operator.lt,
    "le": operator.le,
    "gt": operator.gt,
    "ge": operator.ge,
    "eq": operator.eq,
    "ne": operator.ne,
}
_UNARY: dict[str, Callable[[Any], Any]] = {
    "neg": operator.neg,
    "pos": operator.pos,
    "invert": operator.invert,
    "abs": operator.abs,
}
for _name, _op in _ARITHMETIC.items():
    setattr(Delayed, f"__{_name}__", _binary(_op))
    setattr(Delayed, f"__r{_name}__", _reflected(_op))
for _name, _op in _COMPARISONS.items():
    setattr(Delayed, f"__{_name}__", _binary(_op))
for _name, _uop in _UNARY.items():
    setattr(Delayed, f"__{_name}__", _unary(_uop))


class DelayedLeaf(Delayed):
    """A wrapped object, usually a function: calling it builds a task that calls the object."""

    __slots__ = ("_obj", "_pure")

    def __init__(self, obj: Any, key: Key, pure: bool = False, nout: int | None = None) -> None:
        super().__init__(key, {key: quote(obj)}, (), nout)
        object.__setattr__(self, "_obj", obj)
        object.__setattr__(self, "_pure", pure)

    def __call__(self, *args: Any, **kwargs: Any) -> Delayed:
        pure = kwargs.pop("pure", self._pure)
        key = kwargs.pop("dask_key_name", None)
        return _call(self._obj, args, kwargs, pure=pure, key=key, nout=self._nout)

    def __reduce__(self) -> tuple[Any, ...]:
        return (DelayedLeaf, (self._obj, self._key, self._pure, self._nout))


class DelayedAttr(Delayed):
    """``d.attr``: computes ``getattr(d, 'attr')``; calling it calls the method on ``d``."""

    __slots__ = ("_parent", "_attr")

    def __init__(self, parent: Delayed, attr: str) -> None:
        key = f"getattr-{tokenize(parent._key, attr)}"
        super().__init__(key, {key: (operator.attrgetter(attr), parent._key)}, (parent,))
        object.__setattr__(self, "_parent", parent)
        object.__setattr__(self, "_attr", attr)

    def __call__(self, *args: Any, **kwargs: Any) -> Delayed:
        pure = kwargs.pop("pure", False)
        key = kwargs.pop("dask_key_name", None)
        return _call(MethodCaller(self._attr), (self._parent, *args), kwargs, pure=pure, key=key)

    def __reduce__(self) -> tuple[Any, ...]:
        return (DelayedAttr, (self._parent, self._attr))


def delayed(
    obj: Any = None,
    *,
    name: Key | None = None,
    pure: bool = False,
    nout: int | None = None,
    traverse: bool = True,
) -> Any:
    """Wrap a function (lazy calls) or a value (a ``Delayed`` of it); usable as a decorator.

    >>> @delayed(pure=True)
    ... def inc(x):
    ...     return x + 1
    >>> inc(1).key == inc(1).key
    True
    >>> total = delayed(sum)([inc(1), inc(2)])
    >>> total.compute(scheduler='sync')
    5
    >>> delayed({'a': inc(0)}).compute(scheduler='sync')
    {'a': 1}
    """
    if obj is None:
        return partial(delayed, name=name, pure=pure, nout=nout, traverse=traverse)
    if isinstance(obj, Delayed):
        return obj
    deps: list[Delayed] = []
    task = _unpack(obj, deps) if traverse else obj
    if not deps:
        if name is None:
            prefix = funcname(obj) if callable(obj) else type(obj).__name__
            name = f"{prefix}-{tokenize(obj) if pure else uuid.uuid4().hex}"
        return DelayedLeaf(obj, name, pure=pure, nout=nout)
    if name is None:
        name = f"{type(obj).__name__}-{tokenize(obj) if pure else uuid.uuid4().hex}"
    return Delayed(name, {name: task}, deps, nout)


def merge_graphs(objs: Sequence[Delayed]) -> dict[Key, Any]:
    """The union of the graphs of ``objs`` (an iterative walk over their layers).

    >>> a = delayed(1, name='a')
    >>> b = delayed(abs, pure=True)(a, dask_key_name='b')
    >>> merge_graphs([b]) == {'a': 1, 'b': (abs, 'a')}
    True
    """
    dsk: dict[Key, Any] = {}
    seen: set[int] = set()
    stack = list(objs)
    while stack:
        d = stack.pop()
        if id(d) in seen:
            continue
        seen.add(id(d))
        dsk.update(d._layer)
        stack.extend(d._deps)
    return dsk


def collections_to_dsk(objs: Sequence[Any]) -> tuple[dict[Key, Any], list[Key]]:
    """One graph for several objects, and the key of each: what an executor submits.

    A non-``Delayed`` object is first wrapped with :func:`delayed` (so a list of ``Delayed``
    becomes one key computing the list).

    >>> a, b = delayed(1, name='a'), delayed(2, name='b')
    >>> collections_to_dsk([a, b])
    ({'b': 2, 'a': 1}, ['a', 'b'])
    """
    ds = [delayed(o) for o in objs]
    return merge_graphs(ds), [d._key for d in ds]


def compute(
    *args: Any,
    scheduler: GetFunction | str | None = None,
    traverse: bool = True,
    **kwargs: Any,
) -> tuple[Any, ...]:
    """Compute several values at once, sharing one graph; returns a tuple, one item per arg.

    Arguments that are not ``Delayed`` (and hold none, with ``traverse``) are returned as they
    are. Extra keyword arguments go to the scheduler's ``get``.

    >>> x = delayed(1, name='x')
    >>> compute(x + 1, [x, x * 2], 'plain', scheduler='sync')
    (2, [1, 2], 'plain')
    """
    targets: list[Delayed] = []
    slots: list[int] = []
    for a in args:
        d = a if isinstance(a, Delayed) else delayed(a) if traverse else None
        if d is None or isinstance(d, DelayedLeaf) and d is not a:
            slots.append(-1)
        else:
            slots.append(len(targets))
            targets.append(d)
    if not targets:
        return tuple(args)
    dsk, keys = merge_graphs(targets), [d._key for d in targets]
    results = resolve_scheduler(scheduler)(dsk, keys, **kwargs)
    return tuple(a if i < 0 else results[i] for a, i in zip(args, slots, strict=True))
