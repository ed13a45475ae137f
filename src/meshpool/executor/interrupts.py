"""Signals held back while a caller's thread runs the scheduler's state inline.

Python runs signal handlers on the main thread, between any two bytecodes. A handler that
raises there (Ctrl-C's ``KeyboardInterrupt``, a timeout's exception on SIGALRM, ``SystemExit``
on SIGTERM) halfway through handling a worker's message would lose the message: a future would
then wait for ever, and with it shutdown. So while the main thread handles messages itself
(``reaping.py``, an idle ``submit()``), each of :data:`HELD` that has a Python handler gets one
that takes a note instead, and the real handlers run once the messages are handled. Waiting,
before that, is interrupted as usual.

The swap goes through ``_signal``, the C module: ``signal.signal``/``signal.getsignal`` map
handlers to enums, which for a function raises and catches a ValueError (~4 µs a call, against
~0.1 µs and one ``sigaction``); a signal without a Python handler costs a ~30 ns look. Blocking
the signals with ``pthread_sigmask`` instead would let the kernel hand them to any other thread
(a user's, OpenBLAS's), whose trip still runs the handler on the main thread.
"""

from __future__ import annotations

import contextlib
import os
import threading
from types import FrameType
from typing import Any

try:  # (CPython's C module; see the module docstring)
    from _signal import getsignal as _getsignal
    from _signal import signal as _setsignal
except ImportError:  # pragma: no cover (another Python)
    from signal import getsignal as _getsignal
    from signal import signal as _setsignal
from signal import SIGALRM, SIGHUP, SIGINT, SIGTERM, SIGUSR1, SIGUSR2

# the signals programs give handlers that raise: Ctrl-C, timeouts (pytest-timeout's is SIGALRM),
# termination, and the user-defined pair
HELD = (int(SIGINT), int(SIGALRM), int(SIGTERM), int(SIGHUP), int(SIGUSR1), int(SIGUSR2))
_MAIN_THREAD = threading.main_thread().ident


class HeldInterrupts:
    """``with HeldInterrupts():`` handlers of :data:`HELD` signals run at the end of the block,
    not in it (on the main thread; Python runs handlers nowhere else, and elsewhere this does
    nothing)."""

    __slots__ = ("swapped", "caught", "wake_fd")

    def __init__(self, wake_fd: int = -1) -> None:
        self.swapped: dict[int, Any] = {}  # signal -> the handler swapped out
        self.caught: list[tuple[int, FrameType | None]] = []
        self.wake_fd = wake_fd  # an eventfd a held signal writes (to end a wait on it)

    def __enter__(self) -> HeldInterrupts:
        if threading.get_ident() != _MAIN_THREAD:
            return self
        catch = self._catch
        for signum in HELD:
            handler = _getsignal(signum)
            if callable(handler):  # (not SIG_IGN, SIG_DFL, or a handler set outside Python)
                try:
                    _setsignal(signum, catch)
                except ValueError:  # (not the main interpreter)
                    break
                self.swapped[signum] = handler
        return self

    def _catch(self, signum: int, frame: FrameType | None) -> None:
        self.caught.append((signum, frame))
        if self.wake_fd >= 0:
            with contextlib.suppress(OSError):
                os.eventfd_write(self.wake_fd, 1)

    def __exit__(self, *exc_info: object) -> None:
        swapped = self.swapped
        if not swapped:
            return
        for signum, handler in swapped.items():
            _setsignal(signum, handler)
        self.swapped = {}
        caught, self.caught = self.caught, []
        for signum, frame in caught:  # (in order; the default SIGINT one raises)
            swapped[signum](signum, frame)
