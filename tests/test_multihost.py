"""Multi-host clusters: data moves worker to worker, not through the caller or the scheduler.

Two settings:

* **Loopback** (runs everywhere): ``meshpool scheduler`` and two ``meshpool worker`` processes on
  127.0.0.1 with CURVE credentials, the client in this process. A 20 MB array made on ``w1`` and
  consumed on ``w2`` ends up on both workers while the executor's and the scheduler's byte
  counters stay under 1 MB.
* **Network namespaces** (root and iproute2 only; skipped with the reason otherwise): four
  "hosts" (``mp-sched``, ``mp-w1``, ``mp-w2``, ``mp-client``, each with a per-run suffix) on a
  bridge, in a private /24 that exists only inside these namespaces. The same flow runs from a
  client script in ``mp-client``, and the hosts' veth byte counters prove that the 20 MB left
  w1's link and entered w2's, while the client's link carried little — so no same-host shortcut
  (shared memory, ipc) was taken across hosts. Clients and workers without the cluster's
  credentials, or with another cluster's, are refused with a clear error (``SecurityError``,
  within the client's ``timeout``; the worker exits), and the cluster carries on unaffected.

Liveness bounds only: the machine may be slow and shared.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time

import netns
import pytest
from cli_cluster import START_TIMEOUT, CliCluster, keygen

pytestmark = pytest.mark.timeout(180)

BLOCK = 20 * 2**20  # bytes of the array that must move from w1 to w2
FETCHED = 256 * 2**10  # a result the client fetches from w2's data socket (> SMALL_RESULT)
RUN_TIMEOUT = 90.0  # one client script, start to finish (liveness only)
REFUSAL_TIMEOUT = 3.0  # the refused clients' Executor(timeout=...)


def _start_cluster(
    cluster: CliCluster, scheduler_host: str, worker_hosts: dict[str, str], namespaces: dict
) -> str:
    """Start ``meshpool scheduler`` and one ``meshpool worker`` per name in ``worker_hosts``
    (name -> listen IP), each in ``namespaces[name]`` if given; return the scheduler address."""
    cluster.start_scheduler(host=scheduler_host, namespace=namespaces.get("scheduler"))
    assert cluster.address.startswith(f"tcp://{scheduler_host}:"), cluster.address
    for name, host in worker_hosts.items():
        cluster.start_worker(
            name, "--nworkers", "1", "--listen-host", host, namespace=namespaces.get(name)
        )
    return cluster.address


# --- loopback: runs everywhere ------------------------------------------------------------------


@pytest.fixture
def loopback_cluster(tmp_path, monkeypatch):
    """A secured scheduler and workers w1, w2 on 127.0.0.1, started through the CLI."""
    with CliCluster(tmp_path) as cluster:
        cluster.share_env(monkeypatch)  # the in-process client too
        _start_cluster(cluster, "127.0.0.1", {"w1": "127.0.0.1", "w2": "127.0.0.1"}, {})
        yield cluster


def test_loopback_data_moves_between_workers_not_through_caller(loopback_cluster):

    cluster = loopback_cluster
    with cluster.executor() as ex:
        ex.wait_for_workers(2, timeout=START_TIMEOUT)
        workers = {w["name"]: w for w in ex.workers()}
        assert sorted(workers) == ["w1-0", "w2-0"], workers
        for w in workers.values():
            assert w["address"].startswith("tcp://127.0.0.1:"), w

        block = ex.options(workers=["w1-0"]).submit(netns.make_block, BLOCK)
        out = ex.options(workers=["w2-0"]).submit(netns.consume, block)
        result = out.result(timeout=RUN_TIMEOUT)
        producer = ex.options(workers=["w1-0"]).submit(netns.where).result(timeout=RUN_TIMEOUT)

        n = BLOCK // 8
        assert result["sum"] == n * (n - 1) // 2
        assert result["nbytes"] == BLOCK
        assert result["pid"] == workers["w2-0"]["pid"] != producer["pid"]
        assert producer["pid"] == workers["w1-0"]["pid"]

        held = {w["name"]: w["nbytes"] for w in ex.workers()}
        stats = ex.statistics()
        del block  # keep the array alive until both workers' holdings were read

    # the array was made on w1 and copied to w2: both hold it
    assert held["w1-0"] >= BLOCK and held["w2-0"] >= BLOCK, (held, cluster.procs.all_logs())
    # ... while the caller and the scheduler only saw control messages
    moved = {
        "client_sent": stats.client_bytes_sent,
        "client_received": stats.client_bytes_received,
        "scheduler_sent": stats.scheduler_bytes_sent,
        "scheduler_received": stats.scheduler_bytes_received,
    }
    print("loopback bytes:", moved, "held:", held)
    for what, nbytes in moved.items():
        assert nbytes < 2**20, (what, moved)


# --- network namespaces: root and iproute2 only -----------------------------------------------


@pytest.fixture(scope="module")
def network():
    """Four hosts on a bridge: sched, w1, w2, client (namespaces removed at the end)."""
    reason = netns.unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    netns.remove_stale_namespaces()
    tag = f"{os.getpid()}"
    subnet = f"10.213.{os.getpid() % 200 + 20}"
    net = None
    try:
        net = netns.Network(tag, subnet)
        for role in ("sched", "w1", "w2", "client"):
            net.add_host(role)
        yield net
    finally:
        names = list(net.created) if net is not None else []
        if net is not None:
            net.close()
        else:  # the bridge namespace may exist though Network() failed part-way
            netns.kill_namespace(f"mp-br-{tag}")
        left = [n for n in netns.namespaces() if n.endswith(f"-{tag}")]
        assert not left, f"namespaces left behind: {left} (made {names})"


@pytest.fixture(scope="module")
def ns_cluster(network, tmp_path_factory):
    """A secured scheduler in mp-sched and workers w1, w2 in mp-w1, mp-w2."""
    with CliCluster(tmp_path_factory.mktemp("netns")) as cluster:
        _start_cluster(
            cluster,
            network.address("sched"),
            {"w1": network.address("w1"), "w2": network.address("w2")},
            {
                "scheduler": network.namespace("sched"),
                "w1": network.namespace("w1"),
                "w2": network.namespace("w2"),
            },
        )
        yield cluster


CLIENT_SCRIPT = """
import json, os, sys, time

import meshpool

args = json.loads(sys.argv[1])


# defined in __main__: shipped to the workers by value (they have no copy of this script)
def make_block(nbytes):
    import numpy as np

    return np.arange(nbytes // 8, dtype=np.int64)


def consume(block):
    return {
        "sum": int(block.sum()),
        "nbytes": int(block.nbytes),
        "pid": os.getpid(),
        "netns": os.stat("/proc/self/ns/net").st_ino,
    }


def payload(nbytes):
    return bytes(range(256)) * (nbytes // 256)


def where():
    return {"pid": os.getpid(), "netns": os.stat("/proc/self/ns/net").st_ino}


def flow():
    with meshpool.Executor(args["address"], security=args["security"], timeout=60) as ex:
        ex.wait_for_workers(2, timeout=60)
        workers = ex.workers()
        names = sorted(w["name"] for w in workers)
        producer = next(n for n in names if n.startswith("w1"))
        consumer = next(n for n in names if n.startswith("w2"))
        block = ex.options(workers=[producer]).submit(make_block, args["block"])
        out = ex.options(workers=[consumer]).submit(consume, block)
        fetched = ex.options(workers=[consumer]).submit(payload, args["fetched"])
        result = out.result(timeout=60)
        data = fetched.result(timeout=60)
        made_on = ex.options(workers=[producer]).submit(where).result(timeout=60)
        stats = ex.statistics()
        del block
        return {
            "workers": workers,
            "producer": producer,
            "consumer": consumer,
            "result": result,
            "made_on": made_on,
            "client": where(),
            "fetched_ok": data == payload(args["fetched"]),
            "stats": {k: getattr(stats, k) for k in stats.__dataclass_fields__},
        }


def refused():
    start = time.monotonic()
    try:
        ex = meshpool.Executor(
            args["address"], security=args["security"], timeout=args["timeout"]
        )
    except Exception as exc:
        return {
            "error": type(exc).__name__,
            "comm_error": isinstance(exc, meshpool.CommError),
            "security_error": isinstance(exc, meshpool.SecurityError),
            "message": str(exc),
            "elapsed": time.monotonic() - start,
        }
    ex.shutdown()
    return {"error": None, "elapsed": time.monotonic() - start}


def names():
    with meshpool.Executor(args["address"], security=args["security"], timeout=60) as ex:
        return sorted(w["name"] for w in ex.workers())


print(json.dumps(globals()[args["mode"]]()))
"""


def _run_client(network, ns_cluster, **args) -> dict:
    """Run the client script in mp-client; return the JSON it printed last."""
    script = ns_cluster.directory / "client.py"
    script.write_text(textwrap.dedent(CLIENT_SCRIPT))
    argv = netns.in_namespace(
        network.namespace("client"), [sys.executable, str(script), json.dumps(args)]
    )
    try:
        done = subprocess.run(
            argv, env=ns_cluster.env, capture_output=True, text=True, timeout=RUN_TIMEOUT
        )
    except subprocess.TimeoutExpired as exc:
        raise AssertionError(
            f"client script stuck for {RUN_TIMEOUT:g} s:\n{exc.stdout}\n{exc.stderr}\n"
            + ns_cluster.procs.all_logs()
        ) from exc
    assert done.returncode == 0 and done.stdout.strip(), (
        f"client script failed ({done.returncode}):\n{done.stdout}\n{done.stderr}\n"
        + ns_cluster.procs.all_logs()
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.netns
def test_netns_data_moves_worker_to_worker_over_the_links(network, ns_cluster):
    before = network.counters()
    report = _run_client(
        network,
        ns_cluster,
        mode="flow",
        address=ns_cluster.address,
        security=str(ns_cluster.keys),
        block=BLOCK,
        fetched=FETCHED,
    )
    after = network.counters()
    delta = {role: {d: after[role][d] - before[role][d] for d in ("rx", "tx")} for role in after}
    print("link bytes during the run:", json.dumps(delta))
    print("executor statistics:", json.dumps(report["stats"]))

    # the workers advertise data addresses on their own hosts' links
    by_name = {w["name"]: w for w in report["workers"]}
    assert by_name[report["producer"]]["address"].startswith(f"tcp://{network.address('w1')}:")
    assert by_name[report["consumer"]]["address"].startswith(f"tcp://{network.address('w2')}:")

    # correct results, computed where they were pinned: w1 made the block, w2 consumed it
    n = BLOCK // 8
    result, made_on, client = report["result"], report["made_on"], report["client"]
    assert result["sum"] == n * (n - 1) // 2 and result["nbytes"] == BLOCK
    assert report["fetched_ok"]
    assert result["pid"] == by_name[report["consumer"]]["pid"]
    assert made_on["pid"] == by_name[report["producer"]]["pid"]
    assert len({result["netns"], made_on["netns"], client["netns"]}) == 3, report

    # the 20 MB crossed the links, w1 -> bridge -> w2 (no shared memory or ipc between hosts)
    assert delta["w1"]["tx"] >= BLOCK, delta
    assert delta["w2"]["rx"] >= BLOCK, delta
    # while the client and the scheduler saw control messages (and one 256 KiB result) only
    for role in ("client", "sched"):
        assert delta[role]["rx"] + delta[role]["tx"] < 2 * 2**20, (role, delta)
    assert delta["client"]["rx"] >= FETCHED, delta  # that result did come over the link


@pytest.mark.netns
@pytest.mark.parametrize("credentials", ["none", "another-clusters"])
def test_netns_client_without_the_credentials_is_refused(network, ns_cluster, credentials):
    if credentials == "none":
        security = None
    else:
        security = str(
            keygen(ns_cluster.directory / f"other-{time.monotonic_ns()}", ns_cluster.env)
        )
    report = _run_client(
        network,
        ns_cluster,
        mode="refused",
        address=ns_cluster.address,
        security=security,
        timeout=REFUSAL_TIMEOUT,
    )
    print("refused:", json.dumps(report))
    assert report["error"] is not None, f"connected without the cluster's credentials: {report}"
    assert report["security_error"] and report["comm_error"], report
    assert ns_cluster.address in report["message"], report
    # refused within its timeout (plus slack for a slow machine), not hung
    assert report["elapsed"] < REFUSAL_TIMEOUT + 30, report
    _assert_cluster_intact(network, ns_cluster)


def _assert_cluster_intact(network, ns_cluster) -> None:
    """The scheduler still serves its own clients, with exactly the two real workers."""
    for proc, log in ns_cluster.procs.started:
        if not log.stem.startswith("intruder"):
            assert proc.poll() is None, f"{proc.args} exited:\n{ns_cluster.procs.all_logs()}"
    listed = _run_client(
        network,
        ns_cluster,
        mode="names",
        address=ns_cluster.address,
        security=str(ns_cluster.keys),
    )
    assert listed == ["w1-0", "w2-0"], listed


@pytest.mark.netns
@pytest.mark.parametrize("credentials", ["none", "another-clusters"])
def test_netns_worker_without_the_credentials_is_refused(network, ns_cluster, credentials):
    """A ``meshpool worker`` on another host without the cluster's key never joins: it exits
    with an error that says so (bounded wait), and the cluster is unaffected."""
    flags: list[str] = []  # none: it looks for keys by the scheduler's address, finds none
    if credentials == "another-clusters":
        other = keygen(ns_cluster.directory / f"other-{time.monotonic_ns()}", ns_cluster.env)
        flags = ["--security", str(other)]
    name = f"intruder-{credentials}"
    intruder = ns_cluster.start_worker(
        name,
        "--nworkers",
        "1",
        credentials=flags,
        namespace=network.namespace("client"),
        ready=False,
    )
    try:
        code = intruder.wait(START_TIMEOUT)
    except subprocess.TimeoutExpired:
        raise AssertionError(
            f"a worker without the credentials still runs after {START_TIMEOUT:g} s:\n"
            + ns_cluster.log(name)
        ) from None
    log = ns_cluster.log(name)
    print(f"refused worker exited {code}:", log.splitlines()[-1])
    assert code != 0, log
    assert "refused" in log and ns_cluster.address in log, log
    _assert_cluster_intact(network, ns_cluster)


# --- a host that vanishes: its link goes down mid-run -------------------------------------------

HEARTBEAT_TIMEOUT = 2.0  # seconds: MESHPOOL_HEARTBEAT_TIMEOUT of the partition test's cluster

PARTITION_SCRIPT = """
import json, os, sys, time
from pathlib import Path

import meshpool

args = json.loads(sys.argv[1])
marks = Path(args["marks"])


def square(x, marks, delay):
    Path(marks, f"{x}.{os.getpid()}").touch()
    time.sleep(delay)
    return x * x, os.getpid()


with meshpool.Executor(args["address"], security=args["security"], timeout=60) as ex:
    ex.wait_for_workers(2, timeout=60)
    pids = {w["name"]: w["pid"] for w in ex.workers()}
    futures = [ex.submit(square, i, str(marks), 1.0) for i in range(6)]
    while not [
        p for p in marks.glob(f"*.{pids['w1-0']}") if not futures[int(p.stem)].done()
    ]:
        time.sleep(0.01)
    print("running on w1", flush=True)
    sys.stdin.readline()  # the test took w1's link down
    down = time.monotonic()
    while "w1-0" in {w["name"] for w in ex.workers()}:
        time.sleep(0.05)
    removed_after = time.monotonic() - down
    results = [f.result(timeout=60) for f in futures]
    print(json.dumps({"pids": pids, "results": results, "removed_after": removed_after}))
"""


@pytest.mark.netns
def test_netns_vanished_host_is_noticed_and_its_tasks_rerun(network, tmp_path):
    """w1's link goes down while it runs tasks: nothing closes its TCP connections, yet the
    scheduler removes it within about the heartbeat timeout, and every task completes on w2."""
    cluster = CliCluster(tmp_path, MESHPOOL_HEARTBEAT_TIMEOUT=str(HEARTBEAT_TIMEOUT))
    marks = tmp_path / "marks"
    marks.mkdir()
    script = tmp_path / "partition.py"
    script.write_text(textwrap.dedent(PARTITION_SCRIPT))
    w1 = network.namespace("w1")
    client = None
    try:
        address = _start_cluster(
            cluster,
            network.address("sched"),
            {"w1": network.address("w1"), "w2": network.address("w2")},
            {"scheduler": network.namespace("sched"), "w1": w1, "w2": network.namespace("w2")},
        )
        args = {"address": address, "security": str(cluster.keys), "marks": str(marks)}
        client = subprocess.Popen(
            netns.in_namespace(
                network.namespace("client"), [sys.executable, str(script), json.dumps(args)]
            ),
            env=cluster.env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert client.stdout is not None and client.stdin is not None
        line = client.stdout.readline()  # (bounded by the test's timeout)
        logs = cluster.procs.all_logs
        assert line.strip() == "running on w1", (line, client.stderr.read(), logs())
        netns.ip("-n", w1, "link", "set", "eth0", "down")
        client.stdin.write("down\n")
        client.stdin.flush()
        out, err = client.communicate(timeout=RUN_TIMEOUT)
        assert client.returncode == 0, (out, err, logs())
    finally:
        netns.ip("-n", w1, "link", "set", "eth0", "up", check=False)
        if client is not None and client.poll() is None:
            client.kill()
            client.wait()
        cluster.close()
    report = json.loads(out.strip().splitlines()[-1])
    print(f"vanished host removed {report['removed_after']:.2f} s after its link went down")
    results = report["results"]
    assert [r[0] for r in results] == [i * i for i in range(6)], report
    w1_pid, w2_pid = report["pids"]["w1-0"], report["pids"]["w2-0"]
    # the task w1 was running when its link went down ran again on w2
    rerun = [i for i, r in enumerate(results) if (marks / f"{i}.{w1_pid}").exists()]
    assert any(results[i][1] == w2_pid for i in rerun), (rerun, report)
    log = cluster.log("scheduler")
    assert "connection timed out (host vanished?)" in log, log
