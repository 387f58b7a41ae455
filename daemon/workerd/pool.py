"""The CPU pool, as the master sees it: zygotes, workers, the queue, and their life cycles.

Everything here runs on the master's one thread. The pool never blocks: it sends frames to
workers, reads zygote events, and answers clients through the `reply` callback; the master's
loop calls `handle_*` when something arrives and `tick` when a deadline may have passed.

Worker states:

    starting --ready--> idle <--done-- busy
                         |  \\--run-->/   |
                         |               |-- deadline --> killing --(stack read, SIGKILL)--> gone
                         +--stop--> stopping --exit--> gone       (a busy worker to be retired
                                                                   stops after its task)
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import logging
import math
import os
import random
import signal
import subprocess
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Protocol

import zmq

from workerctl import protocol
from workerctl.frames import readable, send_frames

from . import memory
from .config import Config
from .jobs import Job
from .metrics import Metrics, error_outcome
from .worker import stack_path, worker_id
from .zygote import ZygoteHandle

log = logging.getLogger("workerd.pool")

# How long a timed-out worker gets to write its stack dump before SIGKILL.
STACK_DUMP_GRACE_S = 0.2
# A clear_memory fan-out waits this long for busy workers before answering without them.
FANOUT_WAIT_S = 10.0
# Respawn back-off after crashes at start-up, so a broken worker never becomes a fork loop.
BACKOFF_FIRST_S = 0.1
BACKOFF_MAX_S = 30.0


MAX_WORKERS = 1024


class Reply(Protocol):
    """Sends one reply body (and its raw frames) to a client."""

    def __call__(self, client: bytes, frame: bytes, raw: Sequence[bytes] = ()) -> None: ...


@dataclasses.dataclass(eq=False)
class Worker:
    pid: int
    generation: int
    task_limit: float
    state: str = "starting"
    tasks_done: int = 0
    job: Job | None = None
    retire: bool = False  # stop after the current task
    kill_at: float = math.inf
    started_at: float = dataclasses.field(default_factory=time.monotonic)

    @property
    def ident(self) -> bytes:
        return worker_id(self.pid)

    @property
    def live(self) -> bool:
        """Counts toward the pool's size: neither on its way out nor marked to leave."""
        return self.state in ("starting", "idle", "busy") and not self.retire


@dataclasses.dataclass
class Fanout:
    """A clear_memory(gc) waiting for each worker's answer."""

    done: Callable[[dict[str, Any]], None]
    waiting: set[int]
    deadline: float
    results: list[dict[str, Any]] = dataclasses.field(default_factory=list)


def plan_workers(
    workers: Iterable[Worker], target: int, generation: int, pending: int
) -> tuple[int, list[Worker]]:
    """How many workers to fork now and which to retire, given the pool as it stands.

    Outside a reload, fork what is missing and retire the excess (idle ones first). During a
    reload (live workers of an older generation exist), replace them one by one: keep one new
    worker starting at a time and retire one old worker for each new one that is ready, so
    capacity stays at the target and memory holds at most one extra worker, never double.
    """
    live = [w for w in workers if w.live]
    current = [w for w in live if w.generation == generation]
    old = [w for w in live if w.generation != generation]
    starting = pending + sum(1 for w in current if w.state == "starting")
    if old:
        ready = len(current) + pending - starting
        retire = pick_retirees(old, len(old) + ready - target)
        forks = 1 if starting == 0 and len(current) + pending < target else 0
        return forks, retire
    missing = target - len(current) - pending
    return max(missing, 0), pick_retirees(current, -missing)


def pick_retirees(workers: list[Worker], count: int) -> list[Worker]:
    if count <= 0:
        return []
    order = {"starting": 0, "idle": 1, "busy": 2}
    return sorted(workers, key=lambda w: order[w.state])[:count]


class Pool:
    def __init__(
        self,
        config: Config,
        backend: zmq.Socket[Any],
        endpoint: str,
        stack_dir: str,
        reply: Reply,
        metrics: Metrics,
    ) -> None:
        self.backend = backend
        self.endpoint = endpoint
        self.stack_dir = stack_dir
        self.reply = reply
        self.config = config
        self.target = config.pool.worker_count()
        self.generation = 0  # the generation serving now; numbers are never reused
        self.generations = itertools.count(1)
        self.zygotes: dict[int, ZygoteHandle] = {}
        self.workers: dict[int, Worker] = {}
        self.idle: collections.deque[Worker] = collections.deque()
        self.queue: collections.deque[Job] = collections.deque()
        self.fanouts: list[Fanout] = []
        # Workers that said "ready" before the zygote's "forked" event for them was read.
        self.early_ready: set[int] = set()
        self.failure: str | None = None  # why there is no usable zygote, if there is none
        self.stopping = False
        self.respawn_at = 0.0
        self.early_deaths = 0
        self.zygote_restart_at = math.inf
        self.zygote_failures = 0
        # Called with (generation, ok, message) when a zygote is ready or failed to import.
        self.on_generation: Callable[[int, bool, str], None] | None = None
        self.metrics = metrics
        self.counters = metrics.events

    # -- zygotes -------------------------------------------------------------------------------

    def settings(self, config: Config) -> dict[str, Any]:
        pool = config.pool
        return {
            "preload": list(pool.preload),
            "task_modules": list(config.tasks.modules),
            "gc_freeze": pool.gc_freeze,
            "endpoint": self.endpoint,
            "stack_dir": self.stack_dir,
            "max_message_bytes": int(config.daemon.max_message_mb * 1024 * 1024),
            "report_uss": pool.max_worker_memory_mb > 0,
        }

    def start_generation(self, config: Config, restart: bool = False) -> int:
        """Start a zygote for a new generation of task code; workers follow once it is ready.

        The config takes effect only when the zygote is ready: a reload whose code fails to
        import leaves the running generation, and its settings, untouched. A restart (after the
        zygote died) keeps the pool's current size."""
        generation = next(self.generations)
        self.zygotes[generation] = ZygoteHandle(self.settings(config), generation, config, restart)
        log.info("zygote generation %d starting (pid %d)", generation, self.zygotes[generation].pid)
        return generation

    def handle_zygote(self, zygote: ZygoteHandle) -> None:
        events = zygote.read_events()
        if events is None:
            if zygote.retiring:
                self.discard_zygote(zygote)
            else:
                self.lose_zygote(zygote)
            self.manage_workers()
            return
        for event in events:
            kind = event.get("event")
            if kind == "ready":
                self.zygote_ready(zygote, event)
            elif kind == "failed":
                self.zygote_failed(
                    zygote, f"task code failed to import: {event['error']}", event["traceback"]
                )
            elif kind == "forked":
                worker = Worker(event["pid"], zygote.generation, self.task_limit())
                self.workers[worker.pid] = worker
                if worker.pid in self.early_ready:
                    self.early_ready.discard(worker.pid)
                    self.worker_ready(worker)
            elif kind == "exited":
                self.worker_exited(event["pid"], event["status"])
        self.manage_workers()

    def zygote_ready(self, zygote: ZygoteHandle, event: dict[str, Any]) -> None:
        zygote.ready = True
        self.zygote_failures = 0
        log.info("zygote generation %d ready: imports took %.3f s", zygote.generation, event["import_s"])
        if zygote.generation > self.generation:
            self.generation = zygote.generation
            self.config = zygote.config
            if not zygote.restart:
                self.target = zygote.config.pool.worker_count()
            self.failure = None
            if self.on_generation:
                self.on_generation(zygote.generation, True, f"generation {zygote.generation} ready")
        self.dispatch()

    def zygote_failed(self, zygote: ZygoteHandle, message: str, details: str = "") -> None:
        log.error("zygote generation %d: %s\n%s", zygote.generation, message, details)
        self.discard_zygote(zygote)
        current = self.zygotes.get(self.generation)
        if current is None or not current.ready:
            # Nothing to fall back on: stay up (ping, status, reload work) but refuse CPU tasks
            # until a reload brings good code. Never retried on our own: that is a fork loop.
            self.failure = message
            self.fail_queue(protocol.INTERNAL, f"CPU pool unavailable: {message}")
        if self.on_generation:
            self.on_generation(zygote.generation, False, message)

    def lose_zygote(self, zygote: ZygoteHandle) -> None:
        """The zygote died (its workers die with it): answer their jobs, restart it later."""
        if not zygote.ready:
            status = zygote.process.wait()
            self.zygote_failed(zygote, f"the zygote died while importing task code (exit status {status})")
            return
        log.error("zygote generation %d (pid %d) died", zygote.generation, zygote.pid)
        for worker in [w for w in self.workers.values() if w.generation == zygote.generation]:
            try:
                os.kill(worker.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.worker_exited(worker.pid, -signal.SIGKILL)
        self.discard_zygote(zygote)
        if zygote.generation == self.generation and not self.stopping:
            # Restarted as a new generation of the same code, after a back-off.
            self.zygote_failures += 1
            delay = min(BACKOFF_FIRST_S * 2**self.zygote_failures, BACKOFF_MAX_S)
            self.zygote_restart_at = time.monotonic() + delay

    def discard_zygote(self, zygote: ZygoteHandle) -> None:
        """Forget a zygote whose event pipe reached EOF (so it is exiting) and reap it."""
        zygote.close()
        try:
            zygote.process.wait(timeout=1)
        except subprocess.TimeoutExpired:
            zygote.process.kill()
            zygote.process.wait()
        self.zygotes.pop(zygote.generation, None)

    def retire_old_zygotes(self) -> None:
        """Close the command pipe of each older zygote left without workers; EOF follows."""
        for generation, zygote in list(self.zygotes.items()):
            if generation >= self.generation or zygote.retiring:
                continue
            if not any(w.generation == generation for w in self.workers.values()):
                log.info("zygote generation %d retired", generation)
                zygote.retire()

    # -- workers -------------------------------------------------------------------------------

    def task_limit(self) -> float:
        limit = self.config.pool.max_tasks_per_worker
        if not limit:
            return math.inf
        # Jitter, so workers started together do not all recycle together.
        return limit + random.randint(0, max(1, limit // 10))

    def manage_workers(self) -> None:
        if self.stopping:
            return
        self.retire_old_zygotes()
        zygote = self.zygotes.get(self.generation)
        if zygote is None or not zygote.ready:
            return
        forks, retire = plan_workers(
            self.workers.values(), self.target, self.generation, zygote.pending_forks
        )
        for worker in retire:
            self.retire_worker(worker, "reload" if worker.generation != self.generation else "scale")
        if forks and time.monotonic() >= self.respawn_at:
            zygote.fork(forks)

    def retire_worker(self, worker: Worker, reason: str) -> None:
        self.counters[f"recycled_{reason}"] += 1
        if worker.state == "busy":
            worker.retire = True  # after its task
            return
        self.stop_worker(worker)

    def stop_worker(self, worker: Worker) -> None:
        if worker in self.idle:
            self.idle.remove(worker)
        if worker.state == "starting":
            # It has not connected yet; a frame sent now would be dropped. It has no task.
            self.signal_worker(worker, signal.SIGTERM)
        else:
            self.backend.send_multipart([worker.ident, b"stop"])
        worker.state = "stopping"

    def signal_worker(self, worker: Worker, signum: int) -> None:
        try:
            os.kill(worker.pid, signum)
        except ProcessLookupError:
            pass

    def handle_backend(self) -> None:
        """Drain every frame the workers have sent."""
        while readable(self.backend):
            self.handle_worker_frames(self.backend.recv_multipart())
        self.dispatch()

    def handle_worker_frames(self, frames: list[bytes]) -> None:
        ident, kind = frames[0], frames[1]
        worker = self.workers.get(int(ident[1:]))
        if worker is None:
            if kind == b"ready":
                # A new worker's "ready" (on this socket) can overtake the zygote's "forked"
                # event for it (on the zygote's pipe). Dropped, it left the worker "starting"
                # for good: a slot of the pool that never took a task and was never replaced
                # (seen with 100 workers forked at once). Kept until "forked" is read.
                self.early_ready.add(int(ident[1:]))
            return  # otherwise, about a worker we already gave up on
        if kind == b"ready":
            self.worker_ready(worker)
            return
        if kind == b"gc":
            self.fanout_answer(protocol.unpack(frames[2]))
            return
        job = worker.job
        if job is None or frames[2] != b"%d" % job.id:
            return  # about a job already answered (it timed out while this was on its way)
        if kind == b"item":
            self.forward_item(job, frames[3], frames[4:])
        elif kind == b"done":
            self.job_done(worker, job, frames[3], frames[4], protocol.unpack(frames[5]), frames[6:])

    def worker_ready(self, worker: Worker) -> None:
        self.early_deaths = 0
        if worker.state != "starting":
            return
        worker.state = "idle"
        self.idle.append(worker)
        self.manage_workers()  # a new-generation worker lets an old one retire

    def forward_item(self, job: Job, frame: bytes, raw: Sequence[bytes]) -> None:
        if not job.answered:
            job.items_sent += 1
            self.reply(job.client, frame, raw)

    def job_done(
        self,
        worker: Worker,
        job: Job,
        outcome: bytes,
        frame: bytes,
        extra: dict[str, Any],
        raw: Sequence[bytes],
    ) -> None:
        if worker.state != "busy":
            return  # being killed for its timeout; the caller has its TIMEOUT already
        self.finish(job, frame, outcome.decode(), raw)
        worker.job = None
        worker.tasks_done += 1
        reason = self.recycle_reason(worker, extra)
        if reason:
            self.counters[f"recycled_{reason}"] += 1
            self.stop_worker(worker)
            self.manage_workers()
        elif worker.retire:
            self.stop_worker(worker)
            self.manage_workers()
        else:
            worker.state = "idle"
            self.idle.append(worker)

    def recycle_reason(self, worker: Worker, extra: dict[str, Any]) -> str | None:
        if worker.tasks_done >= worker.task_limit:
            return "max_tasks"
        limit_mb = self.config.pool.max_worker_memory_mb
        if limit_mb and extra.get("uss", 0) > limit_mb * 1024 * 1024:
            log.info("worker %d uses %d MiB private memory: recycling", worker.pid, extra["uss"] >> 20)
            return "max_memory"
        return None

    def worker_exited(self, pid: int, status: int) -> None:
        self.early_ready.discard(pid)
        worker = self.workers.pop(pid, None)
        if worker is None:
            return
        if worker in self.idle:
            self.idle.remove(worker)
        remove_quietly(stack_path(self.stack_dir, pid))
        for fanout in self.fanouts:
            fanout.waiting.discard(pid)
        job, worker.job = worker.job, None
        if worker.state == "stopping" and job is None:
            return
        how = f"killed by signal {-status}" if status < 0 else f"exited with status {status}"
        log.warning("worker %d %s (state %s)", pid, how, worker.state)
        self.counters["worker_deaths"] += 1
        if worker.state == "starting":
            self.early_deaths += 1
            delay = min(BACKOFF_FIRST_S * 2 ** (self.early_deaths - 1), BACKOFF_MAX_S)
            self.respawn_at = time.monotonic() + delay
        if job is not None and not job.answered:
            self.job_lost(job, pid, how)

    def job_lost(self, job: Job, pid: int, how: str) -> None:
        # A stream that already sent items is not retried: its caller would see them twice.
        if job.retries > 0 and not job.items_sent and not self.stopping:
            job.retries -= 1
            self.counters["retries"] += 1
            log.info("job %d: worker %d %s; retrying (%d retries left)", job.id, pid, how, job.retries)
            self.queue.appendleft(job)
            self.dispatch()
            return
        self.fail(
            job,
            protocol.WORKER_LOST,
            f"worker {pid} {how} while running {job.name}",
            {"pid": pid, "attempts": job.attempts},
        )

    # -- jobs ----------------------------------------------------------------------------------

    def submit(self, job: Job) -> None:
        if self.failure is not None:
            self.fail(job, protocol.INTERNAL, f"CPU pool unavailable: {self.failure}")
            return
        self.queue.append(job)
        self.dispatch()

    def accepts(self, worker: Worker, job: Job) -> bool:
        """During a reload, old workers lack modules added by it: such a job waits for a new one."""
        zygote = self.zygotes.get(worker.generation)
        return zygote is not None and job.module in zygote.modules

    def dispatch(self) -> None:
        while self.queue and self.idle:
            job = self.queue[0]
            worker = next((w for w in self.idle if self.accepts(w, job)), None)
            if worker is None:
                return
            self.idle.remove(worker)
            self.queue.popleft()
            now = time.monotonic()
            job.started_at = now
            job.deadline = now + job.timeout_s
            job.attempts += 1
            worker.state, worker.job = "busy", job
            send_frames(self.backend, [worker.ident, b"run", b"%d" % job.id, job.body, *job.raw], copy=False)

    def finish(self, job: Job, frame: bytes, outcome: str, raw: Sequence[bytes] = ()) -> None:
        job.answered = True
        self.counters[f"execute_{outcome}"] += 1
        code = error_outcome(frame) if outcome == "error" else outcome
        self.metrics.answered("execute", code, job.accepted_at, "cpu")
        self.reply(job.client, frame, raw)

    def fail(self, job: Job, code: str, message: str, details: dict[str, Any] | None = None) -> None:
        self.finish(job, protocol.encode_error(job.request_id, code, message, details), code.lower())

    def fail_queue(self, code: str, message: str) -> None:
        while self.queue:
            self.fail(self.queue.popleft(), code, message)

    def running(self) -> list[Job]:
        return [w.job for w in self.workers.values() if w.job is not None]

    # -- time ----------------------------------------------------------------------------------

    def next_deadline(self) -> float:
        times = [self.zygote_restart_at]
        for worker in self.workers.values():
            if worker.state == "busy" and worker.job is not None:
                times.append(worker.job.deadline)
            elif worker.state == "killing":
                times.append(worker.kill_at)
        times.extend(f.deadline for f in self.fanouts)
        if self.respawn_at > time.monotonic():
            times.append(self.respawn_at)
        return min(times)

    def tick(self) -> None:
        now = time.monotonic()
        for worker in list(self.workers.values()):
            if worker.state == "busy" and worker.job is not None and now >= worker.job.deadline:
                self.start_kill(worker, now)
            elif worker.state == "killing" and now >= worker.kill_at:
                self.finish_kill(worker)
        for fanout in [f for f in self.fanouts if now >= f.deadline]:
            self.answer_fanout(fanout)
        if now >= self.zygote_restart_at:
            self.zygote_restart_at = math.inf
            log.info("restarting the zygote")
            self.counters["zygote_restarts"] += 1
            self.start_generation(self.config, restart=True)
        self.manage_workers()

    def start_kill(self, worker: Worker, now: float) -> None:
        """A task ran past its timeout: ask for a stack dump, kill a moment later."""
        worker.state = "killing"
        worker.kill_at = now + STACK_DUMP_GRACE_S
        self.signal_worker(worker, signal.SIGUSR1)
        self.manage_workers()  # start its replacement now

    def finish_kill(self, worker: Worker) -> None:
        self.signal_worker(worker, signal.SIGKILL)
        worker.kill_at = math.inf
        job, worker.job = worker.job, None
        worker.state = "stopping"
        if job is None or job.answered:
            return
        stack = read_text(stack_path(self.stack_dir, worker.pid))
        self.counters["timeouts"] += 1
        self.fail(
            job,
            protocol.TIMEOUT,
            f"{job.name} ran longer than {job.timeout_s:g} s; worker {worker.pid} was killed",
            {"timeout_s": job.timeout_s, "pid": worker.pid, "traceback": stack},
        )

    # -- control -------------------------------------------------------------------------------

    def scale(self, workers: int) -> None:
        """Set the pool's size, within 1..MAX_WORKERS (a reload resets it to the config's)."""
        self.target = min(max(workers, 1), MAX_WORKERS)
        self.manage_workers()

    def collect_garbage(self, done: Callable[[dict[str, Any]], None]) -> None:
        """gc.collect() in every worker; busy ones answer after their task (or are skipped).

        `done` gets {"workers": [per-worker results], "freed_bytes": private memory freed}."""
        targets = [w for w in self.workers.values() if w.state in ("idle", "busy")]
        fanout = Fanout(done, {w.pid for w in targets}, time.monotonic() + FANOUT_WAIT_S)
        self.fanouts.append(fanout)
        for worker in targets:
            self.backend.send_multipart([worker.ident, b"gc"])
        if not fanout.waiting:
            self.answer_fanout(fanout)

    def fanout_answer(self, result: dict[str, Any]) -> None:
        for fanout in self.fanouts:
            if result.get("pid") in fanout.waiting:
                fanout.waiting.discard(result["pid"])
                fanout.results.append(result)
                if not fanout.waiting:
                    self.answer_fanout(fanout)
                return

    def answer_fanout(self, fanout: Fanout) -> None:
        self.fanouts.remove(fanout)
        workers = fanout.results + [{"pid": pid, "skipped": "busy"} for pid in sorted(fanout.waiting)]
        freed = sum(max(r["uss_before"] - r["uss_after"], 0) for r in fanout.results)
        fanout.done({"workers": workers, "freed_bytes": freed})

    def snapshot(self) -> list[dict[str, Any]]:
        return [
            {
                "pid": w.pid,
                "kind": "cpu",
                "state": w.state,
                "tasks_done": w.tasks_done,
                "generation": w.generation,
            }
            for w in sorted(self.workers.values(), key=lambda w: w.pid)
        ]

    def memory(self) -> list[dict[str, Any]]:
        return [{**entry, **memory.process_memory(entry["pid"])} for entry in self.snapshot()]

    # -- stop ----------------------------------------------------------------------------------

    def begin_stop(self) -> None:
        """No new work: queued jobs are answered SHUTTING_DOWN, idle workers are stopped."""
        self.stopping = True
        self.fail_queue(protocol.SHUTTING_DOWN, "workerd is stopping")
        for worker in list(self.workers.values()):
            if worker.state == "busy":
                worker.retire = True
            elif worker.state in ("idle", "starting"):
                self.stop_worker(worker)

    def abort_running(self) -> None:
        """The grace period is over: kill what still runs and answer its callers."""
        for worker in list(self.workers.values()):
            job, worker.job = worker.job, None
            if job is None:
                continue
            if not job.answered:
                self.fail(
                    job,
                    protocol.SHUTTING_DOWN,
                    f"workerd stopped before {job.name} finished (grace period over)",
                )
            self.signal_worker(worker, signal.SIGKILL)
            worker.state = "stopping"

    def close(self) -> None:
        for zygote in list(self.zygotes.values()):
            zygote.retire()
            self.discard_zygote(zygote)


def remove_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def read_text(path: str) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as handle:
            return handle.read()
    except OSError:
        return ""
