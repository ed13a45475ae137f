"""Helpers the test modules share (not run on workers: see tasks.py for that)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

SRC = str(Path(__file__).resolve().parent.parent / "src")
TESTS = str(Path(__file__).resolve().parent)

# Liveness only: every bound here is at least ten times what the operation takes on an idle
# machine, so a failure means "stuck", never "slow".
LIVENESS = 30.0


def wait_until(predicate: Callable[[], object], timeout: float = LIVENESS, what: str = "") -> None:
    """Poll ``predicate`` until it is true (for state in other processes, which has no event)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what or predicate}")
        time.sleep(0.01)


def becomes_true(predicate: Callable[[], object], timeout: float = 10.0) -> bool:
    """Whether ``predicate`` is true within ``timeout`` (polled; it is asked once more at the
    end), for tests that assert on the answer themselves."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return bool(predicate())


def write_script(directory: Path, source: str, name: str = "script.py") -> Path:
    """A script file that imports meshpool (from this checkout) and the tests' task module."""
    path = directory / name
    path.write_text(textwrap.dedent(source))
    return path


def script_env(*, unbuffered: bool = True, **extra: str) -> dict:
    env = dict(os.environ)
    if not unbuffered:  # a real user's default: block-buffered stdout into a pipe
        env.pop("PYTHONUNBUFFERED", None)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (SRC, TESTS, env.get("PYTHONPATH", "")) if p)
    env.update(extra)
    return env


def run_script(
    path: Path, *, cwd: Path | None = None, timeout: float = 2 * LIVENESS, unbuffered: bool = True
) -> subprocess.CompletedProcess:
    """Run ``path`` with ``sys.executable`` and return its completed process (text output)."""
    return subprocess.run(
        [sys.executable, str(path)],
        cwd=str(cwd or path.parent),
        env=script_env(unbuffered=unbuffered),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def gate_paths(tmp_path: Path, name: str) -> tuple[str, str]:
    """(started, release) marker paths for ``tasks.gated``."""
    return str(tmp_path / f"{name}.started"), str(tmp_path / f"{name}.release")


def release(path: str) -> None:
    Path(path).touch()
