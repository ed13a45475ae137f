"""Adapters giving every executor system the same small interface.

Nothing heavy is imported at module level: each adapter imports its library in
``start()`` so that an absent or broken library only fails its own cells, and
so that the ``startup`` probe times the library import itself.

Interface of an adapter (``System``):

* ``start(n_workers)`` / ``shutdown()``
* ``submit(fn, *args)`` -> handle (a future, a dask future or a Ray ObjectRef);
  handles may be passed as arguments when ``FUTURE_ARGS`` is true
* ``result(handle)``, ``gather(handles)``, ``wait_all(handles)``
* ``map(fn, items, chunksize)`` -> list
* ``submit_on(worker_index, fn, *args)`` pins a task to one worker
* ``memory_pids()`` -> (pids whose RSS is counted, note)
* ``after_release()`` waits until the system has forgotten released tasks
"""

from __future__ import annotations

import concurrent.futures as cf
import os
import time
import warnings

N_WORKERS = 2

# Which systems accept futures as task arguments (chain, tree, w2w need it).
# Kept here, import-free, so the parent can print "—" without starting anything.
FUTURE_ARGS = {
    "meshpool": True,
    "processpool": False,
    "loky": False,
    "dask": True,
    "ray": True,
}

ALL_SYSTEMS = ["meshpool", "processpool", "loky", "dask", "ray"]

LABELS = {
    "meshpool": "meshpool",
    "processpool": "ProcessPool",
    "loky": "loky",
    "dask": "dask.distributed",
    "ray": "Ray",
}


class NotApplicable(Exception):
    """The workload cannot be expressed on this system."""


class System:
    name = "?"

    def start(self, n_workers: int = N_WORKERS) -> None:
        raise NotImplementedError

    def shutdown(self) -> None:
        raise NotImplementedError

    def submit(self, fn, *args):
        raise NotImplementedError

    def result(self, handle):
        raise NotImplementedError

    def gather(self, handles):
        return [self.result(h) for h in handles]

    def wait_all(self, handles) -> None:
        raise NotImplementedError

    def map(self, fn, items, chunksize: int = 1):
        raise NotImplementedError

    def submit_on(self, worker_index: int, fn, *args):
        raise NotApplicable(f"{self.name} cannot pin tasks to workers")

    def memory_pids(self):
        return [os.getpid()], "caller process"

    def after_release(self) -> None:
        time.sleep(1.0)

    def versions(self) -> dict:
        return {}


# --------------------------------------------------------------------------
# concurrent.futures-style executors
# --------------------------------------------------------------------------


class _FuturesSystem(System):
    ex = None

    def submit(self, fn, *args):
        return self.ex.submit(fn, *args)

    def result(self, handle):
        return handle.result()

    def wait_all(self, handles) -> None:
        cf.wait(handles)

    def map(self, fn, items, chunksize: int = 1):
        if chunksize == 1:
            return list(self.ex.map(fn, items))
        return list(self.ex.map(fn, items, chunksize=chunksize))

    def shutdown(self) -> None:
        if self.ex is not None:
            self.ex.shutdown()  # stdlib default: wait=True
            self.ex = None


class ProcessPoolSystem(_FuturesSystem):
    name = "processpool"

    def start(self, n_workers: int = N_WORKERS) -> None:
        # Default start method of the platform (fork on Linux with Python < 3.14).
        self.ex = cf.ProcessPoolExecutor(max_workers=n_workers)

    def versions(self) -> dict:
        import multiprocessing

        return {"start_method": multiprocessing.get_start_method()}


class LokySystem(_FuturesSystem):
    name = "loky"

    def start(self, n_workers: int = N_WORKERS) -> None:
        import loky

        self.ex = loky.get_reusable_executor(max_workers=n_workers)

    def versions(self) -> dict:
        import loky

        return {"loky": loky.__version__}


class MeshpoolSystem(_FuturesSystem):
    name = "meshpool"
    _names: list | None = None

    def start(self, n_workers: int = N_WORKERS) -> None:
        import meshpool

        self.ex = meshpool.Executor(n_workers)
        self._n = n_workers

    def worker_names(self, timeout: float = 60.0) -> list:
        if self._names is None:
            deadline = time.monotonic() + timeout
            while True:
                workers = self.ex.workers()
                if len(workers) >= self._n:
                    break
                if time.monotonic() > deadline:
                    raise TimeoutError(f"only {len(workers)} meshpool workers after {timeout}s")
                time.sleep(0.05)
            self._names = sorted(w["name"] for w in workers)
        return self._names

    def submit_on(self, worker_index: int, fn, *args):
        name = self.worker_names()[worker_index]
        return self.ex.options(workers=[name]).submit(fn, *args)

    def wait_all(self, handles) -> None:
        # meshpool.wait, as dask's adapter uses distributed.wait: the stdlib's cf.wait would
        # give every future a Condition (~1.6 KB each) for the memory workload to count
        import meshpool

        meshpool.wait(handles)

    def memory_pids(self):
        pid = self.ex.scheduler_pid  # missing attribute -> error cell
        if pid is None or pid == os.getpid():
            return [os.getpid()], "caller process (scheduler in-process)"
        return [os.getpid(), pid], "caller + scheduler process"

    def after_release(self) -> None:
        # as for dask: wait until the scheduler has forgotten the released tasks (under load
        # the release can take longer than the fixed 1 s wait), then let it settle
        deadline = time.monotonic() + 30
        while self.ex._scheduler_info()["tasks"] and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.5)

    def versions(self) -> dict:
        import meshpool

        return {"meshpool": getattr(meshpool, "__version__", "?")}


# --------------------------------------------------------------------------
# dask.distributed
# --------------------------------------------------------------------------


class DaskSystem(System):
    name = "dask"
    client = None
    cluster = None

    def start(self, n_workers: int = N_WORKERS) -> None:
        import dask
        from distributed import Client, LocalCluster

        # Large arguments are embedded in the graph on purpose (same workload
        # as the other systems); silence the advice to scatter them.
        warnings.filterwarnings("ignore", message=".*Large object.*")
        warnings.filterwarnings("ignore", message=".*Sending large graph.*")
        # No transport compression for anyone (default already False).
        dask.config.set({"distributed.comm.compression": False})
        self.cluster = LocalCluster(
            n_workers=n_workers,
            threads_per_worker=1,
            processes=True,
            dashboard_address=None,
        )
        self.client = Client(self.cluster)
        self._n = n_workers

    def shutdown(self) -> None:
        if self.client is not None:
            self.client.close()
            self.client = None
        if self.cluster is not None:
            self.cluster.close()
            self.cluster = None

    def submit(self, fn, *args):
        return self.client.submit(fn, *args, pure=False)

    def result(self, handle):
        return handle.result()

    def gather(self, handles):
        return self.client.gather(handles)

    def wait_all(self, handles) -> None:
        from distributed import wait

        wait(handles)

    def map(self, fn, items, chunksize: int = 1):
        from tasks import apply_chunk

        if chunksize == 1:
            return self.client.gather(self.client.map(fn, items, pure=False))
        items = list(items)
        chunks = [items[i : i + chunksize] for i in range(0, len(items), chunksize)]
        futs = [self.client.submit(apply_chunk, fn, c, pure=False) for c in chunks]
        return [x for part in self.client.gather(futs) for x in part]

    def worker_addresses(self) -> list:
        self.client.wait_for_workers(self._n, timeout=60)
        return sorted(self.client.scheduler_info()["workers"])

    def submit_on(self, worker_index: int, fn, *args):
        addr = self.worker_addresses()[worker_index]
        return self.client.submit(fn, *args, pure=False, workers=[addr])

    def memory_pids(self):
        # LocalCluster(processes=True) runs its Scheduler inside the caller.
        return [os.getpid()], "caller process (client + in-process scheduler)"

    def after_release(self) -> None:
        sched = self.cluster.scheduler
        deadline = time.monotonic() + 30
        while len(sched.tasks) and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.5)

    def versions(self) -> dict:
        import dask
        import distributed

        return {"dask": dask.__version__, "distributed": distributed.__version__}


# --------------------------------------------------------------------------
# Ray
# --------------------------------------------------------------------------


class RaySystem(System):
    name = "ray"

    def start(self, n_workers: int = N_WORKERS) -> None:
        import ray

        self.ray = ray
        ray.init(
            num_cpus=n_workers,
            include_dashboard=False,
            log_to_driver=False,
            configure_logging=True,
            logging_level="error",
        )
        self._remote = {}

    def shutdown(self) -> None:
        self.ray.shutdown()

    def _r(self, fn):
        r = self._remote.get(fn)
        if r is None:
            r = self._remote[fn] = self.ray.remote(fn)
        return r

    def submit(self, fn, *args):
        return self._r(fn).remote(*args)

    def result(self, handle):
        return self.ray.get(handle)

    def gather(self, handles):
        return self.ray.get(list(handles))

    def wait_all(self, handles) -> None:
        handles = list(handles)
        self.ray.wait(handles, num_returns=len(handles), fetch_local=True)

    def map(self, fn, items, chunksize: int = 1):
        from tasks import apply_chunk

        if chunksize == 1:
            rf = self._r(fn)
            return self.ray.get([rf.remote(x) for x in items])
        items = list(items)
        chunks = [items[i : i + chunksize] for i in range(0, len(items), chunksize)]
        rc = self._r(apply_chunk)
        parts = self.ray.get([rc.remote(fn, c) for c in chunks])
        return [x for part in parts for x in part]

    def submit_on(self, worker_index: int, fn, *args):
        # One node: Ray cannot pin a task to a particular worker process, and
        # every worker reads objects from the node's shared-memory store.  The
        # producer and consumer are just two tasks.
        return self.submit(fn, *args)

    def memory_pids(self):
        return [os.getpid()], "caller (driver) process only; GCS/raylet/object store not counted"

    def system_pids(self):
        """Ray's own daemons (GCS, raylet, ...) started by this driver, for info."""
        import psutil

        me = psutil.Process()
        out = {}
        for p in me.children(recursive=True):
            try:
                name = p.name()
                if "gcs_server" in name or "raylet" in name:
                    out[name] = p.pid
            except psutil.Error:
                pass
        return out

    def versions(self) -> dict:
        import ray

        return {"ray": ray.__version__}


SYSTEMS = {
    "meshpool": MeshpoolSystem,
    "processpool": ProcessPoolSystem,
    "loky": LokySystem,
    "dask": DaskSystem,
    "ray": RaySystem,
}


def make(name: str) -> System:
    return SYSTEMS[name]()
