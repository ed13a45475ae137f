#!/usr/bin/env python
"""Benchmark meshpool against ProcessPoolExecutor, loky, dask.distributed and Ray.

Every (system, workload) measurement runs in a fresh subprocess
(``run.py --one SYSTEM WORKLOAD --json``); the parent repeats each one
``--repeat`` times, interleaving systems so that they share the machine's noise,
and reports medians as a Markdown table and as JSON.

    python benchmarks/run.py [--systems meshpool,processpool,loky,dask,ray]
                             [--workloads throughput,latency,...] [--repeat 3]
                             [--quick] [--out benchmarks/results/latest.json]

See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
SRC = os.path.join(REPO, "src")
RUN_PY = os.path.abspath(__file__)
DEFAULT_OUT = os.path.join(HERE, "results", "latest.json")
MARKER = "RESULT_JSON:"


def _path_entries() -> list[str]:
    # benchmarks/ for ``tasks``/``systems``/``workloads``; src/ so that the
    # working tree's meshpool is benchmarked even when it is not installed.
    return [HERE] + ([SRC] if os.path.isdir(SRC) else [])


def _setup_paths() -> None:
    """Make ``tasks`` importable here and in every worker process we start."""
    for p in reversed(_path_entries()):
        if p not in sys.path:
            sys.path.insert(0, p)
    old = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    new = _path_entries() + [p for p in old if p not in _path_entries()]
    os.environ["PYTHONPATH"] = os.pathsep.join(new)


_setup_paths()

import systems  # noqa: E402
import workloads  # noqa: E402

# ==========================================================================
# child side
# ==========================================================================


def _emit(result: dict, as_json: bool) -> None:
    if as_json:
        print(MARKER + json.dumps(result, default=repr), flush=True)
    else:
        print(json.dumps(result, indent=2, default=repr), flush=True)


def run_one(system_name: str, workload: str, quick: bool, as_json: bool, scale: float) -> int:
    result: dict = {"system": system_name, "workload": workload, "status": "error"}
    sysobj = None
    try:
        if not workloads.applicable(system_name, workload):
            result["status"] = "n/a"
        elif workload == "startup":  # timed around a probe subprocess
            result = measure(system_name, workload, quick, 300.0, scale)
        else:
            sysobj = systems.make(system_name)
            size = workloads.sizes_for(workload, quick, scale)
            result["size"] = size
            t0 = time.perf_counter()
            sysobj.start(systems.N_WORKERS)
            result["start_s"] = time.perf_counter() - t0
            try:
                metrics, extra = workloads.FUNCS[workload](sysobj, size)
            finally:
                t1 = time.perf_counter()
                try:
                    sysobj.shutdown()
                    result["shutdown_s"] = time.perf_counter() - t1
                except Exception as e:
                    result["shutdown_error"] = f"{type(e).__name__}: {e}"
            result.update(status="ok", metrics=metrics, extra=extra)
    except BaseException as e:  # report, never raise: the parent wants JSON
        result["reason"] = f"{type(e).__name__}: {e}"
        result["traceback"] = traceback.format_exc()[-4000:]
    if sysobj is not None:
        try:
            result["versions"] = sysobj.versions()
        except Exception:
            pass
    _emit(result, as_json)
    sys.stderr.flush()
    # Skip interpreter teardown: a library's stuck atexit hook must not turn a
    # finished measurement into a timeout.  Leftover processes are reaped by
    # the parent (it kills our process group).
    os._exit(0 if result["status"] in ("ok", "n/a") else 1)


def startup_probe(system_name: str, as_json: bool) -> int:
    """Import the library, start 2 workers, run one task, shut down.

    The parent times the whole subprocess; the phases below are informational.
    """
    t0 = time.perf_counter()
    phases: dict = {}
    result: dict = {"system": system_name, "workload": "startup", "status": "error"}
    try:
        import tasks

        sysobj = systems.make(system_name)
        sysobj.start(systems.N_WORKERS)  # includes the library import
        t1 = time.perf_counter()
        phases["import_and_start_s"] = t1 - t0
        assert sysobj.result(sysobj.submit(tasks.noop, 1)) == 1
        t2 = time.perf_counter()
        phases["first_task_s"] = t2 - t1
        sysobj.shutdown()
        phases["shutdown_s"] = time.perf_counter() - t2
        result.update(status="ok", extra=phases)
    except BaseException as e:
        result["reason"] = f"{type(e).__name__}: {e}"
        result["traceback"] = traceback.format_exc()[-4000:]
    _emit(result, as_json)
    sys.stdout.flush()
    sys.stderr.flush()
    # A normal interpreter exit (atexit hooks included) is part of start-up cost.
    return 0 if result["status"] == "ok" else 1


# ==========================================================================
# parent side
# ==========================================================================


def _group_pids(pgid: int) -> list[int]:
    try:
        import psutil
    except ImportError:
        return []
    out = []
    for p in psutil.process_iter():
        try:
            if os.getpgid(p.pid) == pgid:
                out.append(p.pid)
        except (ProcessLookupError, PermissionError, psutil.Error):
            pass
    return out


def _reap_group(pgid: int) -> list[int]:
    """Kill whatever is left in the child's process group (processes we
    started, by group id); return the pids that were left over."""
    deadline = time.monotonic() + 2.0
    left = _group_pids(pgid)
    while left and time.monotonic() < deadline:
        time.sleep(0.1)
        left = _group_pids(pgid)
    if left:
        try:
            os.killpg(pgid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    return left


_current_pgid: int | None = None


def _spawn(cmd: list[str], timeout: float) -> dict:
    """Run ``cmd`` in its own session; return the parsed result dict plus
    ``wall_s`` (perf_counter around the whole subprocess)."""
    global _current_pgid
    env = dict(os.environ)
    with (
        tempfile.TemporaryFile("w+") as out,
        tempfile.TemporaryFile("w+") as err,
    ):
        t0 = time.perf_counter()
        proc = subprocess.Popen(
            cmd, stdout=out, stderr=err, stdin=subprocess.DEVNULL, env=env, start_new_session=True
        )
        _current_pgid = proc.pid
        timed_out = False
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            os.killpg(proc.pid, signal.SIGKILL)
            rc = proc.wait()
        wall = time.perf_counter() - t0
        leftovers = _reap_group(proc.pid)
        _current_pgid = None
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    res = None
    for line in reversed(stdout.splitlines()):
        if line.startswith(MARKER):
            try:
                res = json.loads(line[len(MARKER) :])
            except ValueError:
                pass
            break
    if res is None:
        res = {"status": "error"}
        if timed_out:
            res["reason"] = f"timeout after {timeout:.0f} s"
        else:
            res["reason"] = f"no result (exit code {rc})"
        res["stderr_tail"] = stderr[-3000:]
    elif res.get("status") == "error":
        res["stderr_tail"] = stderr[-3000:]
    res["wall_s"] = wall
    res["returncode"] = rc
    if leftovers:
        res["leftover_processes"] = len(leftovers)
    return res


def measure(system: str, workload: str, quick: bool, timeout: float, scale: float = 1.0) -> dict:
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    if workload == "startup":
        res = _spawn([sys.executable, RUN_PY, "--startup-probe", system, "--json"], timeout)
        if res.get("status") == "ok":
            res["metrics"] = {"startup": res["wall_s"]}
    else:
        cmd = [sys.executable, RUN_PY, "--one", system, workload, "--json"]
        if quick:
            cmd.append("--quick")
        if scale != 1.0:
            cmd += ["--scale-one", repr(scale)]
        res = _spawn(cmd, timeout)
    res["loadavg_1m_before"] = load
    return res


def _interpreter_startup() -> float:
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", "pass"], check=False)
    return time.perf_counter() - t0


def _parse_per_system(text: str | None, conv):
    out = {}
    for part in (text or "").split(","):
        if part.strip():
            k, _, v = part.partition("=")
            k = k.strip()
            if k not in systems.SYSTEMS:
                sys.exit(f"unknown system {k!r} in {text!r}")
            out[k] = conv(v)
    return out


def summarize(cells: dict) -> None:
    for by_wl in cells.values():
        for cell in by_wl.values():
            runs = cell["runs"]
            if cell.get("status") == "n/a":
                continue
            ok = [r for r in runs if r.get("status") == "ok"]
            cell["n_runs"], cell["n_ok"] = len(runs), len(ok)
            if not runs:
                cell["status"] = "not run"
            elif not ok:
                cell["status"] = "error"
                cell["reason"] = runs[-1].get("reason", "?")
            else:
                cell["status"] = "ok" if len(ok) == len(runs) else "partial"
                keys = {k for r in ok for k in r.get("metrics", {})}
                cell["median"] = {
                    k: statistics.median(
                        r["metrics"][k]
                        for r in ok
                        if k in r["metrics"] and not _isnan(r["metrics"][k])
                    )
                    for k in keys
                    if any(k in r["metrics"] and not _isnan(r["metrics"][k]) for r in ok)
                }
                if cell["status"] == "partial":
                    cell["reason"] = next(r.get("reason") for r in runs if r.get("status") != "ok")


def _isnan(x) -> bool:
    return isinstance(x, float) and math.isnan(x)


def fmt(value: float, unit: str) -> str:
    if unit == "%":
        return f"{value:.0f}%"
    a = abs(value)
    if a >= 1000:
        return f"{value:,.0f}"
    if a >= 100:
        return f"{value:.0f}"
    if a >= 10:
        return f"{value:.1f}"
    if a >= 1:
        return f"{value:.2f}"
    return f"{value:.3f}"


# Ratios are not meaningful for a percentage of memory given back.
NO_RATIO = {"memory_returned"}


def table(
    cells: dict, system_list: list[str], workload_list: list[str], repeat: int, meta: dict
) -> str:
    scaled = meta.get("scaled_sizes", {})
    with_ratio = "meshpool" in system_list and len(system_list) > 1
    head = ["workload", "unit"] + [systems.LABELS[s] for s in system_list]
    if with_ratio:
        head += ["meshpool vs ProcessPool", "meshpool vs best peer"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    notes = set()
    for key, (wl, label, unit, higher) in workloads.METRICS.items():
        if wl not in workload_list:
            continue
        arrow = "↑" if higher else "↓"
        row = [label, f"{unit} {arrow}"]
        values: dict[str, float] = {}
        for s in system_list:
            cell = cells[s][wl]
            st = cell.get("status")
            if st == "n/a":
                row.append("—")
            elif st in ("error", "not run"):
                row.append(st)
            elif key not in cell.get("median", {}):
                row.append("n/a" if key == "memory_returned" else "error")
            else:
                v = cell["median"][key]
                values[s] = v
                txt = fmt(v, unit)
                if wl in scaled.get(s, {}):
                    txt += " ‡"
                    notes.add("scaled")
                if st == "partial":
                    txt += f" ({cell['n_ok']}/{cell['n_runs']} ok)"
                    notes.add("partial")
                elif cell["n_runs"] < repeat:
                    txt += f" (n={cell['n_runs']})"
                    notes.add("fewer")
                row.append(txt)
        if with_ratio:
            m = values.get("meshpool")

            def speedup(peer: float, m=m, higher=higher) -> float:
                return m / peer if higher else peer / m

            if key in NO_RATIO or m is None or m == 0:
                row += ["—", "—"]
            else:
                pp = values.get("processpool")
                row.append(f"{speedup(pp):.2f}×" if pp else "—")
                peers = {s: v for s, v in values.items() if s != "meshpool" and v}
                if peers:
                    best = (max if higher else min)(peers, key=peers.get)
                    row.append(f"{speedup(peers[best]):.2f}× ({systems.LABELS[best]})")
                else:
                    row.append("—")
        lines.append("| " + " | ".join(row) + " |")
    foot = [
        "",
        f"Medians of up to {repeat} runs, each in a fresh process; 2 workers × 1 thread. "
        "↑ higher is better, ↓ lower is better. — = not applicable (no futures as task arguments).",
    ]
    if with_ratio:
        foot.append(
            "Ratio columns are meshpool's advantage: >1× means meshpool is better "
            "(value ratio for ↑ metrics, inverse for ↓ metrics)."
        )
    if "fewer" in notes:
        foot.append("(n=k): fewer repeats for that system (see --max-repeat).")
    if "scaled" in notes:
        parts = []
        for s, by_wl in scaled.items():
            desc = ", ".join(
                f"{w} {by_wl[w][workloads.SCALABLE[w]]:,} {workloads.SCALABLE[w]}"
                for w in by_wl
                if by_wl[w] != meta["sizes"][w]
            )
            if desc and s in system_list:
                parts.append(f"{systems.LABELS[s]}: {desc}")
        foot.append(
            "‡ smaller size for a slow system (per-task/per-item metric, fewer tasks; see --scale): "
            + "; ".join(parts)
            + "."
        )
    if "partial" in notes:
        foot.append("(k/n ok): some runs failed; median of the successful ones (reasons in JSON).")
    return "\n".join(lines + foot)


def _compile_meshpool() -> bool:
    """Write meshpool's bytecode (``__pycache__``) before measuring, as ``pip install`` does.

    The peers are installed packages whose ``.pyc`` files exist; a source checkout run with
    ``PYTHONDONTWRITEBYTECODE=1`` (this machine's environment) would otherwise compile every
    meshpool module in every process of every measurement (~0.2 s of CPU per start-up here).
    """
    import compileall

    package = os.path.join(SRC, "meshpool")
    if not os.path.isdir(package):  # benchmarking an installed meshpool: pip compiled it
        return False
    return bool(compileall.compile_dir(package, quiet=1))


def parent(args) -> int:
    system_list = [s.strip() for s in args.systems.split(",") if s.strip()]
    workload_list = [w.strip() for w in args.workloads.split(",") if w.strip()]
    for s in system_list:
        if s not in systems.SYSTEMS:
            sys.exit(f"unknown system {s!r}; choose from {','.join(systems.ALL_SYSTEMS)}")
    for w in workload_list:
        if w not in workloads.WORKLOADS:
            sys.exit(f"unknown workload {w!r}; choose from {','.join(workloads.WORKLOADS)}")
    caps = _parse_per_system(args.max_repeat, int)
    scales = {k: v for k, v in _parse_per_system(args.scale, float).items() if v != 1.0}
    bytecode = _compile_meshpool()

    cells: dict = {s: {w: {"runs": []} for w in workload_list} for s in system_list}
    for s in system_list:
        for w in workload_list:
            if not workloads.applicable(s, w):
                cells[s][w]["status"] = "n/a"

    meta = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "python": sys.version,
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "argv": sys.argv,
        "quick": args.quick,
        "repeat": args.repeat,
        "max_repeat": caps,
        "scale": scales,
        "timeout_s": args.timeout,
        "n_workers": systems.N_WORKERS,
        "sizes": {w: workloads.sizes_for(w, args.quick) for w in workload_list},
        "scaled_sizes": {
            s: {
                w: workloads.sizes_for(w, args.quick, f)
                for w in workload_list
                if w in workloads.SCALABLE
            }
            for s, f in scales.items()
        },
        "interpreter_startup_s": _interpreter_startup(),
        "meshpool_bytecode_compiled": bytecode,
    }
    out_path = os.path.abspath(args.out)
    os.makedirs(os.path.dirname(out_path), exist_ok=True)

    def save(final: bool) -> None:
        summarize(cells)
        doc = {"meta": meta, "cells": cells}
        if final:
            doc["table_markdown"] = table(cells, system_list, workload_list, args.repeat, meta)
        tmp = out_path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(doc, f, indent=1, default=repr)
        os.replace(tmp, out_path)

    t_start = time.perf_counter()
    for rep in range(args.repeat):
        for w in workload_list:
            for s in system_list:
                if cells[s][w].get("status") == "n/a":
                    continue
                if rep >= caps.get(s, args.repeat):
                    continue
                res = measure(s, w, args.quick, args.timeout, scales.get(s, 1.0))
                cells[s][w]["runs"].append(res)
                status = res.get("status")
                shown = ", ".join(
                    f"{k}={fmt(v, workloads.METRICS[k][2])}"
                    for k, v in res.get("metrics", {}).items()
                    if isinstance(v, (int, float)) and not _isnan(v)
                )
                if status != "ok":
                    shown = res.get("reason", "?")
                print(
                    f"[{time.perf_counter() - t_start:6.0f}s] rep {rep + 1}/{args.repeat} "
                    f"{w:12s} {s:12s} {status:6s} {res['wall_s']:6.1f}s  {shown}",
                    file=sys.stderr,
                    flush=True,
                )
                save(final=False)
    save(final=True)
    print(table(cells, system_list, workload_list, args.repeat, meta))
    print(f"\nJSON: {out_path}  (total {time.perf_counter() - t_start:.0f} s)", file=sys.stderr)
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--systems", default=",".join(systems.ALL_SYSTEMS))
    p.add_argument("--workloads", default=",".join(workloads.WORKLOADS))
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument(
        "--max-repeat",
        metavar="SYS=N,...",
        default="dask=1,ray=1",
        help="cap the repeats of slow systems (shown as n=k in the table);\n"
        "'' for --repeat everywhere (default: %(default)s)",
    )
    p.add_argument(
        "--scale",
        metavar="SYS=F,...",
        default="dask=0.1,ray=0.1",
        help="multiply the task count of the 100,000-task workloads (map, memory) for slow\n"
        "systems (marked ‡ in the table); '' for full size everywhere (default: %(default)s)",
    )
    p.add_argument("--quick", action="store_true", help="sizes shrunk ~10x (smoke run)")
    p.add_argument("--out", default=DEFAULT_OUT, help="JSON output (default: %(default)s)")
    p.add_argument("--timeout", type=float, default=300.0, help="per measurement, seconds")
    p.add_argument("--scale-one", type=float, default=1.0, help=argparse.SUPPRESS)
    p.add_argument("--one", nargs=2, metavar=("SYSTEM", "WORKLOAD"), help=argparse.SUPPRESS)
    p.add_argument("--startup-probe", metavar="SYSTEM", help=argparse.SUPPRESS)
    p.add_argument("--json", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.one:
        return run_one(args.one[0], args.one[1], args.quick, args.json, args.scale_one)
    if args.startup_probe:
        return startup_probe(args.startup_probe, args.json)
    try:
        return parent(args)
    except KeyboardInterrupt:
        if _current_pgid is not None:
            try:
                os.killpg(_current_pgid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        raise


if __name__ == "__main__":
    sys.exit(main())
