"""The scheduler's state machine, driven synchronously: messages in, ``(peer, message)`` out.

No sockets, no processes, no clock: each test feeds :class:`SchedulerState` the messages clients
and workers would send and compares what it answers, structurally (messages are dataclasses).
``validate_state()`` runs after every step.

Peers: clients are "c1", "c2"; a worker's control connection is its id ("w1"), its execution
slots are "w1/0", "w1/1"...; a worker's data address is "addr-<id>".
"""

from __future__ import annotations

import sys

import pytest

from meshpool import errors
from meshpool import messages as m
from meshpool.scheduler.state import (
    CANCELLED,
    DEFAULT_DURATION,
    ERRED,
    MAX_HELD_IMBALANCE,
    MEMORY,
    NO_WORKER,
    PROCESSING,
    READY,
    WAITING,
    SchedulerState,
)
from meshpool.transport import serialize

ERROR = [b"tb-info", b"exception"]
# Every task reports this duration, and the Sim starts from it: short tasks, so slots hold a
# prefetch queue, whose size stays put.
DURATION = 0.0005


class Sim:
    """A SchedulerState plus the boilerplate of talking to it; validates after every step."""

    def __init__(self, killed_worker_limit: int = 3) -> None:
        self.state = SchedulerState(killed_worker_limit=killed_worker_limit)
        self.state._mean_duration = DURATION
        self._order = 0

    def _check(self, out: list) -> list:
        self.state.validate_state()
        return out

    # --- clients ---------------------------------------------------------------------------

    def submit(self, *tasks: tuple, client: str = "c1") -> list:
        """tasks: (key, [dependency keys]) or (key, [deps], options)."""
        rows, frames = [], []
        for task in tasks:
            key, deps = task[0], task[1]
            options = task[2] if len(task) > 2 else None
            self._order += 1
            rows.append((key, list(deps), 1, (0, self._order, 0), options))
            frames.append(spec(key))
        return self._check(self.state.handle_client(client, m.SubmitTasks(rows, frames)))

    def client(self, msg: object, client: str = "c1") -> list:
        return self._check(self.state.handle_client(client, msg))

    # --- workers ---------------------------------------------------------------------------

    def register(self, wid: str, nthreads: int = 1, resources: dict | None = None) -> list:
        msg = m.RegisterWorker(
            wid, f"name-{wid}", f"addr-{wid}", nthreads, 0, resources or {}, m.versions(), 1
        )
        out = self._check(self.state.handle_worker(wid, msg))
        for slot in range(nthreads):
            out += self._check(self.state.handle_worker(f"{wid}/{slot}", m.SlotHello(wid, slot)))
        return out

    def worker(self, peer: str, msg: object) -> list:
        return self._check(self.state.handle_worker(peer, msg))

    def done(self, peer: str, key: str, nbytes: int = 8, value: bool = True) -> list:
        frames = [b"value-" + key.encode()] if value else []
        return self.worker(peer, m.ComputeDone(key, nbytes, value, DURATION, frames))

    def erred(self, peer: str, key: str) -> list:
        return self.worker(peer, m.ComputeErred(key, DURATION, list(ERROR)))

    def remove(self, wid: str) -> list:
        return self._check(self.state.remove_worker(wid, "test"))

    def ts(self, key: str):
        return self.state.tasks[key]


def spec(key: str) -> bytes:
    return b"spec-" + key.encode()


def compute(key: str, order: int, deps: list | None = None, options: dict | None = None):
    # (the scheduler keeps a task's spec as a tuple: a tuple of bytes is not GC-tracked)
    return m.Compute(key, (0, order, 0), deps or [], options, (spec(key),))


def task_done(key: str, nbytes: int = 8, value: bool = True) -> m.TaskDone:
    return m.TaskDone(key, nbytes, value, [b"value-" + key.encode()] if value else [])


def only(out: list, kind: type) -> list:
    return [(peer, msg) for peer, msg in out if isinstance(msg, kind)]


@pytest.fixture
def sim() -> Sim:
    return Sim()


# --- dispatch -----------------------------------------------------------------------------------


def test_dispatch_to_a_slot_and_report_done(sim):
    assert sim.register("w1") == []
    assert sim.submit(("x", [])) == [("w1/0", compute("x", 1))]
    assert sim.ts("x").state == PROCESSING
    assert sim.done("w1/0", "x") == [("c1", task_done("x"))]
    assert sim.ts("x").state == MEMORY
    assert set(sim.ts("x").who_has) == {sim.state.workers["w1"]}


def test_tasks_wait_for_a_worker(sim):
    assert sim.submit(("x", [])) == []
    assert sim.ts("x").state == READY
    assert sim.register("w1") == [("w1/0", compute("x", 1))]


def test_each_slot_gets_its_own_messages(sim):
    sim.register("w1", nthreads=2)
    out = sim.submit(("a", []), ("b", []))
    assert out == [("w1/0", compute("a", 1)), ("w1/1", compute("b", 2))]


def test_balance_between_workers(sim):
    sim.register("w1")
    sim.register("w2")
    out = sim.submit(("a", []), ("b", []), ("c", []), ("d", []))
    per_worker = {}
    for peer, msg in out:
        per_worker.setdefault(peer, []).append(msg.key)
    assert sorted(len(v) for v in per_worker.values()) == [2, 2]


def test_prefetch_queue_is_bounded(sim):
    sim.register("w1")
    keys = [f"t{i}" for i in range(100)]
    out = sim.submit(*((k, []) for k in keys))
    capacity = sim.state.slot_capacity()
    assert 2 <= len(out) == capacity < 100
    # the rest wait on the scheduler and flow in as the slot finishes
    assert sim.done("w1/0", "t0")[1:] == [("w1/0", compute(f"t{capacity}", capacity + 1))]


def test_small_result_frames_are_forwarded_not_opened(sim):
    sim.register("w1")
    sim.submit(("x", []))
    out = sim.worker("w1/0", m.ComputeDone("x", 3, True, 0.0, [b"\x80opaque"]))
    assert out == [("c1", m.TaskDone("x", 3, True, [b"\x80opaque"]))]


def test_same_key_resubmitted_is_shared_and_reported(sim):
    sim.register("w1")
    sim.submit(("x", []))
    sim.done("w1/0", "x")
    assert sim.submit(("x", []), client="c2") == [("c2", m.TaskDone("x", 8, False, []))]


def test_unknown_dependency_fails_the_task(sim):
    out = sim.submit(("y", ["nope"]))
    assert len(out) == 1 and out[0][0] == "c1" and isinstance(out[0][1], m.TaskErred)
    exc = serialize.loads_exception(out[0][1].frames)
    assert isinstance(exc, KeyError) and "nope" in str(exc)


# --- dependencies and locality -------------------------------------------------------------------


def test_dependent_waits_until_its_input_is_in_memory(sim):
    sim.register("w1")
    sim.register("w2")
    on_w1, on_w2 = {"workers": ["name-w1"]}, {"workers": ["name-w2"]}
    assert sim.submit(("x", [], on_w1), ("y", ["x"], on_w2)) == [
        ("w1/0", compute("x", 1, options=on_w1))
    ]
    assert sim.ts("y").state == WAITING
    out = sim.done("w1/0", "x")
    assert out == [
        ("c1", task_done("x")),
        ("w2/0", compute("y", 2, [("x", ["addr-w1"])], on_w2)),
    ]
    assert sim.done("w2/0", "y") == [("c1", task_done("y"))]


def test_dependent_chained_behind_its_input_in_the_same_slot(sim):
    """A dependent whose inputs are all queued in one slot goes right behind them."""
    sim.register("w1")
    out = sim.submit(("x", []), ("y", ["x"]))
    assert out == [("w1/0", compute("x", 1)), ("w1/0", compute("y", 2, [("x", ["addr-w1"])]))]
    assert sim.done("w1/0", "x") == [("c1", task_done("x"))]
    assert sim.done("w1/0", "y") == [("c1", task_done("y"))]


def test_diamond_chained_once_its_last_input_is(sim):
    """c needs a and b; b needs a. Refused while b waits, c is looked at again once b is
    chained (whichever of a's dependents comes first)."""
    sim.register("w1")
    out = sim.submit(("a", []), ("b", ["a"]), ("c", ["a", "b"]))
    assert [(peer, msg.key) for peer, msg in out] == [("w1/0", "a"), ("w1/0", "b"), ("w1/0", "c")]


def test_chained_dependent_is_never_stolen(sim):
    sim.register("w1")
    sim.submit(("x", []), ("y", ["x"]))
    assert sim.register("w2") == []  # y must stay behind x, whose result it reads locally


def test_diamond_waits_for_both_inputs(sim):
    sim.register("w1")
    sim.register("w2")
    out = sim.submit(("a", []), ("b", []), ("c", ["a", "b"]))
    placed = {msg.key: peer for peer, msg in out}
    assert set(placed) == {"a", "b"}
    out = sim.done(placed["a"], "a")
    assert only(out, m.Compute) == []
    assert set(sim.ts("c").waiting_on) == {sim.ts("b")}
    out = sim.done(placed["b"], "b")
    ((peer, msg),) = only(out, m.Compute)
    assert msg.key == "c"
    assert sorted(msg.dependencies) == [
        ("a", [f"addr-{placed['a'][:2]}"]),
        ("b", [f"addr-{placed['b'][:2]}"]),
    ]


def test_one_member_is_held_as_the_record_itself(sim):
    """A task's lone dependent, waiter or holder is the record, not a set of one (a set is a
    container the cyclic GC scans: see model.Member); two make a set, one left the record."""
    sim.register("w1")
    sim.register("w2")
    w1, w2 = sim.state.workers["w1"], sim.state.workers["w2"]
    sim.submit(("x", [], {"workers": ["name-w1"]}), ("y", ["x"]))
    x, y = sim.ts("x"), sim.ts("y")
    assert x.dependents is y and x.waiters is y and y.waiting_on is x
    assert list(x.dependents) == [y] and y in x.waiters and x.waiters
    sim.done("w1/0", "x")
    assert x.who_has is w1 and not y.waiting_on
    sim.worker("w2", m.AddKeys([("x", 8)]))  # a copy on w2 too
    assert x.who_has == {w1, w2}
    sim.remove("w1")
    assert x.who_has is w2 and list(x.who_has) == [w2] and w1 not in x.who_has


@pytest.mark.parametrize("holder", ["w1", "w2"])
def test_locality_task_goes_where_its_big_input_is(sim, holder):
    sim.register("w1")
    sim.register("w2")
    sim.client(m.Scatter([("big", holder)]))
    sim.worker(holder, m.AddKeys([("big", 100_000_000)]))
    assert sim.ts("big").state == MEMORY
    out = sim.submit(("y", ["big"]))
    assert out == [(f"{holder}/0", compute("y", 1, [("big", [f"addr-{holder}"])]))]


def test_locality_several_dependents_follow_their_inputs(sim):
    sim.register("w1")
    sim.register("w2")
    for key, holder in (("b1", "w1"), ("b2", "w2")):
        sim.client(m.Scatter([(key, holder)]))
        sim.worker(holder, m.AddKeys([(key, 50_000_000)]))
    out = sim.submit(("y2", ["b2"]), ("y1", ["b1"]))
    assert {msg.key: peer for peer, msg in out} == {"y1": "w1/0", "y2": "w2/0"}


# --- failure propagation ---------------------------------------------------------------------------


def test_error_propagates_to_every_dependent(sim):
    sim.register("w1")
    sim.submit(("x", []), ("y", ["x"]), ("z", ["y"]), ("other", []))
    out = sim.erred("w1/0", "x")
    erred = {msg.key: msg.frames for _, msg in only(out, m.TaskErred)}
    assert erred == {"x": ERROR, "y": ERROR, "z": ERROR}
    # y and z were chained behind x on its slot: withdrawn from the worker
    withdrawn = sorted((peer, msg.key, msg.slot) for peer, msg in only(out, m.CancelCompute))
    assert withdrawn == [("w1", "y", 0), ("w1", "z", 0)]
    assert {sim.ts(k).state for k in "xyz"} == {ERRED}
    assert sim.ts("other").state != ERRED


def test_dependent_submitted_after_its_input_failed(sim):
    sim.register("w1")
    sim.submit(("x", []))
    sim.erred("w1/0", "x")
    assert sim.submit(("y", ["x"])) == [("c1", m.TaskErred("y", ERROR))]


def test_retries(sim):
    sim.register("w1")
    sim.submit(("x", [], {"retries": 1}))
    out = sim.erred("w1/0", "x")
    assert out == [("w1/0", compute("x", 1, options={"retries": 1}))]
    assert only(sim.erred("w1/0", "x"), m.TaskErred) == [("c1", m.TaskErred("x", ERROR))]


# --- cancel -----------------------------------------------------------------------------------------


def test_cancel_task_not_yet_dispatched(sim):
    sim.submit(("x", []), ("y", ["x"]))
    out = sim.client(m.CancelKeys(7, ["x"]))
    assert sorted((peer, msg.keys) for peer, msg in only(out, m.TasksCancelled)) == [
        ("c1", ["x"]),
        ("c1", ["y"]),
    ]
    assert only(out, m.CancelReply) == [("c1", m.CancelReply(7, ["x", "y"]))]
    assert sim.register("w1") == []  # nothing left to run


def test_cancel_executing_task_is_refused(sim):
    sim.register("w1")
    sim.submit(("a", []))
    assert sim.client(m.CancelKeys(1, ["a"])) == [("c1", m.CancelReply(1, []))]
    assert sim.ts("a").state == PROCESSING
    assert sim.done("w1/0", "a") == [("c1", task_done("a"))]


def test_cancel_task_queued_on_a_slot_asks_the_worker(sim):
    sim.register("w1")
    sim.submit(("a", []), ("b", []))
    out = sim.client(m.CancelKeys(3, ["b"]))
    # the worker decides (its slot may already have started b): no answer to the client yet
    assert out == [("w1", m.CancelCompute(3, "b", 0))]
    out = sim.worker("w1", m.CancelComputeReply("b", 0, True))
    assert out == [("c1", m.TasksCancelled(["b"])), ("c1", m.CancelReply(3, ["b"]))]
    assert sim.ts("b").state == CANCELLED
    assert sim.done("w1/0", "a") == [("c1", task_done("a"))]


def test_cancel_task_the_worker_had_already_started(sim):
    sim.register("w1")
    sim.submit(("a", []), ("b", []))
    sim.client(m.CancelKeys(3, ["b"]))
    assert sim.worker("w1", m.CancelComputeReply("b", 0, False)) == [("c1", m.CancelReply(3, []))]
    sim.done("w1/0", "a")
    assert sim.done("w1/0", "b") == [("c1", task_done("b"))]


def test_cancel_answered_by_completion_before_the_workers_reply(sim):
    sim.register("w1")
    sim.submit(("a", []), ("b", []))
    sim.client(m.CancelKeys(3, ["b"]))
    sim.done("w1/0", "a")
    out = sim.done("w1/0", "b")  # b had started: its completion overtakes the reply
    assert out == [("c1", m.CancelReply(3, [])), ("c1", task_done("b"))]
    assert sim.worker("w1", m.CancelComputeReply("b", 0, False)) == []  # stale: ignored
    assert sim.ts("b").state == MEMORY


def test_cancel_many_keys_one_reply(sim):
    sim.register("w1")
    sim.submit(("a", []), ("b", []), ("c", []))
    sim.submit(*((f"q{i}", []) for i in range(10)))  # beyond the prefetch queue: on the scheduler
    queued = [k for k in ("b", "c") if sim.ts(k).state == PROCESSING]
    out = sim.client(m.CancelKeys(9, ["a", "b", "c", "q9"]))
    assert only(out, m.CancelReply) == []  # waits for the worker
    assert sorted(msg.key for _, msg in only(out, m.CancelCompute)) == queued
    for key in queued[:-1]:
        assert only(sim.worker("w1", m.CancelComputeReply(key, 0, True)), m.CancelReply) == []
    out = sim.worker("w1", m.CancelComputeReply(queued[-1], 0, True))
    ((_, reply),) = only(out, m.CancelReply)
    assert sorted(reply.cancelled) == sorted(["q9", *queued])


def test_cancel_pending_when_the_worker_dies(sim):
    sim.register("w1")
    sim.submit(("a", []), ("b", []))
    sim.client(m.CancelKeys(3, ["b"]))
    out = sim.remove("w1")
    assert ("c1", m.TasksCancelled(["b"])) in out
    assert ("c1", m.CancelReply(3, ["b"])) in out
    assert sim.ts("a").state == READY


# --- worker loss ------------------------------------------------------------------------------------


def test_worker_removal_requeues_and_blames_only_the_executing_task(sim):
    sim.register("w1")
    sim.submit(("a", []), ("b", []), ("c", []))
    assert [ts.key for ts in sim.state.workers["w1"].slots[0]] == ["a", "b", "c"]
    assert sim.remove("w1") == []
    assert {k: (sim.ts(k).state, sim.ts(k).suspicious) for k in "abc"} == {
        "a": (READY, 1),
        "b": (READY, 0),
        "c": (READY, 0),
    }
    out = sim.register("w2")
    assert [msg.key for _, msg in out] == ["a", "b", "c"]
    assert all(peer == "w2/0" for peer, _ in out)


def test_killed_worker_after_three_deaths(sim):
    sim.submit(("poison", []), ("y", ["poison"]))
    for i in range(3):
        wid = f"w{i}"
        assert only(sim.register(wid), m.Compute)[0][1].key == "poison"
        out = sim.remove(wid)
    erred = dict((msg.key, msg.frames) for _, msg in only(out, m.TaskErred))
    assert set(erred) == {"poison", "y"}
    exc = serialize.loads_exception(erred["poison"])
    assert isinstance(exc, errors.KilledWorker)
    assert exc.attempts == 3 and exc.key == "poison"


def test_killed_worker_limit_counts_only_executing(sim):
    sim.register("w1")
    sim.submit(("a", []), ("b", []))
    for i in range(5):  # b is always queued behind a when the worker dies
        sim.remove(f"w{i + 1}")
        sim.register(f"w{i + 2}")
        assert sim.ts("a").state == PROCESSING or sim.ts("a").state == ERRED
        if sim.ts("a").state == ERRED:
            break
    assert sim.ts("b").suspicious == 0
    assert sim.ts("b").state == PROCESSING


def test_at_most_once_task_is_not_rerun(sim):
    sim.register("w1")
    sim.submit(("once", [], {"at_most_once": True}))
    out = sim.remove("w1")
    ((_, msg),) = only(out, m.TaskErred)
    assert isinstance(serialize.loads_exception(msg.frames), errors.WorkerLost)


def test_lost_result_still_wanted_is_recomputed(sim):
    sim.register("w1")
    sim.submit(("x", []))
    sim.done("w1/0", "x", value=False)
    sim.remove("w1")
    assert sim.ts("x").state == READY
    assert sim.register("w2") == [("w2/0", compute("x", 1))]


def test_lost_input_of_a_pending_task_is_recomputed(sim):
    on_w2 = {"workers": ["name-w2"]}
    sim.register("w1")
    sim.submit(("x", []))
    sim.done("w1/0", "x", value=False)
    sim.register("w2")
    assert sim.submit(("y", ["x"], on_w2)) == [
        ("w2/0", compute("y", 2, [("x", ["addr-w1"])], on_w2))
    ]
    sim.client(m.ReleaseKeys(["x"]))  # only y needs x now
    out = sim.remove("w1")  # x's only copy is gone: recomputed, as y needs it
    assert out == [("w2/0", compute("x", 1))]
    # y, queued first, could not fetch x from the dead worker
    assert sim.worker("w2/0", m.MissingData("y", "x", "addr-w1")) == []
    assert sim.ts("y").state == WAITING
    out = sim.done("w2/0", "x", value=False)
    assert out == [("w2/0", compute("y", 2, [("x", ["addr-w2"])], on_w2))]
    assert sim.done("w2/0", "y") == [("c1", task_done("y")), ("w2/0", m.FreeKeys(["x"]))]


def test_scattered_data_lost_is_data_lost(sim):
    sim.register("w1")
    sim.client(m.Scatter([("d", "w1")]))
    sim.worker("w1", m.AddKeys([("d", 10)]))
    out = sim.remove("w1")
    ((_, msg),) = only(out, m.TaskErred)
    assert isinstance(serialize.loads_exception(msg.frames), errors.DataLost)


# --- releasing and forgetting -----------------------------------------------------------------------


def test_release_forgets_and_frees_on_the_worker(sim):
    sim.register("w1")
    sim.submit(("x", []))
    sim.done("w1/0", "x", nbytes=100, value=False)
    assert sim.state.workers["w1"].nbytes == 100
    assert sim.client(m.ReleaseKeys(["x"])) == [("w1/0", m.FreeKeys(["x"]))]
    assert "x" not in sim.state.tasks
    assert sim.state.workers["w1"].nbytes == 0


def test_released_input_kept_until_its_dependents_finish(sim):
    sim.register("w1")
    sim.submit(("x", []), ("y", ["x"]))
    sim.done("w1/0", "x")
    assert sim.client(m.ReleaseKeys(["x"])) == []  # y still needs it
    assert "x" in sim.state.tasks
    out = sim.done("w1/0", "y")
    assert out == [("c1", task_done("y")), ("w1/0", m.FreeKeys(["x"]))]
    assert "x" not in sim.state.tasks


def test_release_of_pending_task_does_not_cancel_it(sim):
    sim.register("w1")
    sim.submit(("x", []))
    assert sim.client(m.ReleaseKeys(["x"])) == []
    assert sim.ts("x").state == PROCESSING
    # done, nobody wants it: forgotten and freed at once
    assert sim.done("w1/0", "x") == [("w1/0", m.FreeKeys(["x"]))]
    assert "x" not in sim.state.tasks


def test_client_gone_releases_its_keys(sim):
    sim.register("w1")
    sim.submit(("x", []), client="c1")
    sim.submit(("x", []), client="c2")
    sim.done("w1/0", "x")
    assert sim._check(sim.state.remove_client("c1")) == []
    assert sim._check(sim.state.remove_client("c2")) == [("w1/0", m.FreeKeys(["x"]))]


@pytest.mark.parametrize("nbytes", [8, 10 * 2**20])
def test_frees_go_to_a_slot_ahead_of_its_next_task(sim, nbytes):
    """A slot drops the keys before it starts the next task, however late the worker's
    control thread runs; one FreeKeys per worker per step."""
    sim.register("w1")
    sim.submit(("a", []), ("b", []), ("s", ["a", "b"]), ("c", []))
    for key in ("a", "b"):
        sim.done("w1/0", key, nbytes=8, value=False)
    sim.client(m.ReleaseKeys(["a", "b", "s", "c"]))
    out = sim.done("w1/0", "s", nbytes=nbytes, value=False)
    frees = only(out, m.FreeKeys)
    assert sorted(frees[0][1].keys) == ["a", "b", "s"]
    # c is still queued on the slot: for big data (s, here) the control connection is told
    # too, in case c runs long; small keys wait for the slot (a wake-up saved in both processes)
    assert [peer for peer, _ in frees] == (["w1/0", "w1"] if nbytes > 2**20 else ["w1/0"])


def test_frees_to_an_idle_slot_only(sim):
    sim.register("w1")
    sim.submit(("x", []))
    sim.done("w1/0", "x")
    assert sim.client(m.ReleaseKeys(["x"])) == [("w1/0", m.FreeKeys(["x"]))]


def test_frees_to_the_control_connection_without_open_slots(sim):
    sim.register("w1")
    sim.submit(("x", []))
    sim.done("w1/0", "x")
    sim.state.workers["w1"].ready_slots = []  # e.g. retiring
    assert sim.client(m.ReleaseKeys(["x"])) == [("w1", m.FreeKeys(["x"]))]


def test_a_fresh_scheduler_does_not_prefetch():
    """Before any task has been timed, tasks are assumed long: one per slot, so a first burst
    of large leaves does not pile up on a worker that may turn out slow."""
    sim = Sim()
    sim.state._mean_duration = DEFAULT_DURATION
    assert sim.state.slot_capacity() == 1
    sim.register("w1")
    assert len(sim.submit(*((f"t{i}", []) for i in range(10)))) == 1


def test_leaves_wait_for_a_lean_worker(sim):
    """A worker holding partial results that wait for their siblings beyond the imbalance
    does not start new leaves (it would only pile up more); it still runs tasks that consume
    results, and the leaves go to the leaner worker."""
    big = MAX_HELD_IMBALANCE // 2 + 1
    sim.state._mean_duration = DEFAULT_DURATION  # no prefetch: one task per slot
    sim.register("w1")
    sim.register("w2")
    leaves = [f"l{i}" for i in range(8)]
    sim.submit(*((k, []) for k in leaves), ("s", leaves))
    w1, w2 = sim.state.workers["w1"], sim.state.workers["w2"]
    first = {ts.key: ws.id for ws in (w1, w2) for ts in ws.processing}
    on_w1 = [k for k, w in first.items() if w == "w1"]
    on_w2 = [k for k, w in first.items() if w == "w2"]
    assert on_w1 and on_w2
    # w2 stalls on its leaf; w1 finishes two: more than the imbalance waits for ``s`` there
    out = sim.done("w1/0", on_w1[0], nbytes=big)
    (nxt,) = [msg.key for peer, msg in out if peer == "w1/0" and isinstance(msg, m.Compute)]
    out = sim.done("w1/0", nxt, nbytes=big)
    assert w1.waiting_nbytes == 2 * big > w2.waiting_nbytes + MAX_HELD_IMBALANCE
    assert only(out, m.Compute) == []  # w1 waits; the next leaf is kept for w2
    assert not w1.processing
    out = sim.done("w2/0", on_w2[0], nbytes=big)  # w2 catches up: both take leaves again
    assert sorted(peer for peer, _ in only(out, m.Compute)) == ["w1/0", "w2/0"]


def test_erred_and_cancelled_tasks_are_forgotten_when_released(sim):
    sim.register("w1")
    sim.submit(("x", []))
    sim.erred("w1/0", "x")
    sim.client(m.ReleaseKeys(["x"]))
    assert "x" not in sim.state.tasks


# --- restrictions -----------------------------------------------------------------------------------


def test_worker_restriction_waits_for_a_fitting_worker(sim):
    sim.register("w1")
    assert sim.submit(("x", [], {"workers": ["name-w2"]})) == []
    assert sim.ts("x").state == NO_WORKER
    out = sim.register("w2")
    assert out == [("w2/0", compute("x", 1, options={"workers": ["name-w2"]}))]


def test_resource_restriction(sim):
    sim.register("cpu")
    gpu = {"resources": {"GPU": 1}}
    assert sim.submit(("g1", [], gpu), ("g2", [], gpu)) == []
    out = sim.register("gpu", nthreads=2, resources={"GPU": 1})
    # two slots, but one GPU: one task at a time
    assert out == [("gpu/0", compute("g1", 1, options=gpu))]
    out = sim.done("gpu/0", "g1")
    assert only(out, m.Compute) == [("gpu/0", compute("g2", 2, options=gpu))]


def test_restricted_task_not_stolen_by_unfit_worker(sim):
    sim.register("w1")
    opts = {"workers": ["name-w1"]}
    sim.submit(("a", [], opts), ("b", [], opts))
    assert sim.register("w2") == []  # w2 is idle but may not take b


# --- stealing ---------------------------------------------------------------------------------------


def test_idle_worker_steals_a_queued_task(sim):
    sim.register("w1")
    sim.submit(("a", []), ("b", []))  # both queued on w1's only slot
    out = sim.register("w2")
    assert out == [("w1", m.CancelCompute(0, "b", 0))]
    out = sim.worker("w1", m.CancelComputeReply("b", 0, True))
    assert out == [("w2/0", compute("b", 2))]
    assert sim.done("w2/0", "b") == [("c1", task_done("b"))]


def test_steal_refused_when_the_task_started(sim):
    sim.register("w1")
    sim.submit(("a", []), ("b", []))
    sim.register("w2")
    # b had started (a's ComputeDone is still on the way): not asked about again
    assert sim.worker("w1", m.CancelComputeReply("b", 0, False)) == []
    assert sim.ts("b").processing_on is sim.state.workers["w1"]
    assert sim.client(m.CancelKeys(2, ["b"])) == [("c1", m.CancelReply(2, []))]
    sim.done("w1/0", "a")
    assert sim.done("w1/0", "b") == [("c1", task_done("b"))]


def test_task_known_started_is_blamed_when_its_worker_dies(sim):
    sim.register("w1")
    sim.submit(("a", []), ("b", []))
    sim.register("w2")
    sim.worker("w1", m.CancelComputeReply("b", 0, False))
    sim.remove("w1")
    assert sim.ts("b").suspicious == 1


def test_cancel_during_a_steal(sim):
    sim.register("w1")
    sim.submit(("a", []), ("b", []))
    sim.register("w2")
    assert sim.client(m.CancelKeys(5, ["b"])) == []  # the recall already on its way
    out = sim.worker("w1", m.CancelComputeReply("b", 0, True))
    assert out == [("c1", m.TasksCancelled(["b"])), ("c1", m.CancelReply(5, ["b"]))]


# --- initializers and workers ------------------------------------------------------------------------


def test_initializer_replayed_to_every_slot(sim):
    sim.register("w1")
    out = sim.client(m.SetInitializer([b"init"]))
    assert out == [("w1/0", m.RunInitializer([b"init"]))]
    out = sim.register("w2", nthreads=2)
    assert out == [("w2/0", m.RunInitializer([b"init"])), ("w2/1", m.RunInitializer([b"init"]))]


def test_initializer_error_breaks_every_client(sim):
    sim.register("w1")
    sim.client(m.Ping(1), client="c1")
    sim.client(m.Ping(1), client="c2")
    out = sim.worker("w1/0", m.InitializerErred([b"err"]))
    assert sorted(peer for peer, _ in out) == ["c1", "c2"]
    assert all(msg.kind == "initializer" and msg.frames == [b"err"] for _, msg in out)


def test_get_workers_and_retire(sim):
    sim.register("w1", nthreads=2)
    ((_, reply),) = sim.client(m.GetWorkers(4))
    assert reply.request_id == 4 and [w["name"] for w in reply.value] == ["name-w1"]
    out = sim.client(m.RetireWorkers(5, ["name-w1"]))  # it holds nothing: it may go at once
    assert [(peer, type(msg)) for peer, msg in out] == [("w1", m.CloseWorker), ("c1", m.Reply)]
    assert out[1][1] == m.Reply(5, ["name-w1"])


def test_messages_from_unknown_workers_are_dropped(sim):
    assert sim.worker("ghost/0", m.ComputeDone("x", 1, False, 0.0, [])) == []


def test_stale_done_from_a_removed_placement_is_freed(sim):
    sim.register("w1")
    sim.register("w2")
    sim.submit(("x", [], {"workers": ["name-w1"]}))
    # a ComputeDone from a worker the task is not on: freed there, state untouched
    assert sim.done("w2/0", "x") == [("w2/0", m.FreeKeys(["x"]))]
    assert sim.ts("x").state == PROCESSING


def test_compact_gives_back_emptied_tables():
    from meshpool.scheduler.model import SHRINK_ABOVE, shrunk

    big = {i: i for i in range(100_000)}
    for i in range(99_990):
        del big[i]
    before = sys.getsizeof(big)
    small = shrunk(big)
    assert before > SHRINK_ABOVE and sys.getsizeof(small) < before // 100
    assert small == big
    kept = {i: i for i in range(100_000)}
    assert shrunk(kept) is kept  # full tables are left alone
    for i in range(99_990, 100_000):
        del big[i]
    assert shrunk(big) is big and sys.getsizeof(big) < SHRINK_ABOVE  # emptied: in place


def test_shrink_rebuilds_in_place():
    """A new container made while a burst is released would pin one of its pymalloc arenas."""
    from meshpool.scheduler.model import SHRINK_ABOVE, shrink

    d = {i: str(i) for i in range(100_000)}
    s = set(range(100_000))
    for i in range(99_990):
        del d[i]
        s.discard(i)
    grown = sys.getsizeof(d), sys.getsizeof(s)
    assert min(grown) > SHRINK_ABOVE
    shrink(d)
    shrink(s)
    assert sys.getsizeof(d) < grown[0] // 100 and sys.getsizeof(s) < grown[1] // 100
    assert list(d) == list(range(99_990, 100_000)) and d[99_995] == "99995"
    assert s == set(range(99_990, 100_000))


def test_a_big_release_gives_back_the_task_table_at_once(sim):
    sim.register("w1")
    keys = [f"t{i}" for i in range(20_000)]
    sim.submit(*[(k, []) for k in keys])
    for key in keys:  # (not validated step by step: that is quadratic)
        sim.state.handle_worker("w1/0", m.ComputeDone(key, 8, True, DURATION, [b"v"]))
    assert all(sim.ts(k).state == MEMORY for k in keys)
    table = sim.state.tasks
    grown = sys.getsizeof(table)
    sim.client(m.ReleaseKeys(keys))
    assert not table and sim.state.tasks is table
    assert sys.getsizeof(table) < grown // 100  # at once, not at the server's next tick
