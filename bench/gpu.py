"""GPU worker: cold vs warm, daemon overhead, memory over 50 runs, recovery after a kill.

    .venv/bin/python bench/gpu.py [--model-mb N] [--runs 50]

Runs on CUDA when torch sees a device, else on the CPU (then say so next to the figures). The
cold baseline is what users do today: a fresh `python` that imports torch, loads the model and
runs it once. Prints Markdown tables; asserts nothing.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from workerctl import Client, errors

HERE = Path(__file__).resolve().parent

COLD_SCRIPT = """
import sys, time
started = time.monotonic()
import torch
sys.path.insert(0, {here!r})
import big_model
device = "cuda" if torch.cuda.is_available() else "cpu"
model = big_model.load(device)
big_model.run(model)
print(time.monotonic() - started)
"""


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def cold_process(env: dict[str, str]) -> float:
    started = time.monotonic()
    subprocess.run(
        [sys.executable, "-c", COLD_SCRIPT.format(here=str(HERE))],
        check=True,
        env=env,
        stdout=subprocess.DEVNULL,
    )
    return time.monotonic() - started


def start_daemon(directory: Path, env: dict[str, str]) -> tuple[subprocess.Popen[bytes], str]:
    socket = str(directory / "w.sock")
    config = directory / "workerd.toml"
    config.write_text(
        '[pool]\nworkers = 1\n[tasks]\nmodules = []\n[gpu]\nenabled = "true"\nstart = "boot"\n'
        f'[pipelines.big]\npath = "{HERE / "big_model.py"}"\n'
        f'[pipelines.noop]\npath = "{HERE / "noop_pipeline.py"}"\n'
    )
    log = open(directory / "workerd.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(
        [sys.executable, "-m", "workerd", "--socket", socket, "--config", str(config)],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            with Client(socket, timeout=1) as client:
                if client.status()["gpu"]["state"] == "idle":
                    return proc, socket
        except errors.WorkerdError:
            pass
        time.sleep(0.1)
    raise SystemExit("daemon did not start; see workerd.log")


def warm_runs(
    client: Client, runs: int, name: str = "big"
) -> tuple[list[float], list[float], list[tuple[int, int]]]:
    end_to_end, inside, memory = [], [], []
    for _ in range(runs):
        started = time.perf_counter()
        result = client.execute(name)
        end_to_end.append(time.perf_counter() - started)
        inside.append(result["run_s"])
        gpu = client.memory_status()["gpu"]
        memory.append((gpu["allocated_bytes"], gpu["reserved_bytes"]))
    return end_to_end, inside, memory


def recovery(client: Client) -> tuple[float, float]:
    """Seconds from SIGKILL of the GPU worker to the first successful run and to the first warm one."""
    os.kill(client.status()["gpu"]["pid"], signal.SIGKILL)
    killed = time.monotonic()
    first_ok = None
    while True:
        try:
            result = client.execute("big")
        except errors.WorkerdError:
            time.sleep(0.01)
            continue
        now = time.monotonic() - killed
        first_ok = first_ok if first_ok is not None else now
        if result["warm"]:
            return first_ok, now
        time.sleep(0.01)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model-mb", type=float, default=512)
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--cold-repeats", type=int, default=3)
    args = parser.parse_args()
    env = {**os.environ, "WORKERD_BENCH_MODEL_MB": str(args.model_mb)}
    import torch

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU (no CUDA device)"
    print(f"device: {device}; model {args.model_mb:g} MB bf16 weights; torch {torch.__version__}\n")
    colds = [cold_process(env) for _ in range(args.cold_repeats)]
    with tempfile.TemporaryDirectory(prefix="wdbench") as tmp:
        proc, socket = start_daemon(Path(tmp), env)
        try:
            with Client(socket, timeout=600) as client:
                started = time.monotonic()
                first = client.execute("big")
                daemon_cold = time.monotonic() - started
                end_to_end, inside, memory = warm_runs(client, args.runs)
                client.execute("noop")
                noop_total, noop_inside, _ = warm_runs(client, 200, "noop")
                first_ok, first_warm = recovery(client)
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(60)
    overhead = [(e - i) * 1000 for e, i in zip(end_to_end, inside, strict=True)]
    noop = [(e - i) * 1000 for e, i in zip(noop_total, noop_inside, strict=True)]
    print("| measure | median | min | max |\n|---|---|---|---|")
    print(
        f"| cold: fresh process (import torch, load, run), s | {statistics.median(colds):.2f} | "
        f"{min(colds):.2f} | {max(colds):.2f} |"
    )
    print(f"| daemon first run (load in a warm GPU worker), s | {daemon_cold:.2f} | | |")
    print(
        f"| daemon first run: load_s / run_s inside | {first['load_s']:.2f} / "
        f"{first['run_s'] * 1000:.1f} ms | | |"
    )
    print(
        f"| warm end-to-end, ms | {statistics.median(end_to_end) * 1000:.2f} | "
        f"{min(end_to_end) * 1000:.2f} | {max(end_to_end) * 1000:.2f} |"
    )
    print(
        f"| warm run inside the worker, ms | {statistics.median(inside) * 1000:.2f} | "
        f"{min(inside) * 1000:.2f} | {max(inside) * 1000:.2f} |"
    )
    print(
        f"| daemon overhead (end-to-end - inside), ms: p50 / p99 | {statistics.median(overhead):.3f} / "
        f"{percentile(overhead, 0.99):.3f} | {min(overhead):.3f} | {max(overhead):.3f} |"
    )
    print(
        f"| daemon overhead, no-op pipeline (200 runs), ms: p50 / p99 | {statistics.median(noop):.3f} / "
        f"{percentile(noop, 0.99):.3f} | {min(noop):.3f} | {max(noop):.3f} |"
    )
    print(f"| SIGKILL of GPU worker -> first successful run, s | {first_ok:.2f} | | |")
    print(f"| SIGKILL of GPU worker -> first warm run, s | {first_warm:.2f} | | |")
    allocated = {a for a, _ in memory}
    reserved = {r for _, r in memory}
    print(
        f"\nallocated after each of {args.runs} runs: {len(allocated)} distinct value(s), "
        f"{min(allocated) / 2**20:.1f}-{max(allocated) / 2**20:.1f} MiB; reserved: {len(reserved)} distinct, "
        f"{min(reserved) / 2**20:.1f}-{max(reserved) / 2**20:.1f} MiB"
    )


if __name__ == "__main__":
    main()
