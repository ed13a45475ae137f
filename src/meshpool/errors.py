"""meshpool's exception classes: what callers catch to tell one failure from another.

- a task's own exception is re-raised as itself (with the remote traceback); when it cannot
  travel, it arrives as :class:`RemoteError`;
- :class:`KilledWorker`: a task whose execution killed workers too many times (a poison task);
- :class:`WorkerLost`: an at-most-once task whose worker died while running it;
- :class:`DataLost`: a result that lived only on a dead worker and has no lineage to recompute;
- :class:`SchedulerLost`: the cluster is gone (a ``BrokenExecutor``, like ``BrokenProcessPool``);
- :class:`CommError` / :class:`SecurityError` / :class:`VersionMismatch`: connecting went wrong.
"""

from __future__ import annotations

from concurrent.futures import BrokenExecutor


class MeshpoolError(Exception):
    """Base class of meshpool's own errors (not of task exceptions re-raised as themselves)."""


class RemoteError(MeshpoolError):
    """A task's exception that could not be pickled on the worker or unpickled here.

    Carries what can always travel: the exception's type name, its message and the remote
    traceback as text.
    """

    def __init__(self, type_name: str, message: str, traceback_text: str = "") -> None:
        super().__init__(type_name, message, traceback_text)
        self.type_name = type_name
        self.message = message
        self.traceback_text = traceback_text

    def __str__(self) -> str:
        text = f"{self.type_name}: {self.message}"
        if self.traceback_text:
            text += "\n\nRemote traceback:\n" + self.traceback_text
        return text


class SerializationError(MeshpoolError, TypeError):
    """A function, argument or result could not be pickled (or unpickled)."""


class KilledWorker(MeshpoolError):
    """The task was running on workers that died, too many times: it is taken for a poison task."""

    def __init__(self, key: object, attempts: int, last_worker: str = "") -> None:
        super().__init__(key, attempts, last_worker)
        self.key = key
        self.attempts = attempts
        self.last_worker = last_worker

    def __str__(self) -> str:
        return (
            f"task {self.key!r} was running on {self.attempts} workers that died "
            f"(last: {self.last_worker or '?'}); it is not tried again"
        )


class WorkerLost(MeshpoolError):
    """An at-most-once task's worker died while the task ran; it is not re-run."""


class DataLost(MeshpoolError):
    """A result lived only on workers that died and cannot be recomputed (scattered data, ...)."""


class SchedulerLost(BrokenExecutor, MeshpoolError):
    """The scheduler (or the whole local cluster) is gone; pending futures fail with this."""


class WorkerStartError(BrokenExecutor, MeshpoolError):
    """Worker processes failed to start again and again; the executor gave up on them."""


class InitializerFailed(BrokenExecutor, MeshpoolError):
    """The executor's ``initializer`` raised in a worker, as with the stdlib's BrokenProcessPool."""


class CommError(MeshpoolError, ConnectionError):
    """A peer could not be reached or stopped answering (the message names the address)."""


class SecurityError(CommError):
    """A peer refused our credentials, or we have none for its address."""


class VersionMismatch(CommError):
    """Peers run meshpool / Python / cloudpickle versions that cannot share by-value code."""
