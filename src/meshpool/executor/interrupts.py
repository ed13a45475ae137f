"""Ctrl-C held back while a caller's thread runs the scheduler's state inline.

Python runs signal handlers on the main thread, between any two bytecodes. A
``KeyboardInterrupt`` raised there halfway through handling a worker's message would lose the
message (a future would then wait for ever, and with it shutdown). So while a caller's thread
handles messages itself (``reaping.py``), SIGINT only sets a flag, and its handler runs once
the messages are handled. Waiting, before that, is interrupted as usual.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType
from typing import Any

_MAIN_THREAD = threading.main_thread().ident


class HeldInterrupts:
    """``with HeldInterrupts():`` SIGINT's Python handler runs at the end of the block (on the
    main thread; elsewhere Python runs no handlers, and this does nothing). On the main
    thread it costs two ``sigaction`` calls: ~12 µs in a loop here, ~30 µs on a round trip
    (alternating runs of 1,500 round trips, BENCHMARKS.md)."""

    __slots__ = ("previous", "caught")

    def __init__(self) -> None:
        self.previous: Any = None
        self.caught: tuple[int, FrameType | None] | None = None

    def __enter__(self) -> HeldInterrupts:
        if threading.get_ident() == _MAIN_THREAD:
            handler = signal.getsignal(signal.SIGINT)
            if callable(handler):  # (not SIG_IGN, SIG_DFL, or a handler set outside Python)
                self.previous = handler
                signal.signal(signal.SIGINT, self._catch)
        return self

    def _catch(self, signum: int, frame: FrameType | None) -> None:
        self.caught = (signum, frame)

    def __exit__(self, *exc_info: object) -> None:
        previous = self.previous
        if previous is None:
            return
        self.previous = None
        signal.signal(signal.SIGINT, previous)
        if self.caught is not None:
            signum, frame = self.caught
            self.caught = None
            previous(signum, frame)  # (the default one raises KeyboardInterrupt)
