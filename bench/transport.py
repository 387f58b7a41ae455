"""Master-to-worker transport: a ZeroMQ ipc ROUTER/DEALER pair against a socketpair Channel.

Why this exists: the choice of workerd.core.transport was made on these figures. A parent plays the
master, a forked child the worker; the child echoes each [b"run", job id, body] as
[b"done", job id, b"ok", body, extras], as a CPU worker does. Both sides are measured one call
in flight (the latency of a hop) and with 64 in flight (what batching buys). Bodies differ per
call. Prints a table; asserts nothing.

A third system is the floor of any socketpair transport: the same messages on a bare socketpair,
framed as bench/floor.py frames them (two lengths, a job id and one body; sendall, one recv,
floor.split), no frame list and no limits. The Channel's distance to it is what its framing
costs in Python.
--baseline DIR (repeatable) also measures the Channel of another checkout (its
daemon/workerd/core/transport.py), named for its folder.

    .venv/bin/python bench/transport.py [--calls N] [--rounds R] [--baseline DIR ...]
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import os
import select
import socket
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import zmq

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "daemon"))

import benchlib
import floor
from workerd.core import transport

EXTRA = b"\x80"


def bodies(n: int) -> list[bytes]:
    return [os.urandom(180) + b"%08d" % i for i in range(n)]


def run_channel(calls: int, window: int, module: ModuleType = transport) -> float:
    master, theirs = module.channel_pair(max_frame=1 << 20)
    pid = os.fork()
    if pid == 0:
        master.sock.close()
        worker = module.Channel(theirs, max_frame=1 << 20, blocking=True)
        while (messages := worker.receive(block=True)) is not None:
            for frames in messages:
                if frames[0] == b"stop":
                    os._exit(0)
                worker.send([b"done", frames[1], b"ok", frames[2], EXTRA])
        os._exit(0)
    theirs.close()
    poller = select.poll()
    poller.register(master.fileno(), select.POLLIN)
    payload = bodies(calls)
    sent = done = 0
    started = time.perf_counter()
    while done < calls:
        while sent < calls and sent - done < window:
            master.send([b"run", b"%d" % sent, payload[sent]])
            sent += 1
        master.flush()
        poller.poll()
        done += len(master.receive() or [])
    elapsed = time.perf_counter() - started
    master.send([b"stop"])
    master.flush()
    os.waitpid(pid, 0)
    master.close()
    return calls / elapsed


def run_bare(calls: int, window: int) -> float:
    """The same exchange on a bare socketpair, framed as bench/floor.py's broker and workers frame
    theirs: [routing id length, body length, routing id, body], the job id in the id's place."""
    ours, theirs = socket.socketpair()
    pid = os.fork()
    if pid == 0:
        ours.close()
        buffer = bytearray()
        while data := theirs.recv(256 * 1024):
            buffer += data
            for job, body in floor.split(buffer):
                if body == b"stop":
                    os._exit(0)
                reply = b"done" + b"ok" + body + EXTRA
                theirs.sendall(floor.HEAD.pack(len(job), len(reply)) + job + reply)
        os._exit(0)
    theirs.close()
    payload = bodies(calls)
    buffer = bytearray()
    sent = done = 0
    started = time.perf_counter()
    while done < calls:
        while sent < calls and sent - done < window:
            job, body = b"%d" % sent, b"run" + payload[sent]
            ours.sendall(floor.HEAD.pack(len(job), len(body)) + job + body)
            sent += 1
        buffer += ours.recv(256 * 1024)
        done += sum(1 for _ in floor.split(buffer))
    elapsed = time.perf_counter() - started
    ours.sendall(floor.HEAD.pack(0, 4) + b"stop")
    os.waitpid(pid, 0)
    ours.close()
    return calls / elapsed


def checkout_transport(root: str) -> tuple[str, Callable[[int, int], float]]:
    """Another checkout's Channel, loaded from its file (transport.py imports nothing of workerd)."""
    path = Path(root) / "daemon" / "workerd" / "core" / "transport.py"
    if not path.is_file():
        raise argparse.ArgumentTypeError(f"{path} does not exist")
    spec = importlib.util.spec_from_file_location(f"transport_{Path(root).name}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return f"socketpair Channel ({Path(root).resolve().name})", functools.partial(run_channel, module=module)


def run_zmq(calls: int, window: int) -> float:
    directory = tempfile.mkdtemp()
    endpoint = f"ipc://{directory}/w.sock"
    pid = os.fork()
    if pid == 0:
        context = zmq.Context()
        sock = context.socket(zmq.DEALER)
        sock.setsockopt(zmq.ROUTING_ID, b"w1")
        sock.connect(endpoint)
        sock.send_multipart([b"ready"])
        while True:
            frames = sock.recv_multipart()
            if frames[0] == b"stop":
                break
            sock.send_multipart([b"done", frames[1], b"ok", frames[2], EXTRA])
        sock.close(linger=1000)
        context.term()
        os._exit(0)
    context = zmq.Context()
    router = context.socket(zmq.ROUTER)
    router.bind(endpoint)
    router.recv_multipart()  # ready
    payload = bodies(calls)
    sent = done = 0
    started = time.perf_counter()
    while done < calls:
        while sent < calls and sent - done < window:
            router.send_multipart([b"w1", b"run", b"%d" % sent, payload[sent]])
            sent += 1
        router.recv_multipart()
        done += 1
        while router.getsockopt(zmq.EVENTS) & zmq.POLLIN:
            router.recv_multipart()
            done += 1
    elapsed = time.perf_counter() - started
    router.send_multipart([b"w1", b"stop"])
    os.waitpid(pid, 0)
    router.close(linger=0)
    context.term()
    return calls / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--calls", type=benchlib.at_least(1), default=20_000)
    parser.add_argument("--rounds", type=benchlib.at_least(1), default=5)
    parser.add_argument(
        "--baseline", type=checkout_transport, action="append", default=[], help="another checkout's root"
    )
    args = parser.parse_args()
    systems: list[tuple[str, Callable[[int, int], float]]] = [
        ("zmq ipc ROUTER/DEALER", run_zmq),
        ("socketpair Channel", run_channel),
        *args.baseline,
        ("bare socketpair", run_bare),
    ]
    results: dict[tuple[str, int], list[float]] = {}
    for _ in range(args.rounds):  # interleaved: each round runs every system once
        for window in (1, 64):
            for name, run in systems:
                results.setdefault((name, window), []).append(run(args.calls, window))
    print(f"load average {os.getloadavg()[0]:.2f}; {args.calls} calls x {args.rounds} rounds")
    print("| transport | in flight | round trips/s, median (min-max) |")
    print("|---|---|---|")
    for (name, window), rates in results.items():
        print(
            f"| {name} | {window} | {statistics.median(rates):,.0f} ({min(rates):,.0f}-{max(rates):,.0f}) |"
        )


if __name__ == "__main__":
    main()
