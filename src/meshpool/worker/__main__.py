"""Entry point of a worker process started by a local cluster or a nanny.

The parent writes one JSON line of configuration on our stdin (never argv: it may hold key
material) and keeps the pipe open: end-of-file means the parent is gone, and the worker exits,
removing the ipc socket files it was told to clean up.

Tasks here see ``meshpool.current_executor()`` as a client of this worker's own cluster
(``worker/nested.py``). The cap on threads waiting inside tasks with their slot handed over comes
from the config's ``max_replacements``, else ``MESHPOOL_MAX_REPLACEMENTS``, else 64.

The config's ``status_fd`` is the write end of a pipe to the parent: once the scheduler has
registered us we write ``registered`` there and close it, so the parent counts this start as a
success (only consecutive failed starts make it give up, ``cluster/local.py``).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
import traceback
from collections.abc import Callable


def _watch_parent(cleanup: list[str], cleanup_dir: str | None) -> None:
    try:
        while sys.stdin.buffer.read(65536):
            pass
    except Exception:
        pass
    for path in cleanup:
        try:
            os.unlink(path)
        except OSError:
            pass
    if cleanup_dir:
        try:
            os.rmdir(cleanup_dir)  # succeeds for the last one out
        except OSError:
            pass
    from ..transport import shm

    shm.remove_own()
    # os._exit skips the interpreter's flush: output tasks printed without flush=True into a
    # pipe (block-buffered) would be lost
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass
    os._exit(0)


def _max_replacements(config: dict, default: int) -> int:
    value = config.get("max_replacements")
    if value is None:
        value = os.environ.get("MESHPOOL_MAX_REPLACEMENTS") or default
    try:
        return max(0, int(value))
    except ValueError:
        logging.getLogger("meshpool.worker").warning(
            "ignoring max_replacements %r (not an integer); using %d", value, default
        )
        return default


def _report_registered(fd: int | None) -> Callable[[], None] | None:
    if fd is None:
        return None
    os.set_inheritable(fd, False)  # not for the subprocesses tasks start

    def report() -> None:
        try:
            os.write(fd, b"registered\n")
            os.close(fd)
        except OSError:  # the parent is gone: the parent-watch thread ends us
            pass

    return report


def main() -> None:
    config = json.loads(sys.stdin.buffer.readline())
    if config.get("cwd"):
        os.chdir(config["cwd"])
    for path in reversed(config.get("sys_path", [])):
        if path not in sys.path:
            sys.path.insert(0, path)
    logging.basicConfig(
        level=config.get("log_level", "WARNING"),
        format=f"%(asctime)s {config['name']} %(levelname)s %(name)s: %(message)s",
    )
    data_address = config["data_address"]
    cleanup = list(config.get("cleanup", []))
    if data_address.startswith("ipc://"):
        cleanup.append(data_address[len("ipc://") :])
    # before the imports below: a parent shutting down while we still start sees us exit at once
    threading.Thread(
        target=_watch_parent,
        args=(cleanup, config.get("cleanup_dir")),
        name="meshpool-parent-watch",
        daemon=True,
    ).start()
    from ..transport.security import Security
    from . import nested
    from .execution import MAX_REPLACEMENTS
    from .server import SCHEDULER_SILENCE, Worker

    security = Security.from_dict(config["security"]) if config.get("security") else None
    try:
        worker = Worker(
            config["scheduler"],
            worker_id=config["worker_id"],
            name=config["name"],
            nthreads=config.get("nthreads", 1),
            data_address=data_address,
            contact_address=config.get("contact_address"),
            memory_limit=config.get("memory_limit") or 0,
            resources=config.get("resources") or {},
            security=security,
            max_replacements=_max_replacements(config, MAX_REPLACEMENTS),
            scheduler_silence=config.get("scheduler_silence") or SCHEDULER_SILENCE,
            on_registered=_report_registered(config.get("status_fd")),
        )
        nested.install(config["scheduler"], security)
    except BaseException:
        # A cluster shut down while we were still starting removes its private directory, and
        # binding our socket there fails: that is no error worth a traceback.
        cleanup_dir = config.get("cleanup_dir")
        if not (cleanup_dir and not os.path.isdir(cleanup_dir)):
            traceback.print_exc()
            sys.stderr.flush()
        # os._exit, not a normal exit: the parent-watch thread may be blocked reading stdin,
        # and interpreter shutdown would then abort on stdin's lock ("Fatal Python error").
        os._exit(1)
    import signal

    signal.signal(signal.SIGTERM, lambda *_: worker.request_retire())
    try:
        worker.run()
    except BaseException:  # a bug in the worker's loop: say so, and exit as a failure
        traceback.print_exc()
        worker.exit_code = worker.exit_code or 1
    finally:
        from ..transport import shm

        shm.remove_own()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(worker.exit_code)


if __name__ == "__main__":
    main()
