"""Fair share between clients: one client's flood beside another's trickle.

Client A (uid 40201) keeps 5,000 requests in flight on 2 workers; client B (uid 40202) sends one
request every 100 ms. For B: the wait (from its send to the worker's start, one monotonic clock
for every process) and the end-to-end latency, p50 and p99. For A: its completions per second
over the same window. Three cases, interleaved, each rep in a fresh daemon:

  fifo   the code before fair share (`--baseline DIR`: a checkout of it), A and B
  fair   this code, A and B
  alone  this code, A alone (A's throughput to compare with)

and `fifo alone` too, so that "with one client, throughput as today" is measured in the same run.

A's tasks are trivial or 50 ms sleeps; B's are trivial (its own work is not what is measured,
its wait is). Every call's arguments are distinct. Behind FIFO with 50 ms tasks, each of B's
requests waits for the whole flood (5,000 x 50 ms / 2 workers, about 125 s): that case runs
`--fifo-sleep-reps` times (default 1) and B sends only 3 requests in it.

Needs root (setpriv, to run the clients as other uids). Prints its figures; asserts nothing.

    .venv/bin/python bench/fairness.py --baseline /path/to/old/checkout [--reps 3] [--write]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import benchlib

FLOOD_UID, TRICKLE_UID = 40201, 40202
FLOOD_DEPTH = 5000

TASKS = '''
import time


def stamp(n: int, seconds: float = 0.0) -> float:
    """When a worker started call n (one monotonic clock for every process)."""
    start = time.monotonic()
    if seconds:
        time.sleep(seconds)
    return start
'''

# A keeps `depth` requests in flight until SIGTERM; then prints its completion times.
FLOOD = textwrap.dedent(
    """
    import json, signal, sys, time, zmq
    from workerctl import protocol

    path, depth, seconds = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
    sock = zmq.Context().socket(zmq.DEALER)
    sock.setsockopt(zmq.RCVHWM, 0)
    sock.setsockopt(zmq.SNDHWM, 0)
    sock.connect("ipc://" + path)
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    n = 0

    def send():
        global n
        n += 1
        body = protocol.encode_request(n, "execute", name="benchfair:stamp", args=[n, seconds], kwargs={})
        sock.send_multipart([b"", body])

    for _ in range(depth):
        send()
    done = []
    while not stop:
        if sock.poll(100):
            while sock.poll(0):
                sock.recv_multipart()
                done.append(time.monotonic())
                send()
    print(json.dumps(done))
    """
)

# B sends `count` requests `gap` apart, then waits for every reply.
TRICKLE = textwrap.dedent(
    """
    import json, sys, time, msgpack, zmq
    from workerctl import protocol

    path, count, gap, timeout = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4])
    sock = zmq.Context().socket(zmq.DEALER)
    sock.connect("ipc://" + path)
    sent, ended, started = {}, {}, {}

    def read(wait_ms):
        if sock.poll(wait_ms):
            while sock.poll(0):
                reply = msgpack.unpackb(sock.recv_multipart()[1])
                ended[reply["id"]] = time.monotonic()
                started[reply["id"]] = reply.get("result")

    for n in range(1, count + 1):
        sent[n] = time.monotonic()
        body = protocol.encode_request(n, "execute", name="benchfair:stamp", args=[10**6 + n, 0.0], kwargs={})
        sock.send_multipart([b"", body])
        until = sent[n] + gap
        while time.monotonic() < until:
            read(max(1, int((until - time.monotonic()) * 1000)))
    deadline = time.monotonic() + timeout
    while len(ended) < count and time.monotonic() < deadline:
        read(100)
    print(json.dumps([[sent[n], started.get(n), ended.get(n)] for n in sent]))
    """
)


def as_uid(uid: int, script: str, *args: str, code: Path) -> subprocess.Popen[str]:
    path = os.pathsep.join([str(code / "client"), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "PYTHONPATH": path}
    command = ["setpriv", f"--reuid={uid}", "--regid=0", "--clear-groups"]
    command += [sys.executable, "-c", script, *args]
    return subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env=env, cwd="/")


def queued(daemon: benchlib.Daemon) -> int:
    status = daemon.status()
    return status["queue"]["depth"] if status else 0


def run_case(
    code: Path, tasks: Path, task_s: float, with_trickle: bool, window_s: float, trickle_count: int
) -> tuple[float, list[list[float | None]]]:
    """One daemon running `code`: A's flood, B's trickle if asked. (A's rate, B's samples.)"""
    daemon = benchlib.Daemon(
        workers=2,
        modules=["benchfair"],
        extra_pythonpath=[tasks, code / "daemon", code / "client"],
    )
    try:
        os.chmod(daemon.directory, 0o755)  # the socket's 0660 (group root) admits the clients
        daemon.wait_ready()
        flood = as_uid(FLOOD_UID, FLOOD, daemon.socket, str(FLOOD_DEPTH), str(task_s), code=ROOT)
        deadline = time.monotonic() + 60
        while queued(daemon) < FLOOD_DEPTH * 0.9 and time.monotonic() < deadline:
            time.sleep(0.05)
        start = time.monotonic()
        samples: list[list[float | None]] = []
        if with_trickle:
            wait_for = 30 + FLOOD_DEPTH * task_s  # behind FIFO, B waits for the whole flood
            trickle = as_uid(
                TRICKLE_UID, TRICKLE, daemon.socket, str(trickle_count), "0.1", str(wait_for), code=ROOT
            )
            out, _ = trickle.communicate(timeout=wait_for + 60)
            samples = json.loads(out)
        else:
            time.sleep(window_s)
        end = start + window_s
        flood.send_signal(signal.SIGTERM)
        out, _ = flood.communicate(timeout=60)
        done = [t for t in json.loads(out) if start <= t <= end]
        return len(done) / window_s, samples
    finally:
        daemon.stop()


ROOT = benchlib.ROOT


def summary(samples: list[list[float | None]]) -> tuple[list[float], list[float], int]:
    waits = [s[1] - s[0] for s in samples if s[1] is not None]  # type: ignore[operator]
    total = [s[2] - s[0] for s in samples if s[2] is not None]  # type: ignore[operator]
    return waits, total, sum(1 for s in samples if s[2] is None)


def ratio_of(beside: list[float], alone: list[float]) -> str:
    if not beside or not alone:
        return "-"
    return benchlib.ratio(benchlib.median(beside), benchlib.median(alone))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--baseline", type=Path, help="a checkout of the code before fair share (FIFO)")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--fifo-sleep-reps", type=int, default=1)
    parser.add_argument("--window", type=float, default=3.0, help="seconds of B's trickle (one per 100 ms)")
    parser.add_argument("--write", action="store_true", help="put the tables in bench/RESULTS.md")
    args = parser.parse_args()
    if os.getuid() != 0:
        sys.exit("fairness.py runs its clients as other uids: run it as root")
    tasks = Path(tempfile.mkdtemp(prefix="benchfair-"))
    os.chmod(tasks, 0o755)
    (tasks / "benchfair.py").write_text(TASKS)
    count = int(args.window / 0.1)
    systems = [("fair", ROOT)] + ([("fifo", args.baseline.resolve())] if args.baseline else [])
    rates: dict[tuple[str, str, bool], list[float]] = {}
    trickles: dict[tuple[str, str], list[list[float | None]]] = {}
    kinds = [("trivial", 0.0), ("50 ms", 0.05)]
    for rep in range(args.reps):
        for kind, task_s in kinds:
            for name, code in systems:
                for with_trickle in (True, False):
                    slow_fifo = name == "fifo" and task_s and with_trickle
                    if slow_fifo and rep >= args.fifo_sleep_reps:
                        continue
                    n = 3 if slow_fifo else count
                    rate, samples = run_case(code, tasks, task_s, with_trickle, args.window, n)
                    rates.setdefault((kind, name, with_trickle), []).append(rate)
                    trickles.setdefault((kind, name), []).extend(samples)
                    case = "A+B" if with_trickle else "A alone"
                    print(f"rep {rep} {kind:7} {name:4} {case}: A {rate:,.0f}/s", flush=True)
    rows = []
    for kind, _ in kinds:
        for name, _ in systems:
            waits, total, lost = summary(trickles.get((kind, name), []))
            alone = rates.get((kind, name, False), [])
            beside = rates.get((kind, name, True), [])
            rows.append(
                [
                    kind,
                    name,
                    f"{len(waits)}" + (f" ({lost} unanswered)" if lost else ""),
                    f"{benchlib.percentile(waits, 50) * 1000:.1f}" if waits else "-",
                    f"{benchlib.percentile(waits, 99) * 1000:.1f}" if waits else "-",
                    f"{benchlib.percentile(total, 50) * 1000:.1f}" if total else "-",
                    f"{benchlib.percentile(total, 99) * 1000:.1f}" if total else "-",
                    benchlib.spread(beside),
                    benchlib.spread(alone),
                    ratio_of(beside, alone),
                ]
            )
    headers = ["A's tasks", "code", "B's requests", "B wait p50 ms", "B wait p99 ms", "B e2e p50 ms"]
    headers += ["B e2e p99 ms", "A calls/s beside B", "A calls/s alone", "A beside / alone"]
    body = benchlib.table(headers, rows)
    fair_alone = {kind: benchlib.median(rates.get((kind, "fair", False), [0])) for kind, _ in kinds}
    fifo_alone = {kind: benchlib.median(rates.get((kind, "fifo", False), [0])) for kind, _ in kinds}
    if args.baseline:
        body += "\n\nOne client (A alone), this code against the code before fair share: " + ", ".join(
            f"{kind} {benchlib.ratio(fair_alone[kind], fifo_alone[kind])}" for kind, _ in kinds
        )
    body += (
        f"\n\n{args.reps} reps (FIFO with 50 ms tasks: {args.fifo_sleep_reps}), 2 workers, prefetch 4, "
        f"A {FLOOD_DEPTH} in flight."
    )
    benchlib.report("fairness", body, write=args.write)


if __name__ == "__main__":
    main()
