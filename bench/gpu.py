"""GPU worker: cold vs warm, the host-memory tier, daemon overhead, memory over runs, recovery.

    .venv/bin/python bench/gpu.py [--model-mb N] [--runs 50] [--alternations 10] [--parts warm,tiers]

Runs on CUDA when torch sees a device, else on the CPU; every table is headed by the device, and
a CPU run says what it cannot show. The model's weights are written once to a file in a
temporary directory, and every load reads them from there (from the page cache, as a model read
once before would be) and copies them to the device: a cold load is a real one, minus the
framework's own start-up. Prints Markdown tables; asserts nothing.

Parts:
  warm   a fresh process per run (import torch, load, run) against the daemon's first run and
         its warm runs; the daemon's own overhead on a warm run and on a no-op pipeline; memory
         after each of --runs runs; SIGKILL of the GPU worker to the first run and first warm run.
  tiers  with a device budget that holds one model: cold load vs wake from host memory vs warm
         run (and the wake's bytes per second against a measured pinned host-to-device copy);
         two models alternating --alternations times with the host tier against without it.
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
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from workerctl import Client, errors

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import big_model  # noqa: E402 (a file beside this one)

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

MODEL = f'[pipelines.big]\npath = "{HERE / "big_model.py"}"\n'
CONFIG = '[pool]\nworkers = 1\n[tasks]\nmodules = []\n[gpu]\nenabled = "true"\nstart = "boot"\n'


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


@contextmanager
def daemon(directory: Path, config: str, env: dict[str, str]) -> Iterator[Client]:
    """A real daemon with `config`, its GPU worker up, and a client to it; stopped after."""
    directory.mkdir()
    socket = str(directory / "w.sock")
    (directory / "workerd.toml").write_text(config)
    log = open(directory / "workerd.log", "wb")  # noqa: SIM115 (closed below)
    proc = subprocess.Popen(
        [sys.executable, "-m", "workerd", "--socket", socket, "--config", str(directory / "workerd.toml")],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
    )
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with Client(socket, timeout=1) as probe:
                    if probe.status()["gpu"]["state"] == "idle":
                        break
            except errors.WorkerdError:
                pass
            if time.monotonic() > deadline or proc.poll() is not None:
                raise SystemExit(f"daemon did not start; see {directory / 'workerd.log'}")
            time.sleep(0.1)
        with Client(socket, timeout=600) as client:
            yield client
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
        log.close()


def pipeline(client: Client, name: str) -> dict[str, Any]:
    return next(p for p in client.memory_status()["gpu"]["pipelines"] if p["name"] == name)


# -- warm: the daemon against a process per run --------------------------------------------


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


def row(label: str, values: list[float], scale: float = 1.0, digits: int = 2) -> str:
    figures = [statistics.median(values), min(values), max(values)]
    return f"| {label} | " + " | ".join(f"{v * scale:.{digits}f}" for v in figures) + " |"


def tail_row(label: str, seconds: list[float]) -> str:
    """p50 / p99 | min | max, in ms."""
    ms = [value * 1000 for value in seconds]
    p50_p99 = f"{statistics.median(ms):.3f} / {percentile(ms, 0.99):.3f}"
    return f"| {label} | {p50_p99} | {min(ms):.3f} | {max(ms):.3f} |"


def bench_warm(args: argparse.Namespace, env: dict[str, str], directory: Path) -> None:
    colds = [cold_process(env) for _ in range(args.cold_repeats)]
    config = CONFIG + MODEL + f'[pipelines.noop]\npath = "{HERE / "noop_pipeline.py"}"\n'
    with daemon(directory / "warm", config, env) as client:
        started = time.monotonic()
        first = client.execute("big")
        daemon_cold = time.monotonic() - started
        end_to_end, inside, memory = warm_runs(client, args.runs)
        client.execute("noop")
        noop_total, noop_inside, _ = warm_runs(client, 200, "noop")
        first_ok, first_warm = recovery(client)
    overhead = [e - i for e, i in zip(end_to_end, inside, strict=True)]
    noop = [e - i for e, i in zip(noop_total, noop_inside, strict=True)]
    print("| measure | median | min | max |\n|---|---|---|---|")
    print(row("cold: fresh process (import torch, load, run), s", colds))
    print(f"| daemon first run (load in a warm GPU worker), s | {daemon_cold:.2f} | | |")
    inside_ms = f"{first['load_s']:.2f} / {first['run_s'] * 1000:.1f} ms"
    print(f"| daemon first run: load_s / run_s inside | {inside_ms} | | |")
    print(row("warm end-to-end, ms", end_to_end, 1000))
    print(row("warm run inside the worker, ms", inside, 1000))
    print(tail_row("daemon overhead (end-to-end - inside), ms: p50 / p99", overhead))
    print(tail_row("daemon overhead, no-op pipeline (200 runs), ms: p50 / p99", noop))
    print(f"| SIGKILL of GPU worker -> first successful run, s | {first_ok:.2f} | | |")
    print(f"| SIGKILL of GPU worker -> first warm run, s | {first_warm:.2f} | | |")
    allocated = {a for a, _ in memory}
    reserved = {r for _, r in memory}
    print(
        f"\nallocated after each of {args.runs} runs: {len(allocated)} distinct value(s), "
        f"{min(allocated) / 2**20:.1f}-{max(allocated) / 2**20:.1f} MiB; reserved: {len(reserved)} distinct, "
        f"{min(reserved) / 2**20:.1f}-{max(reserved) / 2**20:.1f} MiB"
    )


# -- tiers: cold load vs wake vs warm, and two models that do not fit together -----------------


def tier_config(model_mb: float, host_tier: bool) -> str:
    """Two copies of the model; the device budget holds one, the host budget both."""
    host_mb = model_mb * 3 if host_tier else 0
    gpu = f"memory_budget_mb = {model_mb * 1.5:.0f}\nhost_memory_budget_mb = {host_mb:.0f}\n"
    second = MODEL.replace("[pipelines.big]", "[pipelines.big2]")
    return CONFIG + gpu + MODEL + second


def copy_rate(model_mb: float) -> float | None:
    """Bytes per second of one pinned host-to-device copy of the model's size (CUDA only)."""
    if not torch.cuda.is_available():
        return None
    host = torch.empty(int(model_mb * 2**20), dtype=torch.uint8, pin_memory=True)
    rates = []
    for _ in range(3):
        torch.cuda.synchronize()
        started = time.perf_counter()
        device = host.to("cuda", non_blocking=True)
        torch.cuda.synchronize()
        rates.append(host.numel() / (time.perf_counter() - started))
        del device
    del host
    torch.cuda.empty_cache()
    return statistics.median(rates)


def alternate(client: Client, times: int, first: str) -> tuple[float, list[str]]:
    """Seconds for `times` rounds of the two models, `first` (the one not on the device) first,
    and how each run started."""
    order = (first, "big" if first == "big2" else "big2")
    starts = []
    started = time.monotonic()
    for _ in range(times):
        for name in order:
            starts.append(client.execute(name)["start"])
    return time.monotonic() - started, starts


def bench_tiers(args: argparse.Namespace, env: dict[str, str], directory: Path) -> None:
    rate = copy_rate(args.model_mb)
    wakes, woken_starts, parks = [], [], []
    with daemon(directory / "tiers", tier_config(args.model_mb, True), env) as client:
        cold = client.execute("big")
        warm = [client.execute("big")["run_s"] for _ in range(5)]
        size = pipeline(client, "big")["bytes"]
        client.execute("big2")  # cold; parks big
        for _ in range(3):
            woken = client.execute("big")  # parks big2, wakes big
            assert woken["start"] == "woken", woken
            wakes.append(pipeline(client, "big")["wake_s"])
            parks.append(pipeline(client, "big2")["park_s"])
            woken_starts.append(woken["start_s"])
            client.execute("big2")
        with_tier, with_starts = alternate(client, args.alternations, first="big")
        pinned = client.memory_status()["gpu"]["pinned_bytes"]
    with daemon(directory / "no-tier", tier_config(args.model_mb, False), env) as client:
        client.execute("big")
        without_tier, without_starts = alternate(client, args.alternations, first="big2")
    wake = statistics.median(wakes)
    print("| measure | value |\n|---|---|")
    print(f"| model size (measured footprint), MiB | {size / 2**20:.0f} |")
    print(f"| cold load in the GPU worker (read file, copy to device), s | {cold['start_s']:.3f} |")
    print(f"| wake from host memory: the copy back alone, s (median of {len(wakes)}) | {wake:.3f} |")
    seen = statistics.median(woken_starts)
    print(f"| wake as the run saw it: park the other model, then copy back, s | {seen:.3f} |")
    print(f"| park: copy to {'pinned ' if rate else ''}host memory, s | {statistics.median(parks):.3f} |")
    print(f"| warm run inside the worker, ms (median of 5) | {statistics.median(warm) * 1000:.2f} |")
    if rate:  # on CUDA; on the CPU a wake moves no bytes, so a ratio would say nothing
        print(f"| cold load / wake | {cold['start_s'] / wake:.1f}x |")
        print(f"| wake rate / pinned copy rate, GB/s | {size / wake / 1e9:.1f} / {rate / 1e9:.1f} |")
    if pinned is not None:
        print(f"| pinned host memory held by torch after the wakes, MiB | {pinned / 2**20:.0f} |")
    total = 2 * args.alternations
    print(
        f"| {total} runs alternating two models, host tier: total s (per run) | "
        f"{with_tier:.2f} ({with_tier / total * 1000:.0f} ms) |"
    )
    print(
        f"| {total} runs alternating two models, no host tier (drop and reload): total s (per run) | "
        f"{without_tier:.2f} ({without_tier / total * 1000:.0f} ms) |"
    )
    print(f"\nstarts with the host tier: {sorted(set(with_starts))}; without: {sorted(set(without_starts))}")
    if not torch.cuda.is_available():
        print(
            "\nCPU: the device and host memory are the same RAM here, so a park or wake of a torch "
            "module moves no bytes (it moves the model between the two budgets); these figures show "
            "the bookkeeping, not a copy. The copy is measured on CUDA only."
        )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model-mb", type=float, default=512)
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--cold-repeats", type=int, default=3)
    parser.add_argument("--alternations", type=int, default=10)
    parser.add_argument("--parts", default="warm,tiers", help="comma-separated: warm, tiers")
    args = parser.parse_args()
    parts = set(args.parts.split(","))
    if not parts <= {"warm", "tiers"}:
        parser.error(f"unknown part(s): {', '.join(sorted(parts - {'warm', 'tiers'}))}")
    cuda = torch.cuda.is_available()
    device = torch.cuda.get_device_name(0) if cuda else "CPU (no CUDA device: CPU figures)"
    print(f"device: {device}; model {args.model_mb:g} MB bf16 weights; torch {torch.__version__}\n")
    with tempfile.TemporaryDirectory(prefix="wdbench") as tmp:
        directory = Path(tmp)
        weights = str(directory / "weights.bin")
        env = {**os.environ, "WORKERD_BENCH_MODEL_MB": str(args.model_mb), "WORKERD_BENCH_WEIGHTS": weights}
        os.environ.update(env)  # write_weights reads the size from there
        started = time.monotonic()
        size = big_model.write_weights(weights)
        print(f"weights file: {size / 2**20:.0f} MiB written in {time.monotonic() - started:.1f} s\n")
        if "warm" in parts:
            print("### warm: the daemon against a process per run\n")
            bench_warm(args, env, directory)
        if "tiers" in parts:
            heading = f"### tiers: cold load, wake from host memory, warm ({device})"
            print(f"\n{heading}\n" if "warm" in parts else f"{heading}\n")
            bench_tiers(args, env, directory)


if __name__ == "__main__":
    main()
