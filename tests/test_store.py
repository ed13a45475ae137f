"""The worker's data store under concurrent use (slot threads write, the loop thread reads)."""

from __future__ import annotations

import threading

from meshpool.worker.store import DataStore


def test_total_is_kept_while_threads_put_and_free():
    """The loop thread's heartbeat asks for the total while slot threads store results: it used
    to iterate the entries and die with "dictionary changed size during iteration"."""
    store = DataStore()
    stop = threading.Event()
    errors: list[BaseException] = []

    def beat() -> None:
        try:
            while not stop.is_set():
                store.total_bytes()
                store.keys()
        except BaseException as exc:  # pragma: no cover - the failure being tested for
            errors.append(exc)

    def work(offset: int) -> None:
        for i in range(20_000):
            store.put_result((offset, i), i, [b"x" * (i % 7)])
            if i % 3 == 0:
                store.free((offset, i))

    reader = threading.Thread(target=beat)
    reader.start()
    writers = [threading.Thread(target=work, args=(n,)) for n in range(3)]
    for thread in writers:
        thread.start()
    for thread in writers:
        thread.join()
    stop.set()
    reader.join()
    assert not errors
    held = store.keys()
    assert store.total_bytes() == sum(len(store.frames(k)[0]) for k in held)


def test_replacing_and_freeing_keep_the_total():
    store = DataStore()
    store.put_frames("a", [b"1234"])
    store.put_result("a", 1, [b"12"])  # replaces: the total counts the new size only
    store.put_frames("b", [b"123"])
    store.free("a")
    store.free("missing")
    assert store.total_bytes() == 3 and store.keys() == ["b"]
