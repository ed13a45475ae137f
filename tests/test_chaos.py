"""Workers killed at random while a graph with dependencies runs: every result still correct.

The CI form (default) runs a ≥500-task graph with ≥3 kills, one of them during a transfer; set
``MESHPOOL_CHAOS_TASKS=5000`` for the full 5,000-task run (``-m slow`` selects it too).
"""

from __future__ import annotations

import os
import random
import signal
import threading
import time

import pytest

import meshpool

CHAOS_TASKS = int(os.environ.get("MESHPOOL_CHAOS_TASKS", "600"))


def layer_task(seed: int, *inputs: int) -> int:
    time.sleep(0.004)
    return (seed * 7 + sum(inputs)) % 1_000_003


def big_block(megabytes: int) -> bytes:
    return bytes(megabytes * 2**20)


def size_of(block: bytes) -> int:
    return len(block)


def _expected(layers: list[list[tuple[int, list[int]]]]) -> list[list[int]]:
    values: list[list[int]] = []
    for depth, layer in enumerate(layers):
        row = []
        for seed, parents in layer:
            inputs = [values[depth - 1][p] for p in parents] if depth else []
            row.append((seed * 7 + sum(inputs)) % 1_000_003)
        values.append(row)
    return values


def _make_layers(total: int, width: int, rng: random.Random) -> list[list[tuple[int, list[int]]]]:
    layers = []
    depth = total // width
    for d in range(depth):
        layer = []
        for i in range(width):
            parents = [] if d == 0 else sorted(rng.sample(range(width), 2))
            layer.append((d * width + i, parents))
        layers.append(layer)
    return layers


def _worker_pids(ex) -> dict[str, int]:
    return {w["name"]: w["pid"] for w in ex.workers()}


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


@pytest.mark.timeout(300)
def test_random_kills_keep_every_result_correct():
    rng = random.Random(1234)
    layers = _make_layers(CHAOS_TASKS, 50, rng)
    expected = _expected(layers)
    kills: list[str] = []
    with meshpool.Executor(3) as ex:
        ex.wait_for_workers(3, timeout=60)
        futures: list[list[meshpool.Future]] = []
        for depth, layer in enumerate(layers):
            row = []
            for seed, parents in layer:
                inputs = [futures[depth - 1][p] for p in parents] if depth else []
                row.append(ex.submit(layer_task, seed, *inputs))
            futures.append(row)

        stop = threading.Event()

        def killer() -> None:
            while not stop.is_set() and len(kills) < 4:
                stop.wait(0.6)
                pids = _worker_pids(ex)
                if len(pids) < 2 or stop.is_set():
                    continue
                name = rng.choice(sorted(pids))
                _kill(pids[name])
                kills.append(name)

        thread = threading.Thread(target=killer)
        thread.start()
        try:
            # one kill during a transfer: a big block made on one worker, consumed on another,
            # and its producer killed as the consumer starts fetching it
            names = sorted(_worker_pids(ex))
            block = ex.options(workers=[names[0]]).submit(big_block, 150)
            meshpool.wait([block], timeout=120)
            consumer = ex.options(workers=[names[1]]).submit(size_of, block)
            producer_pid = _worker_pids(ex).get(names[0])
            time.sleep(0.01)
            if producer_pid:
                _kill(producer_pid)
                kills.append(f"{names[0]} (during transfer)")
            assert consumer.result(timeout=120) == 150 * 2**20
            got = [[f.result(timeout=240) for f in row] for row in futures]
        finally:
            stop.set()
            thread.join()
    assert got == expected
    assert len(kills) >= 3, kills


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_full_chaos_5000_tasks(monkeypatch):
    monkeypatch.setattr(__import__(__name__), "CHAOS_TASKS", 5000)
    test_random_kills_keep_every_result_correct()
