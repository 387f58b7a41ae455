"""Shared helpers for the benchmarks: start a real daemon, summarise samples, write RESULTS.md.

Every benchmark script imports this module (bench/ is on sys.path when a script in it runs).
Nothing here asserts a timing: the scripts print figures and leave the judging to the reader.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import csv
import ctypes
import datetime
import hashlib
import math
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import msgpack
import psutil
import zmq

from workerctl import Client, errors

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
RESULTS = BENCH_DIR / "RESULTS.md"
VENV_BIN = Path(sys.executable).parent

BASE_CONFIG = """\
[daemon]
stop_timeout_s = 5

[pool]
workers = {workers}
preload = {preload}
gc_freeze = {gc_freeze}
task_timeout_s = 300

[tasks]
modules = {modules}

[gpu]
enabled = "false"
"""


def toml_list(items: Iterable[str]) -> str:
    return "[" + ", ".join(f'"{item}"' for item in items) + "]"


# -- the daemon under test ----------------------------------------------------------------------


class Daemon:
    """A real `python -m workerd` process on a socket in its own temporary directory."""

    def __init__(
        self,
        workers: int,
        modules: Sequence[str] = ("workerd.examples.tasks",),
        preload: Sequence[str] = (),
        gc_freeze: bool = True,
        extra_pythonpath: Sequence[Path] = (),
        env: dict[str, str] | None = None,
        label: str = "workerd",
        extra_config: str = "",
    ) -> None:
        self.directory = Path(tempfile.mkdtemp(prefix="wbench-"))
        self.socket = str(self.directory / "w.sock")
        self.config_path = self.directory / "workerd.toml"
        self.config_path.write_text(
            BASE_CONFIG.format(
                workers=workers,
                preload=toml_list(preload),
                gc_freeze="true" if gc_freeze else "false",
                modules=toml_list(modules),
            )
            + extra_config
        )
        self.workers = workers
        self.label = label
        proc_env = {**os.environ, **(env or {})}
        if extra_pythonpath:
            parts = [str(p) for p in extra_pythonpath]
            if proc_env.get("PYTHONPATH"):
                parts.append(proc_env["PYTHONPATH"])
            proc_env["PYTHONPATH"] = os.pathsep.join(parts)
        self.log_path = self.directory / "workerd.log"
        self.log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        command = [
            sys.executable,
            "-m",
            "workerd",
            "--socket",
            self.socket,
            "--config",
            str(self.config_path),
            "--workers",
            str(workers),
            "--log-level",
            "warning",
        ]
        self.proc = subprocess.Popen(command, stdout=self.log, stderr=subprocess.STDOUT, env=proc_env)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def client(self, timeout: float = 60.0) -> Client:
        return Client(self.socket, timeout=timeout)

    def status(self) -> dict[str, Any] | None:
        try:
            with self.client(timeout=2.0) as client:
                return client.status()
        except errors.WorkerdError:
            return None

    def wait_ready(self, timeout: float = 120.0) -> dict[str, Any]:
        """Wait until status shows the pool full and every worker idle (as tests/conftest.py)."""
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"workerd exited with {self.proc.returncode}:\n{self.output()}")
            status = self.status()
            if status is not None:
                pool = status["pool"]
                if pool["error"]:
                    raise RuntimeError(f"workerd pool error: {pool['error']}\n{self.output()}")
                if status["state"] == "running" and pool["idle"] == pool["target"] == len(pool["workers"]):
                    return status
            if time.monotonic() > deadline:
                raise RuntimeError(f"workerd not ready within {timeout} s:\n{self.output()}")
            time.sleep(0.05)

    def worker_pids(self) -> list[int]:
        status = self.status()
        assert status is not None
        return [w["pid"] for w in status["pool"]["workers"]]

    def output(self) -> str:
        self.log.flush()
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        shutil.rmtree(self.directory, ignore_errors=True)

    def __enter__(self) -> Daemon:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


# -- bare pyzmq servers (run in their own processes) --------------------------------------------


def echo_server(endpoint: str) -> None:
    """A ROUTER that answers every [b"", msgpack(request)] with a protocol-shaped msgpack reply.

    It decodes the request and encodes a small reply map, as workerd's ping does, so the
    comparison is socket + codec against socket + codec.
    """
    context = zmq.Context()
    router = context.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    router.bind(endpoint)
    started = time.monotonic()
    pid = os.getpid()
    try:
        while True:
            ident, empty, body = router.recv_multipart()
            request = msgpack.unpackb(body, raw=False)
            result = {"pid": pid, "version": "bare", "uptime_s": time.monotonic() - started, "protocols": [1]}
            reply = {"v": 1, "id": request["id"], "ok": True, "result": result}
            router.send_multipart([ident, empty, msgpack.packb(reply, use_bin_type=True)])
    finally:
        router.close()
        context.term()


def wait_for_echo(endpoint: str, timeout: float = 10.0) -> None:
    """Block until a ROUTER at `endpoint` answers one request."""
    context: zmq.Context[Any] = zmq.Context.instance()
    dealer = context.socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    dealer.connect(endpoint)
    try:
        dealer.send_multipart([b"", msgpack.packb({"v": 1, "id": 0, "cmd": "ping"})])
        if not dealer.poll(int(timeout * 1000)):
            raise RuntimeError(f"no echo server answered at {endpoint}")
        dealer.recv_multipart()
    finally:
        dealer.close()


def die_with_parent() -> None:
    """Have the kernel SIGKILL this process when its parent exits (Linux; best effort)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG


def broker_worker(backend: str) -> None:
    """A bare worker: DEALER to the broker's backend, answers each request with its echo."""
    die_with_parent()  # a broker killed without its `finally` must not leave workers behind
    context = zmq.Context()
    dealer = context.socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    dealer.connect(backend)
    dealer.send_multipart([b"READY"])
    while True:
        client, empty, body = dealer.recv_multipart()
        request = msgpack.unpackb(body, raw=False)
        reply = {"v": 1, "id": request["id"], "ok": True, "result": request["args"][0]}
        dealer.send_multipart([client, empty, msgpack.packb(reply, use_bin_type=True)])


def echo_broker(frontend: str, backend: str, workers: int) -> None:
    """A minimal load-balancing broker (zguide's LRU pattern) with `workers` forked echo workers.

    The workers are forked first, while this process has no ZeroMQ context and no threads; the
    broker then only routes frames: client requests go to the least recently idle worker, replies
    go back to their client. It decodes nothing and keeps no per-request state. Requests wait in
    the frontend socket's queue while no worker is idle (the frontend is polled only then).
    """
    children = []
    for _ in range(workers):
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                broker_worker(backend)
            except BaseException:
                code = 1
            finally:
                os._exit(code)
        children.append(pid)
    # terminate() sends SIGTERM: leave through `finally`, so the workers go with the broker.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(0))
    context = zmq.Context()
    front = context.socket(zmq.ROUTER)
    back = context.socket(zmq.ROUTER)
    for sock in (front, back):
        sock.setsockopt(zmq.LINGER, 0)
    front.bind(frontend)
    back.bind(backend)
    backend_only = zmq.Poller()
    backend_only.register(back, zmq.POLLIN)
    both = zmq.Poller()
    both.register(back, zmq.POLLIN)
    both.register(front, zmq.POLLIN)
    idle: collections.deque[bytes] = collections.deque()
    try:
        while True:
            ready = dict((both if idle else backend_only).poll())
            if back in ready:
                while True:
                    try:
                        frames = back.recv_multipart(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    idle.append(frames[0])
                    if frames[1] != b"READY":
                        front.send_multipart(frames[1:])
            if front in ready:
                while idle:
                    try:
                        frames = front.recv_multipart(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    back.send_multipart([idle.popleft(), *frames])
    finally:
        for pid in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)


# -- statistics --------------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile, q in [0, 100]."""
    ordered = sorted(values)
    if not ordered:
        return math.nan
    position = (len(ordered) - 1) * q / 100.0
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def spread(values: Sequence[float], digits: int = 0, scale: float = 1.0) -> str:
    """'median (min-max)' of several runs' figures."""
    if not values:
        return "-"
    scaled = [v * scale for v in values]
    med, low, high = statistics.median(scaled), min(scaled), max(scaled)
    return f"{med:,.{digits}f} ({low:,.{digits}f}-{high:,.{digits}f})"


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else math.nan


def ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b else "-"


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def timed(call: Callable[[], Any], count: int) -> list[float]:
    """Seconds each of `count` calls took."""
    samples = []
    clock = time.perf_counter
    for _ in range(count):
        start = clock()
        call()
        samples.append(clock() - start)
    return samples


def cpu_seconds(pids: Iterable[int]) -> dict[int, float]:
    """user+system CPU seconds of each live process (its threads included, children not)."""
    return {pid: figures[0] for pid, figures in process_counters(pids).items()}


def process_counters(pids: Iterable[int]) -> dict[int, tuple[float, int]]:
    """(user+system CPU seconds, context switches) of each live process, threads included."""
    counters = {}
    for pid in pids:
        try:
            process = psutil.Process(pid)
            times = process.cpu_times()
            switches = process.num_ctx_switches()
        except psutil.Error:
            continue
        counters[pid] = (times.user + times.system, switches.voluntary + switches.involuntary)
    return counters


def counters_delta(
    before: dict[int, tuple[float, int]], after: dict[int, tuple[float, int]], pids: Iterable[int]
) -> tuple[float, int]:
    """Summed (CPU seconds, context switches) of `pids` between two process_counters readings."""
    cpu, switches = 0.0, 0
    for pid in pids:
        if pid in before and pid in after:
            cpu += after[pid][0] - before[pid][0]
            switches += after[pid][1] - before[pid][1]
    return cpu, switches


# -- the environment and RESULTS.md ---------------------------------------------------------------


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def environment() -> str:
    memory_gib = psutil.virtual_memory().total / 2**30
    return (
        f"{os.cpu_count()} CPUs (`nproc` = {len(os.sched_getaffinity(0))}), {cpu_model()}, "
        f"{memory_gib:.0f} GiB; Linux {platform.release()}; Python {platform.python_version()}; "
        f"pyzmq {zmq.__version__} / libzmq {zmq.zmq_version()}; "
        f"msgpack {'.'.join(map(str, msgpack.version))}; psutil {psutil.__version__}"
    )


# The machine may be shared: the load average at the start and end of a run says how quiet it was.
LOAD_AT_START = os.getloadavg()[0]


def code_version() -> str:
    """A digest of the daemon's and client's sources, to tell which code a figure belongs to."""
    digest = hashlib.sha256()
    newest = 0.0
    for path in sorted([*ROOT.glob("daemon/workerd/**/*.py"), *ROOT.glob("client/workerctl/**/*.py")]):
        digest.update(str(path.relative_to(ROOT)).encode() + b"\0" + path.read_bytes())
        newest = max(newest, path.stat().st_mtime)
    changed = datetime.datetime.fromtimestamp(newest, datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    return f"sources sha256 {digest.hexdigest()[:12]} (newest file {changed})"


CODE_AT_START = code_version()


def stamp() -> str:
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    # The benchmark's own processes count in the load average at the end.
    load = f"1-min load average {LOAD_AT_START:.2f} at start, {os.getloadavg()[0]:.2f} at end"
    code = f"daemon+client {CODE_AT_START}"
    if code_version() != CODE_AT_START:
        code += f"; **changed during the run**, now {code_version()}"
    return f"_Measured {now} on: {environment()}; {load}; {code}._"


def write_section(name: str, body: str, script: str = "") -> None:
    """Replace the text between this benchmark's markers in RESULTS.md (append them if absent).

    Only the generated tables live between the markers: commentary written around them by hand
    survives a re-run.
    """
    begin = f"<!-- BEGIN {name} (generated by bench/{script or name}.py) -->"
    end = f"<!-- END {name} -->"
    block = f"{begin}\n{stamp()}\n\n{body.strip()}\n{end}"
    text = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n"
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.DOTALL)
    if pattern.search(text):
        text = pattern.sub(lambda _: block, text)
    else:
        text = text.rstrip() + f"\n\n## {name}\n\n{block}\n"
    RESULTS.write_text(text)
    out = BENCH_DIR / "out"
    out.mkdir(exist_ok=True)
    (out / f"{name}.md").write_text(body.strip() + "\n")


def write_csv(name: str, rows: Sequence[dict[str, Any]]) -> Path:
    """bench/out/NAME.csv, one row per measurement; bench/suite.py merges them into results.csv."""
    out = BENCH_DIR / "out"
    out.mkdir(exist_ok=True)
    path = out / f"{name}.csv"
    columns: dict[str, None] = {}
    for row in rows:
        columns.update(dict.fromkeys(row))
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(columns))
        writer.writeheader()
        writer.writerows(rows)
    return path


def report(name: str, body: str, write: bool = True, script: str = "") -> None:
    """Print a section; with `write`, also put it in RESULTS.md (`script`: the writer, if not NAME.py)."""
    print(body)
    if write:
        write_section(name, body, script)
        print(f"\n(section '{name}' written to {RESULTS.relative_to(ROOT)})")


def at_least(minimum: int) -> Callable[[str], int]:
    """An argparse type: an integer of at least `minimum`."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = minimum - 1
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer of at least {minimum}, got {text!r}")
        return value

    return parse
