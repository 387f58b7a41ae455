"""Master-to-worker transport: a ZeroMQ ipc ROUTER/DEALER pair against a socketpair Channel.

Why this exists: the choice of workerd.core.transport was made on these figures. A parent plays the
master, a forked child the worker; the child echoes each [b"run", job id, body] as
[b"done", job id, b"ok", body, extras], as a CPU worker does. Both sides are measured one call
in flight (the latency of a hop) and with 64 in flight (what batching buys). Bodies differ per
call. Prints a table; asserts nothing.

    .venv/bin/python bench/transport.py [--calls N] [--rounds R]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import zmq

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "daemon"))

from workerd.core.transport import Channel, channel_pair

EXTRA = b"\x80"


def bodies(n: int) -> list[bytes]:
    return [os.urandom(180) + b"%08d" % i for i in range(n)]


def run_channel(calls: int, window: int) -> float:
    master, theirs = channel_pair(max_frame=1 << 20)
    pid = os.fork()
    if pid == 0:
        master.sock.close()
        worker = Channel(theirs, max_frame=1 << 20, blocking=True)
        while (messages := worker.receive(block=True)) is not None:
            for frames in messages:
                if frames[0] == b"stop":
                    os._exit(0)
                worker.send([b"done", frames[1], b"ok", frames[2], EXTRA])
        os._exit(0)
    theirs.close()
    import select

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
    parser.add_argument("--calls", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    results: dict[tuple[str, int], list[float]] = {}
    for _ in range(args.rounds):  # interleaved: each round runs every system once
        for window in (1, 64):
            for name, run in (("zmq ipc ROUTER/DEALER", run_zmq), ("socketpair Channel", run_channel)):
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
