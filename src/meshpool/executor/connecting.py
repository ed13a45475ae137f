"""Connecting a client to a remote scheduler: the handshake, and clear errors when it fails."""

from __future__ import annotations

import time

import zmq

from .. import errors
from .. import messages as m
from ..transport.security import Security
from ..transport.sockets import enable_heartbeats, make_socket


def connect_to_scheduler(
    client_id: str, address: str, security: Security | None, timeout: float
) -> zmq.Socket:
    """A DEALER connected to the scheduler at ``address``, handshaken within ``timeout`` s."""
    dealer = make_socket(zmq.DEALER, identity=client_id.encode())
    enable_heartbeats(dealer)  # a vanished scheduler's connection is closed (sockets.py)
    if security is not None:
        security.client(dealer, address)
    monitor = dealer.get_monitor_socket(HANDSHAKE_EVENTS)
    try:
        dealer.connect(address)
        dealer.send_multipart(m.encode(m.HelloClient(client_id, m.versions())))
        refused = _await_reply(dealer, monitor, timeout)
    finally:
        dealer.disable_monitor()
        monitor.close(linger=0)
    if refused is not None or not dealer.poll(0):
        dealer.close(linger=0)
        if refused is not None:
            raise errors.SecurityError(
                f"the scheduler at {address} refused the connection ({refused}): "
                + (
                    "our credentials are not the cluster's"
                    if security is not None
                    else "it requires credentials, and none were found for this address "
                    "(pass security=DIR or set MESHPOOL_SECURITY)"
                )
            )
        hint = (
            "is it running, and do we hold the cluster's credentials?"
            if security is not None
            else "is it running? (a secured scheduler needs security=...)"
        )
        raise errors.CommError(
            f"no answer from the scheduler at {address} within {timeout:g} s: {hint}"
        )
    msg = m.decode(dealer.recv_multipart())
    if isinstance(msg, m.ClusterBroken):
        dealer.close(linger=0)
        raise errors.VersionMismatch(msg.reason)
    return dealer


HANDSHAKE_EVENTS = (
    zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
    | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
    | zmq.EVENT_HANDSHAKE_FAILED_AUTH
    | zmq.EVENT_HANDSHAKE_SUCCEEDED
    | zmq.EVENT_DISCONNECTED
)


def _await_reply(dealer: zmq.Socket, monitor: zmq.Socket, timeout: float) -> str | None:
    """Wait for the scheduler's first answer; the reason if the handshake was refused."""
    from zmq.utils.monitor import recv_monitor_message

    poller = zmq.Poller()
    poller.register(dealer, zmq.POLLIN)
    poller.register(monitor, zmq.POLLIN)
    deadline = time.monotonic() + timeout
    handshake_ok = False
    early_drops = 0  # dropped before any handshake succeeded: a mechanism mismatch, usually
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return None
        events = dict(poller.poll(int(remaining * 1000) + 1))
        if dealer in events:
            return None
        if monitor in events:
            event = recv_monitor_message(monitor)["event"]
            if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                handshake_ok = True
            elif event == zmq.EVENT_DISCONNECTED:
                early_drops += 0 if handshake_ok else 1
                if early_drops >= 3:
                    return "security handshake failed"
            elif event == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
                return "authentication failed"
            else:
                return "security handshake failed"
