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

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

from ..errors import SecurityError
from .sockets import context

KEY_NAME = "cluster"

_auth_lock = threading.Lock()
_authenticator: ThreadAuthenticator | None = None
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
