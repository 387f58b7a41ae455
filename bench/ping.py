"""Ping round trip through workerctl.Client vs bare pyzmq, and `workerctl ping` as a process.

    .venv/bin/python bench/ping.py [--rounds 7] [--pings 2000] [--processes 20] [--no-write]

Part 1, in-process round trips (one daemon, one bare echo server, rounds interleaved):
  * workerctl.Client.ping() against workerd;
  * a bare DEALER against workerd's control socket (same daemon; no Client code): splits the
    client's cost from the daemon's;
  * a bare DEALER against a bare ROUTER echo in a separate process that decodes the request and
    encodes a protocol-shaped reply with msgpack (the floor: socket + codec, nothing else).
Part 2, whole processes: `.venv/bin/workerctl --socket S ping` vs `python -c "import zmq, msgpack"`
  (plus `python -c pass` and an import-only `python -c "import workerctl.cli"` for context).
Part 3, `python -X importtime -m workerctl.cli ping`: the heaviest imports, and what the client
  imports beyond what `import zmq, msgpack` imports.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import msgpack
import zmq

import benchlib
from benchlib import percentile, spread, table
from workerctl import Client


def client_pinger(socket_path: str) -> tuple[Callable[[], Any], Callable[[], None]]:
    client = Client(socket_path, timeout=30.0)
    return client.ping, client.close


def bare_pinger(endpoint: str) -> tuple[Callable[[], Any], Callable[[], None]]:
    """A DEALER doing what a minimal client must: encode, send, receive, decode, match the id."""
    context: zmq.Context[Any] = zmq.Context.instance()
    dealer = context.socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    dealer.connect(endpoint)
    ids = iter(range(1, 1 << 62))

    def ping() -> Any:
        request_id = next(ids)
        dealer.send_multipart([b"", msgpack.packb({"v": 1, "id": request_id, "cmd": "ping"})])
        frames = dealer.recv_multipart()
        reply = msgpack.unpackb(frames[1], raw=False)
        assert reply["id"] == request_id and reply["ok"] is True
        return reply["result"]

    return ping, dealer.close


def round_trips(rounds: int, pings: int) -> str:
    echo_dir = tempfile.mkdtemp(prefix="wbench-echo-")
    echo_endpoint = f"ipc://{echo_dir}/echo.sock"
    # spawn, not fork: this process may already hold a ZeroMQ context.
    echo = multiprocessing.get_context("spawn").Process(
        target=benchlib.echo_server, args=(echo_endpoint,), daemon=True
    )
    echo.start()
    samples: dict[str, list[list[float]]] = {}
    with benchlib.Daemon(workers=1) as daemon:
        daemon.wait_ready()
        benchlib.wait_for_echo(echo_endpoint)
        variants = {
            "workerctl.Client.ping() -> workerd": client_pinger(daemon.socket),
            "bare DEALER -> workerd": bare_pinger(f"ipc://{daemon.socket}"),
            "bare DEALER -> bare ROUTER echo (separate process)": bare_pinger(echo_endpoint),
        }
        for ping, _ in variants.values():
            benchlib.timed(ping, 500)  # warm up: connections, caches, branch predictors
        for _ in range(rounds):
            for name, (ping, _) in variants.items():
                samples.setdefault(name, []).append(benchlib.timed(ping, pings))
        for _, close in variants.values():
            close()
    echo.terminate()
    echo.join(5)
    if echo.exitcode is None:
        echo.kill()
        echo.join()
    shutil.rmtree(echo_dir, ignore_errors=True)

    def p(name: str, q: float) -> list[float]:
        return [percentile(run, q) for run in samples[name]]

    floor = "bare DEALER -> bare ROUTER echo (separate process)"
    rows = []
    for name in samples:
        rows.append(
            [
                name,
                spread(p(name, 50), 1, 1e6),
                spread(p(name, 99), 1, 1e6),
                f"{statistics.median(p(name, 50)) / statistics.median(p(floor, 50)):.2f}x",
                f"{statistics.median(p(name, 99)) / statistics.median(p(floor, 99)):.2f}x",
            ]
        )
    return (
        f"### Round trip, in process ({rounds} rounds x {pings} pings per variant, interleaved; "
        "figures are median (min-max) over rounds of each round's percentile)\n\n"
        + table(["variant", "p50 µs", "p99 µs", "p50 vs bare echo", "p99 vs bare echo"], rows)
        + "\n\nGoal: workerctl.Client ping within 1.5x of the bare echo."
    )


def bytecode_environments() -> dict[str, dict[str, str]]:
    """Two conditions: .pyc files cached (as on any real install), and this shell's own setting.

    With PYTHONDONTWRITEBYTECODE=1 (set in some sandboxes) an editable install's modules are
    compiled from source on every start while zmq and the stdlib load their .pyc files, which
    penalises the client unfairly. PYTHONPYCACHEPREFIX keeps the cache out of the source tree.
    """
    cached = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    cached["PYTHONPYCACHEPREFIX"] = str(benchlib.BENCH_DIR / "out" / "pycache")
    environments = {"bytecode cached (PYTHONPYCACHEPREFIX)": cached}
    if os.environ.get("PYTHONDONTWRITEBYTECODE"):
        environments["PYTHONDONTWRITEBYTECODE=1 (this shell: client compiled on every start)"] = dict(
            os.environ
        )
    return environments


def whole_processes(runs: int, socket_path: str) -> str:
    python = sys.executable
    workerctl = str(benchlib.VENV_BIN / "workerctl")
    baseline = '`python -c "import zmq, msgpack"`'
    variants = {
        "`workerctl --socket S ping`": [workerctl, "--socket", socket_path, "ping"],
        baseline: [python, "-c", "import zmq, msgpack"],
        "`python -c pass`": [python, "-c", "pass"],
        '`python -c "import workerctl.cli"` (imports only)': [python, "-c", "import workerctl.cli"],
    }
    workdir = tempfile.mkdtemp(prefix="wbench-cwd-")
    sections = []
    for label, env in bytecode_environments().items():
        times: dict[str, list[float]] = {name: [] for name in variants}
        for command in variants.values():  # warm the page cache and the .pyc files
            subprocess.run(command, check=True, cwd=workdir, env=env, stdout=subprocess.DEVNULL)
        for _ in range(runs):
            for name, command in variants.items():
                start = time.perf_counter()
                subprocess.run(command, check=True, cwd=workdir, env=env, stdout=subprocess.DEVNULL)
                times[name].append(time.perf_counter() - start)
        base = statistics.median(times[baseline])
        rows = [
            [name, spread(values, 1, 1e3), f"{statistics.median(values) / base:.2f}x"]
            for name, values in times.items()
        ]
        sections.append(f"#### {label}\n\n" + table(["command", "wall ms", "vs `import zmq, msgpack`"], rows))
    os.rmdir(workdir)
    return (
        f"### Whole process wall time ({runs} runs each, interleaved; median (min-max))\n\n"
        + "\n\n".join(sections)
        + '\n\nGoal: `workerctl ping` within 1.3x of `python -c "import zmq, msgpack"`.'
    )


def parse_importtime(stderr: str) -> dict[str, tuple[int, int, int]]:
    """module -> (self µs, cumulative µs, depth) from `-X importtime` output."""
    modules = {}
    for line in stderr.splitlines():
        if not line.startswith("import time:") or "imported package" in line:
            continue
        self_us, cumulative_us, name = line[len("import time:") :].split("|", 2)
        depth = (len(name) - len(name.lstrip(" ")) - 1) // 2
        modules[name.strip()] = (int(self_us), int(cumulative_us), depth)
    return modules


def importtime_runs(
    command: list[str], runs: int, env: dict[str, str]
) -> dict[str, tuple[float, float, int]]:
    """Per module: median self µs, median cumulative µs, depth over `runs` runs."""
    collected: dict[str, list[tuple[int, int, int]]] = {}
    subprocess.run(command, capture_output=True, check=False, env=env)  # warm the .pyc cache
    for _ in range(runs):
        result = subprocess.run(command, capture_output=True, text=True, check=False, env=env)
        for name, figures in parse_importtime(result.stderr).items():
            collected.setdefault(name, []).append(figures)
    return {
        name: (
            statistics.median(f[0] for f in figures),
            statistics.median(f[1] for f in figures),
            figures[0][2],
        )
        for name, figures in collected.items()
    }


def import_profile(socket_path: str, runs: int = 7) -> str:
    python = sys.executable
    label, env = next(iter(bytecode_environments().items()))
    ping = [python, "-X", "importtime", "-m", "workerctl.cli", "--socket", socket_path, "ping"]
    client = importtime_runs(ping, runs, env)
    base = importtime_runs([python, "-X", "importtime", "-c", "import zmq, msgpack"], runs, env)
    total_client = sum(v[0] for v in client.values())
    total_base = sum(v[0] for v in base.values())
    heaviest = sorted(client.items(), key=lambda item: -item[1][1])
    top = [
        [f"`{name}`", f"{cum / 1e3:.1f}", f"{own / 1e3:.1f}", depth, "yes" if name in base else "**no**"]
        for name, (own, cum, depth) in heaviest
        if depth <= 2
    ][:15]
    extras = sorted(((n, v) for n, v in client.items() if n not in base), key=lambda item: -item[1][0])
    extra_total = sum(v[0] for _, v in extras)
    extra_rows = [
        [f"`{name}`", f"{own / 1e3:.2f}", f"{cum / 1e3:.2f}"] for name, (own, cum, _) in extras[:15]
    ]
    return (
        f"### Imports of `python -X importtime -m workerctl.cli ping` (median of {runs} runs, {label})\n\n"
        f"Sum of self times: workerctl ping {total_client / 1e3:.1f} ms ({len(client)} modules) vs "
        f"`import zmq, msgpack` {total_base / 1e3:.1f} ms ({len(base)} modules); the "
        f"{len(extras)} modules the client imports beyond zmq+msgpack cost {extra_total / 1e3:.1f} ms "
        "of self time.\n\n"
        "Heaviest imports by cumulative time (nesting depth <= 2):\n\n"
        + table(["module", "cumulative ms", "self ms", "depth", "also in zmq+msgpack?"], top)
        + "\n\nHeaviest imports that `import zmq, msgpack` does not do (by self time):\n\n"
        + table(["module", "self ms", "cumulative ms"], extra_rows)
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--pings", type=int, default=2000)
    parser.add_argument("--processes", type=int, default=20)
    parser.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md alone")
    args = parser.parse_args()
    parts = [round_trips(args.rounds, args.pings)]
    with benchlib.Daemon(workers=1) as daemon:
        daemon.wait_ready()
        parts.append(whole_processes(args.processes, daemon.socket))
        parts.append(import_profile(daemon.socket))
    benchlib.report("ping", "\n\n".join(parts), write=not args.no_write)


if __name__ == "__main__":
    main()
