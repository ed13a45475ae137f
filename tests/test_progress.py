"""``meshpool.progress`` over real futures from the 2-worker session cluster.

Bars are written to a StringIO and the test reads the final count. For ``wait=False`` the test
knows the bar is final by adding its own done-callback after ``progress`` added its own: a
future's callbacks run in the order they were added.
"""

from __future__ import annotations

import io
import threading
from concurrent import futures as cf

import pytest
import tasks

from meshpool.progressbar import progress

LIVENESS = 60.0  # seconds: only to catch a hang


class _Countdown:
    """Set once ``n`` callbacks have run (callbacks share one thread: never block in one)."""

    def __init__(self, n: int) -> None:
        self._left = n
        self._lock = threading.Lock()
        self._event = threading.Event()

    def tick(self, _: object) -> None:
        with self._lock:
            self._left -= 1
            if self._left == 0:
                self._event.set()

    def wait(self, timeout: float) -> bool:
        return self._event.wait(timeout)


def kinds() -> list[str]:
    found = ["text"]
    for kind in ("tqdm", "rich"):
        try:
            __import__(kind)
        except ImportError:
            continue
        found.append(kind)
    return found


@pytest.mark.parametrize("bar", ["auto", *kinds()])
def test_blocks_until_done_and_returns_the_futures(ex, bar):
    out = io.StringIO()
    futures = [ex.submit(tasks.inc, i) for i in range(10)]
    returned = progress(futures, file=out, description="inc", bar=bar)
    assert returned == futures
    assert all(f.done() for f in futures)
    assert ex.gather(returned) == list(range(1, 11))
    assert "10/10" in out.getvalue()
    assert "inc" in out.getvalue()


def test_gather_of_progress(ex):
    out = io.StringIO()
    assert ex.gather(progress([ex.submit(tasks.inc, i) for i in range(5)], file=out)) == [
        1,
        2,
        3,
        4,
        5,
    ]
    assert "5/5" in out.getvalue()


def test_already_finished_futures(ex):
    futures = [ex.submit(tasks.inc, i) for i in range(10)]
    cf.wait(futures, timeout=LIVENESS)
    out = io.StringIO()
    progress(futures, file=out, bar="text")
    assert out.getvalue().rstrip().splitlines()[-1].startswith("[" + "#" * 30 + "] 10/10")


@pytest.mark.parametrize("bar", kinds())
def test_failures_are_counted_not_raised(ex, bar):
    out = io.StringIO()
    futures = [
        ex.submit(tasks.fail_at, i, i) if i % 4 == 0 else ex.submit(tasks.inc, i) for i in range(10)
    ]
    progress(futures, file=out, bar=bar)
    assert "10/10" in out.getvalue()
    assert "3 failed" in out.getvalue()
    assert sum(f.exception() is not None for f in futures) == 3


def test_raise_errors_raises_the_tasks_exception(ex):
    futures = [ex.submit(tasks.fail_at, i, 3) for i in range(6)]
    with pytest.raises(ValueError, match="bad item 3"):
        progress(futures, file=io.StringIO(), raise_errors=True)


def test_lazy_iterable_with_total(ex):
    out = io.StringIO()
    futures = progress((ex.submit(tasks.inc, i) for i in range(8)), total=8, file=out, bar="text")
    assert len(futures) == 8 and "8/8" in out.getvalue()


def test_empty():
    out = io.StringIO()
    assert progress([], file=out, bar="text") == []
    assert "0/0" in out.getvalue()


def test_stdlib_futures():
    out = io.StringIO()
    with cf.ThreadPoolExecutor(2) as pool:
        futures = progress([pool.submit(abs, -i) for i in range(6)], file=out, bar="text")
    assert [f.result() for f in futures] == list(range(6))
    assert "6/6" in out.getvalue()


def test_no_wait_returns_at_once_and_keeps_drawing(ex, tmp_path):
    started, release = tmp_path / "started", tmp_path / "release"
    futures = [ex.submit(tasks.inc, 1), ex.submit(tasks.gated, str(started), str(release), 7)]
    out = io.StringIO()
    returned = progress(futures, file=out, wait=False, bar="text")
    assert returned == futures
    assert not futures[1].done()  # the gated task cannot finish before `release` exists
    drawn = _Countdown(len(futures))
    for fut in futures:
        fut.add_done_callback(drawn.tick)
    release.touch()
    assert drawn.wait(LIVENESS)
    assert "2/2" in out.getvalue()
    assert futures[1].result() == 7


def test_raise_errors_needs_wait():
    with pytest.raises(ValueError, match="needs wait=True"):
        progress([], wait=False, raise_errors=True)


def test_top_level_name_is_the_function():
    """``meshpool.progress`` is the function even after ``import meshpool.progressbar`` (the
    module is not called ``progress`` so that it can never shadow the function)."""
    import meshpool
    import meshpool.progressbar

    if "progress" not in meshpool._EXPORTS:
        pytest.skip("meshpool.progress is not exported yet (see meshpool/__init__.py)")
    assert meshpool.progress is progress
