"""The client's command queue: what callers ask of the I/O thread, merged before it runs.

Callers put commands (``("submit", rows, frames, futures)``, ``("release", key)``, ...) on the
core's queue; the I/O thread (or, idle, the submitting caller: ``ClientCore._submit_inline``)
takes them all and runs them in order, merged by :func:`merge_runs`.
"""

from __future__ import annotations

from ..transport.header import BATCH_DEPENDENCIES

# commands a caller may run itself (they reach only the state machine and lanes, no zmq socket)
INLINE_COMMANDS = frozenset({"submit", "release", "release-many"})
MERGE_ROWS = 1000  # submits merged into one message at most (a header stays well under its cap)


def merge_runs(items: list) -> list:
    """Commands in order, with each run of consecutive ``submit`` commands merged into one (up to
    :data:`MERGE_ROWS` tasks or :data:`BATCH_DEPENDENCIES` dependency keys, so its header stays
    under the cap; a single command may bring more), and each run of ``release`` commands into
    one ``release-keys``."""
    merged: list = []
    deps = 0  # dependency keys in the submit being merged
    for item in items:
        kind = item[0]
        last = merged[-1] if merged else None
        if kind == "submit":
            more = sum(len(row[1]) for row in item[1])
            if (
                last is not None
                and last[0] == "submit"
                and len(last[1]) < MERGE_ROWS
                and deps + more < BATCH_DEPENDENCIES
            ):
                last[1].extend(item[1])
                last[2].extend(item[2])
                last[3].extend(item[3])
                deps += more
            else:
                merged.append(["submit", list(item[1]), list(item[2]), list(item[3])])
                deps = more
        elif kind == "release":
            if last is not None and last[0] == "release-keys":
                last[1].append(item[1])
            else:
                merged.append(["release-keys", [item[1]]])
        else:
            merged.append(item)
    return merged
