"""Ctrl-C held back while a caller's thread runs the scheduler's state inline.

Python runs signal handlers on the main thread, between any two bytecodes. A
``KeyboardInterrupt`` raised there halfway through handling a worker's message would lose the
message (a future would then wait for ever, and with it shutdown). So while the main thread
handles messages itself (``reaping.py``, an idle ``submit()``), SIGINT only takes a note, and
the handler runs once the messages are handled. Waiting, before that, is interrupted as usual.

How: the first time the main thread needs it, if SIGINT's handler is Python's default,
meshpool's :func:`on_sigint` takes its place (``asyncio.Runner`` does the same for its run) and
stays until the last executor is shut down on the main thread (:func:`restore_default`). Outside
a held block it raises ``KeyboardInterrupt`` as the default does. Swapping the handler in and
out for each block instead cost two ``sigaction`` calls, ~30 µs of a ~450 µs round trip here;
blocking SIGINT with ``pthread_sigmask`` is cheaper but lets the kernel hand the signal to any
other thread (a user's, OpenBLAS's), whose trip still raises on the main thread. A handler of
the program's own is respected: it is swapped out only around each block (``swap=True``).

While meshpool's handler is installed, ``asyncio.run`` on the main thread does not install its
own (it only replaces Python's default) and handles Ctrl-C as before Python 3.11: a
``KeyboardInterrupt`` out of the event loop.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType
from typing import Any

_MAIN_THREAD = threading.main_thread().ident


class _Held:
    depth = 0  # held blocks open on the main thread
    caught: tuple[int, FrameType | None] | None = None  # a SIGINT that came meanwhile


def on_sigint(signum: int, frame: FrameType | None) -> None:
    """meshpool's SIGINT handler (see the module docstring)."""
    if _Held.depth:
        _Held.caught = (signum, frame)
        return
    signal.default_int_handler(signum, frame)


class HeldInterrupts:
    """``with HeldInterrupts():`` SIGINT's handler runs at the end of the block, not in it (on
    the main thread; Python runs handlers nowhere else, and elsewhere this does nothing).
    ``swap=False``: hold only if that needs no ``sigaction`` call (meshpool's handler is, or
    can be, installed), for blocks too short to pay for one."""

    __slots__ = ("held", "swapped", "swap")

    def __init__(self, swap: bool = True) -> None:
        self.swap = swap
        self.held = False
        self.swapped: Any = None  # the program's own handler, swapped out for the block

    def __enter__(self) -> HeldInterrupts:
        if threading.get_ident() != _MAIN_THREAD:
            return self
        handler = signal.getsignal(signal.SIGINT)
        if handler is not on_sigint:
            if handler is signal.default_int_handler:
                _install(on_sigint)
            elif callable(handler) and self.swap:
                _install(on_sigint)
                self.swapped = handler
            else:  # (SIG_IGN, SIG_DFL, a handler set outside Python, or a short block)
                return self
        self.held = True
        _Held.depth += 1
        return self

    def __exit__(self, *exc_info: object) -> None:
        if not self.held:
            return
        self.held = False
        _Held.depth -= 1
        handler = signal.default_int_handler
        if self.swapped is not None:
            handler, self.swapped = self.swapped, None
            _install(handler)
        if _Held.depth == 0 and _Held.caught is not None:
            signum, frame = _Held.caught
            _Held.caught = None
            handler(signum, frame)  # (the default one raises KeyboardInterrupt)


def restore_default() -> None:
    """Put Python's default SIGINT handler back if meshpool's is installed (main thread)."""
    if threading.get_ident() == _MAIN_THREAD and signal.getsignal(signal.SIGINT) is on_sigint:
        _install(signal.default_int_handler)


def _install(handler: Any) -> None:
    try:
        signal.signal(signal.SIGINT, handler)
    except ValueError:  # (not the main interpreter)
        pass
