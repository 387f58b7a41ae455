"""The GPU worker, as the master sees it: start it, feed it pipeline runs, watch it, restore it.

The worker is spawned as a fresh interpreter (gpu_worker.py), lazily on the first pipeline run
or at boot (`gpu.start`). Runs go to it one at a time from a bounded queue; the master keeps the
deadline of the run in progress. A run past its timeout gets the worker's stacks dumped and the
worker killed (TIMEOUT); a worker that dies (WORKER_LOST) is respawned after a back-off. Either
way the pipelines it had cached are loaded again in the background, so the next run is warm.
"""

from __future__ import annotations

import collections
import itertools
import json
import logging
import math
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import zmq

from workerctl import protocol
from workerctl.frames import readable

from . import memory
from .config import Config, gpu_worker_settings
from .jobs import Job
from .metrics import CACHE_EVENTS, Metrics, error_outcome
from .pool import BACKOFF_FIRST_S, BACKOFF_MAX_S, STACK_DUMP_GRACE_S, Reply, read_text, remove_quietly
from .worker import stack_path

log = logging.getLogger("workerd.gpu")

# A memory or clear request to the GPU worker is answered without it after this long.
ANSWER_WAIT_S = 5.0
# clear waits for the run in progress, which may be long.
CLEAR_WAIT_S = 120.0

Callback = Callable[[Any], None]


class GpuWorker:
    def __init__(
        self,
        config: Config,
        backend: zmq.Socket[Any],
        endpoint: str,
        stack_dir: str,
        reply: Reply,
        metrics: Metrics,
    ) -> None:
        self.config = config
        self.backend = backend
        self.endpoint = endpoint
        self.stack_dir = stack_dir
        self.reply = reply
        self.process: subprocess.Popen[bytes] | None = None
        self.state = "stopped"  # stopped | starting | idle | busy | killing
        self.device: str | None = None
        self.queue: collections.deque[Job] = collections.deque()
        self.job: Job | None = None
        self.kill_at = math.inf
        self.respawn_at = math.inf
        self.failures = 0
        self.cached: list[str] = []  # what the worker held, to restore after a crash
        self.restoring = False
        self.runs = 0
        self.stopping = False
        self.restart_pending = False
        self.killed_for_timeout = False  # its next exit is our kill, not a death
        self.tokens = (b"%d" % n for n in itertools.count(1))
        self.waiting: dict[bytes, tuple[Callback, float]] = {}
        self.metrics = metrics
        self.counters = metrics.events

    @property
    def enabled(self) -> bool:
        return self.config.gpu.enabled != "false" and bool(self.config.pipelines)

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    # -- process -------------------------------------------------------------------------------

    def settings(self) -> dict[str, Any]:
        return {
            "master_pid": os.getpid(),
            "log_level": logging.getLogger().getEffectiveLevel(),
            "endpoint": self.endpoint,
            "stack_dir": self.stack_dir,
            "max_message_bytes": int(self.config.daemon.max_message_mb * 1024 * 1024),
            **gpu_worker_settings(self.config),
        }

    def spawn(self) -> None:
        self.respawn_at = math.inf
        self.process = subprocess.Popen(
            [sys.executable, "-m", "workerd.gpu_worker", json.dumps(self.settings())],
            stdin=subprocess.DEVNULL,
        )
        self.state = "starting"
        log.info("GPU worker starting (pid %d)", self.process.pid)

    def reconfigure(self, config: Config) -> None:
        """Take a reloaded config. A running worker whose [gpu] or [pipelines] changed is
        replaced once idle; pipelines it held that are still configured are restored."""
        changed = (config.gpu, config.pipelines) != (self.config.gpu, self.config.pipelines)
        self.config = config
        self.cached = [name for name in self.cached if name in config.pipelines]
        if changed and self.process is not None:
            self.restart_pending = True
            self.restart_if_idle()

    def restart_if_idle(self) -> None:
        if self.restart_pending and self.state == "idle":
            self.restart_pending = False
            self.stop_process()

    def ensure_started(self) -> None:
        if self.process is None and self.respawn_at == math.inf and not self.stopping:
            self.spawn()

    def check_exit(self) -> None:
        """Called on SIGCHLD: has the worker died?"""
        if self.process is None or self.process.poll() is None:
            return
        status = self.process.returncode
        pid = self.process.pid
        self.process = None
        remove_quietly(stack_path(self.stack_dir, pid))
        was, timed_out = self.state, self.killed_for_timeout
        self.state, self.killed_for_timeout = "stopped", False
        how = f"killed by signal {-status}" if status < 0 else f"exited with status {status}"
        if self.stopping:
            # No respawn and no retry now, but what waited on this worker is answered at once:
            # it used to be left as it was, so a run in flight held the daemon's exit until the
            # grace period ended (then got SHUTTING_DOWN), and a memory or clear request waiting
            # on the worker got no reply at all.
            job, self.job = self.job, None
            if job is not None and not job.answered:
                self.job_lost(job, pid, how)
            self.answer_waiting(how)
            return
        if was == "stopping":  # replaced after a config reload: start the new one now
            self.respawn_at = time.monotonic() if self.enabled else math.inf
            return
        log.warning("GPU worker %d %s (state %s)", pid, how, was)
        if not timed_out:  # killed for its timeout: counted as gpu_timeouts
            self.counters["gpu_worker_deaths"] += 1
        job, self.job = self.job, None
        if job is not None and not job.answered:
            self.job_lost(job, pid, how)
        if self.restoring:
            self.cached = []  # it died restoring: do not try the same thing in a loop
        self.answer_waiting(how)
        self.failures += 1
        delay = min(BACKOFF_FIRST_S * 2 ** (self.failures - 1), BACKOFF_MAX_S)
        self.respawn_at = time.monotonic() + (delay if was == "starting" else 0.0)

    def answer_waiting(self, how: str) -> None:
        for token, (callback, _) in list(self.waiting.items()):
            del self.waiting[token]
            callback({"error": f"GPU worker {how}"})

    # -- frames --------------------------------------------------------------------------------

    def handle_backend(self) -> None:
        while readable(self.backend):
            self.handle_frames(self.backend.recv_multipart()[1:])
        self.dispatch()

    def handle_frames(self, frames: list[bytes]) -> None:
        kind = frames[0]
        if kind == b"ready":
            info = protocol.unpack(frames[1])
            self.device = info["device"]
            self.state = "idle"
            log.info("GPU worker ready on %s (imports took %.2f s)", self.device, info["import_s"])
            if self.config.gpu.enabled == "true" and not str(self.device).startswith("cuda"):
                log.warning(
                    "[gpu] enabled = true but no CUDA device is usable: pipelines run on %s", self.device
                )
            if self.cached:
                self.restoring = True
                self.backend.send_multipart([b"gpu", b"restore", protocol.pack(self.cached)])
        elif kind == b"restored":
            self.restoring = False
            self.failures = 0
            log.info("GPU worker restored pipelines: %s", protocol.unpack(frames[1]))
        elif kind == b"done":
            self.run_done(frames[1], frames[2], frames[3], protocol.unpack(frames[4]), frames[5:])
        elif kind in (b"memory", b"cleared"):
            waiting = self.waiting.pop(frames[1], None)
            if waiting:
                waiting[0](protocol.unpack(frames[2]))

    def run_done(
        self, job_id: bytes, outcome: bytes, frame: bytes, extra: dict[str, Any], raw: list[bytes]
    ) -> None:
        job = self.job
        if job is None or job_id != b"%d" % job.id or self.state != "busy":
            return
        self.job = None
        self.state = "idle"
        self.runs += 1
        self.cached = list(extra.get("cached", []))
        if not self.restoring:
            self.failures = 0
        job.answered = True
        kind = outcome.decode()
        self.counters[f"pipeline_{kind}"] += 1
        for name, key in CACHE_EVENTS.items():  # this run's cache hits, misses and evictions
            self.counters[key] += int(extra.get(name, 0))
        code = error_outcome(frame) if kind == "error" else kind
        self.metrics.answered("execute", code, job.accepted_at, "gpu")
        self.reply(job.client, frame, raw)
        if self.stopping:
            self.stop_process()
        self.restart_if_idle()

    def job_lost(self, job: Job, pid: int, how: str) -> None:
        if job.retries > 0 and not self.stopping:
            job.retries -= 1
            self.counters["retries"] += 1
            log.info("pipeline run %d: GPU worker %d %s; retrying (%d left)", job.id, pid, how, job.retries)
            self.queue.appendleft(job)  # runs on the respawned worker, once it is ready
            return
        self.fail(
            job,
            protocol.WORKER_LOST,
            f"GPU worker {pid} {how} while running {job.name}",
            {"pid": pid, "attempts": job.attempts},
        )

    def fail(self, job: Job, code: str, message: str, details: dict[str, Any] | None = None) -> None:
        job.answered = True
        self.counters[f"pipeline_{code.lower()}"] += 1
        self.metrics.answered("execute", code.lower(), job.accepted_at, "gpu")
        self.reply(job.client, protocol.encode_error(job.request_id, code, message, details))

    # -- jobs ----------------------------------------------------------------------------------

    def submit(self, job: Job) -> None:
        self.queue.append(job)
        self.ensure_started()
        self.dispatch()

    def dispatch(self) -> None:
        if self.state != "idle" or not self.queue:
            return
        job = self.queue.popleft()
        now = time.monotonic()
        job.started_at, job.deadline = now, now + job.timeout_s
        job.attempts += 1
        self.job, self.state = job, "busy"
        self.backend.send_multipart([b"gpu", b"run", b"%d" % job.id, job.body, *job.raw])

    def next_deadline(self) -> float:
        times = [self.respawn_at, self.kill_at]
        if self.job is not None and self.state == "busy":
            times.append(self.job.deadline)
        times.extend(deadline for _, deadline in self.waiting.values())
        return min(times)

    def tick(self) -> None:
        now = time.monotonic()
        if self.state == "busy" and self.job is not None and now >= self.job.deadline and self.process:
            self.state = "killing"
            self.kill_at = now + STACK_DUMP_GRACE_S
            self.process.send_signal(signal.SIGUSR1)
        elif self.state == "killing" and now >= self.kill_at:
            self.finish_kill()
        for token, (callback, deadline) in list(self.waiting.items()):
            if now >= deadline:
                del self.waiting[token]
                callback({"error": "the GPU worker did not answer in time", "state": self.state})
        if now >= self.respawn_at and not self.stopping:
            self.spawn()

    def finish_kill(self) -> None:
        self.kill_at = math.inf
        job, self.job = self.job, None
        if self.process is None:
            return
        pid = self.process.pid
        stack = read_text(stack_path(self.stack_dir, pid))
        self.process.kill()
        self.killed_for_timeout = True
        if job is not None and not job.answered:
            self.counters["gpu_timeouts"] += 1
            self.fail(
                job,
                protocol.TIMEOUT,
                f"pipeline {job.name} ran longer than {job.timeout_s:g} s; GPU worker {pid} was killed",
                {"timeout_s": job.timeout_s, "pid": pid, "traceback": stack},
            )
        # check_exit() (on SIGCHLD) reaps it and respawns at once; the cache is then restored.

    # -- requests to the worker ------------------------------------------------------------------

    def ask(self, op: bytes, args: list[bytes], callback: Callback, wait: float) -> None:
        """Send a memory or clear request; callback gets the answer, or an error dict."""
        if self.state in ("stopped", "starting", "killing") or self.process is None:
            callback(None)
            return
        token = next(self.tokens)
        self.waiting[token] = (callback, time.monotonic() + wait)
        self.backend.send_multipart([b"gpu", op, token, *args])

    def memory(self, callback: Callback) -> None:
        self.ask(b"memory", [], callback, ANSWER_WAIT_S)

    def clear(self, level: str, callback: Callback) -> None:
        self.ask(b"clear", [level.encode()], callback, CLEAR_WAIT_S)

    def describe(self) -> list[dict[str, Any]]:
        """The worker's line in memory_status's `workers`."""
        if self.process is None:
            return []
        return [
            {
                "pid": self.process.pid,
                "kind": "gpu",
                "state": self.state,
                "tasks_done": self.runs,
                **memory.process_memory(self.process.pid),
            }
        ]

    # -- stop ----------------------------------------------------------------------------------

    def begin_stop(self) -> None:
        self.stopping = True
        while self.queue:
            self.fail(self.queue.popleft(), protocol.SHUTTING_DOWN, "workerd is stopping")
        if self.state in ("idle", "starting") and self.process is not None:
            self.stop_process()

    def stop_process(self) -> None:
        if self.state == "idle":
            self.backend.send_multipart([b"gpu", b"stop"])
        elif self.process is not None:
            self.process.terminate()
        self.state = "stopping"

    @property
    def running(self) -> bool:
        return self.job is not None

    def abort_running(self) -> None:
        job, self.job = self.job, None
        if job is not None and not job.answered:
            self.fail(
                job, protocol.SHUTTING_DOWN, f"workerd stopped before {job.name} finished (grace period over)"
            )
        if self.process is not None:
            self.process.kill()
            self.state = "stopping"

    def close(self) -> None:
        if self.process is not None:
            try:
                self.process.wait(timeout=2)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
