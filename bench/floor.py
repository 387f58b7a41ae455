"""The floor: a bare broker of workerd's own shape, measured beside workerd and Pool in one run.

    .venv/bin/python bench/floor.py [--rounds 5] [--calls 40000] [--chunksizes 1,16,100]
                                    [--window 64] [--workers 2] [--serial 2000] [--baseline DIR ...]
                                    [--no-write]

The floor is what workerd's design costs with nothing else in it: a ROUTER in front, a socketpair
per forked worker, prefetch 2, compact chunk replies, and no checks, no bookkeeping, no limits,
no metrics. It speaks just enough of workerd's protocol (execute with `calls` or `args`, and
ping) that the same `workerctl.Client.imap_unordered` drives it and workerd, so the difference
between the two is the daemon's. Its master never decodes a request: it forwards the body with
the client's routing id, and the worker decodes it, runs the calls and encodes the reply.

Each round measures every system at every chunk size, in a rotating order (interleaved), with
inputs distinct per call (benchlib's payload). workerd is measured twice per round ("workerd"
and "workerd again"): the ratio of the two is the A/A noise of the run. --baseline DIR (which
may be repeated) also runs a daemon from another checkout, named for its folder (its daemon/ and
client/ on the daemon's PYTHONPATH; the client is this checkout's), to compare versions of the
daemon in the same run.

Besides calls/s it reads the CPU time (user + system, all threads, from /proc through psutil) of
the client (this process), the master and the workers over each run, in µs per call: on 2 cores
both systems saturate the machine, so the rate follows the total CPU per call.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import importlib
import multiprocessing
import os
import signal
import socket
import statistics
import struct
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgpack
import psutil
import zmq

import benchlib
from benchlib import at_least, percentile, spread, table
from throughput import echo, payload
from workerctl import Client

ECHO = "workerd.examples.tasks:echo"
PREFETCH = 2
# [u32 routing-id length][u32 body length][routing id][body], both ways on a socketpair.
HEAD = struct.Struct("<II")


# -- the floor broker ------------------------------------------------------------------------------


def split(buffer: bytearray) -> Iterator[tuple[bytes, bytes]]:
    """Whole (routing id, body) messages at the front of `buffer`, removed from it."""
    at = 0
    while len(buffer) - at >= HEAD.size:
        rid_len, body_len = HEAD.unpack_from(buffer, at)
        end = at + HEAD.size + rid_len + body_len
        if end > len(buffer):
            break
        start = at + HEAD.size
        yield bytes(buffer[start : start + rid_len]), bytes(buffer[start + rid_len : end])
        at = end
    del buffer[:at]


def floor_worker(sock: socket.socket) -> None:
    functions: dict[str, Callable[..., Any]] = {}
    buffer = bytearray()
    while True:
        data = sock.recv(256 * 1024)
        if not data:
            return
        buffer += data
        for rid, body in split(buffer):
            request = msgpack.unpackb(body, raw=False)
            if request["cmd"] == "ping":
                result: Any = {"pid": os.getpid(), "version": "floor", "max_message_bytes": 64 << 20}
            else:
                name = request["name"]
                function = functions.get(name)
                if function is None:
                    module, _, attr = name.partition(":")
                    function = functions[name] = getattr(importlib.import_module(module), attr)
                calls = request.get("calls")
                if calls is None:
                    result = function(*request["args"], **request["kwargs"])
                else:
                    result = {"values": [function(*args, **kwargs) for args, kwargs in calls]}
            reply = msgpack.packb({"v": 1, "id": request["id"], "ok": True, "result": result})
            sock.sendall(HEAD.pack(len(rid), len(reply)) + rid + reply)


def floor_broker(endpoint: str, workers: int, ready: Any) -> None:
    """Fork the workers first (no ZeroMQ context yet), then route: requests to the worker with
    the fewest in hand while it has fewer than PREFETCH, replies straight back to their client."""
    socks = []
    for _ in range(workers):
        ours, theirs = socket.socketpair()
        pid = os.fork()
        if pid == 0:
            ours.close()
            for other in socks:
                other.close()
            benchlib.die_with_parent()
            try:
                floor_worker(theirs)
            finally:
                os._exit(0)
        theirs.close()
        socks.append(ours)
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(0))
    context = zmq.Context()
    router = context.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    router.bind(endpoint)
    poller = zmq.Poller()
    poller.register(router, zmq.POLLIN)
    for sock in socks:
        poller.register(sock.fileno(), zmq.POLLIN)
    by_fd = {sock.fileno(): index for index, sock in enumerate(socks)}
    buffers = [bytearray() for _ in socks]
    held = [0] * workers
    waiting: collections.deque[tuple[bytes, bytes]] = collections.deque()
    ready.send(os.getpid())
    noblock, sndmore = int(zmq.NOBLOCK), int(zmq.SNDMORE)
    while True:
        for fd, _ in poller.poll():
            if fd is router:
                while True:
                    try:
                        rid, _, body = router.recv_multipart(noblock)
                    except zmq.Again:
                        break
                    waiting.append((rid, body))
                continue
            index = by_fd[fd]
            buffers[index] += socks[index].recv(256 * 1024)
            for rid, body in split(buffers[index]):
                held[index] -= 1
                router.send(rid, sndmore)
                router.send(b"", sndmore)
                router.send(body)
        while waiting:
            index = min(range(workers), key=held.__getitem__)
            if held[index] >= PREFETCH:
                break
            rid, body = waiting.popleft()
            socks[index].sendall(HEAD.pack(len(rid), len(body)) + rid + body)
            held[index] += 1


class Floor:
    def __init__(self, workers: int) -> None:
        self.directory = tempfile.mkdtemp(prefix="wbench-floor-")
        os.chmod(self.directory, 0o700)
        self.socket = f"{self.directory}/floor.sock"
        parent, child = multiprocessing.Pipe()
        self.proc = multiprocessing.get_context("fork").Process(
            target=floor_broker, args=(f"ipc://{self.socket}", workers, child), daemon=True
        )
        self.proc.start()
        self.pid = parent.recv()
        self.workers = [p.pid for p in psutil.Process(self.pid).children()]

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.join(10)
        with contextlib.suppress(OSError):
            os.unlink(self.socket)
            os.rmdir(self.directory)


# -- the systems -----------------------------------------------------------------------------------


class Served:
    """A daemon (workerd, an older workerd, or the floor) driven by workerctl.Client."""

    def __init__(self, name: str, socket_path: str, master: int, workers: list[int]) -> None:
        self.name = name
        self.client = Client(socket_path, timeout=30.0)
        self.roles = {"client": [os.getpid()], "master": [master], "workers": workers}

    def run(self, calls: int, chunksize: int, window: int) -> None:
        results = list(
            self.client.imap_unordered(ECHO, map(payload, range(calls)), window=window, chunksize=chunksize)
        )
        assert len(results) == calls

    def serial(self, count: int) -> list[float]:
        """Seconds each of `count` execute calls took, one in flight."""
        call = self.client.call
        return benchlib.timed(lambda: call(ECHO, [payload()]), count)


class PoolRun:
    name = "multiprocessing.Pool"

    def __init__(self, workers: int) -> None:
        self.pool = multiprocessing.get_context("fork").Pool(workers)
        self.pool.map(echo, range(100))
        self.roles = {"client": [os.getpid()], "master": [], "workers": [p.pid for p in self.pool._pool]}  # type: ignore[attr-defined]

    def run(self, calls: int, chunksize: int, window: int) -> None:
        results = list(self.pool.imap_unordered(echo, map(payload, range(calls)), chunksize=chunksize))
        assert len(results) == calls


def daemon_pids(daemon: benchlib.Daemon) -> tuple[int, list[int]]:
    with daemon.client() as client:
        memory = client.memory_status()
    return daemon.pid, sorted(w["pid"] for w in memory["workers"])


def cpu(pids: list[int]) -> float:
    return sum(benchlib.cpu_seconds(pids).values())


def cpu_per_call(system: Any, calls: int, work: Callable[[], Any]) -> tuple[Any, float, dict[str, float]]:
    """What `work()` returned, its wall seconds, and the CPU per call of each role in µs."""
    before = {role: cpu(pids) for role, pids in system.roles.items()}
    started = time.perf_counter()
    result = work()
    wall = time.perf_counter() - started
    roles = {role: (cpu(pids) - before[role]) / calls * 1e6 for role, pids in system.roles.items()}
    return result, wall, roles


def measure(system: Any, calls: int, chunksize: int, window: int) -> dict[str, float]:
    _, wall, roles = cpu_per_call(system, calls, lambda: system.run(calls, chunksize, window))
    return {"rate": calls / wall, **roles}


def chunk_sizes(text: str) -> list[int]:
    try:
        sizes = [int(size) for size in text.split(",")]
    except ValueError:
        sizes = []
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers separated by commas, got {text!r}")
    return sizes


def checkout(text: str) -> Path:
    """A checkout's root: without its daemon/ and client/ the daemon would quietly be this one."""
    root = Path(text).resolve()
    if not (root / "daemon" / "workerd").is_dir() or not (root / "client" / "workerctl").is_dir():
        missing = "no daemon/workerd or client/workerctl"
        raise argparse.ArgumentTypeError(f"{text}: not a workerd checkout ({missing})")
    return root


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=at_least(1), default=5)
    parser.add_argument(
        "--calls", type=at_least(4), default=40_000, help="per run (a quarter at chunksize 1)"
    )
    parser.add_argument("--chunksizes", type=chunk_sizes, default="1,16,100", help="e.g. 1,16,100")
    window_help = "messages in flight (imap_unordered's window)"
    parser.add_argument("--window", type=at_least(1), default=64, help=window_help)
    parser.add_argument("--workers", type=at_least(1), default=2)
    parser.add_argument(
        "--serial", type=at_least(0), default=2000, help="serial execute calls per round and daemon (0: none)"
    )
    parser.add_argument(
        "--baseline", type=checkout, action="append", default=[], help="another checkout's root (repeatable)"
    )
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    sizes = args.chunksizes

    pool = PoolRun(args.workers)  # forked first, before this process has a ZeroMQ context
    floor = Floor(args.workers)
    daemons = [benchlib.Daemon(workers=args.workers)]
    for root in args.baseline:
        path = [root / "daemon", root / "client"]
        daemons.append(benchlib.Daemon(workers=args.workers, extra_pythonpath=path, label=root.name))
    systems: list[Any] = [pool, Served("floor", floor.socket, floor.pid, floor.workers)]
    try:
        for daemon in daemons:
            daemon.wait_ready()
            master, workers = daemon_pids(daemon)
            systems.append(Served(daemon.label, daemon.socket, master, workers))
        systems.append(Served("workerd again", daemons[0].socket, *daemon_pids(daemons[0])))
        for system in systems:  # warm every path once
            system.run(2_000, 16, args.window)
        figures: dict[tuple[str, int], list[dict[str, float]]] = collections.defaultdict(list)
        loads = []
        latency: dict[str, list[dict[str, float]]] = collections.defaultdict(list)
        for round_index in range(args.rounds):
            loads.append(os.getloadavg()[0])
            for chunksize in sizes:
                turn = systems[round_index % len(systems) :] + systems[: round_index % len(systems)]
                for system in turn:
                    calls = args.calls if chunksize > 1 else args.calls // 4
                    figures[(system.name, chunksize)].append(measure(system, calls, chunksize, args.window))
            for system in systems:
                if isinstance(system, Served) and args.serial:
                    latency[system.name].append(measure_serial(system, args.serial))
            print(f"round {round_index + 1}/{args.rounds} done", file=sys.stderr)
    finally:
        for system in systems:
            if isinstance(system, Served):
                system.client.close()
        for daemon in daemons:
            daemon.stop()
        floor.stop()
        pool.pool.terminate()

    body = report(figures, sizes, [system.name for system in systems], args, loads)
    if latency:
        body += (
            "\n\nSerial execute, one call in flight, µs (each round's p50 and p99; median, spread), "
            "and the CPU per call of each role, all threads, from /proc\n\n"
        )
        body += serial_table(latency)
    benchlib.report("floor", body, write=not args.no_write)


def measure_serial(system: Served, count: int) -> dict[str, float]:
    """p50 and p99 in seconds, and the CPU per call of each role in µs, one call in flight."""
    samples, _, roles = cpu_per_call(system, count, lambda: system.serial(count))
    return {"p50": percentile(samples, 50), "p99": percentile(samples, 99), **roles}


def serial_table(latency: dict[str, list[dict[str, float]]]) -> str:
    floor = statistics.median(run["p50"] for run in latency["floor"])
    rows = []
    for name, runs in latency.items():
        p50s, p99s = [run["p50"] for run in runs], [run["p99"] for run in runs]
        roles = [statistics.median(run[role] for run in runs) for role in ("client", "master", "workers")]
        ratio = statistics.median(p50s) / floor
        rows.append(
            [name, spread(p50s, 0, 1e6), spread(p99s, 0, 1e6), f"{ratio:.2f}x", *(f"{v:.0f}" for v in roles)]
        )
    headers = ["system", "p50 (spread)", "p99 (spread)", "p50 vs floor"]
    headers += ["client µs", "master µs", "workers µs"]
    return table(headers, rows)


def report(
    figures: dict[tuple[str, int], list[dict[str, float]]],
    sizes: list[int],
    names: list[str],
    args: argparse.Namespace,
    loads: list[float],
) -> str:
    rows = []
    for chunksize in sizes:
        floor = statistics.median(f["rate"] for f in figures[("floor", chunksize)])
        pool = statistics.median(f["rate"] for f in figures[("multiprocessing.Pool", chunksize)])
        for name in names:
            runs = figures[(name, chunksize)]
            rates = [f["rate"] for f in runs]
            rate = statistics.median(rates)
            roles = [statistics.median(f[role] for f in runs) for role in ("client", "master", "workers")]
            rows.append(
                [
                    chunksize,
                    name,
                    spread(rates),
                    f"{rate / floor:.2f}x",
                    f"{rate / pool:.2f}x",
                    *(f"{value:.1f}" if value else "-" for value in roles),
                ]
            )
    headers = [
        "chunksize",
        "system",
        "calls/s (spread)",
        "vs floor",
        "vs Pool",
        "client µs",
        "master µs",
        "workers µs",
    ]
    aa = [
        statistics.median(f["rate"] for f in figures[("workerd again", size)])
        / statistics.median(f["rate"] for f in figures[("workerd", size)])
        for size in sizes
    ]
    return (
        f"{args.rounds} rounds, interleaved; {args.calls} calls per run ({args.calls // 4} at chunksize 1), "
        f"window {args.window}, {args.workers} workers; median (spread); CPU per call of each role, "
        f"all threads, from /proc. Load average (1 min) at each round: "
        f"{', '.join(f'{x:.2f}' for x in loads)}. "
        f"A/A (workerd again / workerd): {', '.join(f'{x:.3f}' for x in aa)}\n\n" + table(headers, rows)
    )


if __name__ == "__main__":
    main()
