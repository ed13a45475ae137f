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
