"""The scheduler's state machine (see test_state_machine.py): data a client sends to a worker that
dies (a task's large arguments, scattered data), and which task a dead worker is blamed for.
"""

from __future__ import annotations

import pytest
from test_state_machine import Sim, compute, only

from meshpool import errors
from meshpool import messages as m
from meshpool.scheduler.state import DEFAULT_DURATION, MEMORY, PROCESSING, READY, WAITING
from meshpool.transport import serialize


@pytest.fixture
def sim() -> Sim:
    return Sim()


# --- data a client sends to a worker that dies (a task's large arguments, scattered data) --------

ARGS = ("args", "t")  # the key of task t's large arguments, which the client keeps (Scatter.kept)
WITH_ARGS = {"args_key": ARGS}


def submit_with_kept_args(sim: Sim, worker: str) -> None:
    """c1 sends t's arguments to ``worker``, submits t, and releases the arguments' key (as
    Executor.submit does)."""
    sim.client(m.Scatter([(ARGS, worker)], kept=True))
    sim.submit(("t", [ARGS], WITH_ARGS))
    sim.client(m.ReleaseKeys([ARGS]))


def erred_with(out: list, key) -> BaseException:
    [(_, msg)] = [(p, msg) for p, msg in only(out, m.TaskErred) if msg.key == key]
    return serialize.loads_exception(msg.frames)


def test_kept_data_lost_on_its_way_is_sent_again(sim):
    sim.register("w1")
    sim.register("w2")
    submit_with_kept_args(sim, "w1")
    assert sim.ts("t").state == WAITING
    out = sim.remove("w1")  # before its AddKeys
    assert out == [("c1", m.ResendData("addr-w1", [(ARGS, "w2", "addr-w2")]))]
    out = sim.worker("w2", m.AddKeys([(ARGS, 100)]))
    assert out == [("w2/0", compute("t", 1, [(ARGS, ["addr-w2"])], WITH_ARGS))]


def test_kept_data_for_a_worker_already_gone_is_sent_again_at_once(sim):
    sim.register("w2")
    out = sim.client(m.Scatter([(ARGS, "w1")], kept=True))  # its worker list was stale
    assert out == [("c1", m.ResendData("", [(ARGS, "w2", "addr-w2")]))]


def test_kept_data_lost_after_it_arrived_is_sent_again(sim):
    sim.state._mean_duration = DEFAULT_DURATION  # long tasks: no prefetch
    sim.register("w1")
    sim.submit(("busy", []))  # w1's only slot is taken: t waits, ready, for room
    submit_with_kept_args(sim, "w1")
    sim.worker("w1", m.AddKeys([(ARGS, 100)]))
    assert sim.ts("t").state == READY and sim.ts(ARGS).state == MEMORY
    sim.register("w2")
    assert sim.ts("t").state == PROCESSING  # on w2, which will fetch the arguments from w1
    out = sim.remove("w1")
    assert out == [("c1", m.ResendData("addr-w1", [(ARGS, "w2", "addr-w2")]))]
    assert sim.ts(ARGS).state == WAITING and sim.ts(ARGS).suspicious == 1
    # t could not fetch them; busy (rerun) takes w2's slot meanwhile
    assert sim.worker("w2/0", m.MissingData("t", ARGS, "addr-w1")) == [("w2/0", compute("busy", 1))]
    assert sim.ts("t").state == WAITING
    assert sim.worker("w2", m.AddKeys([(ARGS, 100)])) == []
    out = sim.done("w2/0", "busy")
    assert only(out, m.Compute) == [("w2/0", compute("t", 2, [(ARGS, ["addr-w2"])], WITH_ARGS))]


def test_kept_data_waits_for_a_worker_to_join(sim):
    sim.register("w1")
    submit_with_kept_args(sim, "w1")
    assert sim.remove("w1") == []
    out = sim.register("w2")
    assert out == [("c1", m.ResendData("addr-w1", [(ARGS, "w2", "addr-w2")]))]


def test_kept_data_lost_with_three_workers_fails_its_task_with_data_lost(sim):
    sim.register("w1")
    submit_with_kept_args(sim, "w1")
    for dying, next_one in [("w1", "w2"), ("w2", "w3")]:
        sim.register(next_one)
        out = sim.remove(dying)
        assert out == [
            ("c1", m.ResendData(f"addr-{dying}", [(ARGS, next_one, f"addr-{next_one}")]))
        ]
    sim.register("w4")
    error = erred_with(sim.remove("w3"), "t")
    assert isinstance(error, errors.DataLost) and "3 workers" in str(error)
    assert ARGS not in sim.state.tasks and "t" in sim.state.tasks


def test_kept_data_the_client_no_longer_has_fails_with_data_lost(sim):
    sim.register("w1")
    sim.register("w2")
    submit_with_kept_args(sim, "w1")
    sim.remove("w1")
    error = erred_with(sim.client(m.DataNotKept([ARGS])), "t")
    assert isinstance(error, errors.DataLost)
    assert sim.state.workers["w2"].arriving == {}
    assert sim.worker("w2", m.AddKeys([(ARGS, 100)])) == [("w2/0", m.FreeKeys([ARGS]))]


def test_kept_data_of_a_client_that_left_is_not_waited_for(sim):
    sim.register("w1")
    sim.register("w2")
    submit_with_kept_args(sim, "w1")
    sim.remove("w1")  # asks c1 to send it again, and c1 leaves without answering
    sim.state.remove_client("c1")
    sim.state.validate_state()
    assert sim.state.tasks == {} and sim.state.workers["w2"].arriving == {}


def test_scattered_data_lost_on_its_way_is_data_lost(sim):
    sim.register("w1")
    sim.register("w2")
    sim.client(m.Scatter([("d", "w1")]))
    sim.submit(("t", ["d"]))
    out = sim.remove("w1")
    assert isinstance(erred_with(out, "d"), errors.DataLost)
    assert isinstance(erred_with(out, "t"), errors.DataLost)
    assert only(out, m.ResendData) == []


# --- blame: which task a dead worker was running -----------------------------------------------------


def test_a_run_marker_names_the_task_to_blame(sim):
    """Reports held back by the slot: the oldest unreported task had finished; the marker
    (``running``: the seq of each slot's current task) says the second one ran."""
    sim.register("w1")
    sim.submit(("a", []), ("b", []), ("c", []))
    seq_b = sim.ts("b").seq
    assert sim.ts("a").seq < seq_b < sim.ts("c").seq
    sim.state.remove_worker("w1", running=[seq_b])
    assert [sim.ts(k).suspicious for k in "abc"] == [0, 1, 0]


def test_a_run_marker_saying_idle_blames_nobody(sim):
    sim.register("w1")
    sim.submit(("a", []), ("b", []))
    sim.state.remove_worker("w1", running=[0])
    assert [sim.ts(k).suspicious for k in "ab"] == [0, 0]


def test_without_a_marker_the_oldest_unreported_task_is_blamed(sim):
    sim.register("w1")
    sim.submit(("a", []), ("b", []))
    sim.state.remove_worker("w1")
    assert [sim.ts(k).suspicious for k in "ab"] == [1, 0]
