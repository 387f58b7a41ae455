"""The CPU pool, as the master sees it: zygotes, workers, the queue, and how jobs reach them.

Everything here runs on the master's one thread and never blocks. Each worker is reached over
its own channel (transport.py), watched by the master's reactor; jobs go through lifecycle.py,
which owns their states, deadlines and single terminal reply.

What `status` shows of a worker, derived from its phase and the jobs it holds:

    starting --ready--> idle <--jobs--> busy --deadline--> killing --(stack, SIGKILL)--> gone
                          \\               \\
                           +--stop---------+--> stopping --exit--> gone
                                                (it finishes the job it runs; the ones it held
                                                 ahead are handed back first)
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import signal
import socket
import time
from collections.abc import Callable, Iterable
from typing import Any, Protocol, TypeVar

from workerctl import protocol
from workerd import memory
from workerd.config import Config
from workerd.core import processes
from workerd.core.lifecycle import (
    ANSWERED,
    ASSIGNED,
    RUNNING,
    Job,
    JobQueue,
    Lane,
    Ledger,
    settle,
    shown_state,
)
from workerd.core.reactor import Reactor
from workerd.core.transport import Channel, ChannelError
from workerd.metrics import Metrics
from workerd.pool.generations import BACKOFF_FIRST_S, BACKOFF_MAX_S, Generations, max_frame
from workerd.pool.worker import stack_path
from workerd.pool.zygote import ZygoteHandle

log = logging.getLogger("workerd.pool")

# How long a timed-out worker gets to write its stack dump before SIGKILL.
STACK_DUMP_GRACE_S = 0.2
# A clear_memory fan-out waits this long for busy workers before answering without them.
FANOUT_WAIT_S = 10.0
MAX_WORKERS = protocol.MAX_WORKERS
# A worker whose running job has run this long is sent no job ahead, and the jobs it holds
# ahead go to an idle worker. Prefetch pays for short tasks, where the master's round trip
# between two of them is a good part of their time; well before 50 ms it is not any more.
STEAL_AFTER_S = 0.05
# Worker frames carry a reply of at most max_message_bytes, plus a few small frames around it.
FRAME_SLACK = 64 * 1024


class Planned(Protocol):
    """What plan_workers needs to know of a worker."""

    @property
    def generation(self) -> int: ...
    @property
    def state(self) -> str: ...
    @property
    def live(self) -> bool: ...


W = TypeVar("W", bound=Planned)


def plan_workers(workers: Iterable[W], target: int, generation: int, pending: int) -> tuple[int, list[W]]:
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


def pick_retirees(workers: list[W], count: int) -> list[W]:
    if count <= 0:
        return []
    order = {"starting": 0, "idle": 1, "busy": 2}
    return sorted(workers, key=lambda w: order.get(w.state, 3))[:count]


@dataclasses.dataclass(eq=False)
class Worker:
    pid: int
    generation: int
    channel: Channel
    lane: Lane
    phase: str = "starting"  # starting | serving | stopping | killing | killed | gone
    tasks_done: int = 0
    kill_at: float = math.inf
    expired: Job | None = None  # the job it is being killed for: answered TIMEOUT at the kill
    started_at: float = dataclasses.field(default_factory=time.monotonic)

    @property
    def state(self) -> str:
        return shown_state(self.phase, self.lane)

    @property
    def live(self) -> bool:
        """Counts toward the pool's size: neither on its way out nor told to leave."""
        return self.phase in ("starting", "serving")


@dataclasses.dataclass
class Fanout:
    """A clear_memory(gc) waiting for each worker's answer."""

    done: Callable[[dict[str, Any]], None]
    waiting: set[int]
    deadline: float
    results: list[dict[str, Any]] = dataclasses.field(default_factory=list)


class Pool:
    def __init__(
        self, config: Config, stack_dir: str, ledger: Ledger, reactor: Reactor, metrics: Metrics
    ) -> None:
        self.config = config
        self.stack_dir = stack_dir
        self.ledger = ledger
        self.reactor = reactor
        self.counters = metrics.events
        self.target = config.pool.worker_count()
        self.generations = Generations(self)
        self.workers: dict[int, Worker] = {}
        self.queue = JobQueue()
        self.fanouts: list[Fanout] = []
        self.unflushed: set[Worker] = set()
        self.stopping = False
        self.respawn_at = 0.0  # after a failed fork or start, no fork before this; 0: none pending
        self.early_deaths = 0

    def reaped(self, pid: int, status: int) -> bool:
        """A child of the master exited (SIGCHLD): a zygote, or a worker a dead zygote left."""
        if self.generations.reaped(pid, status):
            return True
        if pid in self.workers:
            self.worker_exited(pid, status)
            return True
        return False

    # -- workers -------------------------------------------------------------------------------

    def add_worker(self, zygote: ZygoteHandle, pid: int, fd: int) -> None:
        channel = Channel(socket.socket(fileno=fd), max_frame(self.config) + FRAME_SLACK, blocking=False)
        lane = Lane(1 + self.config.pool.prefetch)
        worker = Worker(pid, zygote.generation, channel, lane)
        self.workers[pid] = worker
        self.reactor.watch(channel.fileno(), lambda: self.handle_worker(worker))

    def fork_failed(self, error: str) -> None:
        log.error("%s", error)
        self.counters["fork_failures"] += 1
        self.early_deaths += 1
        self.respawn_at = time.monotonic() + min(
            BACKOFF_FIRST_S * 2 ** (self.early_deaths - 1), BACKOFF_MAX_S
        )
        if not any(w.live for w in self.workers.values()):
            self.fail_queue(protocol.INTERNAL, f"CPU pool has no worker: {error}; retrying")

    def manage_workers(self) -> None:
        if self.stopping:
            return
        self.generations.retire_old()
        zygote = self.generations.serving()
        if zygote is None or not zygote.ready:
            return
        forks, retire = plan_workers(
            self.workers.values(), self.target, zygote.generation, zygote.pending_forks
        )
        for worker in retire:
            self.counters[
                "recycled_reload" if worker.generation != zygote.generation else "recycled_scale"
            ] += 1
            self.stop_worker(worker)
        if forks and time.monotonic() >= self.respawn_at:
            zygote.fork(forks)

    def stop_worker(self, worker: Worker) -> None:
        """Hand back the jobs it holds ahead, then stop it once its running job is done."""
        if not worker.live:
            return
        if worker.phase == "starting":
            processes.signal_quietly(worker.pid, signal.SIGTERM)  # not listening yet
        else:
            self.withdraw(worker, worker.lane.prefetched())
            self.send(worker, [b"stop"])
        worker.phase = "stopping"

    def send(self, worker: Worker, frames: list[Any]) -> None:
        worker.channel.send(frames)
        self.unflushed.add(worker)

    def flush(self) -> None:
        """Write what this turn queued for each worker, in one sendmsg each."""
        for worker in self.unflushed:
            self.flush_worker(worker)
        self.unflushed.clear()

    def flush_worker(self, worker: Worker) -> bool:
        try:
            done = worker.channel.flush()
        except OSError:
            done = True  # it is gone; its exit settles its jobs
            worker.channel.out.clear()
        self.reactor.want_write(worker.channel.fileno(), None if done else lambda: self.flush_quietly(worker))
        return done

    def flush_quietly(self, worker: Worker) -> None:
        self.flush_worker(worker)

    def handle_worker(self, worker: Worker) -> None:
        self.read_worker(worker)
        self.dispatch()

    def read_worker(self, worker: Worker) -> None:
        """Act on everything the worker has sent."""
        try:
            messages = worker.channel.receive()
        except ChannelError as exc:
            log.error("worker %d broke its channel (%s): killing it", worker.pid, exc)
            messages = None
        if messages is None:
            # It closed its end: it is exiting, and its exit (reported by the zygote) settles
            # its jobs. A channel it broke means it is alive and not to be trusted: kill it.
            self.reactor.unwatch(worker.channel.fileno())
            if not worker.channel.closed:
                processes.signal_quietly(worker.pid, signal.SIGKILL)
            return
        now = time.monotonic()
        for frames in messages:
            self.worker_message(worker, frames, now)

    def worker_message(self, worker: Worker, frames: list[Any], now: float) -> None:
        kind = frames[0]
        if kind == b"done":
            job = worker.lane.done(int(frames[1]), now)
            if job is not None:
                worker.tasks_done += 1
                self.ledger.result(job, frames[2], frames[3], frames[4:])
        elif kind == b"item":
            job = worker.lane.head
            if job is not None and job.id == int(frames[1]):
                self.ledger.item(job, frames[2], frames[3:])
        elif kind == b"dropped":
            for job_id in protocol.unpack(frames[1]):
                job = worker.lane.find(job_id)
                if job is not None and job.state is not ANSWERED:
                    worker.lane.remove(job, now)
                    self.hand_back(job)
        elif kind == b"ready":
            self.early_deaths = 0
            if worker.phase == "starting":
                worker.phase = "serving"
                self.manage_workers()  # a new-generation worker lets an old one retire
        elif kind == b"gc":
            self.fanout_answer(protocol.unpack(frames[1]))
        elif kind == b"recycling":
            reason = bytes(frames[1]).decode()
            if reason == "max_memory":
                log.info("worker %d is over max_worker_memory_mb: recycled", worker.pid)
            self.counters[f"recycled_{reason}"] += 1
            worker.phase = "stopping"
            # Its last word: it started nothing after its last result, not even a job that
            # reached it after it decided (those it did not read, so could not drop).
            for job in list(worker.lane.jobs):
                worker.lane.remove(job, now)
                self.hand_back(job)
            self.manage_workers()

    def worker_exited(self, pid: int, status: int) -> None:
        worker = self.workers.get(pid)
        if worker is None:
            return
        # Its last messages first: the zygote's word of its exit can overtake what the worker
        # itself said before it left (that it was recycling, a result).
        if worker.channel.sock.fileno() >= 0:
            self.read_worker(worker)
        how = processes.describe_exit(status)
        if worker.phase != "stopping" or worker.lane.jobs:
            log.warning("worker %d %s (state %s)", pid, how, worker.state)
            if worker.phase not in ("killing", "killed"):  # not our kill for a timeout
                self.counters["worker_deaths"] += 1
        if worker.phase == "starting":
            self.early_deaths += 1
            delay = min(BACKOFF_FIRST_S * 2 ** (self.early_deaths - 1), BACKOFF_MAX_S)
            self.respawn_at = time.monotonic() + delay
        self.remove_worker(worker, how)
        self.manage_workers()

    def remove_worker(self, worker: Worker, how: str) -> None:
        """The worker is gone: read what it sent before it went, then settle its jobs."""
        worker.phase = "gone"
        if worker.channel.sock.fileno() >= 0:
            self.read_worker(worker)
            self.reactor.unwatch(worker.channel.fileno())
            self.reactor.want_write(worker.channel.fileno(), None)
            worker.channel.close()
        self.unflushed.discard(worker)
        self.workers.pop(worker.pid, None)
        for fanout in self.fanouts:
            fanout.waiting.discard(worker.pid)
        stack = lambda: read_text(stack_path(self.stack_dir, worker.pid))  # noqa: E731
        retry = None if self.stopping else self.requeue
        if settle(
            self.ledger, worker.lane, worker.pid, f"worker {worker.pid}", how, stack, retry, self.hand_back
        ):
            self.counters["timeouts"] += 1
        remove_quietly(stack_path(self.stack_dir, worker.pid))

    def requeue(self, job: Job) -> None:
        """A job handed back or retried: queued again, ahead of later ones, unless a reload
        removed its module since (then no worker would ever take it: it would wait for good).
        The serving generation's config says, even while its zygote restarts."""
        if job.key not in self.config.tasks.modules:
            self.generations.refuse_removed(job, self.generations.generation)
        else:
            self.queue.push(job, front=True)

    def hand_back(self, job: Job) -> None:
        """A job a worker held and never started."""
        if job.cancel_requested or job.cancelled:
            self.ledger.cancel_reply(job)
        elif self.stopping:
            self.ledger.fail(job, protocol.SHUTTING_DOWN, "workerd is stopping")
        else:
            self.requeue(job)

    # -- handing jobs back -----------------------------------------------------------------------

    def withdraw(self, worker: Worker, jobs: list[Job]) -> list[Job]:
        """Tell the worker to drop jobs it holds ahead; returns those surely not started.

        The worker reads everything sent before it starts its next job. So once the drop is
        written, read what the worker has sent: if its running job has not ended by then, the
        worker will see the drop before it could start any of these. If it has ended (its
        "done" was on the way), the next one may have started; that one stays, and its
        "dropped" or its result says which it was. The ones surely dropped are handed back."""
        if not jobs:
            self.read_worker(worker)  # a result on its way may settle what the caller decides
            return []
        self.send(worker, [b"drop", protocol.pack([job.id for job in jobs])])
        if not self.flush_worker(worker):
            return []  # not all written yet: the worker's "dropped" settles them
        self.read_worker(worker)
        surely = [job for job in jobs if job.state is ASSIGNED and job in worker.lane.jobs]
        for job in surely:
            worker.lane.remove(job, time.monotonic())
            self.hand_back(job)
        return surely

    def worker_of(self, job: Job) -> Worker | None:
        for worker in self.workers.values():
            if job in worker.lane.jobs:
                return worker
        return None

    def cancel(self, job: Job, terminate: bool) -> str:
        """`cancel` for one job of this pool: "cancelled" (surely: it will not run, or ran no
        further, and is answered CANCELLED), "running" (it runs on and ends with its own result,
        or CANCELLED if its worker turns out not to have started it) or "unknown"."""
        if self.queue.remove(job):
            self.ledger.cancel_reply(job)
            return "cancelled"
        worker = self.worker_of(job)
        if worker is None:
            return "unknown"
        if job.state is ASSIGNED:
            job.cancel_requested = True
            if job in self.withdraw(worker, [job]):
                return "cancelled"
        if not terminate or job.state is not RUNNING or worker.phase == "killing":
            return "running"
        self.terminate(worker, job)
        return "cancelled"

    def terminate(self, worker: Worker, job: Job) -> None:
        """Kill the worker running `job`, which is answered CANCELLED at once; the jobs it held
        ahead go back to the queue (surely not started: the drop is written before the kill)."""
        self.withdraw(worker, worker.lane.prefetched())
        if job is not worker.lane.running:
            return
        job.cancelled = True
        self.ledger.cancel_reply(job, terminated=True)
        processes.signal_quietly(worker.pid, signal.SIGKILL)
        worker.phase = "killed"
        self.manage_workers()  # its replacement starts now

    # -- jobs ----------------------------------------------------------------------------------

    def submit(self, job: Job) -> None:
        if self.generations.failure is not None:
            self.ledger.fail(job, protocol.INTERNAL, self.unavailable())
            return
        self.queue.push(job)
        self.dispatch()  # now, not at the end of the turn: the queue's bound counts what waits

    def unavailable(self) -> str:
        return (
            f"CPU pool unavailable: {self.generations.failure}. Fix [tasks] modules or [pool] preload "
            "in the config, then run `workerctl reload`"
        )

    def dispatch(self) -> None:
        """Give queued jobs to workers: idle ones first, then to hold one more job each, but never
        ahead to a worker stuck in a long job (see steal)."""
        if not self.queue:
            return
        serving = [w for w in self.workers.values() if w.phase == "serving"]
        capacity = 1 + self.config.pool.prefetch
        now = time.monotonic()
        for depth in range(capacity):
            for worker in serving:
                if len(worker.lane) != depth or (depth and self.slow(worker, now)):
                    continue
                zygote = self.generations.zygotes.get(worker.generation)
                if zygote is None:
                    continue
                job = self.queue.take(zygote.modules.__contains__)
                if job is None:
                    continue
                worker.lane.add(job, now)
                self.send(worker, [b"run", b"%d" % job.id, job.body, *job.raw])
                if not self.queue:
                    return

    @staticmethod
    def slow(worker: Worker, now: float) -> bool:
        """Has its running job run long enough that jobs sent ahead would wait behind it?"""
        job = worker.lane.running
        return job is not None and now - job.started_at >= STEAL_AFTER_S

    def steal(self, now: float) -> None:
        """Jobs held ahead by a worker stuck in a long job go back to the queue, for the idle
        workers. Prefetch is a bet that the running job ends soon: this settles a lost bet.
        (withdraw() hands back only jobs surely not started, so none runs twice.)"""
        if not any(w.phase == "serving" and not w.lane.jobs for w in self.workers.values()):
            return
        for worker in list(self.workers.values()):
            if worker.phase == "serving" and self.slow(worker, now) and worker.lane.prefetched():
                self.counters["prefetch_taken_back"] += len(self.withdraw(worker, worker.lane.prefetched()))

    def steal_deadline(self) -> float:
        """When a worker holding jobs ahead turns slow, if an idle worker could take them."""
        if not any(w.phase == "serving" and not w.lane.jobs for w in self.workers.values()):
            return math.inf
        times = [
            w.lane.jobs[0].started_at + STEAL_AFTER_S
            for w in self.workers.values()
            if w.phase == "serving" and len(w.lane) > 1 and w.lane.running is not None
        ]
        return min(times, default=math.inf)

    def waiting(self) -> int:
        """Jobs accepted and not started: queued here, or prefetched by a worker."""
        return len(self.queue) + sum(len(w.lane.prefetched()) for w in self.workers.values())

    def full(self, limit: int) -> bool:
        """Do `limit` jobs wait already? (`waiting` costs a walk of the workers: most of the
        time the queue alone says no.)"""
        held = len(self.workers) * self.config.pool.prefetch
        return len(self.queue) + held >= limit and self.waiting() >= limit

    def fail_queue(self, code: str, message: str) -> None:
        for job in self.queue.drain():
            self.ledger.fail(job, code, message)

    def running(self) -> list[Job]:
        return [job for w in self.workers.values() for job in w.lane.jobs]

    # -- time ----------------------------------------------------------------------------------

    def next_deadline(self) -> float:
        times = [self.generations.restart_at, self.steal_deadline()]
        for worker in self.workers.values():
            times.append(worker.kill_at if worker.phase == "killing" else worker.lane.next_deadline())
        times.extend(f.deadline for f in self.fanouts)
        if self.respawn_at:  # a back-off is pending: wake when it ends, even if that is now
            times.append(self.respawn_at)
        return min(times)

    def tick(self) -> None:
        now = time.monotonic()
        for worker in list(self.workers.values()):
            if worker.phase == "killing":
                if now >= worker.kill_at:
                    self.finish_kill(worker)
            elif worker.phase != "killed" and worker.lane.next_deadline() <= now:
                self.start_kill(worker, now)
        for fanout in [f for f in self.fanouts if now >= f.deadline]:
            self.answer_fanout(fanout)
        self.steal(now)
        if self.respawn_at and now >= self.respawn_at:
            # The back-off is over: manage_workers below forks what is missing. Cleared here,
            # where it is due: next_deadline used to drop a back-off the moment it passed, and
            # if no tick had run by then, nothing forked again, ever (a pool left empty).
            self.respawn_at = 0.0
        self.generations.tick(now)
        self.manage_workers()
        self.dispatch()

    def start_kill(self, worker: Worker, now: float) -> None:
        """A task ran past its timeout: hand back what waits behind it, ask for a stack dump,
        kill a moment later. From now on its answer is TIMEOUT, whatever else happens."""
        self.withdraw(worker, worker.lane.prefetched())
        job = worker.lane.running
        if job is None or job.deadline > now:
            return  # it finished just in time (its result was on the way)
        job.expired = True
        worker.expired = job
        worker.phase = "killing"
        worker.kill_at = now + STACK_DUMP_GRACE_S
        processes.signal_quietly(worker.pid, signal.SIGUSR1)
        self.manage_workers()  # start its replacement now

    def finish_kill(self, worker: Worker) -> None:
        """Answer TIMEOUT with the stack it dumped, and kill it. The job stays in its lane until
        the worker is gone: only then is it known which job after it may have started."""
        processes.signal_quietly(worker.pid, signal.SIGKILL)
        worker.kill_at = math.inf
        worker.phase = "killed"
        job, worker.expired = worker.expired, None
        if job is None:
            return
        self.counters["timeouts"] += 1
        stack = read_text(stack_path(self.stack_dir, worker.pid))
        self.ledger.timed_out(job, worker.pid, stack, f"worker {worker.pid}")

    # -- control -------------------------------------------------------------------------------

    def scale(self, workers: int) -> None:
        """Set the pool's size, within 1..MAX_WORKERS (a reload resets it to the config's)."""
        self.target = min(max(workers, 1), MAX_WORKERS)
        self.manage_workers()

    def collect_garbage(self, done: Callable[[dict[str, Any]], None]) -> None:
        """gc.collect() in every worker; busy ones answer after their task (or are skipped).

        `done` gets {"workers": [per-worker results], "freed_bytes": private memory freed}."""
        targets = [w for w in self.workers.values() if w.phase == "serving"]
        fanout = Fanout(done, {w.pid for w in targets}, time.monotonic() + FANOUT_WAIT_S)
        self.fanouts.append(fanout)
        for worker in targets:
            self.send(worker, [b"gc"])
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
                "jobs": len(w.lane),
            }
            for w in sorted(self.workers.values(), key=lambda w: w.pid)
        ]

    def memory(self) -> list[dict[str, Any]]:
        return [{**entry, **memory.process_memory(entry["pid"])} for entry in self.snapshot()]

    # -- stop ----------------------------------------------------------------------------------

    def begin_stop(self) -> None:
        """No new work: queued jobs are answered SHUTTING_DOWN, prefetched ones handed back (and
        answered so), workers stop once their running job is done."""
        self.stopping = True
        self.fail_queue(protocol.SHUTTING_DOWN, "workerd is stopping")
        for worker in list(self.workers.values()):
            self.stop_worker(worker)

    def abort_running(self) -> None:
        """The grace period is over: kill what still runs and answer its callers."""
        for worker in list(self.workers.values()):
            for job in list(worker.lane.jobs):
                self.ledger.fail(
                    job,
                    protocol.SHUTTING_DOWN,
                    f"workerd stopped before {job.name} finished (grace period over)",
                )
            processes.signal_quietly(worker.pid, signal.SIGKILL)
            worker.phase = "stopping"

    def close(self) -> None:
        self.generations.close()
        for worker in self.workers.values():
            worker.channel.close()


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
