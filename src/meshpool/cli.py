"""The ``meshpool`` command: ``scheduler``, ``worker``, ``keygen``.

Every option has an environment variable (``MESHPOOL_<OPTION>``, e.g. ``MESHPOOL_SECURITY``) for
containers; a command-line option wins over its variable.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
import uuid

from ._version import __version__

logger = logging.getLogger("meshpool.cli")


def _env(name: str, default: str | None = None) -> str | None:
    return os.environ.get(f"MESHPOOL_{name.upper().replace('-', '_')}", default)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="meshpool", description="Run the parts of a meshpool cluster."
    )
    parser.add_argument("--version", action="version", version=f"meshpool {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    sched = sub.add_parser("scheduler", help="start a scheduler; prints the address to use")
    sched.add_argument("--host", default=_env("host", "0.0.0.0"), help="interface to bind")
    sched.add_argument("--port", type=int, default=int(_env("port", "8786") or 8786))
    sched.add_argument("--security", default=_env("security"), help="credential directory")
    sched.add_argument(
        "--insecure",
        action="store_true",
        default=bool(_env("insecure")),
        help="plain TCP without CURVE: for trusted networks only",
    )
    sched.add_argument("--log-level", default=_env("log_level", "INFO"))

    work = sub.add_parser("worker", help="start supervised worker processes on this host")
    work.add_argument(
        "address",
        nargs="?",
        default=_env("scheduler"),
        help="the scheduler's address, tcp://HOST:PORT",
    )
    work.add_argument("--nworkers", type=int, default=int(_env("nworkers", "1") or 1))
    work.add_argument("--nthreads", type=int, default=int(_env("nthreads", "1") or 1))
    work.add_argument("--memory-limit", default=_env("memory_limit"), help="e.g. 4GB")
    work.add_argument("--resources", default=_env("resources"), help="e.g. GPU=1,MEM=2e9")
    work.add_argument("--security", default=_env("security"), help="credential directory")
    work.add_argument("--insecure", action="store_true", default=bool(_env("insecure")))
    work.add_argument("--name", default=_env("name"), help="worker name prefix")
    work.add_argument(
        "--contact-address",
        default=_env("contact_address"),
        help="host name or IP that peers use to reach this host",
    )
    work.add_argument(
        "--listen-host",
        default=_env("listen_host", "0.0.0.0"),
        help="interface the data sockets bind",
    )
    work.add_argument(
        "--retire-timeout",
        type=float,
        default=float(_env("retire_timeout", "60") or 60),
        help="seconds to hand off data on SIGTERM before stopping anyway",
    )
    work.add_argument(
        "--scheduler-silence",
        type=float,
        default=float(_env("scheduler_silence", "30") or 30),
        help="seconds without word from the scheduler before the workers (and this) exit",
    )
    work.add_argument("--log-level", default=_env("log_level", "INFO"))

    keygen = sub.add_parser("keygen", help="write a cluster's credentials into DIR")
    keygen.add_argument("directory")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=getattr(args, "log_level", "INFO"),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if args.command == "keygen":
        from .transport.security import Security

        Security.generate(args.directory)
        print(f"credentials written to {args.directory}")
        return 0
    if args.command == "scheduler":
        return _scheduler(args)
    return _worker(args)


def _scheduler(args: argparse.Namespace) -> int:
    from .scheduler.server import serve_forever
    from .transport import security as sec

    security = None
    if args.insecure:
        logger.warning("INSECURE: plain TCP, any peer that reaches this port can run code here")
    else:
        security = sec.scheduler_credentials(args.security, args.host, args.port)

    def ready(address: str) -> None:
        if security is not None and not args.security and args.port == 0:
            # the port is known only now: record the credentials under it
            sec.record_address(security, args.host, int(address.rsplit(":", 1)[1]))
        shown = address.replace("0.0.0.0", sec.public_host())
        print(f"meshpool scheduler at {shown}", flush=True)
        if security is not None:
            print(f"credentials: {security.directory}", flush=True)

    serve_forever(f"tcp://{args.host}:{args.port}", security=security, ready=ready)
    return 0


def _worker(args: argparse.Namespace) -> int:
    from .cluster.local import LocalWorkers
    from .executor.executor import _parse_size
    from .transport import security as sec

    if not args.address:
        print("meshpool worker: the scheduler's address is required", file=sys.stderr)
        return 2
    security = None
    if not args.insecure:
        security = sec.client_credentials(args.security, args.address)
    from .worker.server import CREDENTIALS_REFUSED, SCHEDULER_LOST

    stop = threading.Event()
    gave_up: list[str] = []  # why we stop on our own (see _give_up_message)

    def give_up(why: str) -> None:
        if not gave_up:
            gave_up.append(why)
        stop.set()

    def on_exit(worker_id: str, code: int) -> None:
        if code == CREDENTIALS_REFUSED:  # retrying cannot help
            give_up("refused")
        elif code == SCHEDULER_LOST:  # the scheduler is gone for all our workers alike
            started = workers.processes.get(worker_id)
            give_up("lost" if started is not None and started.registered else "unreachable")
        elif not stop.is_set() and not workers.exited(worker_id):
            give_up("failing")

    resources = {}
    for item in (args.resources or "").split(","):
        if item.strip():
            name, _, amount = item.partition("=")
            resources[name.strip()] = float(amount)
    workers = LocalWorkers(
        count=args.nworkers,
        scheduler_address=args.address,
        directory="",
        prefix=f"{args.name or 'w'}-{uuid.uuid4().hex[:8]}",
        nthreads=args.nthreads,
        memory_limit=_parse_size(args.memory_limit),
        on_exit=on_exit,
        data_host=args.listen_host,
        name_prefix=args.name or f"{sec.public_host()}-{os.getpid()}",
        extra_config={
            "security": security.to_dict() if security is not None else None,
            "resources": resources,
            "contact_address": args.contact_address,
            "log_level": args.log_level,
            "scheduler_silence": args.scheduler_silence,
        },
    )
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    workers.start()
    print(f"meshpool worker: {args.nworkers} process(es) for {args.address}", flush=True)
    while not stop.wait(0.5):
        pass
    # retire gracefully: results move to the remaining workers before these exit
    workers.close(graceful=0.0 if gave_up else args.retire_timeout)
    if gave_up:
        print(_give_up_message(gave_up[0], args, security is not None), file=sys.stderr)
        return 1
    return 0


def _give_up_message(why: str, args: argparse.Namespace, secured: bool) -> str:
    if why == "refused":
        what = "refused our credentials" if secured else "refused us: it requires credentials"
        return (
            f"meshpool worker: the scheduler at {args.address} {what} "
            "(use the cluster's: --security DIR or MESHPOOL_SECURITY)"
        )
    if why == "lost":
        return (
            f"meshpool worker: lost the scheduler at {args.address} "
            f"(no word from it for {args.scheduler_silence:g} s); exiting"
        )
    if why == "unreachable":
        return (
            f"meshpool worker: no answer from a scheduler at {args.address} "
            f"within {args.scheduler_silence:g} s; exiting"
        )
    from .cluster.local import MAX_FAILED_STARTS

    return (
        f"meshpool worker: worker processes failed to start {MAX_FAILED_STARTS} times in a row "
        "(see their output above); exiting"
    )


if __name__ == "__main__":
    sys.exit(main())
