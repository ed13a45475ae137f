"""Cluster credentials: ZeroMQ CURVE on every TCP socket.

A cluster shares one CURVE key pair. Every server socket (the scheduler's, each worker's data
socket) presents it, and every client socket uses it both as its own pair and as the server key it
expects. The ZAP handler (``zmq.auth``) admits a client only if it proves possession of the
cluster's secret key, so holding the credential directory is what membership means: a peer
without it never completes the handshake, and nothing it sends reaches an unpickler.

Credentials live in a directory (``meshpool keygen DIR`` writes one) as ``cluster.key`` and
``cluster.key_secret`` — the format of ``zmq.auth.create_certificates``. They travel to child
processes over pipes, never on a command line.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zmq

from ..errors import SecurityError
from .sockets import context

KEY_NAME = "cluster"

_auth_lock = threading.Lock()
_authenticator: Any = None  # zmq.auth.thread.ThreadAuthenticator, imported when first needed
_authenticator_pid = 0
_allowed: set[bytes] = set()


@dataclass(frozen=True)
class Security:
    public: bytes  # z85-encoded CURVE public key
    secret: bytes  # z85-encoded CURVE secret key
    directory: str = ""

    @classmethod
    def from_directory(cls, path: str | os.PathLike) -> Security:
        directory = Path(path).expanduser()
        secret_file = directory / f"{KEY_NAME}.key_secret"
        if not secret_file.exists():
            raise SecurityError(
                f"no cluster credentials in {directory} (expected {secret_file.name}; "
                "`meshpool keygen DIR` writes them)"
            )
        import zmq.auth

        try:
            public, secret = zmq.auth.load_certificate(str(secret_file))
        except Exception as exc:
            raise SecurityError(f"unreadable credentials in {directory}: {exc}") from exc
        if secret is None:
            raise SecurityError(f"{secret_file} holds no secret key")
        return cls(public, secret, str(directory))

    @classmethod
    def generate(cls, path: str | os.PathLike) -> Security:
        """Write a new cluster key pair into ``path`` (created 0700) and return it."""
        import zmq.auth

        directory = Path(path).expanduser()
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(directory, 0o700)
        public_file, secret_file = zmq.auth.create_certificates(str(directory), KEY_NAME)
        os.chmod(secret_file, 0o600)
        return cls.from_directory(directory)

    def to_dict(self) -> dict:
        return {"public": self.public.decode(), "secret": self.secret.decode()}

    @classmethod
    def from_dict(cls, data: dict) -> Security:
        return cls(data["public"].encode(), data["secret"].encode())

    def server(self, sock: zmq.Socket) -> None:
        """Make ``sock`` a CURVE server that admits only holders of the cluster key."""
        _ensure_authenticator(self.public)
        sock.curve_secretkey = self.secret
        sock.curve_publickey = self.public
        sock.curve_server = True

    def client(self, sock: zmq.Socket, address: str = "") -> None:
        sock.curve_secretkey = self.secret
        sock.curve_publickey = self.public
        sock.curve_serverkey = self.public


def _ensure_authenticator(public: bytes) -> None:
    global _authenticator, _authenticator_pid
    from zmq.auth.thread import ThreadAuthenticator

    with _auth_lock:
        if _authenticator is None or _authenticator_pid != os.getpid():
            _allowed.clear()
            _authenticator = ThreadAuthenticator(context())
            _authenticator.start()
            _authenticator.configure_curve_callback(domain="*", credentials_provider=_Provider())
            _authenticator_pid = os.getpid()
        _allowed.add(public)


class _Provider:
    """ZAP callback: a client is admitted only if its public key is a cluster key we serve."""

    def callback(self, domain: str, key: bytes) -> bool:
        return zmq.utils.z85.encode(key) in _allowed if len(key) == 32 else key in _allowed


# --- credentials found by address (zero configuration on a shared home directory) -------------


def credentials_root() -> Path:
    """``~/.meshpool/clusters`` (``MESHPOOL_HOME`` replaces ``~/.meshpool``)."""
    base = os.environ.get("MESHPOOL_HOME") or os.path.join(os.path.expanduser("~"), ".meshpool")
    return Path(base) / "clusters"


def public_host() -> str:
    import socket

    return socket.gethostname()


def _local_names() -> list[str]:
    import socket

    names = {socket.gethostname(), "localhost", "127.0.0.1"}
    try:
        names.add(socket.getfqdn())
        for info in socket.getaddrinfo(socket.gethostname(), None):
            names.add(str(info[4][0]))
    except OSError:
        pass
    return sorted(n for n in names if n and "/" not in n)


def _split(address: str) -> tuple[str, int]:
    host_port = address.split("://", 1)[-1]
    host, _, port = host_port.rpartition(":")
    return host.strip("[]"), int(port)


def scheduler_credentials(directory: str | None, host: str, port: int) -> Security:
    """The scheduler's credentials: from ``directory``, or made and recorded by address."""
    if directory:
        path = Path(directory).expanduser()
        if not (path / f"{KEY_NAME}.key_secret").exists():
            return Security.generate(path)
        return Security.from_directory(path)
    root = credentials_root()
    root.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(root.parent, 0o700)
    os.chmod(root, 0o700)
    wildcard = host in ("0.0.0.0", "*", "", "::")
    base = public_host() if wildcard else host
    real = root / (f"{base}-{port}" if port else f"{base}-pid{os.getpid()}")
    security = Security.generate(real)
    if port:
        record_address(security, host, port)
    return security


def record_address(security: Security, host: str, port: int) -> None:
    """Link ``<name>-<port>`` to the scheduler's credential directory for each name of ``host``
    (called once the port is known: ``--port 0`` binds first)."""
    root = credentials_root()
    real = Path(security.directory)
    hosts = _local_names() if host in ("0.0.0.0", "*", "", "::") else [host]
    for name in hosts:
        link = root / f"{name}-{port}"
        if link == real:
            continue
        try:
            if link.is_symlink():
                link.unlink()
            elif link.exists():
                continue
            link.symlink_to(real.name)
        except OSError:
            pass


def client_credentials(directory: str | None, address: str) -> Security | None:
    """A client's or worker's credentials for ``address``; None if none are known (insecure)."""
    if directory:
        return Security.from_directory(directory)
    env = os.environ.get("MESHPOOL_SECURITY")
    if env:
        return Security.from_directory(env)
    if not address.startswith("tcp://"):
        return None
    host, port = _split(address)
    candidates = [host]
    try:
        import socket

        candidates += [str(i[4][0]) for i in socket.getaddrinfo(host, port)]
    except OSError:
        pass
    root = credentials_root()
    for name in candidates:
        path = root / f"{name}-{port}"
        if (path / f"{KEY_NAME}.key_secret").exists():
            return Security.from_directory(path)
    return None
