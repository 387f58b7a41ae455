"""Memory of many trivial calls: Client.imap_unordered and `workerctl run --batch`, 10k to 1M calls.

    .venv/bin/python bench/batch_memory.py [--sizes 10000,100000,1000000] [--chunksizes 100,1]
                                           [--max-unchunked 100000] [--window 32] [--workers 2]
                                           [--no-write]

For each size and each way of sending, a fresh daemon (so its peak figures are its own) and a
fresh client process run `workerd.examples.tasks:echo` once per input:

  * imap_unordered: `for r in Client.imap_unordered(echo, range(n), window, chunksize)` in a
    child process that consumes and drops each result;
  * workerctl run --batch: an input file of n lines `[i]`, results appended to an output file
    (checked afterwards: n lines, each input once).

Peak RSS of the client is the child's ru_maxrss (wait4); the daemon's is VmHWM of the master and
of its workers (/proc/PID/status) after the run, against their RSS before it. Flat means: the
same peak at 1M calls as at 10k. Chunksize 1 (one message per call, about 20x slower here) runs
only up to --max-unchunked calls.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import benchlib
from benchlib import table

ECHO = "workerd.examples.tasks:echo"

IMAP_SCRIPT = f"""
import sys
from workerctl import Client
socket_path, n, window, chunksize = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
done = 0
with Client(socket_path, timeout=120) as client:
    for _ in client.imap_unordered("{ECHO}", range(n), window=window, chunksize=chunksize):
        done += 1
assert done == n, done
"""


def status_kib(pid: int, key: str) -> int:
    with open(f"/proc/{pid}/status", encoding="ascii") as handle:
        for line in handle:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


def run_child(command: list[str]) -> tuple[float, int]:
    """Wall seconds and peak RSS (KiB) of a child process; fails loudly if the child fails."""
    started = time.perf_counter()
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    elapsed = time.perf_counter() - started
    stderr = proc.stderr.read().decode() if proc.stderr else ""
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"{command[:4]} exited {proc.returncode}:\n{stderr}")
    return elapsed, usage.ru_maxrss


def write_input(path: Path, n: int) -> None:
    with open(path, "w") as handle:
        for start in range(0, n, 10_000):
            handle.write("".join(f"[{i}]\n" for i in range(start, min(start + 10_000, n))))


def check_output(path: Path, n: int) -> None:
    lines = 0
    seen = bytearray(n + 1)
    with open(path, "rb") as handle:
        for raw in handle:
            record = json.loads(raw)
            assert "result" in record and not seen[record["line"]], record
            seen[record["line"]] = 1
            lines += 1
    assert lines == n, (lines, n)


def measure(mode: str, n: int, chunksize: int, args: argparse.Namespace, scratch: Path) -> dict[str, float]:
    with benchlib.Daemon(workers=args.workers) as daemon:
        daemon.wait_ready()
        workers = daemon.worker_pids()
        before = {pid: status_kib(pid, "VmRSS") for pid in [daemon.pid, *workers]}
        if mode == "imap_unordered":
            command = [
                sys.executable,
                "-c",
                IMAP_SCRIPT,
                daemon.socket,
                str(n),
                str(args.window),
                str(chunksize),
            ]
        else:
            source, out = scratch / f"in-{n}.jsonl", scratch / f"out-{n}.jsonl"
            if not source.exists():
                write_input(source, n)
            out.unlink(missing_ok=True)
            command = [
                str(benchlib.VENV_BIN / "workerctl"),
                "--socket",
                daemon.socket,
                "run",
                ECHO,
                "--batch",
                str(source),
                "--output",
                str(out),
                "--window",
                str(args.window),
                "--chunksize",
                str(chunksize),
            ]
        seconds, client_kib = run_child(command)
        if mode != "imap_unordered":
            check_output(out, n)
            out.unlink()
        master_peak = status_kib(daemon.pid, "VmHWM")
        worker_peak = max(status_kib(pid, "VmHWM") for pid in workers)
        return {
            "seconds": seconds,
            "client_mib": client_kib / 1024,
            "master_before_mib": before[daemon.pid] / 1024,
            "master_peak_mib": master_peak / 1024,
            "worker_before_mib": max(before[pid] for pid in workers) / 1024,
            "worker_peak_mib": worker_peak / 1024,
        }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", default="10000,100000,1000000")
    parser.add_argument("--chunksizes", default="100,1")
    parser.add_argument("--max-unchunked", type=int, default=100_000)
    parser.add_argument("--window", type=int, default=32)
    parser.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--modes", default="imap_unordered,run --batch")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    rows = []
    csv_rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="wbench-batch-") as scratch:
        for chunksize in [int(c) for c in args.chunksizes.split(",")]:
            for mode in args.modes.split(","):
                first: dict[str, float] | None = None
                for n in sizes:
                    if chunksize == 1 and n > args.max_unchunked:
                        continue
                    figures = measure(mode, n, chunksize, args, Path(scratch))
                    first = first or figures
                    print(mode, chunksize, n, {k: round(v, 1) for k, v in figures.items()}, flush=True)
                    csv_rows.append({"how": mode, "chunksize": chunksize, "calls": n, **figures})
                    rows.append(
                        [
                            mode,
                            chunksize,
                            f"{n:,}",
                            f"{figures['seconds']:.1f}",
                            f"{n / figures['seconds']:,.0f}",
                            f"{figures['client_mib']:.1f}",
                            f"{figures['client_mib'] - first['client_mib']:+.1f}",
                            f"{figures['master_before_mib']:.1f} → {figures['master_peak_mib']:.1f}",
                            f"{figures['master_peak_mib'] - first['master_peak_mib']:+.1f}",
                            f"{figures['worker_before_mib']:.1f} → {figures['worker_peak_mib']:.1f}",
                        ]
                    )
    body = (
        f"### Peak memory over many trivial calls (echo; window {args.window}, {args.workers} workers; "
        "a fresh daemon and client per row)\n\n"
        + table(
            [
                "how",
                "chunksize",
                "calls",
                "wall s",
                "calls/s",
                "client peak RSS MiB",
                f"vs {sizes[0]:,}",
                "master RSS → peak MiB",
                f"vs {sizes[0]:,}",
                "worker RSS → peak MiB (max)",
            ],
            rows,
        )
    )
    benchlib.write_csv("batch_memory", csv_rows)
    benchlib.report("batch_memory", body, write=not args.no_write)


if __name__ == "__main__":
    main()
