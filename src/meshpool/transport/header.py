"""The header codec: the first frame of every message, builtins only.

A header is a tuple of builtins (str, bytes, int, float, bool, None, and lists/tuples/dicts of
those). It is written with pickle protocol 5 (fast in C) and read back with an unpickler that
refuses every global, so no callable can be named and no user code runs while a header is decoded
(DESIGN.md rule 3): a malformed or hostile header can only fail to decode, raising
:class:`MalformedMessage`. Headers are capped at :data:`MAX_HEADER_BYTES`.
"""

from __future__ import annotations

import io
import pickle
from typing import Any

MAX_HEADER_BYTES = 16 * 1024 * 1024  # a submit of ~100k tasks' metadata fits; a bomb does not
# dependency keys per submit message: clients flush a batch past this, so a header stays a few
# MB even with long keys (~100 bytes each at worst, as pickle shares repeated strings)
BATCH_DEPENDENCIES = 50_000


class MalformedMessage(ValueError):
    """A frame list that is not a well-formed meshpool message."""


class _BuiltinsOnly(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        raise MalformedMessage(f"header names a global ({module}.{name}); refused")

    def persistent_load(self, pid: Any) -> Any:
        raise MalformedMessage("header uses a persistent id; refused")


def dumps_header(header: tuple) -> bytes:
    return pickle.dumps(header, protocol=5)


def loads_header(data: bytes | memoryview) -> tuple:
    """Decode a header frame; raise MalformedMessage for anything but a tuple of builtins."""
    if len(data) > MAX_HEADER_BYTES:
        raise MalformedMessage(f"header of {len(data)} bytes exceeds {MAX_HEADER_BYTES}")
    try:
        header = _BuiltinsOnly(io.BytesIO(data)).load()
    except MalformedMessage:
        raise
    except Exception as exc:  # truncated, garbage, wrong protocol...
        raise MalformedMessage(f"undecodable header: {type(exc).__name__}: {exc}") from None
    if type(header) is not tuple or not header or type(header[0]) is not str:
        raise MalformedMessage("header is not a tuple starting with an operation name")
    return header
