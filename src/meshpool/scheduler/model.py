"""The scheduler's records: one TaskState per key, one WorkerState per worker, and the
bookkeeping of cancels and recalls in flight. Plain data; the rules live in the mixins
(``transitions``, ``placement``, ``recalls``, ``retirement``) that ``state.SchedulerState`` joins.
"""

from __future__ import annotations

import sys
from collections import deque
from collections.abc import Iterator
from collections.abc import Set as AbstractSet
from typing import Any, TypeAlias, TypeVar

from .. import messages as m

Outgoing = list  # list[tuple[peer_id, message]]

WAITING, READY, PROCESSING, MEMORY, ERRED, CANCELLED, NO_WORKER = (
    "waiting",
    "ready",
    "processing",
    "memory",
    "erred",
    "cancelled",
    "no-worker",
)
_FINISHED = (MEMORY, ERRED, CANCELLED)


_T = TypeVar("_T")
_EMPTY: frozenset = frozenset()  # every TaskState set starts as this one (no memory per task)
SHRINK_ABOVE = 256 * 1024  # bytes: a container's table bigger than this may be shrunk


_M = TypeVar("_M", bound="Member")


class Member:
    """A record that also stands for the set holding just itself.

    Most of a task's dependents, waiters and holders are one record (a reduction tree, a
    result on one worker). A set of one costs 216 bytes and is a container the cyclic garbage
    collector tracks: a 100,000-task reduction graph in flight had ~180,000 of them, and each
    full collection scanned them all, so the collector's share grew with the graph
    (``benchmarks/graph_gc.py``). Held as the record itself, the one member costs neither.
    :func:`_with` and :func:`_without` switch between the shared empty set, a lone record and
    a set. Code reading these fields only iterates them and tests membership and truth, which
    a record answers as the set of itself (true, with no ``__len__``: a Python-level
    ``__len__`` would make every truth test a call).
    """

    __slots__ = ()

    def __iter__(self: _M) -> Iterator[_M]:
        return iter((self,))

    def __contains__(self, item: object) -> bool:
        return item is self


# what a TaskState holds of other records: none, one record, or a set of several
Few: TypeAlias = "AbstractSet[_M] | _M"


def _with(items: Any, item: _T) -> Any:
    """``items`` plus ``item``: the shared empty set, a lone :class:`Member` or a set."""
    if items is _EMPTY:
        return item if isinstance(item, Member) else {item}
    if isinstance(items, Member):
        return items if items is item else {items, item}
    items.add(item)
    return items


_C = TypeVar("_C", dict, set)


def oversized(container: dict | set) -> bool:
    """Its table is big and mostly empty."""
    allocated = sys.getsizeof(container)
    return allocated > SHRINK_ABOVE and len(container) * 64 < allocated


def shrink(container: dict | set) -> None:
    """Right-size the table of ``container`` when it is big and mostly empty, in place.

    In place, because a container is mostly compacted while a burst of tasks is released: a
    new dict or set object made then lands in one of the burst's pymalloc arenas and, living
    on, keeps that whole arena (1 MiB) from ever going back to the system."""
    if oversized(container):
        kept = container.copy()  # right-sized, and update() from it sizes the table once
        container.clear()
        container.update(kept)  # type: ignore[arg-type]


def shrunk(container: _C) -> _C:
    """As :func:`shrink` for a container other threads read: emptied in place when nothing
    is left, else replaced by a right-sized copy (a reader never sees it half rebuilt)."""
    if not oversized(container):
        return container
    if not container:
        container.clear()
        return container
    return type(container)(container)


def _without(items: Any, item: _T) -> Any:
    """``items`` less ``item``: the shared empty set when nothing is left, the lone record when
    one :class:`Member` is."""
    if isinstance(items, Member):
        return _EMPTY if items is item else items
    if not items:
        return _EMPTY
    items.discard(item)
    if len(items) > 1:
        return items
    if not items:
        return _EMPTY
    (only,) = items
    return only if isinstance(only, Member) else items


class InvalidTransition(RuntimeError):
    """The state machine was asked for a move its rules do not allow (a bug, not bad input)."""


class TaskState(Member):
    __slots__ = (
        "key",
        "state",
        "spec",
        "dependencies",
        "dependents",
        "waiting_on",
        "waiters",
        "who_has",
        "processing_on",
        "priority",
        "nbytes",
        "wanted_by",
        "options",
        "error",
        "retries_left",
        "suspicious",
        "slot",
        "seq",
        "restrictions",
        "recall",
    )

    def __init__(self, key: Any, spec: tuple | None, priority: Any, options: dict | None) -> None:
        self.key = key
        self.state = WAITING
        self.spec = spec  # opaque frames; None for scattered data (no lineage)
        self.dependencies: tuple[TaskState, ...] = ()
        # (these start as the shared empty frozenset, hold a lone record as itself and become
        # sets from two members on: see Member, _with and _without. Five empty sets were half
        # of a held task's memory; then its one-member sets were 216 bytes each, GC-tracked)
        self.dependents: Few[TaskState] = _EMPTY
        self.waiting_on: Few[TaskState] = _EMPTY  # dependencies not yet in memory
        self.waiters: Few[TaskState] = _EMPTY  # dependents not yet finished
        self.who_has: Few[WorkerState] = _EMPTY
        self.processing_on: WorkerState | None = None
        self.priority = priority
        self.nbytes = 0
        self.wanted_by: AbstractSet[str] = _EMPTY
        self.options = options
        self.error: list | None = None
        self.retries_left = (options or {}).get("retries", 0) or 0
        self.suspicious = 0
        self.slot = -1
        self.seq = 0  # its number among the Computes sent to its slot (see worker/reporting.py)
        self.restrictions = _restrictions(options)
        self.recall: _Recall | None = None  # asked the worker to take it back; no answer yet

    def __repr__(self) -> str:
        return f"<TaskState {self.key!r} {self.state}>"


class _CancelRequest:
    """A client's CancelKeys, answered once every worker asked about its keys has replied."""

    __slots__ = ("client_id", "request_id", "cancelled", "outstanding")

    def __init__(self, client_id: str, request_id: int) -> None:
        self.client_id = client_id
        self.request_id = request_id
        self.cancelled: list = []
        self.outstanding = 0


class _Recall:
    """A task queued on a slot that we asked the worker to take back (CancelCompute).

    ``cancel``: a client cancels it; else it is being stolen for ``thief`` (worker id, slot).
    ``started``: the worker answered that it had started the task. The recall then stays, as a
    note that the task is executing: it is not asked about again (steal retries would ping-pong
    until the previous task's ComputeDone arrives) and is blamed if the worker dies.
    """

    __slots__ = ("cancel", "thief", "requests", "started")

    def __init__(self, cancel: bool, thief: tuple[str, int] | None = None) -> None:
        self.cancel = cancel
        self.thief = thief
        self.requests: list[_CancelRequest] = []
        self.started = False


def _restrictions(options: dict | None) -> tuple | None:
    if not options:
        return None
    workers = options.get("workers")
    resources = options.get("resources")
    if not workers and not resources:
        return None
    return (frozenset(workers) if workers else None, dict(resources) if resources else None)


class WorkerState(Member):
    __slots__ = (
        "id",
        "name",
        "address",
        "nthreads",
        "memory_limit",
        "resources",
        "used_resources",
        "processing",
        "slots",
        "blocked",
        "blocked_count",
        "ready_slots",
        "sent",
        "has_what",
        "nbytes",
        "waiting_nbytes",
        "pid",
        "versions",
        "retiring",
        "handoff",
        "arriving",
    )

    def __init__(self, msg: m.RegisterWorker) -> None:
        self.id = msg.worker_id
        self.name = msg.name
        self.address = msg.data_address
        self.nthreads = max(1, int(msg.nthreads))
        self.memory_limit = msg.memory_limit
        self.resources = dict(msg.resources or {})
        self.used_resources: dict[str, float] = {}
        self.processing: set[TaskState] = set()
        self.slots: list[deque[TaskState]] = [deque() for _ in range(self.nthreads)]
        self.blocked: set[TaskState] = set()  # executing, but waiting on other tasks (no room)
        self.blocked_count = [0] * self.nthreads  # of those, per slot
        self.ready_slots: list[int] = []
        self.sent = [0] * self.nthreads  # Computes sent to each slot so far
        self.has_what: set[TaskState] = set()
        self.nbytes = 0
        self.waiting_nbytes = 0  # of ``nbytes``, results some pending task still needs
        self.pid = msg.pid
        self.retiring: list | None = None  # None, or the (client, request) waiting on it
        self.handoff: set = set()  # keys asked to be copied elsewhere while retiring
        # data a client sends straight to this worker (Scatter), not yet reported (AddKeys)
        self.arriving: dict[Any, TaskState] = {}
        self.versions = msg.versions

    def __repr__(self) -> str:
        return f"<WorkerState {self.name} {len(self.processing)} processing>"

    def info(self) -> dict:
        return {
            "id": self.id,
            "name": self.name,
            "address": self.address,
            "nthreads": self.nthreads,
            "memory_limit": self.memory_limit,
            "resources": dict(self.resources),
            "processing": len(self.processing),
            "executing": sum(1 for q in self.slots if q) + len(self.blocked),
            "keys": len(self.has_what),
            "nbytes": self.nbytes,
            "pid": self.pid,
        }


def _error_frames(kind: str, detail: Any) -> list:
    """Exception frames built from builtins only: the caller's side rebuilds meshpool's class."""
    from ..transport.header import dumps_header

    return [dumps_header(("meshpool-error", kind, detail))]


def _missing_dependency_error(key: Any, dep_key: Any) -> list:
    return _error_frames(
        "KeyError",
        f"task {key!r} depends on {dep_key!r}, which the scheduler does not know "
        "(released or never submitted)",
    )
