"""Ctrl-C held back while a caller's thread runs the scheduler's state inline.

Python runs signal handlers on the main thread, between any two bytecodes. A
``KeyboardInterrupt`` raised there halfway through handling a worker's message would lose the
message (a future would then wait for ever, and with it shutdown). So while the main thread
handles messages itself (``reaping.py``, an idle ``submit()``), SIGINT's handler is swapped for
one that takes a note, and the real one runs once the messages are handled. Waiting, before
that, is interrupted as usual.

The swap goes through ``_signal``, the C module: ``signal.signal``/``signal.getsignal`` map
handlers to enums, which for a function raises and catches a ValueError (~4 µs a call, against
~0.1 µs and one ``sigaction``). Blocking SIGINT with ``pthread_sigmask`` instead would let the
kernel hand the signal to any other thread (a user's, OpenBLAS's), whose trip still raises on
the main thread.
"""

from __future__ import annotations

import threading
from types import FrameType
from typing import Any

try:  # (CPython's C module; see the module docstring)
    from _signal import SIGINT
    from _signal import getsignal as _getsignal
    from _signal import signal as _setsignal
except ImportError:  # pragma: no cover (another Python)
    from signal import SIGINT
    from signal import getsignal as _getsignal
    from signal import signal as _setsignal

_MAIN_THREAD = threading.main_thread().ident


class HeldInterrupts:
    """``with HeldInterrupts():`` SIGINT's handler runs at the end of the block, not in it (on
    the main thread; Python runs handlers nowhere else, and elsewhere this does nothing)."""

    __slots__ = ("previous", "caught")

    def __init__(self) -> None:
        self.previous: Any = None
        self.caught: tuple[int, FrameType | None] | None = None

    def __enter__(self) -> HeldInterrupts:
        if threading.get_ident() == _MAIN_THREAD:
            handler = _getsignal(SIGINT)
            if callable(handler):  # (not SIG_IGN, SIG_DFL, or a handler set outside Python)
                try:
                    _setsignal(SIGINT, self._catch)
                except ValueError:  # (not the main interpreter)
                    return self
                self.previous = handler
        return self

    def _catch(self, signum: int, frame: FrameType | None) -> None:
        self.caught = (signum, frame)

    def __exit__(self, *exc_info: object) -> None:
        previous = self.previous
        if previous is None:
            return
        self.previous = None
        _setsignal(SIGINT, previous)
        if self.caught is not None:
            signum, frame = self.caught
            self.caught = None
            previous(signum, frame)  # (the default one raises KeyboardInterrupt)
