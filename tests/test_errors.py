"""Errors: a task's exception comes back as itself with its remote traceback; what cannot travel
comes back as a RemoteError; what cannot be pickled fails in submit(); no failure breaks the pool.

A catalogue of crashing and unpicklable payloads (STYLE.md: a clean error, never a hang).
"""

from __future__ import annotations

import threading
import traceback

import pytest
import tasks
from helpers import LIVENESS

import meshpool


def raised(fut):
    with pytest.raises(BaseException) as info:
        fut.result(LIVENESS)
    return info.value


# --- the task's own exception ------------------------------------------------------------------


def test_exception_keeps_type_message_and_remote_traceback(ex):
    exc = raised(ex.submit(tasks.fail, "remote boom"))
    assert type(exc) is ValueError and str(exc) == "remote boom"
    text = "".join(traceback.format_exception(exc))
    assert "tasks.py" in text and "in fail" in text  # the worker's frames are there


def test_exception_in_dependency_fails_dependents_with_same_error(ex):
    a = ex.submit(tasks.fail, "upstream")
    b = ex.submit(tasks.inc, a)
    c = ex.submit(tasks.add, b, 1)
    for fut in (a, b, c):
        exc = raised(fut)
        assert type(exc) is ValueError and str(exc) == "upstream"


def test_exception_that_cannot_be_pickled_holding_a_lock(ex):
    exc = raised(ex.submit(tasks.raise_holding_lock))
    assert isinstance(exc, meshpool.RemoteError)
    assert exc.type_name.endswith("ValueError")
    assert exc.message == "holds a lock"
    assert "raise_holding_lock" in exc.traceback_text
    assert "raise_holding_lock" in str(exc)


def test_exception_that_cannot_be_pickled_holding_a_socket(ex):
    exc = raised(ex.submit(tasks.raise_holding_socket))
    assert isinstance(exc, meshpool.RemoteError)
    assert exc.type_name.endswith("OSError")
    assert exc.message == "holds a socket"
    assert "raise_holding_socket" in exc.traceback_text


def test_exception_whose_class_cannot_be_unpickled_here(ex, tmp_path):
    exc = raised(ex.submit(tasks.raise_worker_only_class, str(tmp_path)))
    assert isinstance(exc, meshpool.RemoteError)
    assert exc.type_name == "worker_only_errors.WorkerOnlyError"
    assert "only the worker knows this class" in exc.message
    assert "raise_worker_only_class" in exc.traceback_text
    assert "WorkerOnlyError" in exc.traceback_text
    assert "only the worker knows this class" in exc.traceback_text


# --- unpicklable calls fail in submit(), in the caller's thread ---------------------------------


class Unpicklable:
    def __reduce__(self):
        raise RuntimeError("refuses to be pickled")

    def __call__(self):
        return 1


class HoldsLock:
    def __init__(self):
        self.lock = threading.Lock()

    def __call__(self):
        return 1


@pytest.mark.parametrize("fn", [Unpicklable(), HoldsLock()], ids=["reduce-raises", "holds-lock"])
def test_unpicklable_function_raises_from_submit(ex, fn):
    with pytest.raises(meshpool.SerializationError) as info:
        ex.submit(fn)
    assert isinstance(info.value, TypeError)
    assert type(fn).__name__ in str(info.value)


def test_unpicklable_argument_raises_from_submit(ex):
    with pytest.raises(meshpool.SerializationError) as info:
        ex.submit(tasks.identity, threading.Lock())
    assert isinstance(info.value, TypeError)
    assert "lock" in str(info.value)
    with pytest.raises(meshpool.SerializationError, match="Unpicklable"):
        ex.submit(tasks.identity, 1, key=Unpicklable())


def test_unpicklable_argument_in_map_raises_from_map(ex):
    with pytest.raises(meshpool.SerializationError):
        ex.map(tasks.identity, [1, threading.Lock()])


def test_unpicklable_return_value_fails_that_future(ex):
    exc = raised(ex.submit(tasks.return_lock))
    assert isinstance(exc, meshpool.SerializationError)
    assert "return_lock" in str(exc)  # names the function
    assert "lock" in str(exc)  # and the type
    assert ex.submit(tasks.inc, 1).result(LIVENESS) == 2


# --- exits and BaseExceptions fail one future, not the pool -------------------------------------


def test_sys_exit_fails_that_future_only(ex):
    pids = {w["pid"] for w in ex.workers()}
    exc = raised(ex.submit(tasks.call_exit, 3))
    assert isinstance(exc, SystemExit) and exc.code == 3
    assert ex.submit(tasks.inc, 1).result(LIVENESS) == 2
    assert {w["pid"] for w in ex.workers()} == pids  # no worker died


def test_base_exception_subclass_fails_that_future_only(ex):
    exc = raised(ex.submit(tasks.raise_base_exception))
    assert type(exc).__name__ == "CustomBaseException"
    assert not isinstance(exc, Exception)
    assert ex.submit(tasks.inc, 1).result(LIVENESS) == 2


def test_keyboard_interrupt_in_task_fails_that_future_only(ex):
    exc = raised(ex.submit(tasks.raise_keyboard_interrupt))
    assert isinstance(exc, KeyboardInterrupt)
    assert list(ex.map(tasks.inc, range(4))) == [1, 2, 3, 4]


def test_pool_survives_a_catalogue_of_failures(ex, tmp_path):
    bad = [
        ex.submit(tasks.fail),
        ex.submit(tasks.raise_holding_lock),
        ex.submit(tasks.raise_holding_socket),
        ex.submit(tasks.return_lock),
        ex.submit(tasks.call_exit, 0),
        ex.submit(tasks.raise_base_exception),
        ex.submit(tasks.raise_worker_only_class, str(tmp_path)),
    ]
    for fut in bad:
        raised(fut)
    assert list(ex.map(tasks.inc, range(10))) == list(range(1, 11))


def test_error_classes():
    import concurrent.futures as cf

    assert issubclass(meshpool.SerializationError, TypeError)
    assert issubclass(meshpool.InitializerFailed, cf.BrokenExecutor)
    assert issubclass(meshpool.WorkerStartError, cf.BrokenExecutor)
    assert issubclass(meshpool.SchedulerLost, cf.BrokenExecutor)
    assert issubclass(meshpool.CommError, ConnectionError)
    assert issubclass(meshpool.SecurityError, meshpool.CommError)
    err = meshpool.RemoteError("mod.Type", "msg", "tb text")
    assert "mod.Type: msg" in str(err) and "tb text" in str(err)
