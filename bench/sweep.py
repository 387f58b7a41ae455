"""Concurrency sweep: workerd vs Pool, ProcessPoolExecutor, a subprocess per call and Celery.

    .venv/bin/python bench/sweep.py [--systems workerd,pool,executor,subprocess,celery]
                                    [--tasks trivial,sleep50] [--concurrency 1,16,64,256]
                                    [--duration 3] [--warmup 1] [--runs 3] [--drain 30]
                                    [--workers 2] [--sleep-workers 16] [--csv PATH] [--no-write]

Two tasks: `trivial` echoes a small dict; `sleep50` sleeps 50 ms (the shape where a thread-pool
ceiling or a single event loop shows up). Every system gets the same number of worker processes:
--workers (default 2, the cores of the reference machine) for `trivial`, --sleep-workers (default
16) for `sleep50`, so the 50 ms task is not capped at 40 req/s by two processes:

  * workerd: the real daemon (benchlib.Daemon), `workerd.examples.tasks:echo` / `:sleep`, driven
    by one workerctl.Client through execute_many(window=c): a new request goes as soon as one
    completes;
  * multiprocessing.Pool (fork): apply_async whose callback (on the pool's result thread)
    submits the next call;
  * concurrent.futures.ProcessPoolExecutor (fork): submit + add_done_callback submitting the next;
  * a subprocess per call: start python, import workerd.examples.tasks, run the task once, print
    the result as JSON, exit; c threads each running one such process at a time (no pool: up to c
    processes at once whatever the worker count);
  * Celery's prefork pool (`celery -A celery_tasks worker --pool=prefork --concurrency=N`, tasks
    in bench/celery_tasks.py) with a real Redis broker and result backend: c threads each doing
    `task.delay(...).get()` (Celery has no efficient asynchronous closed loop on the client).
    The script starts redis-server itself on 127.0.0.1 (a free port, no persistence, a temporary
    directory), installing it with apt-get and the `bench` extras (celery, redis) with pip when
    they are missing, and stops it at the end; if any of that fails, the Celery rows are replaced
    by a line saying why and the rest still runs.

One load generator (this process) keeps exactly c requests outstanding (a closed loop) for
--warmup + --duration seconds. Only requests that complete inside the --duration window count:
req/s is successful completions / duration, latency is submit-to-result of those, errors are
exceptions and timeouts. After the window no new request is sent, and the ones outstanding are
waited for (at most --drain s; a drain that runs out is noted and its stragglers are killed where
they are processes) before the next cell starts. Each run measures every system at every c,
rotating the order of the systems between runs; cells are "median (min-max)" over --runs runs.

Evidence of who was busy: CPU seconds (user+sys, psutil) over the window of the load generator
(this process, all its threads: for Pool and ProcessPoolExecutor that includes their result and
management threads), of the middle process (workerd's master; Celery's main process and
redis-server) and of the workers (workerd's zygote and workers; the pools' processes; Celery's
prefork children; for a subprocess per call, the CPU of the children reaped in the window),
shown as % of one core. A load generator at >= 90 % of a core is flagged as saturated: the
figures of that cell are then a floor for the system, not its ceiling.

Writes the tables to bench/RESULTS.md (section `sweep`, unless --no-write) and one CSV row per
system x task x c x run to bench/out/sweep.csv (--csv). Nothing asserts a timing.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import csv
import dataclasses
import importlib
import itertools
import json
import math
import multiprocessing
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import psutil

import benchlib
from benchlib import median, percentile, spread, table
from workerctl import Client, errors
from workerd.examples import tasks as example_tasks

PAYLOAD: dict[str, Any] = {"user": "alice", "n": 42, "tags": ["a", "b", "c"], "ok": True}
SERIAL = itertools.count()


def payload() -> dict[str, Any]:
    """A dict shaped like PAYLOAD, distinct per call."""
    n = next(SERIAL)
    return {"user": f"user{n}", "n": n, "tags": ["a", "b", str(n)], "ok": True}


# How long one call may take before it counts as an error (a timeout).
CALL_TIMEOUT_S = 30.0
# A load generator using this share of one core or more may itself be the bottleneck.
SATURATED = 0.90
# Differences between medians smaller than this share are flagged as possibly noise.
NOISE = 0.05
CSV_COLUMNS = [
    "section",
    "system",
    "task",
    "concurrency",
    "run",
    "duration_s",
    "requests",
    "errors",
    "rps",
    "p50_ms",
    "p95_ms",
    "p99_ms",
    "cpu_loadgen_s",
    "cpu_daemon_s",
    "cpu_workers_s",
    "broker_cpu_s",
    "notes",
]
# One subprocess call: the imports and the run a fresh process pays for every request.
SUBPROCESS_SNIPPET = (
    "import json, sys, workerd.examples.tasks as t; print(json.dumps(t.{function}(*json.loads(sys.argv[1]))))"
)

# (submit time, completion time, ok) of each completed request; appended from any thread.
Samples = list[tuple[float, float, bool]]


@dataclasses.dataclass(frozen=True)
class Workload:
    key: str
    title: str
    function: str  # its name in workerd.examples.tasks and in bench/celery_tasks.py
    make_args: Callable[[], tuple[Any, ...]]

    def args(self) -> tuple[Any, ...]:
        """Fresh arguments for one call: distinct per call where they are data (equal objects
        would let pickle's memo shrink a peer's messages)."""
        return self.make_args()

    @property
    def workerd_name(self) -> str:
        return f"workerd.examples.tasks:{self.function}"

    def local(self) -> Callable[..., Any]:
        """The function itself, for the forked pools (picklable by reference)."""
        function: Callable[..., Any] = getattr(example_tasks, self.function)
        return function


WORKLOADS = {
    "trivial": Workload("trivial", "echo of a small dict", "echo", lambda: (payload(),)),
    "sleep50": Workload("sleep50", "sleep 50 ms", "sleep", lambda: (0.05,)),
}


@dataclasses.dataclass
class Cell:
    """One system x task x c x run: the CSV row, plus what the tables need."""

    system: str
    task: str
    concurrency: int
    run: int
    duration_s: float
    requests: int = 0
    errors: int = 0
    rps: float = math.nan
    p50_ms: float = math.nan
    p95_ms: float = math.nan
    p99_ms: float = math.nan
    cpu_loadgen_s: float = math.nan
    cpu_daemon_s: float = math.nan
    cpu_workers_s: float = math.nan
    broker_cpu_s: float = math.nan
    notes: list[str] = dataclasses.field(default_factory=list)

    def share(self, cpu_s: float) -> float:
        """CPU seconds as a share of one core over the window."""
        return cpu_s / self.duration_s

    @property
    def error_rate(self) -> float:
        return self.errors / self.requests if self.requests else math.nan

    @property
    def saturated(self) -> bool:
        return self.share(self.cpu_loadgen_s) >= SATURATED

    def row(self) -> dict[str, Any]:
        row = {name: getattr(self, name) for name in CSV_COLUMNS if name not in ("section", "notes")}
        row = {
            k: (("" if math.isnan(v) else round(v, 4)) if isinstance(v, float) else v) for k, v in row.items()
        }
        return {"section": "sweep", **row, "notes": "; ".join(self.notes)}


# -- closed loops ------------------------------------------------------------------------------


def callback_loop(
    submit: Callable[[Callable[[bool], None]], None], c: int, end: float, drain_s: float, samples: Samples
) -> bool:
    """Keep c calls outstanding until `end`: each completion (a callback, on the system's own
    thread) submits the next. True if every call outstanding at `end` completed within drain_s."""
    lock = threading.Lock()
    outstanding = c
    drained = threading.Event()

    def retire() -> None:
        nonlocal outstanding
        with lock:
            outstanding -= 1
            if outstanding == 0:
                drained.set()

    def launch() -> None:
        sent = time.perf_counter()

        def finish(ok: bool) -> None:
            # Runs on the pool's thread: it must never raise there (a Pool's result thread
            # that dies leaves every later call hanging).
            now = time.perf_counter()
            samples.append((sent, now, ok))
            if now >= end:
                retire()
                return
            try:
                launch()
            except Exception:
                samples.append((now, time.perf_counter(), False))
                retire()

        submit(finish)

    for _ in range(c):
        launch()
    return drained.wait(max(0.0, end - time.perf_counter()) + drain_s)


def thread_loop(call: Callable[[], bool], c: int, end: float, drain_s: float, samples: Samples) -> bool:
    """c threads, each making one blocking call at a time until `end`. True if all ended in time."""

    def loop() -> None:
        clock = time.perf_counter
        while (sent := clock()) < end:
            try:
                ok = call()
            except Exception:
                ok = False
            samples.append((sent, clock(), ok))

    threads = [threading.Thread(target=loop, daemon=True, name=f"sweep-{i}") for i in range(c)]
    for thread in threads:
        thread.start()
    deadline = end + drain_s
    for thread in threads:
        thread.join(max(0.0, deadline - time.perf_counter()))
    return not any(thread.is_alive() for thread in threads)


# -- the systems -------------------------------------------------------------------------------


def descendants(pid: int) -> list[int]:
    try:
        return [p.pid for p in psutil.Process(pid).children(recursive=True)]
    except psutil.Error:
        return []


def own_children() -> set[int]:
    return {p.pid for p in psutil.Process().children()}


class System:
    """One way of running a workload with a fixed number of worker processes."""

    key = ""
    name = ""
    note = ""  # said once in the table, and in each CSV row
    # True: the workers are this process's short-lived children, counted by RUSAGE_CHILDREN.
    children_cpu = False

    def drive(self, c: int, end: float, drain_s: float, samples: Samples) -> bool:
        """Run the closed loop with c outstanding until `end`; False if the drain ran out."""
        raise NotImplementedError

    def roles(self) -> dict[str, list[int]]:
        """Process ids by role ("daemon", "broker", "workers"), this process excluded."""
        return {}

    def close(self) -> None:
        pass


class WorkerdSystem(System):
    key, name = "workerd", "workerd"
    note = "one workerctl.Client, execute_many(window=c)"

    def __init__(self, workload: Workload, workers: int) -> None:
        self.workload = workload
        self.daemon = benchlib.Daemon(workers=workers)
        try:
            self.daemon.wait_ready()
            self.client = Client(self.daemon.socket, timeout=CALL_TIMEOUT_S)
            self.client.call(workload.workerd_name, list(workload.args()))
        except BaseException:
            self.daemon.stop()
            raise

    def drive(self, c: int, end: float, drain_s: float, samples: Samples) -> bool:
        sent: list[float] = []
        make = self.workload.args

        def calls() -> Iterator[tuple[list[Any], dict[str, Any]]]:
            # Pulled by the client only as the window frees up: the time of the pull is the send.
            clock = time.perf_counter
            while (now := clock()) < end:
                sent.append(now)
                yield list(make()), {}

        cutoff = end + drain_s
        try:
            for outcome in self.client.execute_many(self.workload.workerd_name, calls(), window=c):
                now = time.perf_counter()
                samples.append((sent[outcome.index], now, outcome.error is None))
                if now > cutoff:
                    return False  # leaving the loop forgets the rest: their replies are dropped
        except errors.RequestTimeout:
            return False
        return True

    def roles(self) -> dict[str, list[int]]:
        # The zygote and the workers are the master's descendants (the status's worker pids).
        return {"daemon": [self.daemon.pid], "workers": descendants(self.daemon.pid)}

    def close(self) -> None:
        with contextlib.suppress(AttributeError):
            self.client.close()
        self.daemon.stop()


class PoolSystem(System):
    key, name = "pool", "multiprocessing.Pool"
    note = "apply_async, the callback submits the next"

    def __init__(self, workload: Workload, workers: int) -> None:
        self.function, self.args = workload.local(), workload.args
        before = own_children()
        self.pool = multiprocessing.get_context("fork").Pool(workers)
        self.pool.map(example_tasks.echo, range(workers * 4))
        self.workers = sorted(own_children() - before)

    def drive(self, c: int, end: float, drain_s: float, samples: Samples) -> bool:
        def submit(finish: Callable[[bool], None]) -> None:
            self.pool.apply_async(
                self.function,
                self.args(),
                callback=lambda _: finish(True),
                error_callback=lambda _: finish(False),
            )

        return callback_loop(submit, c, end, drain_s, samples)

    def roles(self) -> dict[str, list[int]]:
        return {"workers": self.workers}

    def close(self) -> None:
        self.pool.terminate()
        self.pool.join()


class ExecutorSystem(System):
    key, name = "executor", "ProcessPoolExecutor"
    note = "submit + add_done_callback submitting the next"

    def __init__(self, workload: Workload, workers: int) -> None:
        self.function, self.args = workload.local(), workload.args
        before = own_children()
        context = multiprocessing.get_context("fork")
        self.executor = concurrent.futures.ProcessPoolExecutor(workers, mp_context=context)
        # Processes start on demand: overlapping sleeps make it start them all now.
        list(self.executor.map(example_tasks.sleep, [0.2] * workers))
        self.workers = sorted(own_children() - before)

    def drive(self, c: int, end: float, drain_s: float, samples: Samples) -> bool:
        def submit(finish: Callable[[bool], None]) -> None:
            future = self.executor.submit(self.function, *self.args())
            future.add_done_callback(lambda f: finish(not f.cancelled() and f.exception() is None))

        return callback_loop(submit, c, end, drain_s, samples)

    def roles(self) -> dict[str, list[int]]:
        return {"workers": self.workers}

    def close(self) -> None:
        self.executor.shutdown(wait=True, cancel_futures=True)


class SubprocessSystem(System):
    key, name = "subprocess", "subprocess per call"
    note = "no pool: up to c python processes at once, c threads"
    children_cpu = True

    def __init__(self, workload: Workload, workers: int) -> None:
        self.command = [
            sys.executable,
            "-c",
            SUBPROCESS_SNIPPET.format(function=workload.function),
            json.dumps(list(workload.args())),
        ]
        self.live: set[subprocess.Popen[bytes]] = set()
        self.lock = threading.Lock()
        if not self.call():
            raise RuntimeError(f"the subprocess call fails: {self.command}")

    def call(self) -> bool:
        process = subprocess.Popen(self.command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        with self.lock:
            self.live.add(process)
        try:
            out, _ = process.communicate(timeout=CALL_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.communicate()
            return False
        finally:
            with self.lock:
                self.live.discard(process)
        return process.returncode == 0 and bool(out.strip())

    def drive(self, c: int, end: float, drain_s: float, samples: Samples) -> bool:
        drained = thread_loop(self.call, c, end, drain_s, samples)
        if not drained:
            self.kill_stragglers()
        return drained

    def kill_stragglers(self) -> None:
        """Processes still running after the drain must not load the next cell."""
        with self.lock:
            stragglers = list(self.live)
        for process in stragglers:
            with contextlib.suppress(ProcessLookupError):
                process.kill()


class RedisServer:
    """redis-server on 127.0.0.1, a free port, no persistence, in a temporary directory."""

    def __init__(self, executable: str) -> None:
        self.directory = Path(tempfile.mkdtemp(prefix="wbench-redis-"))
        self.port = free_port()
        self.log = open(self.directory / "redis.log", "wb")  # noqa: SIM115 - closed in stop()
        command = [executable, "--bind", "127.0.0.1", "--port", str(self.port), "--save", ""]
        command += ["--appendonly", "no", "--dir", str(self.directory), "--daemonize", "no"]
        self.proc = subprocess.Popen(command, stdout=self.log, stderr=subprocess.STDOUT)
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise

    @property
    def pid(self) -> int:
        return self.proc.pid

    def url(self, database: int) -> str:
        return f"redis://127.0.0.1:{self.port}/{database}"

    def wait_ready(self, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self.proc.returncode}: {self.output()}")
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), 1) as conn:
                conn.sendall(b"PING\r\n")
                if conn.recv(64).startswith(b"+PONG"):
                    return
            time.sleep(0.05)
        raise RuntimeError(f"redis-server did not answer PING within {timeout} s: {self.output()}")

    def version(self) -> str:
        executable = self.proc.args[0] if isinstance(self.proc.args, list) else "redis-server"
        out = subprocess.run([executable, "--version"], capture_output=True, text=True, check=False).stdout
        return out.split("v=")[1].split()[0] if "v=" in out else "?"

    def output(self) -> str:
        self.log.flush()
        return (self.directory / "redis.log").read_text(errors="replace")[-2000:]

    def stop(self) -> None:
        stop_process(self.proc)
        self.log.close()
        shutil.rmtree(self.directory, ignore_errors=True)


class CelerySystem(System):
    key, name = "celery", "Celery prefork (Redis)"
    note = "c threads, task.delay().get()"

    def __init__(self, workload: Workload, workers: int, redis: RedisServer) -> None:
        self.redis = redis
        self.app_module = importlib.import_module("celery_tasks")
        self.task = getattr(self.app_module, workload.function)
        self.args = workload.args
        self.directory = Path(tempfile.mkdtemp(prefix="wbench-celery-"))
        self.log = open(self.directory / "celery.log", "wb")  # noqa: SIM115 - closed in close()
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join(
                filter(None, [str(benchlib.BENCH_DIR), os.environ.get("PYTHONPATH")])
            ),
        }
        # No gossip, mingle or heartbeat: one worker needs none, and they only add broker traffic.
        command = [sys.executable, "-m", "celery", "-A", "celery_tasks", "worker", "--pool=prefork"]
        command += [f"--concurrency={workers}", "--loglevel=warning", "-n", f"sweep{workers}@%h"]
        command += ["--without-gossip", "--without-mingle", "--without-heartbeat"]
        self.proc = subprocess.Popen(
            command, cwd=benchlib.BENCH_DIR, env=env, stdout=self.log, stderr=subprocess.STDOUT
        )
        try:
            self.wait_ready(workers)
        except BaseException:
            self.close()
            raise

    def wait_ready(self, workers: int, timeout: float = 60.0) -> None:
        """Until a probe task comes back and the prefork pool has all its processes."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the celery worker exited with {self.proc.returncode}: {self.output()}")
            with contextlib.suppress(Exception):
                self.app_module.echo.delay("probe").get(timeout=2)
                if len(descendants(self.proc.pid)) >= workers:
                    return
        raise RuntimeError(f"the celery worker was not ready within {timeout} s: {self.output()}")

    def call(self) -> bool:
        self.task.delay(*self.args()).get(timeout=CALL_TIMEOUT_S)
        return True

    def drive(self, c: int, end: float, drain_s: float, samples: Samples) -> bool:
        return thread_loop(self.call, c, end, drain_s, samples)

    def roles(self) -> dict[str, list[int]]:
        return {"daemon": [self.proc.pid], "workers": descendants(self.proc.pid), "broker": [self.redis.pid]}

    def output(self) -> str:
        self.log.flush()
        return (self.directory / "celery.log").read_text(errors="replace")[-2000:]

    def close(self) -> None:
        children = descendants(self.proc.pid)
        stop_process(self.proc)
        for pid in children:  # a killed main process leaves its pool behind
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.log.close()
        shutil.rmtree(self.directory, ignore_errors=True)


def stop_process(proc: subprocess.Popen[bytes], grace: float = 15.0) -> None:
    """SIGTERM, then SIGKILL after `grace` seconds."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


# -- Celery's prerequisites --------------------------------------------------------------------


def bench_requirements() -> list[str]:
    """The `bench` extras of pyproject.toml: what the Celery peer needs."""
    project = tomllib.loads((benchlib.ROOT / "pyproject.toml").read_text())
    requirements: list[str] = project["project"]["optional-dependencies"]["bench"]
    return requirements


def ensure_python_packages() -> None:
    try:
        importlib.import_module("celery")
        importlib.import_module("redis")
        return
    except ImportError:
        pass
    print("installing the bench extras (celery, redis) with pip ...", flush=True)
    command = [sys.executable, "-m", "pip", "install", "-q", *bench_requirements()]
    subprocess.run(command, check=True, capture_output=True, text=True)
    importlib.invalidate_caches()
    importlib.import_module("celery")
    importlib.import_module("redis")


def ensure_redis_server() -> str:
    """The path of redis-server, installing the Debian package first if it is missing."""
    found = shutil.which("redis-server")
    if found:
        return found
    install = ["apt-get", "install", "-y", "-qq", "redis-server"]
    if os.geteuid() != 0:
        if shutil.which("sudo") is None:
            raise RuntimeError("redis-server is not installed, and neither root nor sudo can install it")
        install = ["sudo", "-n", "env", "DEBIAN_FRONTEND=noninteractive", "RUNLEVEL=1", *install]
    # RUNLEVEL=1: the package's scripts must not start a system-wide redis of their own.
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive", "RUNLEVEL": "1"}
    print("installing redis-server with apt-get ...", flush=True)
    if subprocess.run(install, env=env, capture_output=True, check=False).returncode != 0:
        # A machine whose package lists were never fetched knows no redis-server yet.
        subprocess.run([*install[:-4], "update", "-qq"], env=env, capture_output=True, check=False)
        result = subprocess.run(install, env=env, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            raise RuntimeError(f"apt-get install redis-server failed: {result.stderr.strip()[-300:]}")
    found = shutil.which("redis-server")
    if not found:
        raise RuntimeError("redis-server is still not on PATH after apt-get install")
    return found


def start_redis(stack: contextlib.ExitStack) -> tuple[RedisServer | None, str]:
    """A running redis-server with Celery importable, or None and why not."""
    try:
        ensure_python_packages()
        redis = RedisServer(ensure_redis_server())
    except Exception as exc:
        detail = exc.stderr.strip()[-300:] if isinstance(exc, subprocess.CalledProcessError) else ""
        return None, f"{type(exc).__name__}: {exc} {detail}".strip()
    stack.callback(redis.stop)
    # The app in celery_tasks reads these at import, here and in the worker started later.
    os.environ["SWEEP_CELERY_BROKER"] = redis.url(0)
    os.environ["SWEEP_CELERY_BACKEND"] = redis.url(1)
    versions = f"redis-server {redis.version()}, celery {importlib.import_module('celery').__version__}"
    return redis, versions


# -- one cell ----------------------------------------------------------------------------------


class CpuMeter(threading.Thread):
    """Reads every role's CPU seconds at the window's start and end, off the driving thread."""

    def __init__(self, system: System, start: float, end: float) -> None:
        super().__init__(daemon=True, name="sweep-cpu")
        self.system, self.start_at, self.end_at = system, start, end
        self.cpu: dict[str, float] = {}

    def run(self) -> None:
        time.sleep(max(0.0, self.start_at - time.perf_counter()))
        roles = {"loadgen": [os.getpid()], **self.system.roles()}
        pids = [pid for group in roles.values() for pid in group]
        before, children_before = benchlib.process_counters(pids), children_cpu_seconds()
        time.sleep(max(0.0, self.end_at - time.perf_counter()))
        after, children_after = benchlib.process_counters(pids), children_cpu_seconds()
        self.cpu = {role: benchlib.counters_delta(before, after, group)[0] for role, group in roles.items()}
        if self.system.children_cpu:
            self.cpu["workers"] = children_after - children_before


def children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def measure(system: System, workload: Workload, c: int, run: int, args: argparse.Namespace) -> Cell:
    cell = Cell(system.name, workload.key, c, run, args.duration)
    samples: Samples = []
    window_start = time.perf_counter() + args.warmup
    end = window_start + args.duration
    meter = CpuMeter(system, window_start, end)
    meter.start()
    try:
        if not system.drive(c, end, args.drain, samples):
            cell.notes.append(f"drain over {args.drain:g} s")
    except Exception as exc:
        cell.notes.append(f"driver failed: {type(exc).__name__}: {str(exc)[:120]}")
    meter.join()
    summarise(cell, list(samples), window_start, end)
    cell.cpu_loadgen_s = meter.cpu.get("loadgen", math.nan)
    cell.cpu_daemon_s = meter.cpu.get("daemon", math.nan)
    cell.cpu_workers_s = meter.cpu.get("workers", math.nan)
    cell.broker_cpu_s = meter.cpu.get("broker", math.nan)
    if cell.saturated:
        cell.notes.append(f"load generator saturated ({cell.share(cell.cpu_loadgen_s):.0%} of a core)")
    return cell


def summarise(cell: Cell, samples: Samples, start: float, end: float) -> None:
    """Counts and percentiles of the requests that completed inside [start, end]."""
    window = [(sent, done, ok) for sent, done, ok in samples if start <= done <= end]
    latencies = [done - sent for sent, done, ok in window if ok]
    cell.requests = len(window)
    cell.errors = len(window) - len(latencies)
    cell.rps = len(latencies) / cell.duration_s
    if latencies:
        cell.p50_ms, cell.p95_ms, cell.p99_ms = (percentile(latencies, q) * 1e3 for q in (50, 95, 99))


def progress(cell: Cell, runs: int) -> None:
    print(
        f"run {cell.run}/{runs} {cell.task} c={cell.concurrency} {cell.system}: {cell.rps:,.0f} req/s, "
        f"p99 {cell.p99_ms:.1f} ms, errors {cell.errors}, loadgen {cell.share(cell.cpu_loadgen_s):.0%}"
        + (f" [{'; '.join(cell.notes)}]" if cell.notes else ""),
        flush=True,
    )


# -- the run -----------------------------------------------------------------------------------

SYSTEM_KEYS = ["workerd", "pool", "executor", "subprocess", "celery"]
FORKED_POOLS: dict[str, type[PoolSystem] | type[ExecutorSystem]] = {
    "pool": PoolSystem,
    "executor": ExecutorSystem,
}


@dataclasses.dataclass
class Results:
    cells: list[Cell]
    workers: dict[str, int]  # task -> worker processes per system
    celery: str  # versions, or why Celery was not measured
    celery_ok: bool


def worker_count(workload: Workload, args: argparse.Namespace) -> int:
    return int(args.sleep_workers if workload.key == "sleep50" else args.workers)


def start_pools(
    stack: contextlib.ExitStack, workloads: Sequence[Workload], args: argparse.Namespace
) -> dict[str, list[System]]:
    """The fork-based pools of every task, made before this process opens any ZeroMQ socket."""
    pools: dict[str, list[System]] = {w.key: [] for w in workloads}
    for workload in workloads:
        for key, kind in FORKED_POOLS.items():
            if key in args.systems:
                system = kind(workload, worker_count(workload, args))
                stack.callback(system.close)
                pools[workload.key].append(system)
    return pools


def start_task_systems(
    stack: contextlib.ExitStack, workload: Workload, redis: RedisServer | None, args: argparse.Namespace
) -> list[System]:
    workers = worker_count(workload, args)
    systems: list[System] = []
    if "workerd" in args.systems:
        systems.append(stack.enter_context(contextlib.closing(WorkerdSystem(workload, workers))))
    if "subprocess" in args.systems:
        systems.append(SubprocessSystem(workload, workers))
    if "celery" in args.systems and redis is not None:
        systems.append(stack.enter_context(contextlib.closing(CelerySystem(workload, workers, redis))))
    return systems


def sweep_task(systems: list[System], workload: Workload, args: argparse.Namespace) -> list[Cell]:
    cells: list[Cell] = []
    for run in range(1, args.runs + 1):
        shift = (run - 1) % max(1, len(systems))
        for c in args.concurrency:
            for system in systems[shift:] + systems[:shift]:
                cell = measure(system, workload, c, run, args)
                if system.note:
                    cell.notes.insert(0, system.note)
                progress(cell, args.runs)
                cells.append(cell)
    return cells


def run_sweep(args: argparse.Namespace) -> Results:
    workloads = [WORKLOADS[key] for key in args.tasks]
    cells: list[Cell] = []
    with contextlib.ExitStack() as stack:
        redis, celery = (None, "not in --systems")
        if "celery" in args.systems:
            redis, celery = start_redis(stack)
            print(f"celery: {celery}", flush=True)
        pools = start_pools(stack, workloads, args)
        for workload in workloads:
            with contextlib.ExitStack() as task_stack:
                systems = start_task_systems(task_stack, workload, redis, args) + pools[workload.key]
                systems.sort(key=lambda s: SYSTEM_KEYS.index(s.key))
                cells += sweep_task(systems, workload, args)
    workers = {w.key: worker_count(w, args) for w in workloads}
    return Results(cells, workers, celery, redis is not None)


# -- the report --------------------------------------------------------------------------------


def group(cells: Sequence[Cell]) -> dict[tuple[str, int, str], list[Cell]]:
    grouped: dict[tuple[str, int, str], list[Cell]] = {}
    for cell in cells:
        grouped.setdefault((cell.task, cell.concurrency, cell.system), []).append(cell)
    return grouped


def finite(values: Sequence[float]) -> list[float]:
    return [v for v in values if not math.isnan(v)]


def ms(values: Sequence[float]) -> str:
    values = finite(values)
    if not values:
        return "-"
    return spread(values, 2 if median(values) < 10 else 1 if median(values) < 100 else 0)


def cpu(cells: Sequence[Cell], attribute: str) -> str:
    return spread(finite([cell.share(getattr(cell, attribute)) for cell in cells]), 0, 100)


def middle(cells: Sequence[Cell]) -> str:
    """The middle process's CPU: workerd's master, or Celery's main process + redis-server."""
    daemon, broker = cpu(cells, "cpu_daemon_s"), cpu(cells, "broker_cpu_s")
    if broker != "-":
        return f"{daemon} + redis {broker}"
    return daemon


def row_notes(cells: Sequence[Cell]) -> str:
    notes = []
    drained = sum(any(n.startswith("drain over") for n in cell.notes) for cell in cells)
    if drained:
        notes.append(f"drain ran out in {drained}/{len(cells)}")
    saturated = sum(cell.saturated for cell in cells)
    if saturated:
        notes.append(f"**loadgen saturated** in {saturated}/{len(cells)}")
    failed = [n for cell in cells for n in cell.notes if n.startswith("driver failed")]
    if failed:
        notes.append(failed[0])
    return "; ".join(notes)


def task_table(results: Results, task: str, concurrency: Sequence[int], systems: Sequence[str]) -> str:
    grouped = group(results.cells)
    rows = []
    for c in concurrency:
        base = median([cell.rps for cell in grouped.get((task, c, WorkerdSystem.name), [])])
        for name in systems:
            cells = grouped.get((task, c, name))
            if not cells:
                continue
            rps = [cell.rps for cell in cells]
            errors = sum(cell.errors for cell in cells) / max(1, sum(cell.requests for cell in cells))
            rows.append(
                [
                    name,
                    c,
                    spread(rps),
                    benchlib.ratio(median(rps), base) if not math.isnan(base) else "-",
                    ms([cell.p50_ms for cell in cells]),
                    ms([cell.p95_ms for cell in cells]),
                    ms([cell.p99_ms for cell in cells]),
                    f"{errors:.2%}",
                    cpu(cells, "cpu_loadgen_s"),
                    middle(cells),
                    cpu(cells, "cpu_workers_s"),
                    row_notes(cells),
                ]
            )
    headers = ["system", "c", "req/s", "vs workerd", "p50 ms", "p95 ms", "p99 ms", "errors"]
    headers += ["CPU % loadgen", "CPU % daemon (broker)", "CPU % workers", "notes"]
    return table(headers, rows)


def findings(results: Results, concurrency: Sequence[int]) -> list[str]:
    """Where workerd loses or saturates, from the medians."""
    grouped = group(results.cells)
    lines = []
    for task in results.workers:
        for c in concurrency:
            cells = {name: found for (t, cc, name), found in grouped.items() if t == task and cc == c}
            lines += cell_findings(task, c, cells)
    return lines


def figures(cells: Sequence[Cell], attribute: str) -> list[float]:
    return finite([getattr(cell, attribute) for cell in cells]) or [math.nan]


def overlap(ours: Sequence[float], theirs: Sequence[float]) -> str:
    """Flag a difference within the run-to-run spread, or within NOISE: it may be noise."""
    if min(theirs) <= max(ours) and min(ours) <= max(theirs):
        return " (ranges overlap)"
    if abs(median(theirs) - median(ours)) <= NOISE * median(ours):
        return f" (within {NOISE:.0%})"
    return ""


def peer_findings(where: str, name: str, ours: Sequence[Cell], peer: Sequence[Cell]) -> list[str]:
    """A peer with more req/s, or a lower p99, than workerd."""
    lines = []
    rps, peer_rps = figures(ours, "rps"), figures(peer, "rps")
    if median(peer_rps) > median(rps):
        times = f"{median(peer_rps) / median(rps):.2f}x" if median(rps) else "workerd none"
        lines.append(
            f"{where}: {name} {median(peer_rps):,.0f} req/s beats workerd {median(rps):,.0f} ({times})"
            + overlap(rps, peer_rps)
        )
    p99, peer_p99 = figures(ours, "p99_ms"), figures(peer, "p99_ms")
    if median(p99) > median(peer_p99):
        lines.append(
            f"{where}: workerd p99 {median(p99):.2f} ms worse than {name} {median(peer_p99):.2f} ms"
            + overlap(p99, peer_p99)
        )
    return lines


def busy_findings(where: str, name: str, cells: Sequence[Cell]) -> list[str]:
    """Errors, and a saturated load generator (or workerd master)."""
    lines = []
    errors, requests = sum(x.errors for x in cells), sum(x.requests for x in cells)
    if errors:
        lines.append(f"{where}: {name} errors {errors / requests:.2%} ({errors} of {requests})")
    loadgen = median(finite([x.share(x.cpu_loadgen_s) for x in cells]) or [math.nan])
    if loadgen >= SATURATED:
        lines.append(
            f"{where}: load generator at {loadgen:.0%} of a core driving {name}: its figures are a floor"
        )
    master = median(finite([x.share(x.cpu_daemon_s) for x in cells]) or [math.nan])
    if name == WorkerdSystem.name and master >= SATURATED:
        lines.append(f"{where}: workerd's master at {master:.0%} of a core (saturated)")
    return lines


def cell_findings(task: str, c: int, cells: dict[str, list[Cell]]) -> list[str]:
    where = f"{task}, c={c}"
    ours = cells.get(WorkerdSystem.name)
    lines = []
    for name, found in cells.items():
        if ours and name != WorkerdSystem.name:
            lines += peer_findings(where, name, ours, found)
        lines += busy_findings(where, name, found)
    return lines


def render(results: Results, args: argparse.Namespace) -> str:
    names = [
        kind.name
        for kind in (WorkerdSystem, PoolSystem, ExecutorSystem, SubprocessSystem, CelerySystem)
        if kind.key in args.systems
    ]
    parts = [
        f"Closed loop, c requests outstanding, one load generator process; {args.warmup:g} s warm-up, then "
        f"{args.duration:g} s measured; {args.runs} runs, systems interleaved (order rotated per run). "
        "Figures: median (min-max) over runs; req/s counts successful completions inside the window; "
        "CPU as % of one core over the window (loadgen: this process, all threads; daemon: workerd's master, "
        "or Celery's main process + redis-server; workers: the worker processes, for a subprocess per call "
        "the children reaped in the window).\n",
        "Drivers: "
        + "; ".join(
            f"{kind.name}: {kind.note}"
            for kind in (WorkerdSystem, PoolSystem, ExecutorSystem, SubprocessSystem, CelerySystem)
            if kind.key in args.systems
        )
        + ".\n",
    ]
    if "celery" in args.systems:
        parts.append(
            f"Celery: {results.celery}."
            if results.celery_ok
            else f"**Celery not measured**: {results.celery}.\n"
        )
    for task, workers in results.workers.items():
        workload = WORKLOADS[task]
        parts.append(f"\n### {task}: {workload.title}, {workers} worker processes per system\n")
        parts.append(task_table(results, task, args.concurrency, names))
    lines = findings(results, args.concurrency)
    parts.append("\n### Where workerd loses or saturates\n")
    parts.append("\n".join(f"- {line}" for line in lines) if lines else "- nowhere in this run")
    return "\n".join(parts)


def write_csv(path: Path, cells: Sequence[Cell]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, CSV_COLUMNS)
        writer.writeheader()
        writer.writerows(cell.row() for cell in cells)


def comma_list(
    kind: Callable[[str], Any], allowed: Sequence[Any] | None = None
) -> Callable[[str], list[Any]]:
    def parse(text: str) -> list[Any]:
        values = [kind(part.strip()) for part in text.split(",") if part.strip()]
        wrong = [v for v in values if allowed is not None and v not in allowed]
        if wrong or not values:
            raise argparse.ArgumentTypeError(f"expected a comma list of {list(allowed or [])}, got {text!r}")
        return values

    return parse


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--systems", type=comma_list(str, SYSTEM_KEYS), default=SYSTEM_KEYS)
    parser.add_argument("--tasks", type=comma_list(str, list(WORKLOADS)), default=list(WORKLOADS))
    parser.add_argument("--concurrency", type=comma_list(int), default=[1, 16, 64, 256])
    parser.add_argument("--duration", type=float, default=3.0, help="measured seconds per cell")
    parser.add_argument("--warmup", type=float, default=1.0, help="seconds per cell before the window")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--drain", type=float, default=30.0, help="most seconds to wait for stragglers")
    parser.add_argument("--workers", type=int, default=2, help="worker processes for the trivial task")
    parser.add_argument("--sleep-workers", type=int, default=16, help="worker processes for sleep50")
    parser.add_argument("--csv", type=Path, default=benchlib.BENCH_DIR / "out" / "sweep.csv")
    parser.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md alone")
    args = parser.parse_args()
    cells = len(args.systems) * len(args.tasks) * len(args.concurrency) * args.runs
    print(f"{cells} cells of {args.warmup + args.duration:g} s each, plus drains and start-ups", flush=True)
    results = run_sweep(args)
    write_csv(args.csv, results.cells)
    benchlib.report("sweep", render(results, args), write=not args.no_write)
    print(f"\n(CSV: {args.csv})")


if __name__ == "__main__":
    main()
