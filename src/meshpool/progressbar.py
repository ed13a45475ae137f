"""``meshpool.progress``: a progress bar over futures, in a terminal or a notebook.

>>> futures = [ex.submit(work, i) for i in range(100)]      # doctest: +SKIP
>>> results = ex.gather(meshpool.progress(futures))         # blocks, drawing a bar; then gathers

Theory of operation
-------------------
Every future gets a done-callback; the callbacks count finished and failed futures and redraw the
bar. Nothing polls: meshpool runs done-callbacks on its callback thread as completions arrive
(already-finished futures call back at once), and the caller, with ``wait=True``, sleeps on one
``threading.Event`` that the last callback sets. ``wait=False`` returns at once and the callbacks
keep the bar moving in the background (handy in a notebook, where the widget updates while other
cells run).

The bar is drawn by whichever is installed: tqdm (``tqdm.auto``, which picks the notebook
widget under Jupyter; given a ``file=``, tqdm's text bar in that file), else rich, else a
minimal text bar (redrawn in place on a terminal, one line per tenth of the work in a log file).
``bar=`` picks one explicitly. Rich and text redraw at most every :data:`REDRAW_INTERVAL` seconds
(tqdm throttles itself), and always draw the final count.

A future that raised, or was cancelled, counts as *failed*; the bar shows how many. ``progress``
never raises for them unless ``raise_errors=True``, when it stops at the first failure and raises
that exception (the other tasks keep running). Any iterable of futures works, meshpool's or the
stdlib's; ``total=`` sizes the bar while a lazy iterable (a generator that submits) is consumed.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Iterable, Sized
from concurrent import futures as cf
from typing import Literal, Protocol, TextIO

__all__ = ["progress"]

REDRAW_INTERVAL = 0.1  # seconds between redraws of rich and text bars: smooth, yet cheap
TEXT_WIDTH = 30  # characters in the text bar

BarKind = Literal["auto", "tqdm", "rich", "text"]


def progress(
    futures: Iterable[cf.Future],
    *,
    total: int | None = None,
    description: str | None = None,
    file: TextIO | None = None,
    wait: bool = True,
    raise_errors: bool = False,
    bar: BarKind = "auto",
) -> list[cf.Future]:
    """Show a progress bar as ``futures`` finish; return them as a list.

    With ``wait=True`` (the default) this blocks until every future is done, so
    ``ex.gather(meshpool.progress(futures))`` draws the bar and then collects the results;
    ``wait=False`` returns at once and the bar keeps updating in the background.

    ``total`` sizes the bar while a lazy iterable is consumed (otherwise its length);
    ``description`` labels it; ``file`` is where a text bar goes (default: standard error);
    ``raise_errors=True`` (with ``wait``) raises the first failure's exception as soon as it
    happens; ``bar`` is ``"auto"``, ``"tqdm"``, ``"rich"`` or ``"text"``.
    """
    if raise_errors and not wait:
        raise ValueError("raise_errors=True needs wait=True (nothing would catch the error)")
    if total is None and isinstance(futures, Sized):
        total = len(futures)
    tracker = _Tracker(_make_bar(bar, total, description, file), total, raise_errors)
    items: list[cf.Future] = []
    try:
        for fut in futures:
            items.append(fut)
            fut.add_done_callback(tracker.on_done)
        tracker.seal(len(items))
        if wait:
            tracker.wait()
    except BaseException:
        tracker.close()
        raise
    return items


class _Bar(Protocol):
    def show(self, done: int, failed: int, total: int | None, final: bool) -> None:
        """Draw ``done`` of ``total`` (None: not known yet); ``final`` is the last call."""


class _Tracker:
    """Counts done-callbacks, redraws the bar, and wakes the waiting caller at the end."""

    def __init__(self, bar: _Bar, total: int | None, raise_errors: bool) -> None:
        self._bar = bar
        self._lock = threading.Lock()
        self._finished = threading.Event()
        self._raise_errors = raise_errors
        self._shown_total = total
        self._expected: int | None = None  # known once the input is consumed
        self._done = 0
        self._failed = 0
        self._closed = False
        self._error: BaseException | None = None

    def on_done(self, fut: cf.Future) -> None:
        error = _failure(fut)
        with self._lock:
            if self._closed:
                return
            self._done += 1
            if error is not None:
                self._failed += 1
                if self._raise_errors and self._error is None:
                    self._error = error
                    self._finished.set()
            self._update()

    def seal(self, count: int) -> None:
        """The input is consumed: ``count`` futures in all."""
        with self._lock:
            self._expected = self._shown_total = count
            if not self._closed:
                self._update()

    def _update(self) -> None:
        final = self._expected is not None and self._done >= self._expected
        self._bar.show(self._done, self._failed, self._shown_total, final)
        if final:
            self._closed = True
            self._finished.set()

    def wait(self) -> None:
        self._finished.wait()
        self.close()
        if self._error is not None:
            raise self._error

    def close(self) -> None:
        """Draw the final state now (early exit: error, interrupt) and ignore later callbacks."""
        with self._lock:
            if not self._closed:
                self._closed = True
                self._bar.show(self._done, self._failed, self._shown_total, True)


def _failure(fut: cf.Future) -> BaseException | None:
    if fut.cancelled():
        return cf.CancelledError()
    return fut.exception()


# --- bars -----------------------------------------------------------------------------------


def _make_bar(
    kind: BarKind, total: int | None, description: str | None, file: TextIO | None
) -> _Bar:
    if kind not in ("auto", "tqdm", "rich", "text"):
        raise ValueError(f"bar must be 'auto', 'tqdm', 'rich' or 'text', not {kind!r}")
    if kind in ("auto", "tqdm"):
        try:
            return _TqdmBar(total, description, file)
        except ImportError:
            if kind == "tqdm":
                raise
    if kind in ("auto", "rich"):
        try:
            return _RichBar(total, description, file)
        except ImportError:
            if kind == "rich":
                raise
    return _TextBar(total, description, file)


class _TqdmBar:
    """tqdm's bar: the notebook widget under Jupyter (``tqdm.auto``), text into ``file``."""

    def __init__(self, total: int | None, description: str | None, file: TextIO | None) -> None:
        if file is None:
            from tqdm.auto import tqdm
        else:
            from tqdm.std import tqdm
        self._bar = tqdm(total=total, desc=description, file=file, unit="task")
        self._failed = 0

    def show(self, done: int, failed: int, total: int | None, final: bool) -> None:
        bar = self._bar
        if total != bar.total:
            bar.total = total
            bar.refresh()
        if failed != self._failed:
            self._failed = failed
            bar.set_postfix_str(f"{failed} failed", refresh=False)
        if done > bar.n:
            bar.update(done - bar.n)
        if final:
            bar.close()


class _Throttle:
    """True at most once per :data:`REDRAW_INTERVAL`, and always for the final draw."""

    def __init__(self) -> None:
        self._last = float("-inf")

    def __call__(self, final: bool) -> bool:
        now = time.monotonic()
        if final or now - self._last >= REDRAW_INTERVAL:
            self._last = now
            return True
        return False


class _RichBar:
    """rich's progress bar (used when tqdm is not installed)."""

    def __init__(self, total: int | None, description: str | None, file: TextIO | None) -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
        )

        console = Console(file=file) if file is not None else Console(stderr=True)
        self._progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[failed]}"),
            TimeElapsedColumn(),
            console=console,
            auto_refresh=False,  # we redraw from the done-callbacks: no refresh thread
        )
        self._task = self._progress.add_task(description or "tasks", total=total, failed="")
        self._progress.start()
        self._throttle = _Throttle()

    def show(self, done: int, failed: int, total: int | None, final: bool) -> None:
        label = f"{failed} failed" if failed else ""
        self._progress.update(self._task, completed=done, total=total, failed=label)
        if self._throttle(final):
            self._progress.refresh()
        if final:
            self._progress.stop()


class _TextBar:
    """A dependency-free bar: redrawn in place on a terminal, a line per tenth in a file."""

    def __init__(self, total: int | None, description: str | None, file: TextIO | None) -> None:
        self._file = file if file is not None else sys.stderr
        self._label = f"{description}: " if description else ""
        self._tty = bool(getattr(self._file, "isatty", lambda: False)())
        self._start = time.monotonic()
        self._throttle = _Throttle()
        self._tenth = -1

    def show(self, done: int, failed: int, total: int | None, final: bool) -> None:
        if self._tty:
            if self._throttle(final):
                self._write("\r" + self._line(done, failed, total) + ("\n" if final else ""))
            return
        tenth = 10 * done // total if total else 0
        if final or tenth > self._tenth:
            self._tenth = tenth
            self._write(self._line(done, failed, total) + "\n")

    def _line(self, done: int, failed: int, total: int | None) -> str:
        filled = TEXT_WIDTH * done // total if total else 0
        bar = "#" * filled + "." * (TEXT_WIDTH - filled)
        count = f"{done}/{total if total is not None else '?'}"
        failures = f", {failed} failed" if failed else ""
        elapsed = time.monotonic() - self._start
        return f"{self._label}[{bar}] {count}{failures} {elapsed:.1f}s"

    def _write(self, text: str) -> None:
        self._file.write(text)
        self._file.flush()
