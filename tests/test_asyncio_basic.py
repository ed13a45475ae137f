"""meshpool futures in asyncio: wrap_future, run_in_executor, ``await fut``."""

from __future__ import annotations

import asyncio
import threading

import pytest
import tasks
from helpers import LIVENESS

LARGE = 200_000  # > 64 KiB: fetched from the worker when awaited


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, LIVENESS))


def test_wrap_future(ex):
    async def main():
        return await asyncio.wrap_future(ex.submit(tasks.inc, 1))

    assert run(main()) == 2


def test_wrap_future_large_result(ex):
    async def main():
        return await asyncio.wrap_future(ex.submit(tasks.big, LARGE))

    # wrap_future copies the future's raw result; meshpool must hand over the value
    assert run(main()) == b"x" * LARGE


def test_run_in_executor(ex):
    async def main():
        loop = asyncio.get_running_loop()
        return await asyncio.gather(
            loop.run_in_executor(ex, tasks.inc, 1), loop.run_in_executor(ex, tasks.add, 2, 3)
        )

    assert run(main()) == [2, 5]


def test_await_small_and_large_results(ex):
    async def main():
        small = await ex.submit(tasks.big, 10)
        large = await ex.submit(tasks.big, LARGE)
        return small, large

    assert run(main()) == (b"x" * 10, b"x" * LARGE)


def test_await_does_not_block_the_loop(ex, tmp_path):
    from helpers import gate_paths, release

    started, release_path = gate_paths(tmp_path, "g")

    async def main():
        fut = ex.submit(tasks.gated, started, release_path, "done")
        ticks = 0

        async def ticker():
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0)
                if ticks == 50:
                    release(release_path)

        ticking = asyncio.ensure_future(ticker())
        try:
            value = await fut
        finally:
            ticking.cancel()
        return value, ticks

    value, ticks = run(main())
    assert value == "done" and ticks >= 50  # the loop kept running while we awaited


def test_await_exception(ex):
    async def main():
        await ex.submit(tasks.fail, "async boom")

    with pytest.raises(ValueError, match="async boom"):
        run(main())


def test_await_finished_future(ex):
    fut = ex.submit(tasks.inc, 1)
    fut.result(LIVENESS)

    async def main():
        return await fut

    assert run(main()) == 2


def test_gather_many_awaits(ex):
    async def main():
        return await asyncio.gather(*(ex.submit(tasks.inc, i) for i in range(20)))

    assert run(main()) == list(range(1, 21))


def test_callbacks_off_the_io_thread_in_asyncio(ex):
    async def main():
        loop = asyncio.get_running_loop()
        seen = loop.create_future()

        def callback(_):
            loop.call_soon_threadsafe(seen.set_result, threading.current_thread().name)

        ex.submit(tasks.inc, 1).add_done_callback(callback)
        return await seen

    assert run(main()) != "meshpool-io"


def test_async_for_as_completed(ex):
    import meshpool

    async def main():
        fs = [ex.submit(tasks.inc, i) for i in range(5)]
        return sorted([await f async for f in meshpool.as_completed(fs, timeout=LIVENESS)])

    assert run(main()) == [1, 2, 3, 4, 5]
