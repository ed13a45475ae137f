"""``examples/library_backend.py`` runs, prints identical counts three times, and leaves nothing.

The example runs in a session of its own; every process it starts (the scheduler, the worker
host, local and remote worker processes) stays in that session, whatever its process group. So
"no process left" is: once the script exits, no live process has the script's session id.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "library_backend.py"
LIVENESS = 120.0  # seconds: catches a hang only (the example takes a few seconds)


def session_members(sid: int) -> list[psutil.Process]:
    members = []
    for proc in psutil.process_iter():
        try:
            if os.getsid(proc.pid) == sid and proc.status() != psutil.STATUS_ZOMBIE:
                members.append(proc)
        except (ProcessLookupError, PermissionError, psutil.NoSuchProcess):
            continue
    return members


@pytest.mark.timeout(2 * LIVENESS)
def test_library_backend_example(tmp_path):
    if sys.version_info < (3, 11):
        pytest.skip("on 3.10 workers start new sessions, so the leftover check cannot see them")
    proc = subprocess.Popen(
        [sys.executable, str(EXAMPLE)],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=LIVENESS)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, 9)
            proc.wait()
    assert proc.returncode == 0, err
    lines = out.splitlines()
    counts = {
        line.split(":", 1)[0].strip(): line.split(":", 1)[1]
        for line in lines
        if line.strip().startswith(("threads:", "local:", "remote:"))
    }
    assert set(counts) == {"threads", "local", "remote"}
    assert len(set(counts.values())) == 1
    assert "37517 words" in counts["threads"]
    assert any(line.startswith("identical results: True") for line in lines)
    assert any("meshpool scheduler at tcp://127.0.0.1:" in line for line in lines)

    deadline = time.monotonic() + 10  # exiting processes may need a moment to be reaped
    while (left := session_members(proc.pid)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not left, [p.cmdline() for p in left]
