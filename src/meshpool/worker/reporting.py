"""Reporting finished tasks in batches, without losing track of which task killed a worker.

A no-op task's cost is mostly its two messages: each ComputeDone is a send here, a wake-up of
the scheduler's thread and a receive there. A slot that has its next task queued can hold the
result of a tiny task and send several in one message (measured: the caller's CPU per no-op task
went from ~140 to ~90 µs). But the scheduler blamed a dead worker's crash on "the oldest task
the slot has not reported": with results held back, that is a task that had finished.

So a slot says which task it runs in a *run marker*: a small file in ``/dev/shm`` mapped by the
worker and, once registered, by a scheduler on the same host. Before a task starts, its slot
writes the task's number among the Computes the slot received (the scheduler numbers what it
sends the same way: ``TaskState.seq``) and writes 0 after it. An aligned 8-byte store needs no
system call and survives the process: when the worker dies, the scheduler reads which task each
slot was running. The worker unlinks the file as soon as the scheduler has answered its
registration (the scheduler's mapping keeps it readable), and holds results only if the
scheduler said it maps the marker; workers on other hosts report every task at once, as before.

What is held, and for how long (:class:`ResultHold`): results of tasks that ran shorter than
:data:`HOLD_BELOW` seconds on average, while the slot's next task is already queued, at most
:data:`MAX_HELD` results and :data:`HOLD_SECONDS` of age; never a result of an ``at_most_once``
task (a worker death would rerun it). Everything held goes out before any other message of the
slot, and as soon as its queue is empty.
"""

from __future__ import annotations

import os
import time
from typing import Any

HOLD_BELOW = 0.0005  # hold results only while the slot's tasks average less than this (s)
MAX_HELD = 8  # results sent in one message at most (a quarter of the most a slot is sent ahead)
HOLD_SECONDS = 0.0005  # the oldest held result waits at most about this long (a quarter of
# the work a slot is sent ahead, placement.PREFETCH_SECONDS: its queue never runs dry meanwhile)


class ResultHold:
    """A slot's held ComputeDone messages, and when to let them go."""

    def __init__(self) -> None:
        self.enabled = False  # set once the scheduler maps our run marker (see allowed())
        self.held: list = []
        self._since = 0.0
        self._mean = 2 * HOLD_BELOW  # seconds per task (moving average): held once it drops

    def note_duration(self, seconds: float) -> None:
        self._mean += 0.1 * (seconds - self._mean)

    def possible(self, at_most_once: bool) -> bool:
        """Could a report of this task be held at all?"""
        return self.enabled and not at_most_once and self._mean < HOLD_BELOW

    def keep(self, done: Any, next_queued: bool) -> bool:
        """Hold ``done`` back (``possible`` said it could be)? False: the caller sends it and
        everything held now."""
        if not next_queued:
            return False
        now = time.monotonic()
        if not self.held:
            self._since = now
        elif len(self.held) >= MAX_HELD - 1 or now - self._since > HOLD_SECONDS:
            return False
        self.held.append(done)
        return True

    def take(self, msg: Any = None) -> list:
        """Everything held, plus ``msg``, in order; the hold is empty afterwards."""
        held, self.held = self.held, []
        if msg is not None:
            held.append(msg)
        return held


def allowed() -> bool:
    """``MESHPOOL_HOLD_RESULTS=0`` turns holding off (every task reported at once)."""
    return os.environ.get("MESHPOOL_HOLD_RESULTS", "1") != "0"
