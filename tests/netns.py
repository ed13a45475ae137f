"""Test plumbing for multi-host tests: Linux network namespaces as "hosts".

Each host is a network namespace with one veth link (``eth0``) whose other end sits on a bridge
in a namespace of its own, so every byte between two hosts crosses exactly two veth links, and
each host's ``eth0`` counters say what it sent and received. Addresses come from a private /24
that exists only inside these namespaces: no namespace has a default route, and none is linked
to the root namespace, so nothing can reach (or be reached from) anywhere else.

The meshpool processes run in them are started with ``cli_cluster`` (``namespace=``), and
:meth:`Network.close` kills whatever still runs in its namespaces (``ip netns pids``) before
deleting them: cleanup never depends on a test having gone well.

This module also holds the worker-side task functions of the loopback test (workers import it
by reference: their ``PYTHONPATH`` includes ``tests/``).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import uuid

import psutil

IP_TIMEOUT = 30.0  # seconds one `ip` command may take (a slow shared machine; never stuck)
STOP_TIMEOUT = 10.0  # seconds the processes of a namespace get to exit after SIGKILL


# --- environment checks ------------------------------------------------------------------------


def unavailable_reason() -> str | None:
    """Why namespace tests cannot run here (not root, no ``ip``, no ``ip netns add``), or None.

    Tries to add (and then deletes) a throw-away namespace, so a container without
    CAP_SYS_ADMIN is caught here rather than half-way through building a network.
    """
    if not sys.platform.startswith("linux"):
        return "network namespaces need Linux"
    if os.geteuid() != 0:
        return "network namespaces need root (run as uid 0)"
    if shutil.which("ip") is None:
        return "iproute2's `ip` is missing (apt-get install iproute2)"
    probe = f"mp-probe-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    result = ip("netns", "add", probe, check=False)
    if result.returncode != 0:
        return f"`ip netns add` failed (no CAP_SYS_ADMIN?): {result.stderr.strip()}"
    ip("netns", "del", probe, check=False)
    return None


# --- namespaces and links ----------------------------------------------------------------------


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    """Run ``ip ARGS`` (bounded by :data:`IP_TIMEOUT`); raise with its stderr if ``check``."""
    result = subprocess.run(
        ["ip", *args], capture_output=True, text=True, timeout=IP_TIMEOUT, check=False
    )
    if check and result.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)} failed: {result.stderr.strip()}")
    return result


def create_namespace(name: str) -> None:
    """Create network namespace ``name`` and bring its loopback up (nothing else in it yet)."""
    ip("netns", "add", name)
    ip("-n", name, "link", "set", "lo", "up")


def create_bridge(namespace: str, bridge: str = "br0") -> None:
    """Create and bring up a bridge device inside ``namespace`` (the hosts' shared "switch")."""
    ip("-n", namespace, "link", "add", bridge, "type", "bridge")
    ip("-n", namespace, "link", "set", bridge, "up")


def connect_to_bridge(
    host: str, bridge_namespace: str, port: str, address: str, bridge: str = "br0"
) -> None:
    """Link namespace ``host`` to the bridge: a veth pair made inside the bridge namespace (so
    the root namespace never sees it), end ``eth0`` moved into ``host`` with ``address``
    (CIDR, e.g. ``10.213.5.2/24``), end ``port`` enslaved to the bridge."""
    ip("-n", bridge_namespace, "link", "add", "eth0", "type", "veth", "peer", "name", port)
    ip("-n", bridge_namespace, "link", "set", "eth0", "netns", host)
    ip("-n", bridge_namespace, "link", "set", port, "master", bridge)
    ip("-n", bridge_namespace, "link", "set", port, "up")
    ip("-n", host, "addr", "add", address, "dev", "eth0")
    ip("-n", host, "link", "set", "eth0", "up")


def link_bytes(namespace: str, device: str = "eth0") -> dict[str, int]:
    """``{"rx": bytes, "tx": bytes}`` counted by ``device`` in ``namespace`` since it came up."""
    out = ip("-n", namespace, "-s", "-j", "link", "show", "dev", device).stdout
    stats = json.loads(out)[0]["stats64"]
    return {"rx": int(stats["rx"]["bytes"]), "tx": int(stats["tx"]["bytes"])}


def in_namespace(namespace: str | None, argv: list[str]) -> list[str]:
    """``argv`` run inside ``namespace`` (``ip netns exec``), or as is for None."""
    return argv if namespace is None else ["ip", "netns", "exec", namespace, *argv]


def namespace_pids(namespace: str) -> list[int]:
    """Process ids of everything running in ``namespace``."""
    out = ip("netns", "pids", namespace, check=False).stdout
    return [int(p) for p in out.split() if p.isdigit()]


def kill_namespace(namespace: str) -> None:
    """SIGKILL every process left in ``namespace``, then delete it (each step best-effort)."""
    for pid in namespace_pids(namespace):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + STOP_TIMEOUT
    while namespace_pids(namespace) and time.monotonic() < deadline:
        time.sleep(0.05)
    ip("netns", "del", namespace, check=False)


def namespaces() -> list[str]:
    """Names of the network namespaces that exist (``ip netns list``)."""
    out = ip("netns", "list", check=False).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


_OUR_NAMES = re.compile(r"^mp-(?:br|probe|sched|w1|w2|client)-(\d+)(?:-[0-9a-f]+)?$")


def remove_stale_namespaces() -> list[str]:
    """Delete namespaces that earlier runs left behind (killed before their cleanup ran):
    ours by name, made by a test process that no longer exists. Returns their names."""
    stale = []
    for name in namespaces():
        found = _OUR_NAMES.match(name)
        if found and not psutil.pid_exists(int(found.group(1))):
            kill_namespace(name)
            stale.append(name)
    return stale


class Network:
    """Hosts (namespaces) on one bridge, in a private /24 that exists only inside them.

    ``Network(tag)`` names its namespaces ``mp-<role>-<tag>`` and the bridge's ``mp-br-<tag>``;
    :meth:`add_host` hands out ``.1``, ``.2``, ... in order. :meth:`close` removes everything.
    """

    def __init__(self, tag: str, subnet: str) -> None:
        self.tag = tag
        self.subnet = subnet  # the first three octets, e.g. "10.213.7"
        self.bridge_namespace = f"mp-br-{tag}"
        self.hosts: dict[str, tuple[str, str]] = {}  # role -> (namespace, ip)
        self.created: list[str] = []
        create_namespace(self.bridge_namespace)
        self.created.append(self.bridge_namespace)
        create_bridge(self.bridge_namespace)

    def add_host(self, role: str) -> tuple[str, str]:
        """A new host ``role`` on the bridge; returns (namespace name, its IP address)."""
        namespace = f"mp-{role}-{self.tag}"
        address = f"{self.subnet}.{len(self.hosts) + 1}"
        create_namespace(namespace)
        self.created.append(namespace)
        connect_to_bridge(namespace, self.bridge_namespace, f"p-{role}", f"{address}/24")
        self.hosts[role] = (namespace, address)
        return namespace, address

    def namespace(self, role: str) -> str:
        return self.hosts[role][0]

    def address(self, role: str) -> str:
        return self.hosts[role][1]

    def counters(self) -> dict[str, dict[str, int]]:
        """Every host's ``eth0`` byte counters, by role."""
        return {role: link_bytes(namespace) for role, (namespace, _) in self.hosts.items()}

    def close(self) -> None:
        """Kill what runs in the namespaces and delete them (hosts first, then the bridge)."""
        for namespace in reversed(self.created):
            kill_namespace(namespace)
        self.created.clear()


# --- worker-side tasks (loopback test) -------------------------------------------------------


def make_block(nbytes: int):
    """A NumPy array of ``nbytes`` bytes with a known sum."""
    import numpy as np

    return np.arange(nbytes // 8, dtype=np.int64)


def consume(block) -> dict:
    """Summarize ``block`` where it runs: its sum and size, and which process and host."""
    return {
        "sum": int(block.sum()),
        "nbytes": int(block.nbytes),
        "pid": os.getpid(),
        "netns": os.stat("/proc/self/ns/net").st_ino,
    }


def where() -> dict:
    return {"pid": os.getpid(), "netns": os.stat("/proc/self/ns/net").st_ino}
