"""Trivial-task latency and throughput: workerd vs multiprocessing, concurrent.futures, bare pyzmq.

    .venv/bin/python bench/throughput.py [--rounds 5] [--serial 1000] [--requests 10000]
                                         [--window 64] [--chunksize 16] [--workers 2] [--perf]
                                         [--no-write]

The task echoes a small dict. Four systems, each with 2 worker processes, all alive for the whole
run; each round measures every system in turn (the order rotates between rounds):

  * workerd: the real daemon, `workerd.examples.tasks:echo`, through one workerctl.Client;
    in flight two ways: a sliding window of client.send() + client.wait_result(oldest), and
    Client.imap_unordered(window=--window) (the client's own windowed path);
  * multiprocessing.Pool(2): apply (serial), apply_async (in flight);
  * concurrent.futures.ProcessPoolExecutor(2): submit().result() (serial), submit (in flight);
  * a bare pyzmq load-balancing broker (ROUTER frontend / ROUTER backend) with 2 forked DEALER
    workers that decode the request and encode a reply with msgpack (bench/benchlib.py).

Serial: one request at a time, latency of each (p50/p99). In flight: a sliding window of
--window requests (a new one is sent as soon as the oldest completes) until --requests are done;
throughput = requests / wall time. During each in-flight run the CPU time (user+sys) and context
switches (psutil) of every process are read before and after, to tell who is the bottleneck.
Batched (--chunksize > 0): the same calls with --chunksize calls per message, for the systems
that batch (workerd imap_unordered, Pool.imap_unordered, ProcessPoolExecutor.map).

--perf: one more in-flight run each for workerd and the broker while `perf record` samples the
master (the broker), to split its CPU per request by shared object (libpython, kernel, libzmq...).

A variant that fails (an error or no reply within 10 s) is reported as failed, not retried.
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import contextlib
import functools
import itertools
import multiprocessing
import multiprocessing.pool
import os
import shutil
import signal
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgpack
import psutil
import zmq

import benchlib
from benchlib import percentile, spread, table
from workerctl import Client

ECHO = "workerd.examples.tasks:echo"
PAYLOAD: dict[str, Any] = {"user": "alice", "n": 42, "tags": ["a", "b", "c"], "ok": True}
SERIAL = itertools.count()


def payload(_: object = None) -> dict[str, Any]:
    """A dict like PAYLOAD, distinct per call: equal objects would let pickle's memo shrink a
    chunk of Pool's or ProcessPoolExecutor's (one pickled list of calls) to almost nothing."""
    n = next(SERIAL)
    return {"user": f"user{n}", "n": n, "tags": ["a", "b", str(n)], "ok": True}


# How long the workerd client waits for one reply before the variant counts as failed.
REPLY_TIMEOUT_S = 10.0


def echo(value: Any) -> Any:
    """The task for multiprocessing and concurrent.futures (workers are forked: no import needed)."""
    return value


def sliding_window(total: int, window: int, send: Callable[[], Any], wait: Callable[[Any], Any]) -> None:
    pending: collections.deque[Any] = collections.deque()
    sent = 0
    while sent < min(window, total):
        pending.append(send())
        sent += 1
    while pending:
        wait(pending.popleft())
        if sent < total:
            pending.append(send())
            sent += 1


def new_children(known: set[int]) -> list[int]:
    children = {p.pid for p in psutil.Process().children()} - known
    known.update(children)
    return sorted(children)


class System:
    """One way of running the echo: `serial_call` and `in_flight` are timed by the benchmark."""

    name = ""
    serial = True  # False: the serial path is the same as another system's; not measured again

    def serial_call(self) -> None:
        raise NotImplementedError

    def in_flight(self, total: int, window: int) -> None:
        raise NotImplementedError

    def batched(self, total: int, chunksize: int, window: int) -> None:
        raise NotImplementedError

    def roles(self) -> dict[str, list[int]]:
        """Process ids by role, the benchmark's own process (the client) excluded."""
        raise NotImplementedError

    def close(self) -> None:
        pass


class PoolSystem(System):
    name = "multiprocessing.Pool"

    def __init__(self, workers: int, known: set[int]) -> None:
        self.pool = multiprocessing.get_context("fork").Pool(workers)
        self.pool.map(echo, range(100))
        self.workers = new_children(known)

    def serial_call(self) -> None:
        self.pool.apply(echo, (payload(),))

    def in_flight(self, total: int, window: int) -> None:
        def send() -> multiprocessing.pool.AsyncResult[Any]:
            return self.pool.apply_async(echo, (payload(),))

        sliding_window(total, window, send, lambda result: result.get())

    def batched(self, total: int, chunksize: int, window: int) -> None:
        results = list(self.pool.imap_unordered(echo, map(payload, range(total)), chunksize=chunksize))
        assert len(results) == total

    def roles(self) -> dict[str, list[int]]:
        return {"workers": self.workers}

    def close(self) -> None:
        self.pool.terminate()
        self.pool.join()


class ExecutorSystem(System):
    name = "ProcessPoolExecutor"

    def __init__(self, workers: int, known: set[int]) -> None:
        context = multiprocessing.get_context("fork")
        self.executor = concurrent.futures.ProcessPoolExecutor(workers, mp_context=context)
        list(self.executor.map(echo, range(100)))
        self.workers = new_children(known)

    def serial_call(self) -> None:
        self.executor.submit(echo, payload()).result()

    def in_flight(self, total: int, window: int) -> None:
        def send() -> concurrent.futures.Future[Any]:
            return self.executor.submit(echo, payload())

        sliding_window(total, window, send, lambda future: future.result())

    def batched(self, total: int, chunksize: int, window: int) -> None:
        results = list(self.executor.map(echo, map(payload, range(total)), chunksize=chunksize))
        assert len(results) == total

    def roles(self) -> dict[str, list[int]]:
        return {"workers": self.workers}

    def close(self) -> None:
        self.executor.shutdown(cancel_futures=True)


class WorkerdSystem(System):
    name = "workerd (send + wait_result)"

    def __init__(self, workers: int, known: set[int]) -> None:
        self.daemon = benchlib.Daemon(workers=workers)
        known.add(self.daemon.pid)
        self.daemon.wait_ready()
        with self.daemon.client() as client:
            memory = client.memory_status()
        self.workers = sorted(w["pid"] for w in memory["workers"])
        self.zygotes = [z["pid"] for z in memory.get("zygotes", [])]
        self.client = Client(self.daemon.socket, timeout=REPLY_TIMEOUT_S)
        assert self.client.call(ECHO, [PAYLOAD]) == PAYLOAD

    def serial_call(self) -> None:
        self.client.call(ECHO, [payload()])

    def in_flight(self, total: int, window: int) -> None:
        client = self.client

        def send() -> int:
            return client.send("execute", name=ECHO, args=[payload()], kwargs={})

        sliding_window(total, window, send, client.wait_result)

    def roles(self) -> dict[str, list[int]]:
        return {"master": [self.daemon.pid], "workers": self.workers, "zygote": self.zygotes}

    def close(self) -> None:
        self.client.close()
        self.daemon.stop()


class WorkerdMapSystem(System):
    """The same daemon and client, in flight through Client.imap_unordered."""

    name = "workerd (imap_unordered)"
    serial = False

    def __init__(self, base: WorkerdSystem) -> None:
        self.base = base

    def in_flight(self, total: int, window: int) -> None:
        self.batched(total, 1, window)

    def batched(self, total: int, chunksize: int, window: int) -> None:
        calls = map(payload, range(total))
        results = list(self.base.client.imap_unordered(ECHO, calls, window=window, chunksize=chunksize))
        assert len(results) == total

    def roles(self) -> dict[str, list[int]]:
        return self.base.roles()


class BrokerSystem(System):
    name = "bare pyzmq broker"

    def __init__(self, workers: int, known: set[int]) -> None:
        self.directory = tempfile.mkdtemp(prefix="wbench-broker-")
        frontend, backend = f"ipc://{self.directory}/front.sock", f"ipc://{self.directory}/back.sock"
        # spawn: the broker must not inherit this process's ZeroMQ context or threads.
        self.process = multiprocessing.get_context("spawn").Process(
            target=benchlib.echo_broker, args=(frontend, backend, workers), daemon=True
        )
        self.process.start()
        assert self.process.pid is not None
        known.add(self.process.pid)
        context: zmq.Context[Any] = zmq.Context.instance()
        self.dealer = context.socket(zmq.DEALER)
        self.dealer.setsockopt(zmq.LINGER, 0)
        self.dealer.connect(frontend)
        self.ids = iter(range(1, 1 << 62))
        self.send()
        if not self.dealer.poll(10_000):
            raise RuntimeError("the bare broker does not answer")
        self.receive()
        self.workers = sorted(p.pid for p in psutil.Process(self.process.pid).children())

    def send(self) -> int:
        request_id = next(self.ids)
        body = {"v": 1, "id": request_id, "cmd": "execute", "name": ECHO, "args": [payload()], "kwargs": {}}
        self.dealer.send_multipart([b"", msgpack.packb(body, use_bin_type=True)])
        return request_id

    def receive(self) -> Any:
        frames = self.dealer.recv_multipart()
        return msgpack.unpackb(frames[1], raw=False)

    def serial_call(self) -> None:
        request_id = self.send()
        reply = self.receive()
        assert reply["id"] == request_id

    def in_flight(self, total: int, window: int) -> None:
        # Replies come back in any order; counting them is enough (each is decoded, like a client).
        sliding_window(total, window, self.send, lambda _: self.receive())

    def roles(self) -> dict[str, list[int]]:
        assert self.process.pid is not None
        return {"broker": [self.process.pid], "workers": self.workers}

    def close(self) -> None:
        self.dealer.close()
        self.process.terminate()
        self.process.join(5)
        if self.process.exitcode is None:  # seen once on a loaded machine: do not hang on it
            self.process.kill()
            self.process.join()
        for pid in self.workers:  # normally gone with the broker already
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(self.directory, ignore_errors=True)


def new_entry(serial: bool) -> dict[str, Any]:
    return {
        "serial": serial,
        "p50": [],
        "p99": [],
        "rate": [],
        "batched": [],
        "cpu": collections.defaultdict(list),
        "errors": [],
    }


def attempt(entry: dict[str, Any], key: str, call: Callable[[], Any]) -> float | None:
    """Run `call` unless this variant already failed; its wall time, or None on failure."""
    if any(k == key for k, _ in entry["errors"]):
        return None
    started = time.perf_counter()
    try:
        call()
    except Exception as exc:
        entry["errors"].append((key, f"{type(exc).__name__}: {exc}"))
        print(f"  {key} failed: {type(exc).__name__}: {exc}")
        return None
    return time.perf_counter() - started


def serial_run(system: System, count: int, out: list[float]) -> None:
    out.extend(benchlib.timed(system.serial_call, count))


def start_systems(workers: int) -> list[System]:
    known: set[int] = set()
    systems: list[System] = []
    try:
        # The fork-based pools first, before this process creates any ZeroMQ context or socket.
        executor = ExecutorSystem(workers, known)
        systems.append(executor)
        pool = PoolSystem(workers, known)
        systems.append(pool)
        workerd = WorkerdSystem(workers, known)
        systems.append(workerd)
        broker = BrokerSystem(workers, known)
        systems.append(broker)
    except BaseException:
        for system in systems:
            system.close()
        raise
    return [workerd, WorkerdMapSystem(workerd), broker, pool, executor]


def measure_round(system: System, entry: dict[str, Any], args: argparse.Namespace) -> None:
    if system.serial:
        latencies: list[float] = []
        if (
            attempt(entry, "serial", functools.partial(serial_run, system, args.serial, latencies))
            is not None
        ):
            entry["p50"].append(percentile(latencies, 50))
            entry["p99"].append(percentile(latencies, 99))
    roles = {"client (this process)": [os.getpid()], **system.roles()}
    pids = [pid for group in roles.values() for pid in group]
    before = benchlib.process_counters(pids)
    wall = attempt(entry, "in flight", functools.partial(system.in_flight, args.requests, args.window))
    after = benchlib.process_counters(pids)
    if wall is not None:
        entry["rate"].append(args.requests / wall)
        for role, group in roles.items():
            entry["cpu"][role].append((*benchlib.counters_delta(before, after, group), wall))
    if args.chunksize > 0 and not isinstance(system, WorkerdSystem | BrokerSystem):
        batched = functools.partial(system.batched, args.requests, args.chunksize, args.window)
        seconds = attempt(entry, "batched", batched)
        if seconds is not None:
            entry["batched"].append(args.requests / seconds)


def perf_shares(pid: int, call: Callable[[], None]) -> dict[str, float]:
    """Share of CPU samples by shared object (libpython, kernel, libzmq...) of `pid` during `call`.

    `perf record` samples the process at 999 Hz; Python 3.11 has no perf trampoline, so the
    interpreter's time shows as libpython whatever Python code it runs.
    """
    data = Path(tempfile.mkdtemp(prefix="wbench-perf-")) / "perf.data"
    recorder = subprocess.Popen(
        ["perf", "record", "-q", "-F", "999", "-o", str(data), "-p", str(pid)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    time.sleep(0.5)  # perf attaches
    try:
        call()
    finally:
        recorder.send_signal(signal.SIGINT)
        recorder.wait()
    report = subprocess.run(
        ["perf", "report", "-i", str(data), "--sort", "dso", "--stdio", "-q"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout
    shutil.rmtree(data.parent, ignore_errors=True)
    shares = {}
    for line in report.splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0].endswith("%"):
            shares[parts[1]] = float(parts[0].rstrip("%")) / 100
    return shares


def profile_middles(systems: list[System], args: argparse.Namespace) -> dict[str, dict[str, float]]:
    """µs of the master's (or broker's) CPU per in-flight request, by shared object."""
    profiles = {}
    for system in systems:
        if not isinstance(system, WorkerdSystem | BrokerSystem):
            continue
        middle = system.roles()["master" if isinstance(system, WorkerdSystem) else "broker"][0]
        before = benchlib.process_counters([middle])
        shares = perf_shares(middle, functools.partial(system.in_flight, args.requests, args.window))
        cpu, _ = benchlib.counters_delta(before, benchlib.process_counters([middle]), [middle])
        profiles[system.name] = {dso: share * cpu / args.requests for dso, share in shares.items()}
    return profiles


def render_profiles(profiles: dict[str, dict[str, float]], args: argparse.Namespace) -> str:
    names = list(profiles)
    totals: collections.Counter[str] = collections.Counter()
    for figures in profiles.values():
        totals.update(figures)
    shown = [dso for dso, _ in totals.most_common(6)]
    rows = [[f"`{dso}`", *(f"{profiles[n].get(dso, 0.0) * 1e6:.1f}" for n in names)] for dso in shown]
    rows.append(
        ["other", *(f"{sum(v for d, v in profiles[n].items() if d not in shown) * 1e6:.1f}" for n in names)]
    )
    rows.append(["**all**", *(f"{sum(profiles[n].values()) * 1e6:.1f}" for n in names)])
    return (
        f"\n\nWhere the middle process's CPU goes (`perf record -F 999` on the workerd master and on the "
        f"broker during one extra in-flight run of {args.requests} requests, run while perf samples it; "
        "µs of CPU per request by shared object):\n\n"
        + table(["shared object", *(f"{n}: µs/request" for n in names)], rows)
    )


def run(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    systems = start_systems(args.workers)
    data = {s.name: new_entry(s.serial) for s in systems}
    try:
        for system in systems:  # warm up every path once
            entry = data[system.name]
            if system.serial:
                attempt(entry, "serial", functools.partial(serial_run, system, 200, []))
            attempt(entry, "in flight", functools.partial(system.in_flight, 2000, args.window))
        for round_number in range(args.rounds):
            shift = round_number % len(systems)
            for system in systems[shift:] + systems[:shift]:
                measure_round(system, data[system.name], args)
            print(f"round {round_number + 1}/{args.rounds} done")
        if args.perf:
            data["_profiles"] = profile_middles(systems, args)
    finally:
        for system in systems:
            system.close()
    return data


def rate_cell(entry: dict[str, Any], key: str, values: list[float], digits: int = 0) -> str:
    failures = [message for k, message in entry["errors"] if k == key]
    if failures:
        return f"**failed**: {failures[0][:160]}"
    return spread(values, digits)


def render(data: dict[str, dict[str, Any]], args: argparse.Namespace) -> str:
    profiles = data.pop("_profiles", None)
    broker_rates = data["bare pyzmq broker"]["rate"]
    broker = statistics.median(broker_rates) if broker_rates else float("nan")
    rows = []
    for name, entry in data.items():
        rate = statistics.median(entry["rate"]) if entry["rate"] else float("nan")
        if not entry["serial"]:
            p50, p99 = "(the same as above)", ""
        else:
            p50, p99 = rate_cell(entry, "serial", entry["p50"]), spread(entry["p99"], 0, 1e6)
            if entry["p50"]:
                p50 = spread(entry["p50"], 0, 1e6)
        rows.append(
            [
                name,
                p50,
                p99,
                rate_cell(entry, "in flight", entry["rate"]),
                f"{rate / broker:.2f}x" if entry["rate"] else "-",
            ]
        )
    cpu_rows = []
    for name, entry in data.items():
        samples_by_role = entry["cpu"]
        if not samples_by_role:
            continue
        runs = len(entry["rate"])
        for role, samples in samples_by_role.items():
            cpu_rows.append(
                [
                    name,
                    role,
                    spread([cpu for cpu, _, _ in samples], 2),
                    spread([cpu / wall for cpu, _, wall in samples], 0, 100),
                    spread([cpu / args.requests for cpu, _, _ in samples], 1, 1e6),
                    spread([switches / args.requests for _, switches, _ in samples], 2),
                ]
            )
        totals = [sum(samples_by_role[role][i][0] for role in samples_by_role) for i in range(runs)]
        walls = [samples_by_role["client (this process)"][i][2] for i in range(runs)]
        cpu_rows.append(
            [
                name,
                "**all**",
                spread(totals, 2),
                spread([t / w for t, w in zip(totals, walls, strict=True)], 0, 100),
                spread([t / args.requests for t in totals], 1, 1e6),
                "",
            ]
        )
    text = (
        f"{args.workers} worker processes each; echo of a {len(msgpack.packb(PAYLOAD))}-byte msgpack dict; "
        f"{args.rounds} rounds; serial: {args.serial} requests per round; in flight: {args.requests} "
        f"requests per round with {args.window} in flight. Figures: median (min-max) over rounds.\n\n"
        + table(
            [
                "system",
                "serial p50 µs",
                "serial p99 µs",
                f"in flight ({args.window}) req/s",
                "vs bare broker",
            ],
            rows,
        )
        + "\n\nGoals: workerd >= 0.8x the bare broker, ahead of ProcessPoolExecutor, serial p99 < 1 ms.\n\n"
        "CPU time and context switches during the in-flight runs (user+sys, all threads; % of one "
        "core over the run's wall time, 2 cores = 200 %):\n\n"
        + table(
            [
                "system",
                "process",
                "CPU s per run",
                "% of a core",
                "CPU µs per request",
                "ctx switches per request",
            ],
            cpu_rows,
        )
    )
    if args.chunksize > 0:
        batch_rows = [
            [name, rate_cell(entry, "batched", entry["batched"])]
            for name, entry in data.items()
            if entry["batched"] or any(k == "batched" for k, _ in entry["errors"])
        ]
        text += (
            f"\n\nBatched: {args.requests} calls, {args.chunksize} calls per message "
            f"(workerd: imap_unordered(window={args.window}, chunksize={args.chunksize}); Pool.imap_unordered"
            f"(chunksize={args.chunksize}); ProcessPoolExecutor.map(chunksize={args.chunksize})):\n\n"
            + table(["system", "calls/s"], batch_rows)
        )
    if profiles:
        text += render_profiles(profiles, args)
    return text


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--serial", type=int, default=1000, help="serial requests per round")
    parser.add_argument("--requests", type=int, default=10000, help="in-flight requests per round")
    parser.add_argument("--window", type=int, default=64, help="requests in flight")
    parser.add_argument("--chunksize", type=int, default=16, help="calls per message when batched; 0: skip")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument(
        "--perf", action="store_true", help="also profile the master and the broker with `perf record`"
    )
    parser.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md alone")
    args = parser.parse_args()
    if args.perf and shutil.which("perf") is None:
        parser.error("--perf needs the `perf` tool on PATH")
    benchlib.report("throughput", render(run(args), args), write=not args.no_write)


if __name__ == "__main__":
    main()
