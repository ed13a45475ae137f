"""``meshpool.Executor``: the ``concurrent.futures.Executor`` over a meshpool cluster.

``Executor()`` starts a local cluster (the scheduler inside this process's I/O thread, worker
processes on this machine, private ipc sockets); ``Executor("tcp://host:port")`` joins a cluster
started with ``meshpool scheduler`` / ``meshpool worker``. Everything else is the stdlib's
contract: ``submit``, ``map``, ``shutdown``, ``with``; plus task-graph extras (futures as
arguments, ``scatter``/``gather``, ``options``).

``submit`` does its serializing here, in the caller's thread — so an unpicklable function or
argument raises right here, naming the object — and then only enqueues work for the I/O thread.
"""

from __future__ import annotations

import collections
import functools
import itertools
import os
import threading
import time
import weakref
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from concurrent import futures as cf
from dataclasses import dataclass
from typing import Any

from .. import errors
from .. import messages as m
from ..transport import serialize, shm
from ..transport.header import BATCH_DEPENDENCIES, MAX_HEADER_BYTES, dumps_header
from ..transport.security import Security
from ..transport.sockets import MAX_FRAME_BYTES
from . import chunks
from . import current as _current
from .client import ClientCore
from .future import Future, KeyRef
from .waiting import as_completed as _as_completed
from .waiting import wait as _wait

LARGE_ARGUMENTS = 64 * 1024  # arguments bigger than this go straight to a worker as data
SUBMIT_BATCH = 1000  # tasks per message when map() submits many
_ATOMIC = (int, float, str, bytes, bool, type(None), complex)
_REF_TYPES = (Future, KeyRef)  # pickled as their keys (persistent ids)


@dataclass(frozen=True)
class ExecutorStatistics:
    """A snapshot of an executor's counters (``Executor.statistics()``)."""

    submitted: int
    finished: int
    pending: int
    workers: int
    client_bytes_sent: int
    client_bytes_received: int
    scheduler_bytes_sent: int
    scheduler_bytes_received: int
    #: of the client's bytes, those that went as shared-memory files (workers on this host)
    shm_bytes_sent: int = 0
    shm_bytes_received: int = 0
    #: messages the scheduler received (workers report tiny tasks several to a message)
    scheduler_messages_received: int = 0


class Executor(cf.Executor):
    """Run calls on a pool of worker processes, on this machine or a cluster.

    ``Executor(4)`` is ``ProcessPoolExecutor(4)``'s drop-in: an int first argument is
    ``max_workers``; a string is a scheduler address (``"tcp://host:port"``).
    """

    def __init__(
        self,
        address: str | int | None = None,
        max_workers: int | None = None,
        *,
        threads_per_worker: int = 1,
        initializer: Callable[..., Any] | None = None,
        initargs: tuple = (),
        security: str | os.PathLike | Security | None = None,
        timeout: float = 10,
        memory_limit: int | str | None = None,
    ) -> None:
        if isinstance(address, bool):
            raise TypeError("address must be a string (scheduler address) or an int (max_workers)")
        if isinstance(address, int):
            if max_workers is not None:
                raise TypeError("max_workers given twice (an int first argument is max_workers)")
            address, max_workers = None, address
        if max_workers is not None and max_workers <= 0:
            raise ValueError("max_workers must be greater than 0")
        if threads_per_worker <= 0:
            raise ValueError("threads_per_worker must be greater than 0")
        if initializer is not None and not callable(initializer):
            raise TypeError("initializer must be a callable")
        self._functions = serialize.FunctionCache()
        self._shutdown_lock = threading.Lock()
        self._shutdown = False
        self._pid = os.getpid()
        init_frames = None
        if initializer is not None:
            init_frames = serialize.dumps((initializer, tuple(initargs)), what="initializer")
            _check_initializer_size(init_frames)
        self._core = ClientCore(
            address,
            nworkers=max_workers or os.cpu_count() or 1,
            threads_per_worker=threads_per_worker,
            security=_security(security, address),
            timeout=timeout,
            memory_limit=_parse_size(memory_limit),
        )
        self._max_workers = max_workers
        core = self._core
        weakref.finalize(self, core.command, "executor-gone")
        if init_frames is not None:
            core.command("initializer", init_frames)
        self._scatter_turn = itertools.count()
        self._context_tokens: list = []
        self._workers_cache: tuple[float, list[dict]] | None = None
        _current.register(self)

    # --- the stdlib contract -----------------------------------------------------------------

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future:
        """Schedule ``fn(*args, **kwargs)``; return a :class:`meshpool.Future`."""
        return self._submit(fn, args, kwargs, None)

    def map(
        self,
        fn: Callable[..., Any],
        *iterables: Iterable[Any],
        timeout: float | None = None,
        chunksize: int = 1,
        buffersize: int | None = None,
    ) -> Iterator[Any]:
        """Like ``Executor.map``: results come back in order. Everything is submitted now,
        unless ``buffersize`` (Python 3.14's meaning): then the iterables are read lazily and
        at most that many submitted tasks wait to be yielded, so an endless generator can be
        mapped in constant memory."""
        return self._map(fn, iterables, timeout, chunksize, None, buffersize)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        with self._shutdown_lock:
            self._shutdown = True
        if os.getpid() != self._pid:
            return
        self._core.close(wait, cancel_futures)

    def as_completed(
        self, fs: Iterable[cf.Future], timeout: float | None = None
    ) -> Iterator[cf.Future]:
        """Yield futures as they finish (``meshpool.as_completed``)."""
        return _as_completed(fs, timeout=timeout)

    # --- extras ------------------------------------------------------------------------------

    def options(self, **options: Any) -> ExecutorOptions:
        """A view whose ``submit``/``map`` apply task options: ``priority``, ``retries``,
        ``workers`` (names), ``resources`` ({"GPU": 1}), ``at_most_once``."""
        return ExecutorOptions(self, _check_options(options))

    def scatter(self, data: Any, workers: list[str] | None = None) -> Any:
        """Place data on workers; return a future (or a list of futures, for a list)."""
        single = not isinstance(data, (list, tuple))
        items = [data] if single else list(data)
        futures = self._scatter(items, workers)
        return futures[0] if single else futures

    def gather(self, futures: Iterable[cf.Future], timeout: float | None = None) -> list:
        """Results of many futures, large ones fetched from the workers in one round."""
        futures = list(futures)
        _wait(futures, timeout=timeout)  # (inside a task: gives the slot back meanwhile)
        remote = [f.key for f in futures if isinstance(f, Future) and _is_remote(f)]
        if remote:
            frames = self._core.fetch_many(remote).result(timeout)
            for f in futures:
                if isinstance(f, Future) and f.key in frames and _is_remote(f):
                    with f._condition:
                        f._result = _packed(frames[f.key])
        return [f.result(timeout) for f in futures]

    def workers(self) -> list[dict]:
        """The cluster's workers: name, id, address, threads, memory limit, running tasks..."""
        return self._core.request(m.GetWorkers, self._core.timeout)

    def retire_workers(self, names: list[str], timeout: float | None = None) -> list[str]:
        """Retire the named workers gracefully: they take no new tasks, finish what they run,
        and hand the results only they hold to the other workers before closing (no future
        loses its value). Returns the names retired. A local cluster does not restart them."""
        return self._core.request(lambda rid: m.RetireWorkers(rid, list(names)), timeout)

    def wait_for_workers(self, n: int = 1, timeout: float | None = None) -> None:
        """Block until at least ``n`` workers have joined."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while len(self.workers()) < n:
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"fewer than {n} workers joined within {timeout} s")
            time.sleep(0.02)

    @property
    def scheduler_pid(self) -> int | None:
        """The scheduler's process id when it runs apart from this process, else None."""
        if self._core.server is not None:
            return None
        return self._scheduler_info()["pid"]

    def _scheduler_info(self) -> dict:
        core = self._core
        if core.server is not None:
            return core.server.info()
        return core.request(m.GetSchedulerInfo, core.timeout)

    @property
    def address(self) -> str:
        core = self._core
        return core.address if core.address is not None else core.server.address

    def statistics(self) -> ExecutorStatistics:
        """Counters of this executor, and bytes the scheduler sent and received (all clients'
        traffic for a shared scheduler). Bulk data moves between workers and is not counted."""
        core = self._core
        stats = dict(core.stats)
        info = self._scheduler_info()
        return ExecutorStatistics(
            submitted=stats["submitted"],
            finished=stats["finished"],
            pending=len(core.pending),
            workers=info["workers"],
            client_bytes_sent=stats["client_bytes_sent"],
            client_bytes_received=stats["client_bytes_received"],
            scheduler_bytes_sent=info["bytes_sent"],
            scheduler_bytes_received=info["bytes_received"],
            shm_bytes_sent=stats["shm_bytes_sent"],
            shm_bytes_received=stats["shm_bytes_received"],
            scheduler_messages_received=info.get("messages_received", 0),
        )

    def __enter__(self) -> Executor:
        self._context_tokens.append(_current.enter(self))
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._context_tokens:
            _current.leave(self._context_tokens.pop())
        self.shutdown(wait=True)

    # --- graphs ------------------------------------------------------------------------------

    def get(self, dsk: Any, keys: Any, **kwargs: Any) -> Any:
        """Run a dask-style dict graph on the cluster, as one submission; results are shaped
        like ``dask.get``'s (a list of keys gives a tuple). Accepts dask's HighLevelGraph, so
        ``dask.compute(x, scheduler=executor.get)`` runs dask collections here."""
        from . import graphs  # (the graph package is loaded when first needed)

        return graphs.get(self, dsk, keys, priority=kwargs.pop("priority", 0))

    def compute(self, obj: Any, *more: Any, priority: int = 0) -> Any:
        """Submit delayed objects; a Future for one, a list of futures for several."""
        from . import graphs

        futures = graphs.compute(self, (obj, *more), priority)
        return futures[0] if not more else futures

    def __repr__(self) -> str:
        where = self._core.address or "local cluster"
        return f"<meshpool.Executor {where}{' (shut down)' if self._shutdown else ''}>"

    # --- submitting --------------------------------------------------------------------------

    def _check_open(self) -> None:
        if os.getpid() != self._pid:
            raise RuntimeError(
                "this meshpool.Executor was created in another process and inherited through "
                "fork(); create a new Executor in this process"
            )
        if self._shutdown:
            raise RuntimeError("cannot schedule new futures after shutdown")
        broken = self._core.broken
        if broken is not None:
            if isinstance(broken, cf.BrokenExecutor):
                raise type(broken)(*broken.args)
            raise RuntimeError("cannot schedule new futures after shutdown")

    def _new_key(self, fn: Any) -> str:
        name = getattr(fn, "__name__", None) or type(fn).__name__
        return f"{name}-{self._core.prefix}-{next(self._core.counter)}"

    def _prepare(
        self, fn: Callable, args: tuple, kwargs: dict, options: dict | None
    ) -> tuple[Future, tuple, list]:
        """Serialize one call: (future, task row, frames). Raises here on bad input."""
        # Plain pickle refuses futures (Future.__reduce__ raises), so when it succeeds there is
        # no dependency to look for; only otherwise are the arguments scanned.
        plain = serialize.dumps_plain((args, kwargs))
        deps = [] if plain is not None else _find_futures(args, kwargs)
        for dep in deps:
            if dep._client is not self._core:
                raise ValueError(f"{dep!r} belongs to another executor")
        key = self._new_key(fn)
        priority = (-(options or {}).get("priority", 0), next(self._core.counter), 0)
        row, frames = self._prepare_task(fn, args, kwargs, deps, options, key, priority, plain)
        if deps:
            self._core.lineage[key] = row[1]
        return Future(key, self._core), row, frames

    def _prepare_task(
        self,
        fn: Callable,
        args: tuple,
        kwargs: dict,
        deps: list,
        options: dict | None,
        key: Any,
        priority: tuple,
        frames: list | None = None,
        keep: bool = True,
    ) -> tuple[tuple, list]:
        """Serialize one task whose dependencies (futures or key refs) are ``deps``;
        ``frames``, when given, are its arguments already pickled. Large arguments are stored
        on a worker first; with ``keep`` (the task has a future) the client keeps them until
        the task ends, to send them again if that worker dies first."""
        if not callable(fn):
            raise TypeError(f"{fn!r} is not callable")
        fn_bytes = self._functions.dumps(fn)
        if frames is None:
            frames = serialize.dumps(
                (args, kwargs), ref_type=_REF_TYPES if deps else None, what=f"argument of {fn!r}:"
            )
        dep_keys = [d.key for d in deps]
        if len(dep_keys) > BATCH_DEPENDENCIES:
            _check_dependencies_size(fn, dep_keys)
        task_options = _task_options(options)
        if serialize.nbytes(frames) > LARGE_ARGUMENTS:
            args_key = ("args", key)
            if keep:
                self._core.kept[args_key] = frames
            self._store([args_key], [frames], self._args_workers(task_options), kept=keep)
            dep_keys.append(args_key)
            task_options = dict(task_options or {}, args_key=args_key)
            frames = []
        return (key, dep_keys, 1 + len(frames), priority, task_options), [fn_bytes, *frames]

    def _submit(self, fn: Callable, args: tuple, kwargs: dict, options: dict | None) -> Future:
        with self._shutdown_lock:
            self._check_open()
            fut, row, frames = self._prepare(fn, args, kwargs, options)
            self._core.command("submit", [row], frames, [fut])
            if row[4] and "args_key" in row[4]:
                self._core.command("release", row[4]["args_key"])
        return fut

    def _submit_rows(self, rows: list, frames: list, futures: list[Future]) -> None:
        """Submit prepared tasks; then release their large arguments' keys, which the client
        wanted only until the tasks that need them were submitted."""
        self._core.command("submit", rows, frames, futures)
        args_keys = [row[4]["args_key"] for row in rows if row[4] and "args_key" in row[4]]
        if args_keys:
            self._core.command("release-many", args_keys)

    def _submit_many(
        self, fn: Callable, arg_tuples: Iterable[tuple], options: dict | None
    ) -> list[Future]:
        futures: list[Future] = []
        rows: list = []
        frames: list = []
        batch: list[Future] = []
        dependencies = 0
        with self._shutdown_lock:
            self._check_open()
            for args in arg_tuples:
                fut, row, task_frames = self._prepare(fn, args, {}, options)
                rows.append(row)
                frames.extend(task_frames)
                batch.append(fut)
                dependencies += len(row[1])
                if len(rows) >= SUBMIT_BATCH or dependencies >= BATCH_DEPENDENCIES:
                    self._submit_rows(rows, frames, batch)
                    futures.extend(batch)
                    rows, frames, batch, dependencies = [], [], [], 0
            if rows:
                self._submit_rows(rows, frames, batch)
                futures.extend(batch)
        return futures

    def _map(
        self,
        fn: Callable,
        iterables: tuple,
        timeout: float | None,
        chunksize: int,
        options: dict | None,
        buffersize: int | None = None,
    ) -> Iterator[Any]:
        if chunksize < 1:
            raise ValueError("chunksize must be >= 1.")
        if buffersize is not None and (not isinstance(buffersize, int) or buffersize < 1):
            raise ValueError("buffersize must be None or an integer >= 1.")
        end_time = None if timeout is None else timeout + time.monotonic()
        if chunksize == 1:
            calls: Iterator[tuple] = zip(*iterables, strict=False)
            fn_to_run = fn
        elif len(iterables) == 1:  # the function travels once (cached), chunks carry data
            calls = ((chunk,) for chunk in chunks.chunks_of_items(iterables[0], chunksize))
            fn_to_run = functools.partial(chunks.run_chunk_of_items, fn)
        else:
            calls = ((chunk,) for chunk in chunks.chunks_of_tuples(iterables, chunksize))
            fn_to_run = functools.partial(chunks.run_chunk_of_tuples, fn)
        if buffersize is not None:
            results = self._bounded_results(fn_to_run, calls, buffersize, end_time, options)
        else:
            fs = self._submit_many(fn_to_run, calls, options)
            results = _result_iterator(fs, end_time, self._core)
        return results if chunksize == 1 else itertools.chain.from_iterable(results)

    def _bounded_results(
        self,
        fn: Callable,
        calls: Iterator[tuple],
        buffersize: int,
        end_time: float | None,
        options: dict | None,
    ) -> Iterator[Any]:
        window: collections.deque[Future] = collections.deque(
            self._submit(fn, args, {}, options) for args in itertools.islice(calls, buffersize)
        )
        executor_ref = weakref.ref(self)
        del self  # the generator must not keep the executor alive

        def results() -> Iterator[Any]:
            try:
                while window:
                    executor = executor_ref()
                    if executor is not None and not executor._shutdown:
                        args = next(calls, None)
                        if args is not None:
                            window.append(executor._submit(fn, args, {}, options))
                    del executor
                    fut = window[0]
                    if end_time is None:
                        value = fut.result()
                    else:
                        value = fut.result(end_time - time.monotonic())
                    window.popleft()
                    yield value
            finally:
                for fut in window:
                    fut.cancel()

        return results()

    # --- asyncio -------------------------------------------------------------------------------

    async def __aenter__(self) -> Executor:
        self._context_tokens.append(_current.enter(self))
        return self

    async def __aexit__(self, *exc: Any) -> None:
        if self._context_tokens:
            _current.leave(self._context_tokens.pop())
        import asyncio  # (imported lazily: it costs ~60 ms at start-up)

        await asyncio.to_thread(self.shutdown, True)

    async def gather_async(self, futures: Iterable[cf.Future]) -> list:
        """Results of many futures without blocking the event loop."""
        import asyncio

        return list(await asyncio.gather(*(_awaitable(f) for f in futures)))

    async def map_async(
        self,
        fn: Callable[..., Any],
        *iterables: Iterable[Any],
        buffersize: int | None = 1000,
    ) -> AsyncIterator[Any]:
        """``async for result in ex.map_async(fn, items)``: results in order, never blocking
        the event loop; at most ``buffersize`` tasks in flight (None: submit everything)."""
        import asyncio

        calls = zip(*iterables, strict=False)
        window: collections.deque[Future] = collections.deque()
        try:
            while True:
                while buffersize is None or len(window) < buffersize:
                    args = next(calls, None)
                    if args is None:
                        break
                    window.append(self.submit(fn, *args))
                    if len(window) % 100 == 0:
                        await asyncio.sleep(0)  # let the loop breathe during long submits
                if not window:
                    return
                yield await window.popleft()
        finally:
            for fut in window:
                fut.cancel()

    # --- data --------------------------------------------------------------------------------

    def _scatter(self, items: list, workers: list[str] | None) -> list[Future]:
        with self._shutdown_lock:
            self._check_open()
            keys = [f"data-{self._core.prefix}-{next(self._core.counter)}" for _ in items]
            frames = [serialize.dumps(item, what="scattered object") for item in items]
            futures = [Future(key, self._core) for key in keys]
            self._store(keys, frames, workers, futures)
        return futures

    def _store(
        self,
        keys: list,
        frames_per_key: list[list],
        names: list[str] | None,
        futures: list[Future] | None = None,
        kept: bool = False,
    ) -> None:
        """Send data straight to workers' data sockets, round robin among ``names`` (or all).
        ``kept``: the client holds a copy and resends it if asked (``Scatter.kept``)."""
        targets = self._live_workers(names)
        by_worker: dict[str, tuple[list, list, list]] = {}
        hosts: dict[str, str] = {}
        for key, frames in zip(keys, frames_per_key, strict=True):
            ws = targets[next(self._scatter_turn) % len(targets)]
            items, out, rows = by_worker.setdefault(ws["address"], ([], [], []))
            hosts[ws["address"]] = ws.get("host", "")
            items.append((key, len(frames)))
            out.extend(frames)
            rows.append((key, ws["id"]))
        if futures is not None:
            self._core.command(
                "call", lambda core: core.pending.update({f.key: f for f in futures})
            )
        for address, (items, out, rows) in by_worker.items():
            # a worker on this host gets big frames as shared-memory files, copied here in the
            # caller's thread (the I/O thread only sends their names)
            out, spec = shm.pack_frames(out, hosts[address], self._core.prefix, self._core.shm_pool)
            self._core.command("store", address, items, out, spec, rows, kept)

    def _args_workers(self, task_options: dict | None) -> list[str] | None:
        """Where a task's large arguments go: to a worker it may run on (sent to another, they
        would cross to that one again), or to any if none of those is up."""
        names = task_options.get("workers") if task_options else None
        if names and any(w["name"] in names or w["id"] in names for w in self._live_workers(None)):
            return list(names)
        return None

    def _live_workers(self, names: list[str] | None) -> list[dict]:
        """Workers to send data to; the list is reused for a second (a round trip saved per
        large argument), a stale entry only costs a retry through the scheduler."""
        cached = self._workers_cache
        if cached is not None and time.monotonic() - cached[0] < 1.0:
            workers = cached[1]
            if names:
                workers = [w for w in workers if w["name"] in names or w["id"] in names]
            if workers:
                return workers
        deadline = time.monotonic() + self._core.timeout
        while True:
            workers = self.workers()
            self._workers_cache = (time.monotonic(), workers)
            if names:
                workers = [w for w in workers if w["name"] in names or w["id"] in names]
            if workers:
                return workers
            if time.monotonic() > deadline:
                raise errors.CommError(
                    f"no {'matching ' if names else ''}worker joined within "
                    f"{self._core.timeout:g} s to receive data"
                )
            time.sleep(0.01)


class ExecutorOptions:
    """``Executor.options(...)``: ``submit`` and ``map`` with task options applied."""

    def __init__(self, executor: Executor, options: dict) -> None:
        self._executor = executor
        self._options = options

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future:
        return self._executor._submit(fn, args, kwargs, self._options)

    def map(
        self,
        fn: Callable[..., Any],
        *iterables: Iterable[Any],
        timeout: float | None = None,
        chunksize: int = 1,
        buffersize: int | None = None,
    ) -> Iterator[Any]:
        return self._executor._map(fn, iterables, timeout, chunksize, self._options, buffersize)

    def options(self, **options: Any) -> ExecutorOptions:
        return ExecutorOptions(self._executor, {**self._options, **_check_options(options)})


_OPTION_NAMES = {"priority", "retries", "workers", "resources", "at_most_once"}


def _check_options(options: dict) -> dict:
    unknown = set(options) - _OPTION_NAMES
    if unknown:
        raise TypeError(f"unknown task options {sorted(unknown)}; known: {sorted(_OPTION_NAMES)}")
    if "workers" in options and isinstance(options["workers"], str):
        options["workers"] = [options["workers"]]
    return options


def _task_options(options: dict | None) -> dict | None:
    if not options:
        return None
    out = {k: v for k, v in options.items() if k != "priority" and v not in (None, 0, False)}
    if "workers" in out:
        out["workers"] = list(out["workers"])
    return out or None


def _find_futures(args: tuple, kwargs: dict) -> list[Future]:
    """Meshpool futures anywhere in builtin containers inside the arguments."""
    found: list[Future] = []
    seen: set[int] = set()
    stack: list = [args]
    if kwargs:
        stack.append(kwargs)
    while stack:
        obj = stack.pop()
        typ = type(obj)
        if typ in _ATOMIC:
            continue
        if isinstance(obj, Future):
            if id(obj) not in seen:
                seen.add(id(obj))
                found.append(obj)
        elif typ in (list, tuple, set, frozenset):
            stack.extend(x for x in obj if type(x) not in _ATOMIC)
        elif typ is dict:
            stack.extend(v for v in obj.values() if type(v) not in _ATOMIC)
    return found


def _result_iterator(fs: list[Future], end_time: float | None, core: ClientCore) -> Iterator[Any]:
    """Yield results in order; on error, timeout or close, cancel what has not started."""
    try:
        fs.reverse()
        while fs:
            fut = fs[-1]
            if end_time is None:
                yield fut.result()
            else:
                yield fut.result(end_time - time.monotonic())
            fs.pop()
    finally:
        leftover = [f for f in fs if not f.done()]
        if leftover:
            core.cancel(leftover, 5.0)


def _awaitable(fut: cf.Future) -> Any:
    import asyncio

    return fut if isinstance(fut, Future) else asyncio.wrap_future(fut)


def _is_remote(fut: Future) -> bool:
    from .future import Remote

    return fut.done() and not fut.cancelled() and type(fut._result) is Remote


def _packed(frames: list) -> Any:
    from .future import Packed

    return Packed(frames)


def _security(value: Any, address: Any) -> Security | None:
    """Explicit credentials, or those recorded for a TCP address (None for the local cluster)."""
    if isinstance(value, Security):
        return value
    if not isinstance(address, str):
        return None
    from ..transport.security import client_credentials

    return client_credentials(os.fspath(value) if value is not None else None, address)


_UNITS = {"": 1, "b": 1, "k": 1e3, "kb": 1e3, "m": 1e6, "mb": 1e6, "g": 1e9, "gb": 1e9}
_UNITS.update({"kib": 2**10, "mib": 2**20, "gib": 2**30, "t": 1e12, "tb": 1e12})


def _check_dependencies_size(fn: Callable, dep_keys: list) -> None:
    """A task's dependency keys ride in a message header (capped: MAX_HEADER_BYTES)."""
    nbytes = len(dumps_header(tuple(dep_keys)))
    if nbytes > MAX_HEADER_BYTES // 2:
        raise ValueError(
            f"a call of {fn!r} depends on {len(dep_keys)} futures, whose keys alone take "
            f"{nbytes / 2**20:.0f} MiB, over the {MAX_HEADER_BYTES // 2**20 // 2} MiB a task's "
            "description may take: combine them in steps (e.g. a tree of partial sums)"
        )


def _check_initializer_size(frames: list) -> None:
    """The initializer travels through the scheduler (to every worker, also later ones), whose
    connections cap frames at MAX_FRAME_BYTES: refuse a bigger one here, clearly."""
    biggest = max(serialize.nbytes([f]) for f in frames)
    if biggest > MAX_FRAME_BYTES:
        raise errors.SerializationError(
            f"initializer and initargs pickle to a {biggest / 2**20:.0f} MiB piece, over the "
            f"{MAX_FRAME_BYTES // 2**20} MiB that may travel through the scheduler: have the "
            "initializer load large data itself (e.g. from a file), rather than pass it in "
            "initargs"
        )


def _parse_size(value: int | str | None) -> int | None:
    """``"2GB"`` / ``"512MiB"`` / ``1e9`` -> bytes."""
    if value is None or isinstance(value, (int, float)):
        return None if value is None else int(value)
    text = value.strip().lower().replace(" ", "")
    number = text.rstrip("abcdefghijklmnopqrstuvwxyz")
    unit = text[len(number) :]
    if unit not in _UNITS or not number:
        raise ValueError(f"cannot read {value!r} as a size (e.g. '2GB', '512MiB')")
    return int(float(number) * _UNITS[unit])
