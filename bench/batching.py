"""Dynamic batching: throughput at 64 requests in flight and latency at 1, against a fixed-delay
batcher shaped like TorchServe's (bench/fixed_delay.py).

One daemon serves the same MLP (tests/integration/mlp_pipeline.py: its batched forward is much
cheaper per input than one input at a time) as four pipelines, with max_batch 1, 8, 32 and 64
and no timer (max_wait_ms 0). Each round measures every configuration once, the baseline too,
in turn (interleaved, so a change in the machine's load hits all of them alike); the figures are
the median of the rounds, with their range. Nothing asserts: the script prints, and with
--write puts the table in RESULTS.md (section "Batching").

    .venv/bin/python bench/batching.py [--rounds 3] [--requests 1024] [--serial 200] [--write]

On CUDA the same script runs with --device cuda (bench/cuda_proof.sh).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
import tempfile
import time
from collections import deque
from pathlib import Path

from benchlib import ROOT, median, percentile, report, spread, table
from gpu import daemon
from workerctl import Client

MLP = ROOT / "tests" / "integration" / "mlp_pipeline.py"
SIZES = (1, 8, 32, 64)
WINDOW = 64
# The baselines: TorchServe's two knobs, batch_size as our largest, and max_batch_delay 10 ms
# (its default is 100 ms: 10 is kinder to it at low load). The same loop with no delay is our
# rule (take what waits when the worker is free) with the baseline's leaner path per request:
# it tells the batching rule apart from what the rest of each path costs.
BASELINE_BATCH = 64
BASELINES = {
    f"fixed delay (TorchServe-like: batch_size {BASELINE_BATCH}, max_batch_delay 10 ms)": 10,
    "the same loop with no delay (workerd's rule)": 0,
}


def start_baseline(
    stack: contextlib.ExitStack[None], directory: Path, delay_ms: int, device: str, env: dict[str, str]
) -> str:
    """Start bench/fixed_delay.py; its socket path."""
    socket = str(directory / f"baseline-{delay_ms}.sock")
    command = [sys.executable, str(Path(__file__).with_name("fixed_delay.py")), f"ipc://{socket}"]
    process = subprocess.Popen([*command, str(BASELINE_BATCH), str(delay_ms), str(MLP), device], env=env)
    stack.callback(process.wait, 10)
    stack.callback(process.terminate)
    return socket


def config(device: str) -> str:
    lines = ["[pool]", "workers = 1", "[tasks]", "modules = []", "[gpu]", 'enabled = "auto"']
    lines += [f'device = "{device}"', 'start = "boot"']
    for size in SIZES:
        lines += [f"[pipelines.mlp{size}]", f'path = "{MLP}"', f"max_batch = {size}"]
    return "\n".join(lines) + "\n"


def throughput(client: Client, name: str, total: int) -> float:
    """Requests per second with WINDOW in flight: a new one sent as each oldest one ends."""
    started = time.perf_counter()
    flying: deque[int] = deque()
    for seed in range(total):
        if len(flying) == WINDOW:
            client.wait_result(flying.popleft())
        flying.append(client.send("execute", name=name, kwargs={"seed": seed}))
    while flying:
        client.wait_result(flying.popleft())
    return total / (time.perf_counter() - started)


def latencies(client: Client, name: str, count: int) -> list[float]:
    """Seconds per request, one in flight."""
    samples = []
    for seed in range(count):
        started = time.perf_counter()
        client.execute(name, seed=seed)
        samples.append(time.perf_counter() - started)
    return samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--requests", type=int, default=1024, help="per throughput measurement")
    parser.add_argument("--serial", type=int, default=200, help="requests per latency measurement")
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--torch-threads", type=int, default=0, help="OMP_NUM_THREADS for the daemon and the baseline"
    )
    parser.add_argument("--write", action="store_true", help="put the table in bench/RESULTS.md")
    args = parser.parse_args()
    print(f"load average at start: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    env = dict(os.environ)
    if args.torch_threads:
        env["OMP_NUM_THREADS"] = str(args.torch_threads)
    directory = Path(tempfile.mkdtemp(prefix="wbench-batching-"))
    names = [f"mlp{size}" for size in SIZES]
    rates: dict[str, list[float]] = {name: [] for name in [*names, *BASELINES]}
    p50: dict[str, list[float]] = {name: [] for name in rates}
    p99: dict[str, list[float]] = {name: [] for name in rates}
    with contextlib.ExitStack() as stack:
        # The baselines first: they are up by the time the daemon is.
        device = args.device
        sockets = {name: start_baseline(stack, directory, ms, device, env) for name, ms in BASELINES.items()}
        ours = stack.enter_context(daemon(directory / "daemon", config(args.device), env))
        clients = dict.fromkeys(names, ours)
        for name, socket in sockets.items():
            clients[name] = stack.enter_context(Client(socket, timeout=600))
        for name, client in clients.items():  # loaded, and torch's threads warm, before timing
            throughput(client, name, WINDOW * 2)
        for round_ in range(args.rounds):
            for name, client in clients.items():
                rates[name].append(throughput(client, name, args.requests))
                samples = latencies(client, name, args.serial)
                p50[name].append(percentile(samples, 50))
                p99[name].append(percentile(samples, 99))
            print(f"round {round_ + 1}: " + ", ".join(f"{n} {rates[n][-1]:,.0f}/s" for n in rates))
    first = median(rates["mlp1"])
    rows = []
    for name in rates:
        label = f"workerd, max_batch {name[3:]}" if name in names else name
        rows.append([
            label,
            spread(rates[name]),
            f"{median(rates[name]) / first:.1f}x",
            spread(p50[name], 2, 1000),
            spread(p99[name], 2, 1000),
        ])  # fmt: skip
    headers = [
        f"{args.device}, MLP 256-1024-1024-16",
        f"requests/s at {WINDOW} in flight",
        "vs max_batch 1",
        "p50 ms at 1 in flight",
        "p99 ms at 1 in flight",
    ]
    load = " ".join(f"{v:.2f}" for v in os.getloadavg())
    body = (
        f"Median of {args.rounds} interleaved rounds (range in brackets); {args.requests} requests per "
        f"throughput figure, {args.serial} per latency figure. Load average at the end: {load}.\n\n"
        + table(headers, rows)
    )
    threads = f", OMP_NUM_THREADS={args.torch_threads}" if args.torch_threads else ""
    report(f"Batching ({args.device}{threads})", body, write=args.write, script="batching")


if __name__ == "__main__":
    main()
