"""The GPU worker, as the master sees it: start it, feed it pipeline runs, watch it, restore it.

The worker is spawned as a fresh interpreter (gpu_worker.py), lazily on the first pipeline run
or at boot (`gpu.start`), and reached over its channel (transport.py). Runs go to it one at a
time from a bounded queue, through the job lifecycle (lifecycle.py); the worker says when each
starts, so a run's timeout never counts the restore or the clear it waited behind. A run past its
timeout gets the worker's stacks dumped and the worker killed (TIMEOUT); a worker that dies
(WORKER_LOST, or a retry) is respawned after a back-off. Either way the pipelines it had cached
are loaded again in the background, so the next run is warm.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import os
import signal
import time
from collections.abc import Callable
from typing import Any

from workerctl import protocol

from . import memory, processes
from .config import Config, gpu_worker_settings
from .lifecycle import WHEN_TOLD, Job, JobQueue, Lane, Ledger, settle
from .metrics import CACHE_EVENTS, Metrics
from .pool import BACKOFF_FIRST_S, BACKOFF_MAX_S, FRAME_SLACK, STACK_DUMP_GRACE_S, read_text, remove_quietly
from .reactor import Reactor
from .transport import Channel, ChannelError, channel_pair
from .worker import stack_path

log = logging.getLogger("workerd.gpu")

# A memory or clear request to the GPU worker is answered without it after this long.
ANSWER_WAIT_S = 5.0
# clear waits for the run in progress, which may be long.
CLEAR_WAIT_S = 120.0

Callback = Callable[[Any], None]


class GpuWorker:
    def __init__(
        self, config: Config, stack_dir: str, ledger: Ledger, reactor: Reactor, metrics: Metrics
    ) -> None:
        self.config = config
        self.stack_dir = stack_dir
        self.ledger = ledger
        self.reactor = reactor
        self.pid: int | None = None
        self.channel: Channel | None = None
        # stopped | starting | idle | busy | killing | killed | stopping (idle/busy: see `state`)
        self.phase = "stopped"
        self.device: str | None = None
        self.queue = JobQueue()
        self.lane = Lane(1, starts=WHEN_TOLD)
        self.kill_at = math.inf
        self.expired: Job | None = None  # the run it is being killed for: TIMEOUT at the kill
        self.respawn_at = math.inf
        self.failures = 0
        self.cached: list[str] = []  # what the worker held, to restore after a crash
        self.restoring = False
        self.runs = 0
        self.stopping = False
        self.restart_pending = False
        self.tokens = (b"%d" % n for n in itertools.count(1))
        self.waiting: dict[bytes, tuple[Callback, float]] = {}
        self.counters = metrics.events

    @property
    def enabled(self) -> bool:
        return self.config.gpu.enabled != "false" and bool(self.config.pipelines)

    @property
    def state(self) -> str:
        if self.phase == "serving":
            return "busy" if self.lane.jobs else "idle"
        return "killing" if self.phase == "killed" else self.phase

    @property
    def running(self) -> bool:
        return bool(self.lane.jobs)

    # -- process -------------------------------------------------------------------------------

    def settings(self) -> dict[str, Any]:
        return {
            "master_pid": os.getpid(),
            "log_level": logging.getLogger().getEffectiveLevel(),
            "stack_dir": self.stack_dir,
            "max_message_bytes": self.max_frame(),
            **gpu_worker_settings(self.config),
        }

    def max_frame(self) -> int:
        return int(self.config.daemon.max_message_mb * 1024 * 1024)

    def spawn(self) -> None:
        """Start the worker; if the kernel refuses, answer what waits and try again later."""
        self.respawn_at = math.inf
        channel, theirs = channel_pair(self.max_frame() + FRAME_SLACK)
        try:
            pid = processes.spawn(
                "workerd.gpu_worker", [json.dumps(self.settings()), str(theirs.fileno())], [theirs.fileno()]
            )
        except OSError as exc:
            channel.close()
            self.spawn_failed(exc)
            return
        finally:
            theirs.close()
        self.pid, self.channel, self.phase = pid, channel, "starting"
        self.reactor.watch(channel.fileno(), self.handle_channel)
        log.info("GPU worker starting (pid %d)", pid)

    def spawn_failed(self, exc: OSError) -> None:
        self.failures += 1
        delay = min(BACKOFF_FIRST_S * 2 ** (self.failures - 1), BACKOFF_MAX_S)
        log.error("cannot start the GPU worker: %s; retrying in %.1f s", exc, delay)
        message = f"cannot start the GPU worker: {exc}; retrying in {delay:.1f} s"
        for job in self.queue.drain():
            self.ledger.fail(job, protocol.INTERNAL, message)
        self.respawn_at = time.monotonic() + delay

    def reconfigure(self, config: Config) -> None:
        """Take a reloaded config. A running worker whose [gpu] or [pipelines] changed is
        replaced once idle; pipelines it held that are still configured are restored. Queued
        runs of a pipeline that is gone (or of a GPU worker now disabled) end now."""
        changed = (config.gpu, config.pipelines) != (self.config.gpu, self.config.pipelines)
        self.config = config
        self.cached = [name for name in self.cached if name in config.pipelines]
        for key in self.queue.waiting_keys():
            if not self.enabled or key not in config.pipelines:
                reason = (
                    "the GPU worker is disabled ([gpu] enabled)"
                    if not self.enabled
                    else "it is no longer configured"
                )
                for job in self.queue.pop_key(key):
                    self.ledger.fail(
                        job, protocol.UNKNOWN_TASK, f"pipeline {key!r}: {reason} (after a reload)"
                    )
        if changed and self.pid is not None:
            self.restart_pending = True
            self.restart_if_idle()

    def restart_if_idle(self) -> None:
        if self.restart_pending and self.state == "idle":
            self.restart_pending = False
            self.stop_process()

    def ensure_started(self) -> None:
        if self.pid is None and self.respawn_at == math.inf and not self.stopping:
            self.spawn()

    def reaped(self, pid: int, status: int) -> bool:
        """A child of the master exited: is it this worker?"""
        if pid != self.pid:
            return False
        how = processes.describe_exit(status)
        was = self.phase
        self.close_channel()
        self.pid, self.phase = None, "stopped"
        # A death inside the kill window ends the kill too (settle answers the TIMEOUT): a
        # kill_at left set is a deadline forever past, and the loop spun on it at full CPU.
        self.kill_at, self.expired = math.inf, None
        retry = None if self.stopping else self.retry
        if settle(
            self.ledger, self.lane, pid, f"GPU worker {pid}", how, self.stack_file(pid), retry, self.hand_back
        ):
            self.counters["gpu_timeouts"] += 1
        remove_quietly(stack_path(self.stack_dir, pid))
        self.answer_waiting(f"GPU worker {how}")
        if self.stopping:
            return True
        if was == "stopping":  # replaced after a config reload: start the new one now
            self.respawn_at = time.monotonic() if self.enabled else math.inf
            return True
        log.warning("GPU worker %d %s (state %s)", pid, how, was)
        if was not in ("killing", "killed"):  # killed for its timeout: counted as gpu_timeouts
            self.counters["gpu_worker_deaths"] += 1
        if self.restoring:
            self.cached = []  # it died restoring: do not try the same thing in a loop
        self.restoring = False
        self.failures += 1
        delay = min(BACKOFF_FIRST_S * 2 ** (self.failures - 1), BACKOFF_MAX_S)
        self.respawn_at = time.monotonic() + (delay if was == "starting" else 0.0)
        return True

    def stack_file(self, pid: int) -> Callable[[], str]:
        return lambda: read_text(stack_path(self.stack_dir, pid))

    def retry(self, job: Job) -> None:
        self.queue.push(job, front=True)

    def hand_back(self, job: Job) -> None:
        if self.stopping:
            self.ledger.fail(job, protocol.SHUTTING_DOWN, "workerd is stopping")
        else:
            self.queue.push(job, front=True)

    def close_channel(self) -> None:
        if self.channel is not None:
            self.read_channel()  # what it sent before it went
            self.reactor.unwatch(self.channel.fileno())
            self.channel.close()
            self.channel = None

    def answer_waiting(self, why: str) -> None:
        for token, (callback, _) in list(self.waiting.items()):
            del self.waiting[token]
            callback({"error": why})

    # -- channel -------------------------------------------------------------------------------

    def send(self, frames: list[Any]) -> None:
        if self.channel is None:
            return
        self.channel.send(frames)
        self.flush()

    def flush(self) -> None:
        channel = self.channel
        if channel is None:
            return
        try:
            done = channel.flush()
        except OSError:
            done = True  # gone: reaping it settles everything
            channel.out.clear()
        self.reactor.want_write(channel.fileno(), None if done else self.flush)

    def handle_channel(self) -> None:
        self.read_channel()
        self.dispatch()

    def read_channel(self) -> None:
        channel = self.channel
        if channel is None:
            return
        try:
            messages = channel.receive()
        except ChannelError as exc:
            log.error("GPU worker broke its channel (%s): killing it", exc)
            messages = None
        if messages is None:
            self.reactor.unwatch(channel.fileno())
            if not channel.closed and self.pid is not None:
                processes.signal_quietly(self.pid, signal.SIGKILL)
            return
        now = time.monotonic()
        for frames in messages:
            self.message(frames, now)

    def message(self, frames: list[Any], now: float) -> None:
        kind = frames[0]
        if kind == b"start":
            self.lane.started(int(frames[1]), now)
        elif kind == b"done":
            job = self.lane.done(int(frames[1]), now)
            if job is not None:
                self.run_done(job, frames[2], frames[3], protocol.unpack(frames[4]), frames[5:])
        elif kind == b"ready":
            self.ready(protocol.unpack(frames[1]))
        elif kind == b"restored":
            self.restoring = False
            self.failures = 0
            log.info("GPU worker restored pipelines: %s", protocol.unpack(frames[1]))
        elif kind in (b"memory", b"cleared"):
            waiting = self.waiting.pop(bytes(frames[1]), None)
            if waiting:
                waiting[0](protocol.unpack(frames[2]))

    def ready(self, info: dict[str, Any]) -> None:
        self.device = info["device"]
        if self.phase == "starting":
            self.phase = "serving"
        log.info("GPU worker ready on %s (imports took %.2f s)", self.device, info["import_s"])
        if self.config.gpu.enabled == "true" and not str(self.device).startswith("cuda"):
            log.warning("[gpu] enabled = true but no CUDA device is usable: pipelines run on %s", self.device)
        if self.restart_pending:
            # A reload changed its config while it started: replace it now. Nothing else ever
            # sees it idle (dispatch holds back while a restart is pending), so it waited for good.
            self.restart_if_idle()
            return
        if self.cached:
            self.restoring = True
            self.send([b"restore", protocol.pack(self.cached)])

    def run_done(self, job: Job, outcome: bytes, frame: bytes, extra: dict[str, Any], raw: list[Any]) -> None:
        self.runs += 1
        self.cached = list(extra.get("cached", []))
        if not self.restoring:
            self.failures = 0
        for name, key in CACHE_EVENTS.items():  # this run's cache hits, misses and evictions
            self.counters[key] += int(extra.get(name, 0))
        self.ledger.result(job, outcome, frame, raw)
        if self.stopping:
            self.stop_process()
        self.restart_if_idle()

    # -- jobs ----------------------------------------------------------------------------------

    def submit(self, job: Job) -> None:
        self.queue.push(job)
        self.ensure_started()
        self.dispatch()

    def dispatch(self) -> None:
        if self.phase != "serving" or self.lane.jobs or not self.queue or self.restart_pending:
            return
        job = self.queue.take(lambda key: True)
        if job is not None:
            self.lane.add(job, time.monotonic())
            self.send([b"run", b"%d" % job.id, job.body, *job.raw])

    def cancel(self, job: Job, terminate: bool) -> str:
        """`cancel` for a pipeline run: queued ones surely; a run handed to the worker is
        "running" (the worker may have begun it) unless terminated with its worker."""
        if self.queue.remove(job):
            self.ledger.cancel_reply(job)
            return "cancelled"
        if job not in self.lane.jobs:
            return "unknown"
        if not terminate or self.pid is None or self.phase in ("killing", "killed"):
            return "running"
        job.cancelled = True
        self.ledger.cancel_reply(job, terminated=True)
        processes.signal_quietly(self.pid, signal.SIGKILL)
        self.phase = "killed"
        return "cancelled"

    def next_deadline(self) -> float:
        times = [self.respawn_at, self.kill_at, self.lane.next_deadline()]
        times.extend(deadline for _, deadline in self.waiting.values())
        return min(times)

    def tick(self) -> None:
        now = time.monotonic()
        if self.phase == "killing" and now >= self.kill_at:
            self.finish_kill()
        elif self.phase not in ("killing", "killed") and self.lane.next_deadline() <= now:
            self.start_kill(now)
        for token, (callback, deadline) in list(self.waiting.items()):
            if now >= deadline:
                del self.waiting[token]
                callback({"error": "the GPU worker did not answer in time", "state": self.state})
        if now >= self.respawn_at and not self.stopping:
            self.spawn()
        self.dispatch()

    def start_kill(self, now: float) -> None:
        """A run went past its timeout: its answer is TIMEOUT from now on; ask for the stacks."""
        self.read_channel()  # a result on its way settles it
        job = self.lane.running
        if job is None or job.deadline > now or self.pid is None:
            return
        job.expired = True
        self.expired = job
        self.phase = "killing"
        self.kill_at = now + STACK_DUMP_GRACE_S
        processes.signal_quietly(self.pid, signal.SIGUSR1)

    def finish_kill(self) -> None:
        """Answer TIMEOUT with the stacks the worker dumped, and kill it; reaping it respawns it."""
        self.kill_at = math.inf
        self.phase = "killed"
        if self.pid is None:
            return
        stack = read_text(stack_path(self.stack_dir, self.pid))
        processes.signal_quietly(self.pid, signal.SIGKILL)
        job, self.expired = self.expired, None
        if job is not None:
            self.counters["gpu_timeouts"] += 1
            self.ledger.timed_out(job, self.pid, stack, f"GPU worker {self.pid}")

    # -- requests to the worker ------------------------------------------------------------------

    def ask(self, op: bytes, args: list[bytes], callback: Callback, wait: float) -> None:
        """Send a memory or clear request; callback gets the answer, or an error dict."""
        if self.phase != "serving" or self.restart_pending or self.channel is None:
            callback(None)
            return
        token = next(self.tokens)
        self.waiting[token] = (callback, time.monotonic() + wait)
        self.send([op, token, *args])

    def memory(self, callback: Callback) -> None:
        self.ask(b"memory", [], callback, ANSWER_WAIT_S)

    def clear(self, level: str, callback: Callback) -> None:
        self.ask(b"clear", [level.encode()], callback, CLEAR_WAIT_S)

    def describe(self) -> list[dict[str, Any]]:
        """The worker's line in memory_status's `workers`."""
        if self.pid is None:
            return []
        return [
            {"pid": self.pid, "kind": "gpu", "state": self.state, "tasks_done": self.runs}
            | memory.process_memory(self.pid)
        ]

    # -- stop ----------------------------------------------------------------------------------

    def begin_stop(self) -> None:
        self.stopping = True
        # No respawn from now on: a back-off left pending would come due and stay due (tick
        # never spawns while stopping), and the loop spun on it for the rest of the stop.
        self.respawn_at = math.inf
        for job in self.queue.drain():
            self.ledger.fail(job, protocol.SHUTTING_DOWN, "workerd is stopping")
        self.answer_waiting("workerd is stopping")
        if self.state in ("idle", "starting") and self.pid is not None:
            self.stop_process()

    def stop_process(self) -> None:
        if self.state == "idle":
            self.send([b"stop"])
        elif self.pid is not None:
            processes.signal_quietly(self.pid, signal.SIGTERM)
        self.phase = "stopping"

    def abort_running(self) -> None:
        for job in list(self.lane.jobs):
            self.ledger.fail(
                job, protocol.SHUTTING_DOWN, f"workerd stopped before {job.name} finished (grace period over)"
            )
        if self.pid is not None:
            processes.signal_quietly(self.pid, signal.SIGKILL)
            self.phase = "stopping"
