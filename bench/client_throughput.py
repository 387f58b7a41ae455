"""Many trivial calls: workerctl imap_unordered (chunked) vs multiprocessing.Pool.imap_unordered.

    .venv/bin/python bench/client_throughput.py [--rounds 3] [--workers 2] [--window 32]
                                                [--calls 1:20000,16:200000,100:1000000] [--no-write]

The task is `workerd.examples.tasks:echo` (returns its one argument); the inputs are range(n).
At each chunksize K both sides send K calls per message: workerd's Client.imap_unordered(window=
--window, chunksize=K) against a real daemon with --workers workers, and Pool(--workers)
.imap_unordered(echo, range(n), chunksize=K). The AsyncClient's imap_unordered runs too. Both
systems stay alive for the whole run; each round measures every variant in turn (the order
rotates), so they see the same machine. Calls/s = n / wall time of consuming every result.

While the workerd variants run, the CPU time of the client, the master and the workers is read
(psutil), to say where each call's time goes.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import multiprocessing
import os
import statistics
import time
from collections.abc import Callable
from typing import Any

import psutil

import benchlib
from benchlib import table
from workerctl import AsyncClient, Client
from workerd.examples.tasks import echo

ECHO = "workerd.examples.tasks:echo"
CLIENT = "workerctl Client.imap_unordered"
ASYNC = "workerctl AsyncClient.imap_unordered"
POOL = "multiprocessing Pool.imap_unordered"


def cpu_seconds(pids: list[int]) -> dict[int, float]:
    """user+system CPU seconds of each process (its threads included: libzmq's I/O thread)."""
    seconds = {}
    for pid in pids:
        try:
            times = psutil.Process(pid).cpu_times()
        except psutil.Error:
            continue
        seconds[pid] = times.user + times.system
    return seconds


def parse_calls(text: str) -> list[tuple[int, int]]:
    pairs = []
    for part in text.split(","):
        chunksize, count = part.split(":")
        pairs.append((int(chunksize), int(count)))
    return pairs


def run_client(client: Client, chunksize: int, count: int, window: int) -> float:
    started = time.perf_counter()
    done = sum(1 for _ in client.imap_unordered(ECHO, range(count), window=window, chunksize=chunksize))
    assert done == count
    return count / (time.perf_counter() - started)


def run_async(socket_path: str, chunksize: int, count: int, window: int) -> float:
    async def go() -> float:
        async with AsyncClient(socket_path, timeout=120) as client:
            started = time.perf_counter()
            done = 0
            async for _ in client.imap_unordered(ECHO, range(count), window=window, chunksize=chunksize):
                done += 1
            assert done == count
            return count / (time.perf_counter() - started)

    return asyncio.run(go())


def run_pool(pool: Any, chunksize: int, count: int) -> float:
    started = time.perf_counter()
    done = sum(1 for _ in pool.imap_unordered(echo, range(count), chunksize=chunksize))
    assert done == count
    return count / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--window", type=int, default=32)
    parser.add_argument("--calls", type=parse_calls, default=parse_calls("1:20000,16:200000,100:1000000"))
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()

    rates: dict[tuple[str, int], list[float]] = {}
    cpu: dict[int, dict[str, list[float]]] = {}
    with benchlib.Daemon(workers=args.workers) as daemon, multiprocessing.Pool(args.workers) as pool:
        daemon.wait_ready()
        pids = {"master": [daemon.pid], "workers": daemon.worker_pids(), "client": [os.getpid()]}
        with daemon.client(timeout=120) as client:
            run_client(client, 16, 10_000, args.window)  # warm up: connections, imports, caches
            run_pool(pool, 16, 10_000)
            for round_no in range(args.rounds):
                for chunksize, count in args.calls:
                    variants: list[tuple[str, Callable[[], float]]] = [
                        (CLIENT, functools.partial(run_client, client, chunksize, count, args.window)),
                        (ASYNC, functools.partial(run_async, daemon.socket, chunksize, count, args.window)),
                        (POOL, functools.partial(run_pool, pool, chunksize, count)),
                    ]
                    shift = round_no % len(variants)
                    for label, variant in variants[shift:] + variants[:shift]:
                        watched = [p for group in pids.values() for p in group]
                        before = cpu_seconds(watched)
                        rate = variant()
                        after = cpu_seconds(watched)
                        rates.setdefault((label, chunksize), []).append(rate)
                        if label == CLIENT:
                            per_call = cpu.setdefault(chunksize, {})
                            for group, members in pids.items():
                                spent = sum(after.get(p, 0.0) - before.get(p, 0.0) for p in members)
                                micros = spent / count * 1e6
                                per_call.setdefault(group, []).append(micros)
                        print(
                            f"round {round_no + 1} chunksize {chunksize}: {label}: {rate:,.0f} calls/s",
                            flush=True,
                        )

    labels = [
        "workerctl Client.imap_unordered",
        "workerctl AsyncClient.imap_unordered",
        "multiprocessing Pool.imap_unordered",
    ]
    rows = []
    for chunksize, count in args.calls:
        pool_rate = statistics.median(rates[(labels[2], chunksize)])
        for label in labels:
            values = rates[(label, chunksize)]
            rows.append(
                [
                    chunksize,
                    f"{count:,}",
                    label,
                    benchlib.spread(values),
                    benchlib.ratio(statistics.median(values), pool_rate),
                ]
            )
    body = (
        f"### Trivial calls (echo), {args.workers} workers each, window {args.window}, "
        f"{args.rounds} rounds interleaved; calls/s median (min-max)\n\n"
        + table(["chunksize", "calls", "variant", "calls/s", "vs Pool"], rows)
        + "\n\nCPU time per call of the sync client run (µs, median over rounds):\n\n"
        + table(
            ["chunksize", "client", "master", "workers (all)"],
            [
                [k, *(f"{statistics.median(cpu[k][g]):.2f}" for g in ("client", "master", "workers"))]
                for k, _ in args.calls
            ],
        )
    )
    benchlib.report("client_throughput", body, write=not args.no_write)


if __name__ == "__main__":
    main()
