"""A joblib parallel backend named ``"meshpool"``: ``joblib.Parallel`` on a meshpool cluster.

>>> import joblib, meshpool.joblib                  # doctest: +SKIP
>>> with meshpool.Executor() as ex, joblib.parallel_config(backend="meshpool"):
...     joblib.Parallel()(joblib.delayed(pow)(i, 2) for i in range(4))
[0, 1, 4, 9]

Theory of operation
-------------------
Importing this module registers :class:`MeshpoolBackend` with joblib. joblib drives it; the backend
only turns joblib's *batches* into meshpool tasks::

    Parallel ── submit(batch, callback) ──▶ executor.submit(run_batch, items, nested) ─▶ workers
        ▲                                                                   │
        └── callback(future) on meshpool's callback thread ◀── future done ─┘
            (joblib reads the result, then dispatches the next batch)

- **Which cluster.** An ``executor=`` given to the backend, else one connected to ``address=``
  (``parallel_config(backend="meshpool", address="tcp://...")``; one shared executor per address
  for the life of the process), else :func:`meshpool.current_executor` at the moment a
  ``Parallel`` call starts (so ``parallel_config`` may be entered before the executor exists).
- **How many jobs.** ``n_jobs=-1`` (the default under this backend) is the cluster's total
  threads, ``-2`` one fewer, and so on; a positive ``n_jobs`` is taken as asked. joblib runs a
  call in the caller when the effective count is 1, so the count is at least 2 unless
  ``n_jobs=1`` was asked for: a cluster of one thread, or one whose workers are still joining,
  still gets the work. (When no worker has joined yet, the backend first waits for one.)
- **Batching.** :class:`joblib._parallel_backends.AutoBatchingMixin` sizes batches from how long
  they take (aiming at 0.2-2 s each), so many tiny calls become few tasks; ``batch_size=`` sets it.
- **Results and errors** come back through the done-callback joblib passes to ``submit``; a call
  that raised re-raises with its own type and the remote traceback. On an error joblib calls
  :meth:`~MeshpoolBackend.abort_everything`, which cancels the batches that have not started.
- **Large arguments** (array-likes over :data:`SCATTER_BYTES`) are scattered to the cluster once
  per ``Parallel`` call and passed to every batch that uses them as a future, so a large ``X``
  that ``GridSearchCV`` hands to every fit travels once rather than once per batch. Objects are
  recognised by identity for the length of the call.
- **Nested parallelism.** A ``Parallel`` inside a task runs with joblib's threading backend (then
  sequentially one level deeper), like loky's workers do. ``backend="meshpool"`` asked for inside a
  meshpool worker without an explicit ``executor``/``address`` also falls back to threads: a task
  that waited on tasks queued behind it on the same busy workers could wait forever.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable, Iterable
from concurrent import futures as cf
from typing import TYPE_CHECKING, Any

import joblib
from joblib._parallel_backends import (
    AutoBatchingMixin,
    FallbackToBackend,
    ParallelBackendBase,
    ThreadingBackend,
)

from .executor.current import current_executor

if TYPE_CHECKING:
    from .executor.executor import Executor
    from .executor.future import Future

__all__ = ["MeshpoolBackend", "SCATTER_BYTES", "register"]

BACKEND_NAME = "meshpool"
# Arguments at least this big (``nbytes``, else ``sys.getsizeof``) are scattered once per call
# instead of travelling with every batch. Smaller ones cost less to resend than the extra round
# trip a scatter takes; bigger ones would be pickled and sent again for every batch.
SCATTER_BYTES = 1 << 20
WAIT_FOR_WORKERS = 10.0  # seconds a call waits for a first worker before it gives up

_by_address: dict[str, Executor] = {}
_by_address_lock = threading.Lock()


class MeshpoolBackend(AutoBatchingMixin, ParallelBackendBase):  # type: ignore[misc]
    """joblib's ``"meshpool"`` backend: batches of calls run as tasks on a meshpool cluster.

    ``MeshpoolBackend(executor=ex)`` runs on ``ex``; ``address="tcp://host:port"`` connects to a
    cluster; with neither, the current executor is used. Pass an instance to
    ``joblib.parallel_config(backend=...)`` or ``Parallel(backend=...)``, or use the registered
    name with ``parallel_config(backend="meshpool", address=...)``.
    """

    default_n_jobs = -1
    supports_retrieve_callback = True
    supports_sharedmem = False
    uses_threads = False

    def __init__(
        self,
        executor: Executor | None = None,
        *,
        address: str | None = None,
        scatter_bytes: int = SCATTER_BYTES,
        **backend_kwargs: Any,
    ) -> None:
        if executor is not None and address is not None:
            raise TypeError("give the meshpool backend an executor or an address, not both")
        super().__init__(**backend_kwargs)
        self._given = executor
        self._address = address
        self._scatter_bytes = scatter_bytes
        self._executor: Executor | None = None
        self._lock = threading.Lock()
        self._pending: set[cf.Future] = set()
        self._scattered: dict[int, tuple[Any, Future]] = {}

    # --- which cluster, how many jobs ---------------------------------------------------------

    def configure(
        self,
        n_jobs: int = 1,
        parallel: Any = None,
        prefer: Any = None,
        require: Any = None,
        **backend_kwargs: Any,
    ) -> int:
        """Pick the executor for this ``Parallel`` call; return its effective ``n_jobs``."""
        self.parallel = parallel
        if self._given is None and self._address is None and _inside_worker():
            raise FallbackToBackend(ThreadingBackend(nesting_level=self.nesting_level))
        self._executor = self._resolve()
        return self.effective_n_jobs(n_jobs)

    def effective_n_jobs(self, n_jobs: int | None) -> int:
        if n_jobs == 0:
            raise ValueError("n_jobs == 0 in Parallel has no meaning")
        if n_jobs == 1:
            return 1
        if n_jobs is not None and n_jobs > 1:
            return n_jobs
        if self._given is None and self._address is None and _inside_worker():
            return ThreadingBackend().effective_n_jobs(n_jobs)
        threads = self._cluster_threads(self._executor or self._resolve())
        requested = threads + 1 + (n_jobs if n_jobs is not None else self.default_n_jobs)
        return max(requested, 2)

    def _resolve(self) -> Executor:
        if self._given is not None:
            return self._given
        if self._address is not None:
            return _executor_for(self._address)
        executor = current_executor()
        if executor is None:
            raise RuntimeError(
                "joblib backend 'meshpool': no meshpool executor is running here; create one "
                "(meshpool.Executor()) or pass parallel_config(backend='meshpool', "
                "address='tcp://host:port')"
            )
        return executor

    @staticmethod
    def _cluster_threads(executor: Executor) -> int:
        threads = _threads(executor)
        if threads == 0:
            executor.wait_for_workers(1, timeout=WAIT_FOR_WORKERS)
            threads = _threads(executor)
        return threads

    # --- running batches ----------------------------------------------------------------------

    def submit(
        self, func: Callable[[], list], callback: Callable[[Any], None] | None = None
    ) -> Any:
        """Run one joblib batch as a task; ``callback(future)`` when it is done."""
        executor = self._executor if self._executor is not None else self._resolve()
        items = getattr(func, "items", None)  # joblib's BatchedCalls (its dask backend reads it)
        if items is None:
            future = executor.submit(func)
        else:
            items = [
                (f, self._share(executor, args), self._share(executor, kw)) for f, args, kw in items
            ]
            future = executor.submit(run_batch, items, self.get_nested_backend())
        with self._lock:
            self._pending.add(future)
        future.add_done_callback(self._forget)
        if callback is not None:
            future.add_done_callback(callback)
        return future

    def apply_async(
        self, func: Callable[[], list], callback: Callable[[Any], None] | None = None
    ) -> Any:
        """joblib < 1.5 calls this name; later versions call :meth:`submit`."""
        return self.submit(func, callback)

    def retrieve_result_callback(self, out: Future) -> list:
        return out.result()

    def _forget(self, future: cf.Future) -> None:
        with self._lock:
            self._pending.discard(future)

    def _share(self, executor: Executor, values: Any) -> Any:
        """``args`` (tuple) or ``kwargs`` (dict) with large values replaced by scattered futures."""
        if isinstance(values, dict):
            return {k: self._scatter_large(executor, v) for k, v in values.items()}
        return tuple(self._scatter_large(executor, v) for v in values)

    def _scatter_large(self, executor: Executor, value: Any) -> Any:
        if not _is_large(value, self._scatter_bytes):
            return value
        with self._lock:
            held = self._scattered.get(id(value))
        if held is not None:
            return held[1]
        future = executor.scatter(value)
        with self._lock:
            # The object is held too, so its id cannot be reused by another while the call lasts.
            held = self._scattered.setdefault(id(value), (value, future))
        return held[1]

    def abort_everything(self, ensure_ready: bool = True) -> None:
        """Cancel the batches that have not started (joblib will not read their results)."""
        with self._lock:
            pending = list(self._pending)
            self._pending.clear()
        for future in pending:
            future.cancel()

    def stop_call(self) -> None:
        with self._lock:
            self._scattered.clear()

    def terminate(self) -> None:
        self.stop_call()
        self.reset_batch_stats()
        self._executor = None

    def __repr__(self) -> str:
        target = self._given or self._address or "current executor"
        return f"<MeshpoolBackend on {target}>"


def run_batch(items: Iterable[tuple[Callable, tuple, dict]], nested: tuple[Any, Any]) -> list:
    """Run one joblib batch on a worker, nested ``Parallel`` calls on ``nested`` (as joblib's
    ``BatchedCalls`` does)."""
    backend, n_jobs = nested
    with joblib.parallel_config(backend=backend, n_jobs=n_jobs):
        return [func(*args, **kwargs) for func, args, kwargs in items]


def register() -> None:
    """Register the ``"meshpool"`` backend with joblib (done when this module is imported)."""
    joblib.register_parallel_backend(BACKEND_NAME, MeshpoolBackend)


def _threads(executor: Executor) -> int:
    return sum(int(w.get("nthreads", 1)) for w in executor.workers())


def _is_large(value: Any, limit: int) -> bool:
    """Worth scattering: a big array-like (or bytes) object; never a container to unpack."""
    if isinstance(value, (list, tuple, set, frozenset, dict, str, int, float, bool, type(None))):
        return False
    nbytes = getattr(value, "nbytes", None)
    if not isinstance(nbytes, int):
        try:
            nbytes = sys.getsizeof(value)
        except TypeError:
            return False
    return nbytes >= limit


def _inside_worker() -> bool:
    """Is this a meshpool worker process (started as ``python -m meshpool.worker``)?"""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    return spec is not None and spec.name in ("meshpool.worker.__main__", "meshpool.worker")


def _executor_for(address: str) -> Executor:
    """One executor per cluster address for this process, reconnected if it broke."""
    from .executor.executor import Executor

    with _by_address_lock:
        executor = _by_address.get(address)
        if executor is not None:
            try:
                executor.workers()
            except (cf.BrokenExecutor, RuntimeError):
                executor = None
        if executor is None:
            executor = _by_address[address] = Executor(address)
        return executor


register()
