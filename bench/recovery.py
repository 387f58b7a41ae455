"""Recovery: SIGKILL of a busy worker -> WORKER_LOST and a full pool; task timeout -> TIMEOUT.

    .venv/bin/python bench/recovery.py [--kills 10] [--timeouts 10] [--timeout-s 0.5]
                                       [--heap-mb 0,300] [--no-write]

For each zygote heap size in --heap-mb (0: the bundled examples only; N: bench/heavy_heap.py
preloaded with ~N MB of small objects, so each respawn forks a big, frozen zygote), one daemon
with 2 workers:

  kills:    run `workerd.examples.tasks:sleep` (30 s), wait until status shows its worker busy
            and 50 ms more, SIGKILL that worker, then time
              - kill -> WORKER_LOST reply at the client,
              - kill -> the replacement's pid first appears in status (forked),
              - kill -> status shows the pool full again with every worker idle
            (status is polled every millisecond on a second connection);
  timeouts: run sleep(10) with timeout_s = --timeout-s and time send -> TIMEOUT reply; what
            exceeds timeout_s is the overhead (dispatch + the daemon's stack-dump grace + reply),
            then kill... -> full pool again, and whether the reply carried the worker's stack.
"""

from __future__ import annotations

import argparse
import os
import signal
import time
from typing import Any

import benchlib
from benchlib import spread, table
from workerctl import Client, errors

SLEEP = "workerd.examples.tasks:sleep"


def pool_state(control: Client) -> tuple[dict[str, list[int]], int]:
    pool = control.status()["pool"]
    states: dict[str, list[int]] = {}
    for worker in pool["workers"]:
        states.setdefault(worker["state"], []).append(worker["pid"])
    return states, pool["target"]


def wait_full(control: Client, gone: int | None, timeout: float = 30.0) -> tuple[float, float | None]:
    """Poll status every ms until every worker is idle, the pool is full and `gone` has left it.

    Returns (time the pool was full, time a pid not seen before first appeared or None).
    """
    deadline = time.perf_counter() + timeout
    _, target = pool_state(control)
    seen: set[int] | None = None
    first_new: float | None = None
    while True:
        states, target = pool_state(control)
        now = time.perf_counter()
        pids = {pid for group in states.values() for pid in group}
        if seen is None:
            seen = pids
        elif first_new is None and pids - seen:
            first_new = now
        if len(states.get("idle", [])) == target == len(pids) and gone not in pids:
            return now, first_new
        if now > deadline:
            raise RuntimeError(f"pool not full again within {timeout} s: {states}")
        time.sleep(0.001)


def wait_busy(control: Client, timeout: float = 10.0) -> int:
    deadline = time.perf_counter() + timeout
    while True:
        states, _ = pool_state(control)
        if states.get("busy"):
            return states["busy"][0]
        if time.perf_counter() > deadline:
            raise RuntimeError("no worker became busy")
        time.sleep(0.001)


def kill_runs(daemon: benchlib.Daemon, kills: int) -> dict[str, list[float]]:
    results: dict[str, list[float]] = {"lost": [], "forked": [], "full": []}
    with daemon.client(timeout=60) as client, daemon.client(timeout=10) as control:
        for _ in range(kills):
            wait_full(control, None)
            request = client.send("execute", name=SLEEP, args=[], kwargs={"seconds": 30.0})
            pid = wait_busy(control)
            time.sleep(0.05)  # let it get into time.sleep()
            killed_at = time.perf_counter()
            os.kill(pid, signal.SIGKILL)
            try:
                client.wait_result(request, timeout=30)
            except errors.WorkerLost:
                results["lost"].append(time.perf_counter() - killed_at)
            else:
                raise RuntimeError("the killed task returned a result")
            full_at, forked_at = wait_full(control, pid)
            results["full"].append(full_at - killed_at)
            if forked_at is not None:
                results["forked"].append(forked_at - killed_at)
    return results


def timeout_runs(daemon: benchlib.Daemon, runs: int, timeout_s: float) -> dict[str, list[float]]:
    results: dict[str, list[float]] = {"reply": [], "over": [], "full": [], "stack": []}
    with daemon.client(timeout=60) as client, daemon.client(timeout=10) as control:
        for _ in range(runs):
            wait_full(control, None)
            sent_at = time.perf_counter()
            try:
                client.call(SLEEP, [], {"seconds": 10.0}, timeout_s=timeout_s)
            except errors.TaskTimeout as exc:
                replied_at = time.perf_counter()
                results["reply"].append(replied_at - sent_at)
                results["over"].append(replied_at - sent_at - timeout_s)
                results["stack"].append(1.0 if "sleep" in str(exc.details.get("traceback", "")) else 0.0)
                pid = exc.details.get("pid")
            else:
                raise RuntimeError("the task did not time out")
            full_at, _ = wait_full(control, pid)
            results["full"].append(full_at - replied_at)
    return results


def measure(heap_mb: int, args: argparse.Namespace) -> dict[str, Any]:
    if heap_mb:
        daemon = benchlib.Daemon(
            workers=args.workers,
            modules=["workerd.examples.tasks", "heavy_heap"],
            preload=["heavy_heap"],
            extra_pythonpath=[benchlib.BENCH_DIR],
            env={"HEAVY_HEAP_MB": str(heap_mb)},
        )
    else:
        daemon = benchlib.Daemon(workers=args.workers)
    with daemon:
        daemon.wait_ready(timeout=180)
        return {
            "kills": kill_runs(daemon, args.kills),
            "timeouts": timeout_runs(daemon, args.timeouts, args.timeout_s),
        }


def render(results: dict[int, dict[str, Any]], args: argparse.Namespace) -> str:
    ms = 1e3
    kill_rows = []
    timeout_rows = []
    for heap_mb, result in results.items():
        label = "examples only" if not heap_mb else f"+ {heap_mb} MB preloaded heap"
        kills, timeouts = result["kills"], result["timeouts"]
        kill_rows.append(
            [
                label,
                len(kills["lost"]),
                spread(kills["lost"], 2, ms),
                spread(kills["forked"], 1, ms),
                spread(kills["full"], 1, ms),
            ]
        )
        timeout_rows.append(
            [
                label,
                len(timeouts["reply"]),
                spread(timeouts["reply"], 1, ms),
                spread(timeouts["over"], 1, ms),
                spread(timeouts["full"], 1, ms),
                f"{sum(timeouts['stack']):.0f}/{len(timeouts['stack'])}",
            ]
        )
    return (
        f"{args.workers} workers; figures: median (min-max) over the runs; milliseconds.\n\n"
        "SIGKILL of a worker busy with `sleep(30)`:\n\n"
        + table(
            [
                "zygote",
                "kills",
                "kill -> WORKER_LOST ms",
                "kill -> replacement forked ms",
                "kill -> pool full ms",
            ],
            kill_rows,
        )
        + f"\n\nTask timeout (`sleep(10)` with timeout_s = {args.timeout_s:g}):\n\n"
        + table(
            [
                "zygote",
                "runs",
                "send -> TIMEOUT ms",
                "beyond timeout_s ms",
                "TIMEOUT -> pool full ms",
                "stack in reply",
            ],
            timeout_rows,
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--kills", type=int, default=10)
    parser.add_argument("--timeouts", type=int, default=10)
    parser.add_argument("--timeout-s", type=float, default=0.5)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--heap-mb", default="0,300", help="comma-separated zygote heap sizes")
    parser.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md alone")
    args = parser.parse_args()
    results = {}
    for heap_mb in (int(x) for x in args.heap_mb.split(",")):
        started = time.monotonic()
        results[heap_mb] = measure(heap_mb, args)
        print(f"heap {heap_mb} MB: {time.monotonic() - started:.1f} s")
    benchlib.report("recovery", render(results, args), write=not args.no_write)


if __name__ == "__main__":
    main()
