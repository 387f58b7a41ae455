"""The whole benchmark suite in one command: workerd and its peers, measured in the same run.

    .venv/bin/python bench/suite.py [--quick] [--skip NAME,...] [--no-write]

Runs, one after the other (never in parallel: they would measure each other):

  1. environment: CPU model, cores, memory, Python, pyzmq/libzmq, msgpack, torch and CUDA, redis
     and celery, the worker counts and gc_freeze settings of every section;
  2. serial: ping and a trivial execute through workerctl.Client, one at a time, p50/p95/p99;
  3. sweep.py: c in {1, 16, 64, 256} concurrent requests for a fixed time, a trivial task and a
     50 ms sleep, on workerd, multiprocessing.Pool, ProcessPoolExecutor, a subprocess per call and
     Celery's prefork pool with a real redis-server (sweep.py installs and starts it itself);
  4. cow.py: copy-on-write growth of forked workers with gc_freeze on and off;
  5. batch_memory.py: client and master memory at 10k / 100k / 1M calls;
  6. gpu.py: cold vs warm pipeline runs of a multi-GB model, only when CUDA is present (its table
     names the device).

Each part writes its own section of bench/RESULTS.md and its rows to bench/out/NAME.csv; this
script writes the environment, serial and headline sections and merges every CSV into
bench/results.csv (one row per measurement, a `section` column first). Nothing asserts a timing.
A part that fails is reported as failed in the headline section, and the rest still runs.
`--quick` shortens every part and writes nothing but bench/out/ (it checks the suite itself; its
figures mean nothing).
"""

from __future__ import annotations

import argparse
import csv
import importlib.metadata
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import benchlib
from benchlib import percentile, spread, table

ECHO = "workerd.examples.tasks:echo"
CORES = len(os.sched_getaffinity(0))
SLEEP_WORKERS = 16
COW_WORKERS = 4

# Each part: (name, arguments for the full run, arguments for --quick).
PARTS: list[tuple[str, list[str], list[str]]] = [
    ("sweep", [], ["--duration", "1", "--warmup", "0.5", "--runs", "1", "--concurrency", "1,16"]),
    ("cow", [], ["--rounds", "1", "--heap-mb", "50"]),
    ("batch_memory", [], ["--sizes", "10000,100000", "--chunksizes", "100"]),
]


# -- environment -----------------------------------------------------------------------------------


def version_of(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def torch_description() -> tuple[str, bool]:
    """torch's version and device, and whether CUDA is there (asked in a child: importing torch
    and initialising CUDA here would weigh on every later measurement of this process)."""
    code = (
        "import torch; c = torch.cuda.is_available(); "
        "print(torch.__version__, '|', torch.cuda.get_device_name(0) if c else 'no CUDA device', '|', c)"
    )
    try:
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
        version, device, cuda = (part.strip() for part in out.stdout.split("|"))
    except (OSError, ValueError, subprocess.TimeoutExpired):
        return "not importable", False
    return f"{version} ({device})", cuda == "True"


def redis_version() -> str:
    server = shutil.which("redis-server")
    if server is None:
        return "redis-server not installed (sweep.py installs it)"
    out = subprocess.run([server, "--version"], capture_output=True, text=True)
    return out.stdout.strip().split(" sha=")[0]


def environment(torch_text: str, quick: bool) -> str:
    rows = [
        ["machine", benchlib.environment()],
        ["torch", torch_text],
        ["celery / redis-py", f"{version_of('celery')} / {version_of('redis')}"],
        ["redis server", redis_version()],
        ["serial section", "workerd with 2 workers, gc_freeze = true"],
        ["sweep, trivial task", f"every system with {CORES} workers (= cores); workerd gc_freeze = true"],
        ["sweep, 50 ms sleep", f"every system with {SLEEP_WORKERS} workers; workerd gc_freeze = true"],
        ["cow", f"{COW_WORKERS} workers, ~300 MB preloaded heap, gc_freeze = true vs false"],
        ["batch_memory", f"{CORES} workers, gc_freeze = true"],
        ["mode", "--quick (a check of the suite, not figures)" if quick else "full"],
    ]
    return table(["", ""], rows)


# -- serial latency --------------------------------------------------------------------------------


def serial(rounds: int, count: int) -> tuple[str, list[dict[str, Any]]]:
    """ping and a trivial execute, one at a time, through one workerctl.Client."""
    figures: dict[str, list[list[float]]] = {"ping": [], "execute echo": []}
    with benchlib.Daemon(workers=2) as daemon:
        daemon.wait_ready()
        with daemon.client() as client:
            calls = {"ping": client.ping, "execute echo": lambda: client.execute(ECHO, {"n": 1})}
            for call in calls.values():
                benchlib.timed(call, 200)  # warm-up
            for _ in range(rounds):
                for name, call in calls.items():
                    figures[name].append(benchlib.timed(call, count))
    rows, csv_rows = [], []
    for name, runs in figures.items():
        quantiles = {q: [percentile(samples, q) for samples in runs] for q in (50, 95, 99)}
        rows.append([name, *(spread(quantiles[q], 0, 1e6) for q in (50, 95, 99))])
        for number, samples in enumerate(runs):
            csv_rows.append(
                {"request": name, "round": number + 1, "count": len(samples)}
                | {f"p{q}_us": round(percentile(samples, q) * 1e6, 1) for q in (50, 95, 99)}
            )
    body = (
        f"### One request at a time through workerctl.Client ({rounds} rounds x {count} requests; "
        "median (min-max) over rounds of each round's percentile)\n\n"
        + table(["request", "p50 µs", "p95 µs", "p99 µs"], rows)
    )
    return body, csv_rows


# -- the parts and the headline --------------------------------------------------------------------


def run_part(name: str, arguments: list[str], write: bool) -> tuple[bool, float]:
    command = [sys.executable, str(benchlib.BENCH_DIR / f"{name}.py"), *arguments]
    if not write:
        command.append("--no-write")
    print(f"\n=== {name}: {' '.join(command[1:])}", flush=True)
    started = time.monotonic()
    done = subprocess.run(command, cwd=benchlib.ROOT)
    return done.returncode == 0, time.monotonic() - started


def run_gpu(write: bool) -> tuple[bool, float]:
    """gpu.py prints its table; this files it under its own section (CUDA machines only)."""
    print("\n=== gpu: bench/gpu.py --model-mb 6000", flush=True)
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, str(benchlib.BENCH_DIR / "gpu.py"), "--model-mb", "6000"],
        cwd=benchlib.ROOT,
        capture_output=True,
        text=True,
    )
    print(done.stdout, done.stderr, sep="\n")
    if done.returncode == 0:
        benchlib.report("gpu_cuda", done.stdout, write, script="suite")
    return done.returncode == 0, time.monotonic() - started


def headline() -> str:
    """workerd's requests/s against each peer's, per task and concurrency, from sweep.csv."""
    path = benchlib.BENCH_DIR / "out" / "sweep.csv"
    if not path.exists():
        return "(no sweep figures: the sweep did not run)"
    with open(path, encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    cells: dict[tuple[str, int, str], list[float]] = {}
    for row in rows:
        if row.get("rps") not in (None, ""):
            key = (row["task"], int(row["concurrency"]), row["system"])
            cells.setdefault(key, []).append(float(row["rps"]))
    systems = sorted({system for _, _, system in cells}, key=lambda s: (not s.startswith("workerd"), s))
    lines = []
    for task in sorted({task for task, _, _ in cells}):
        body = []
        for concurrency in sorted({c for t, c, _ in cells if t == task}):
            body.append([concurrency, *(spread(cells.get((task, concurrency, s), []), 0) for s in systems)])
        lines += [
            f"#### {task}: requests/s, median (min-max) over runs",
            "",
            table(["c", *systems], body),
            "",
        ]
    return "\n".join(lines)


def merge_csvs(names: list[str], target: Path) -> Path:
    """Every part's rows in one CSV, a `section` column first, columns united."""
    rows: list[dict[str, Any]] = []
    columns: dict[str, None] = {"section": None}
    for name in names:
        path = benchlib.BENCH_DIR / "out" / f"{name}.csv"
        if not path.exists():
            continue
        with open(path, encoding="utf-8") as handle:
            for row in csv.DictReader(handle):
                row = {"section": name, **{k: v for k, v in row.items() if k != "section"}}
                columns.update(dict.fromkeys(row))
                rows.append(row)
    with open(target, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(columns))
        writer.writeheader()
        writer.writerows(rows)
    return target


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--quick", action="store_true", help="shorten every part; print only (checks the suite)"
    )
    parser.add_argument("--skip", default="", help="comma-separated parts to leave out (sweep, cow, ...)")
    parser.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md alone")
    args = parser.parse_args()
    # --quick figures mean nothing: they never replace the real ones in RESULTS.md or results.csv.
    write, skip = not (args.no_write or args.quick), set(filter(None, args.skip.split(",")))
    unknown = skip - {"serial", "gpu", *(name for name, _, _ in PARTS)}
    if unknown:
        parser.error(
            f"--skip: no part named {', '.join(sorted(unknown))} "
            "(parts: serial, sweep, cow, batch_memory, gpu)"
        )
    started = time.monotonic()
    torch_text, cuda = torch_description()
    benchlib.report("environment", environment(torch_text, args.quick), write, script="suite")

    outcomes: list[list[str]] = []
    if "serial" not in skip:
        begun = time.monotonic()
        body, rows = serial(rounds=2 if args.quick else 5, count=300 if args.quick else 2000)
        benchlib.write_csv("serial", rows)
        benchlib.report("serial", body, write, script="suite")
        outcomes.append(["serial", "ok", f"{time.monotonic() - begun:.0f}"])
    for name, full, quick in PARTS:
        if name in skip:
            continue
        ok, seconds = run_part(name, quick if args.quick else full, write)
        outcomes.append([name, "ok" if ok else "**failed** (its output above says why)", f"{seconds:.0f}"])
    if cuda and "gpu" not in skip:
        ok, seconds = run_gpu(write)
        outcomes.append(["gpu (CUDA)", "ok" if ok else "**failed**", f"{seconds:.0f}"])
    else:
        outcomes.append(["gpu (CUDA)", "skipped: no CUDA device" if not cuda else "skipped", "0"])

    target = benchlib.BENCH_DIR / ("results.csv" if write else "out/results.csv")
    merged = merge_csvs(["serial", *(name for name, _, _ in PARTS)], target)
    summary = (
        headline() + f"\n\n#### Parts of this run (whole suite: {(time.monotonic() - started) / 60:.1f} min; "
        f"every row in {merged.relative_to(benchlib.ROOT)})\n\n"
        + table(["part", "outcome", "seconds"], outcomes)
    )
    benchlib.report("suite", summary, write, script="suite")


if __name__ == "__main__":
    main()
