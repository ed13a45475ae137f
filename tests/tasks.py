"""Functions the tests run on workers (importable there: workers see the caller's sys.path)."""

from __future__ import annotations

import os
import time


def inc(x):
    return x + 1


def add(x, y):
    return x + y


def slow_inc(x, delay=0.2):
    time.sleep(delay)
    return x + 1


def sleep(seconds):
    time.sleep(seconds)
    return seconds


def fail(message="boom"):
    raise ValueError(message)


def getpid(*_):
    return os.getpid()


def big(n):
    return b"x" * n


def identity(x):
    return x


INITIALIZED = None


def initializer(value):
    global INITIALIZED
    INITIALIZED = value


def pid_and_initialized(*_):
    return os.getpid(), INITIALIZED


# --- gates: tasks whose start and end the test controls (no sleeps in the test) --------------


def gated(started, release, value=None, timeout=60.0):
    """Touch ``started``, then block until ``release`` exists; return ``value``."""
    with open(started, "w"):
        pass
    deadline = time.monotonic() + timeout
    while not os.path.exists(release):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{release} never appeared")
        time.sleep(0.005)
    return value


def touch(path, value=None):
    with open(path, "w") as f:
        f.write(str(os.getpid()))
    return value


def append_line(path, text):
    """Append one line (atomic for short lines with O_APPEND) and return ``text``."""
    with open(path, "a") as f:
        f.write(f"{text}\n")
    return text


def capture(*args, **kwargs):
    return args, kwargs


def mul(x, y):
    return x * y


def total(*xs):
    return sum(xs)


def fail_at(x, bad):
    if x == bad:
        raise ValueError(f"bad item {x}")
    return x


def say(text):
    print(text, flush=True)
    return text


def ones(n):
    import numpy

    return numpy.ones(n)


# --- errors that travel badly -----------------------------------------------------------------


def raise_holding_lock():
    import threading

    exc = ValueError("holds a lock")
    exc.lock = threading.Lock()
    raise exc


def raise_holding_socket():
    import socket

    exc = OSError("holds a socket")
    exc.sock = socket.socket()
    raise exc


def raise_worker_only_class(directory):
    """Raise an exception whose class lives in a module only this worker process can import."""
    import importlib
    import sys

    with open(os.path.join(directory, "worker_only_errors.py"), "w") as f:
        f.write("class WorkerOnlyError(Exception):\n    pass\n")
    sys.path.insert(0, directory)
    try:
        module = importlib.import_module("worker_only_errors")
    finally:
        sys.path.remove(directory)
    raise module.WorkerOnlyError("only the worker knows this class")


def return_lock():
    import threading

    return threading.Lock()


def call_exit(code=3):
    import sys

    sys.exit(code)


class CustomBaseException(BaseException):
    pass


def raise_base_exception():
    raise CustomBaseException("not an Exception")


def raise_keyboard_interrupt():
    raise KeyboardInterrupt


def fail_or_gate(item, release):
    """("fail",) raises at once; ("gate", path) is ``gated(path, release)``."""
    if item[0] == "fail":
        raise ValueError("first item fails")
    return gated(item[1], release)


def record_initializer(path, value):
    """An initializer: set INITIALIZED and append this process's pid to ``path``."""
    initializer(value)
    with open(path, "a") as f:
        f.write(f"{os.getpid()}\n")


def failing_initializer():
    raise ValueError("initializer fails on purpose")


def full_array(mb, value):
    """An array of ``mb`` MiB filled with ``value`` (numpy imported here, not at module level:
    a worker running it holds no more than numpy itself)."""
    import numpy as np

    return np.full(int(mb * 2**20) // 8, float(value))


def array_sum(a):
    return float(a.sum())


def break_my_slot():
    """Close the socket of the slot running this task: the slot fails after the task returns,
    outside any task (its result cannot be sent)."""
    from meshpool.worker import execution

    execution._local.slot.channel.close()
    return 1
