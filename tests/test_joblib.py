"""The ``"meshpool"`` joblib backend on a real 2-worker local cluster (the session executor).

Calls that must run on the cluster return ``os.getpid()`` and are checked against the workers'
pids; scikit-learn's ``GridSearchCV`` is compared with a serial run and records the pid of every
fit through a scorer (scorers run in the same task as their fit).
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from collections.abc import Iterator

import pytest

joblib = pytest.importorskip("joblib")
from cli_cluster import CliCluster  # noqa: E402
from joblib import Parallel, delayed, parallel_config  # noqa: E402

import meshpool  # noqa: E402
import meshpool.joblib  # noqa: E402
from meshpool.joblib import MeshpoolBackend  # noqa: E402

LIVENESS = 60.0  # seconds: only to catch a hang; each step takes well under a tenth of it


def square_and_pid(i: int) -> tuple[int, int]:
    return i * i, os.getpid()


def fail_on(i: int, bad: int) -> int:
    if i == bad:
        raise KeyError(f"bad item {i}")
    return i


def nested_pids(n: int) -> list[int]:
    """A Parallel call inside a task: it must run (on threads) in this same worker."""
    return Parallel(n_jobs=-1)(delayed(os.getpid)() for _ in range(n))


def explicit_meshpool_inside_task() -> int:
    with parallel_config(backend="meshpool"):
        return sum(Parallel(n_jobs=-1)(delayed(abs)(-i) for i in range(10)))


class Pickled:
    """A large payload that counts how often the caller pickles it (scatter-once check)."""

    lock = threading.Lock()
    count = 0

    def __init__(self, size: int) -> None:
        self.payload = b"x" * size

    @property
    def nbytes(self) -> int:
        return len(self.payload)

    def __reduce__(self) -> tuple:
        with Pickled.lock:
            Pickled.count += 1
        return (_rebuild, (self.payload,))


def _rebuild(payload: bytes) -> Pickled:
    obj = Pickled.__new__(Pickled)
    obj.payload = payload
    return obj


def payload_size(obj: Pickled, i: int) -> int:
    return obj.nbytes + i


def pid_scorer(estimator, X, y) -> float:  # noqa: N803 - scikit-learn's names
    return float(os.getpid())


@pytest.fixture
def pids(ex):
    ex.wait_for_workers(2, timeout=30)
    return {w["pid"] for w in ex.workers()}


@pytest.fixture
def remote_address(tmp_path) -> Iterator[str]:
    """A scheduler and one worker process started with the ``meshpool`` command (plain TCP on
    the loopback interface), stopped afterwards. (A remote worker imports this module, the
    tasks' functions, like any user module: tests/ is on its path.)"""
    with CliCluster(tmp_path, security="insecure") as cluster:
        cluster.start_scheduler()
        cluster.start_worker("w", "--nworkers", "1")
        yield cluster.address


def test_results_equal_serial_and_run_on_workers(ex, pids):
    with parallel_config(backend="meshpool"):
        out = Parallel()(delayed(square_and_pid)(i) for i in range(100))
    assert [v for v, _ in out] == [i * i for i in range(100)]
    ran = {pid for _, pid in out}
    assert os.getpid() not in ran
    assert ran <= pids


def test_n_jobs_minus_one_is_the_clusters_threads(ex, pids):
    threads = sum(w["nthreads"] for w in ex.workers())
    backend = MeshpoolBackend(executor=ex)
    assert backend.effective_n_jobs(-1) == threads
    assert backend.effective_n_jobs(None) == threads
    assert backend.effective_n_jobs(1) == 1
    assert backend.effective_n_jobs(5) == 5
    assert backend.effective_n_jobs(-threads) == 2  # at least 2: 1 would run in the caller
    with parallel_config(backend="meshpool"):
        assert joblib.effective_n_jobs(-1) == threads


@pytest.mark.parametrize("return_as", ["generator", "generator_unordered"])
def test_return_as_generator(ex, return_as):
    with parallel_config(backend="meshpool"):
        gen = Parallel(n_jobs=-1, return_as=return_as)(
            delayed(square_and_pid)(i) for i in range(30)
        )
        assert not isinstance(gen, list)
        values = [v for v, _ in gen]
    if return_as == "generator":
        assert values == [i * i for i in range(30)]
    else:
        assert sorted(values) == [i * i for i in range(30)]


@pytest.mark.parametrize("batch_size", ["auto", 1, 7])
def test_batch_sizes(ex, batch_size):
    with parallel_config(backend="meshpool"):
        out = Parallel(n_jobs=-1, batch_size=batch_size)(delayed(abs)(-i) for i in range(500))
    assert out == list(range(500))


def test_explicit_batches_become_tasks(ex):
    """batch_size=25 over 100 calls: 4 tasks, each returning one list of 25 results."""
    before = ex.statistics().submitted
    with parallel_config(backend="meshpool"):
        out = Parallel(n_jobs=2, batch_size=25, pre_dispatch="all")(
            delayed(abs)(-i) for i in range(100)
        )
    assert out == list(range(100))
    assert ex.statistics().submitted - before == 4


def test_exception_type_is_preserved(ex):
    with parallel_config(backend="meshpool"), pytest.raises(KeyError, match="bad item 13"):
        Parallel(n_jobs=-1)(delayed(fail_on)(i, 13) for i in range(40))
    # the backend stays usable after an abort
    with parallel_config(backend="meshpool"):
        assert Parallel(n_jobs=-1)(delayed(abs)(-i) for i in range(5)) == list(range(5))


def test_backend_instance_and_parallel_argument(ex, pids):
    out = Parallel(backend=MeshpoolBackend(executor=ex), n_jobs=-1)(
        delayed(square_and_pid)(i) for i in range(10)
    )
    assert {pid for _, pid in out} <= pids


def test_nested_parallel_runs_on_threads_in_the_worker(ex, pids):
    with parallel_config(backend="meshpool"):
        out = Parallel(n_jobs=-1)(delayed(nested_pids)(4) for _ in range(4))
        explicit = Parallel(n_jobs=-1)(delayed(explicit_meshpool_inside_task)() for _ in range(2))
    for inner in out:
        assert len(set(inner)) == 1 and inner[0] in pids
    assert explicit == [45, 45]


def test_large_arguments_are_scattered_once_per_call(ex):
    big = Pickled(2 << 20)
    Pickled.count = 0
    with parallel_config(backend="meshpool"):
        out = Parallel(n_jobs=-1, batch_size=1)(delayed(payload_size)(big, i) for i in range(12))
    assert out == [big.nbytes + i for i in range(12)]
    assert Pickled.count == 1


def test_address_connects_to_a_remote_cluster(remote_address):
    with parallel_config(backend="meshpool", address=remote_address):
        out = Parallel()(delayed(square_and_pid)(i) for i in range(20))
        again = Parallel()(delayed(abs)(-i) for i in range(3))  # reuses the connection
    assert [v for v, _ in out] == [i * i for i in range(20)]
    remote = meshpool.joblib._by_address[remote_address]
    assert {pid for _, pid in out} <= {w["pid"] for w in remote.workers()}
    assert again == [0, 1, 2]
    remote.shutdown()
    del meshpool.joblib._by_address[remote_address]


def test_no_executor_is_a_clear_error(tmp_path):
    script = tmp_path / "no_executor.py"
    script.write_text(
        "import joblib, meshpool.joblib\n"
        "with joblib.parallel_config(backend='meshpool'):\n"
        "    try:\n"
        "        joblib.Parallel(n_jobs=-1)(joblib.delayed(abs)(i) for i in range(4))\n"
        "    except RuntimeError as exc:\n"
        "        print('RuntimeError:', exc)\n"
    )
    done = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=LIVENESS
    )
    assert done.returncode == 0, done.stderr
    assert "RuntimeError: joblib backend 'meshpool': no meshpool executor" in done.stdout


def test_gridsearchcv_matches_serial_and_fits_on_workers(ex, pids):
    pytest.importorskip("sklearn")
    import numpy as np
    from sklearn.datasets import load_iris
    from sklearn.model_selection import GridSearchCV
    from sklearn.svm import SVC

    X, y = load_iris(return_X_y=True)  # noqa: N806
    grid = {"C": [0.1, 1.0, 10.0], "kernel": ["linear", "rbf"]}
    scoring = {"acc": "accuracy", "pid": pid_scorer}
    serial = GridSearchCV(SVC(), grid, cv=3, scoring="accuracy").fit(X, y)
    with parallel_config(backend="meshpool"):
        search = GridSearchCV(SVC(), grid, cv=3, n_jobs=-1, scoring=scoring, refit="acc")
        search.fit(X, y)
    np.testing.assert_array_equal(
        search.cv_results_["mean_test_acc"], serial.cv_results_["mean_test_score"]
    )
    fit_pids = {int(p) for split in range(3) for p in search.cv_results_[f"split{split}_test_pid"]}
    assert os.getpid() not in fit_pids
    assert fit_pids <= pids
