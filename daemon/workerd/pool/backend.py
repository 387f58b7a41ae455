"""The CPU pool, as the master sees it: workers, the queue, and how jobs reach them.

Runs in: the master. Everything here runs on its one thread and never blocks. The zygotes that
fork the workers are generations.py's; each worker is a core.child.Child (its channel, lane, kill
window and asks) plus what is its own here: its generation, its phase, its recycling. Jobs go
through core/lifecycle.py, which owns their states, deadlines and single terminal reply.

What `status` shows of a worker, derived from its phase, its kill window and the jobs it holds:

    starting --ready--> idle <--jobs--> busy --deadline--> killing --(stack, SIGKILL)--> gone
                          \\               \\
                           +--stop---------+--> stopping --exit--> gone
                                                (it finishes the job it runs; the ones it held
                                                 ahead are handed back first)
"""

from __future__ import annotations

import logging
import signal
import socket
import time
from collections.abc import Callable
from typing import Any

from workerctl import protocol
from workerd import memory, messages
from workerd.config import Config
from workerd.core.backend import Services, fate_once_answered
from workerd.core.backoff import RESTART_FIRST_S, RESTART_MAX_S, Backoff
from workerd.core.child import Child, frame_limit
from workerd.core.lifecycle import ANSWERED, ASSIGNED, RUNNING, Job, Lane
from workerd.core.processes import describe_exit
from workerd.core.queue import JobQueue
from workerd.core.transport import Channel
from workerd.pool.generations import Generations
from workerd.pool.plan import plan_workers
from workerd.pool.workers import (
    Worker,
    collect_garbage,
    describe,
    holder,
    idle_worker,
    slow,
    steal_deadline,
    yielding,
)
from workerd.pool.zygotes import ZygoteHandle

log = logging.getLogger("workerd.pool")

MAX_WORKERS = protocol.MAX_WORKERS


class Pool:
    kind = "cpu"

    def __init__(self, config: Config, services: Services) -> None:
        self.ledger, self.reactor, self.counters, self.stack_dir = services
        self.target = config.pool.worker_count()
        self.generations = Generations(self, config, self.stack_dir, self.reactor, self.counters)
        self.workers: dict[int, Worker] = {}
        self.queue = JobQueue()
        self.arrived: list[Job] = []  # submitted since the last dispatch, which checks their yields
        self.stopping = False
        self.forks = Backoff(RESTART_FIRST_S, RESTART_MAX_S)  # after a fork or a start failed

    @property
    def config(self) -> Config:
        """The serving generation's config (a reload's takes effect once its code imported)."""
        return self.generations.config

    # -- what the zygotes say (generations.Owner) ----------------------------------------------

    def reaped(self, pid: int, status: int) -> bool:
        """A child of the master exited (SIGCHLD): a zygote, or a worker a dead zygote left."""
        if self.generations.reaped(pid, status):
            return True
        if pid in self.workers:
            self.worker_exited(pid, status)
            return True
        return False

    def worker_forked(self, zygote: ZygoteHandle, pid: int, fd: int) -> None:
        channel = Channel(socket.socket(fileno=fd), frame_limit(self.config.daemon.max_message_bytes), False)
        worker: Worker

        def on_message(frames: list[Any], now: float) -> None:
            self.worker_message(worker, frames, now)

        lane = Lane(1 + self.config.pool.prefetch)
        child = Child(self.reactor, self.ledger, self.stack_dir, f"worker {pid}", lane, on_message)
        worker = Worker(pid, zygote.generation, child)
        self.workers[pid] = worker
        child.attach(pid, channel)

    def fork_failed(self, error: str) -> None:
        log.error("%s", error)
        self.counters["fork_failures"] += 1
        self.forks.next(time.monotonic())
        if not any(w.live for w in self.workers.values()):
            self.fail_queue(protocol.INTERNAL, f"CPU pool has no worker: {error}; retrying")

    def generation_serves(self, generation: int, modules: frozenset[str]) -> None:
        """A new generation's code is ready: its config is the pool's. Queued jobs for a module
        it no longer lists end now: no worker will ever take them, and they must not wait
        forever (or block the queue)."""
        self.target = self.config.pool.worker_count()
        for key in self.queue.waiting_keys():
            if key not in modules:
                for job in self.queue.pop_key(key):
                    self.refuse_removed(job, generation)

    def zygote_lost(self, generation: int, how: str) -> None:
        """A zygote died: its workers die with it, and their jobs are settled."""
        for worker in [w for w in self.workers.values() if w.generation == generation]:
            worker.child.kill_now()
            self.remove_worker(worker, f"its zygote {how}")

    def has_workers(self, generation: int) -> bool:
        return any(w.generation == generation for w in self.workers.values())

    def has_live_workers(self) -> bool:
        return any(w.live for w in self.workers.values())

    def changed(self) -> None:
        self.manage_workers()
        self.dispatch()

    # -- workers -------------------------------------------------------------------------------

    def manage_workers(self) -> None:
        if self.stopping:
            return
        self.generations.retire_old()
        zygote = self.generations.serving()
        if zygote is None:
            return
        forks, retire = plan_workers(
            self.workers.values(), self.target, zygote.generation, zygote.pending_forks
        )
        for worker in retire:
            reason = "recycled_reload" if worker.generation != zygote.generation else "recycled_scale"
            self.counters[reason] += 1
            self.stop_worker(worker)
        if forks and not self.forks.pending:
            zygote.fork(forks)

    def stop_worker(self, worker: Worker) -> None:
        """Hand back the jobs it holds ahead, then stop it once its running job is done."""
        if not worker.live:
            return
        if worker.phase == "starting":
            worker.child.signal(signal.SIGTERM)  # not listening yet
        else:
            self.withdraw(worker, worker.lane.prefetched())
            worker.child.send([messages.STOP])
        worker.phase = "stopping"

    def worker_message(self, worker: Worker, frames: list[Any], now: float) -> None:
        kind = frames[0]
        if kind == messages.DONE:
            worker.dropping.pop(int(frames[1]), None)
            job = worker.lane.done(int(frames[1]), now)
            if job is not None:
                worker.tasks_done += 1
                self.ledger.result(job, frames[2], frames[3], frames[4:])
        elif kind == messages.ITEM:
            job = worker.lane.head
            if job is not None and job.id == int(frames[1]):
                self.ledger.item(job, frames[2], frames[3:])
        elif kind == messages.DROPPED:
            for job_id in protocol.unpack(frames[1]):
                if worker.dropping.pop(job_id, False):
                    continue  # handed back when the drop was sent: in the lane now, it was sent again
                job = worker.lane.find(job_id)
                if job is not None and job.state is not ANSWERED:
                    worker.lane.remove(job, now)
                    self.hand_back(job)
        elif kind == messages.READY:
            self.forks.reset()
            if worker.phase == "starting":
                worker.phase = "serving"
                self.manage_workers()  # a new-generation worker lets an old one retire
        elif kind == messages.GC:
            worker.child.answered(frames[1], protocol.unpack(frames[2]))
        elif kind == messages.RECYCLING:
            self.recycling(worker, bytes(frames[1]).decode(), now)

    def recycling(self, worker: Worker, reason: str, now: float) -> None:
        """Its last word: it started nothing after its last result, not even a job that reached
        it after it decided (those it did not read, so could not drop). A kill window it is in
        stays open: its job is answered TIMEOUT all the same."""
        if reason == messages.MAX_MEMORY.decode():
            log.info("worker %d is over max_worker_memory_mb: recycled", worker.pid)
        self.counters[f"recycled_{reason}"] += 1
        worker.phase = "stopping"
        for job in list(worker.lane.jobs):
            worker.lane.remove(job, now)
            self.hand_back(job)
        self.manage_workers()

    def worker_exited(self, pid: int, status: int) -> None:
        worker = self.workers.get(pid)
        if worker is None:
            return
        worker.child.read()  # its last messages first: the zygote's word can overtake them
        how = describe_exit(status)
        if worker.phase != "stopping" or worker.lane.jobs or worker.child.kill is not None:
            log.warning("worker %d %s (state %s)", pid, how, worker.state)
            if not worker.child.killing:  # not our kill
                self.counters["worker_deaths"] += 1
        if worker.phase == "starting":
            self.forks.next(time.monotonic())
        self.remove_worker(worker, how)
        self.manage_workers()

    def remove_worker(self, worker: Worker, how: str) -> None:
        """The worker is gone: settle its jobs (core.child.Child.gone)."""
        worker.phase = "gone"
        self.workers.pop(worker.pid, None)
        retry = None if self.stopping else self.requeue
        if worker.child.gone(how, retry, self.hand_back):
            self.counters["timeouts"] += 1

    def requeue(self, job: Job) -> None:
        """A job handed back or retried: queued again, ahead of later ones, unless a reload
        removed its module since (then no worker would ever take it: it would wait for good).
        The serving generation's config says, even while its zygote restarts."""
        if job.key not in self.config.tasks.modules:
            self.refuse_removed(job, self.generations.generation)
        else:
            self.queue.push(job)

    def refuse_removed(self, job: Job, generation: int) -> None:
        self.ledger.fail(
            job,
            protocol.DENIED,
            f"module {job.key!r} is no longer listed in [tasks] modules "
            f"(removed by the reload to generation {generation})",
        )

    def hand_back(self, job: Job) -> None:
        """A job a worker held and never started (a departed client's: dropped, no reply)."""
        if job.cancel_requested or job.cancelled or job.departed:
            self.ledger.cancel_reply(job)
        elif self.stopping:
            self.ledger.shut_out(job)
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
            worker.child.read()  # a result on its way may settle what the caller decides
            return []
        worker.child.send([messages.DROP, protocol.pack([job.id for job in jobs])])
        for job in jobs:
            worker.dropping[job.id] = False
        if not worker.child.flush():
            return []  # not all written yet: the worker's "dropped" settles them
        worker.child.read()
        surely = [job for job in jobs if job.state is ASSIGNED and job in worker.lane.jobs]
        for job in surely:
            # Its "dropped" will come, perhaps once the job is back in this worker's lane, sent
            # again: that one is a new copy, and the worker runs it (it read the drop first).
            worker.dropping[job.id] = True
            worker.lane.remove(job, time.monotonic())
            self.hand_back(job)
        return surely

    def cancel(self, job: Job, terminate: bool) -> str:
        """`cancel` for one job of this pool, by what will happen to it (protocol.md, cancel):
        "cancelled" (answered CANCELLED before this returns), "running" (it runs on to its own
        reply) or "unknown" (its reply is decided already: a result, or a TIMEOUT owed by its
        kill window). What the turn's dispatch would place goes first, as for `depth`: a job an
        idle worker takes this turn has started, as it had when submit placed it at once."""
        self.dispatch()
        if self.queue.remove(job):
            self.ledger.cancel_reply(job)
            return "cancelled"
        worker = holder(self.workers.values(), job)
        if worker is None or job.expired:
            return "unknown"
        if job.state is ASSIGNED:  # prefetched: withdrawn if surely not started
            job.cancel_requested = True
            self.withdraw(worker, [job])
        if job.state is ANSWERED:  # what withdraw read answered it: handed back, or finished
            return fate_once_answered(job)
        if terminate and not worker.child.killing:
            return self.terminate(worker, job)
        # It may have started: it runs on, and if it turns out it had not, it runs elsewhere.
        job.cancel_requested = False
        return "running"

    def terminate(self, worker: Worker, job: Job) -> str:
        """Kill the worker holding `job`, which is answered CANCELLED at once; the jobs it held
        ahead of it go back to the queue (surely not started: the drop is written before the
        kill; those not surely dropped are settled by its exit, and never ran). What the drop's
        read brings may end `job` first: then it is not in flight any more ("unknown")."""
        self.withdraw(worker, [j for j in worker.lane.prefetched() if j is not job])
        if job.state is ANSWERED:
            return fate_once_answered(job)
        job.cancelled = True
        self.ledger.cancel_reply(job, terminated=True)
        worker.child.kill_now()
        self.manage_workers()  # its replacement starts now
        return "cancelled"

    # -- jobs ----------------------------------------------------------------------------------

    def submit(self, job: Job) -> None:
        """Queued; placed by the turn's one dispatch (master.poll_once) with every job the turn
        brought, or by `depth` first."""
        if self.generations.failure is not None:
            self.ledger.fail(job, protocol.INTERNAL, self.unavailable())
            return
        self.queue.push(job)
        self.arrived.append(job)

    def yield_ahead(self, job: Job, worker: Worker, jobs: list[Job]) -> None:
        """`worker` gives back `jobs` it holds ahead (those surely not started: withdraw), and
        takes again in the fair order, `job` first."""
        if not self.withdraw(worker, jobs):
            return
        self.counters["prefetch_yielded"] += 1
        if self.queue.remove(job):  # still queued (what withdraw read did not dispatch it)
            # Given to it here, not by dispatch, which sends nothing ahead to a worker whose
            # job has run past STEAL_AFTER_S: the one that gave back is often that worker.
            self.place(worker, job, time.monotonic())
        self.dispatch()

    def unavailable(self) -> str:
        return (
            f"CPU pool unavailable: {self.generations.failure}. Fix [tasks] modules or [pool] preload "
            "in the config, then run `workerctl reload`"
        )

    def dispatch(self) -> None:
        """Give queued jobs to workers; then what they hold ahead yields to each new job the
        fair order puts first (pool/workers.py, yielding). A new job is looked at once, after
        the dispatch that placed it or left it queued: jobs a yield hands back never yield."""
        self.place_queued()
        arrived, self.arrived = self.arrived, []  # a yield dispatches again
        for job in arrived:
            choice = yielding(self.workers.values(), job, self.queue.shared(), self.can_run)
            if choice is not None:
                self.yield_ahead(job, *choice)

    def place_queued(self) -> None:
        """Idle workers first, then to hold one more job each, but never ahead to a worker
        stuck in a long job (see steal)."""
        if not self.queue:
            return
        places = 1 + self.config.pool.prefetch
        # Most calls find every lane full (a flood's steady state): say so in one pass.
        open_lanes = [w for w in self.workers.values() if w.serving and len(w.lane) < places]
        if not open_lanes:
            return
        now = time.monotonic()
        for depth in range(places):
            for worker in open_lanes:
                if len(worker.lane) != depth or (depth and slow(worker, now)):
                    continue
                zygote = self.generations.zygotes.get(worker.generation)
                if zygote is None:
                    continue
                job = self.queue.take(zygote.modules.__contains__)
                if job is None:
                    continue
                self.place(worker, job, now)
                if not self.queue:
                    return

    def can_run(self, worker: Worker, job: Job) -> bool:
        zygote = self.generations.zygotes.get(worker.generation)
        return worker.serving and zygote is not None and job.key in zygote.modules

    def place(self, worker: Worker, job: Job, now: float) -> None:
        worker.lane.add(job, now)
        worker.child.send([messages.RUN, b"%d" % job.id, job.body, *job.raw])

    def steal(self, now: float) -> None:
        """Jobs held ahead by a worker stuck in a long job go back to the queue, for the idle
        workers. Prefetch is a bet that the running job ends soon: this settles a lost bet.
        (withdraw() hands back only jobs surely not started, so none runs twice.)"""
        if not idle_worker(self.workers.values()):
            return
        for worker in list(self.workers.values()):
            if worker.serving and slow(worker, now) and worker.lane.prefetched():
                self.counters["prefetch_taken_back"] += len(self.withdraw(worker, worker.lane.prefetched()))

    def depth(self) -> int:
        """Jobs accepted and not started: queued here, or prefetched by a worker. What an idle
        worker can take goes first (it would go at the end of this turn), so a job that is
        about to start is not counted as waiting: max_queue's BUSY is exact."""
        self.dispatch()
        return len(self.queue) + sum(len(w.lane.prefetched()) for w in self.workers.values())

    def full(self, limit: int) -> bool:
        """Do `limit` jobs wait already? (Most of the time the queue alone says no.)"""
        held = len(self.workers) * self.config.pool.prefetch
        return len(self.queue) + held >= limit and self.depth() >= limit

    def fail_queue(self, code: str, message: str) -> None:
        for job in self.queue.drain():
            self.ledger.fail(job, code, message)

    @property
    def busy(self) -> bool:
        """Does a job still run (or wait in a kill window)?"""
        return any(w.lane.jobs or w.child.kill is not None for w in self.workers.values())

    @property
    def exited(self) -> bool:
        return not self.workers

    # -- time ----------------------------------------------------------------------------------

    def next_deadline(self) -> float:
        if self.arrived:  # submitted after this turn's dispatch (the cluster's fallback): now
            return 0.0
        times = [self.generations.restarts.due, steal_deadline(self.workers.values()), self.forks.due]
        times.extend(worker.child.next_deadline() for worker in self.workers.values())
        return min(times)

    def tick(self) -> None:
        now = time.monotonic()
        for worker in list(self.workers.values()):
            if worker.child.tick(now):
                self.counters["timeouts"] += 1
            late = worker.child.overdue(now)  # a CPU worker runs one job at a time
            if late:
                self.start_kill(worker, late[0], now)
        self.steal(now)
        self.forks.ready(now)  # the back-off is over: manage_workers below forks what is missing
        self.generations.tick(now)
        self.manage_workers()
        self.dispatch()

    def start_kill(self, worker: Worker, job: Job, now: float) -> None:
        """A task ran past its timeout: hand back what waits behind it, and open its kill
        window (core/kill.py): from now on its answer is TIMEOUT, whatever else happens."""
        self.withdraw(worker, worker.lane.prefetched())
        if job.state is RUNNING:  # not answered by what withdraw read
            worker.child.open_kill([job], now)
            self.manage_workers()  # start its replacement now

    # -- control -------------------------------------------------------------------------------

    def scale(self, workers: int) -> None:
        """Set the pool's size, within 1..MAX_WORKERS (a reload resets it to the config's)."""
        self.target = min(max(workers, 1), MAX_WORKERS)
        self.manage_workers()

    def collect_garbage(self, done: Callable[[dict[str, Any]], None]) -> None:
        """gc.collect() in every worker; busy ones answer after their task, or are skipped once
        FANOUT_WAIT_S has passed; one that leaves meanwhile is skipped at once.

        `done` gets {"workers": [per-worker results], "freed_bytes": private memory freed}."""
        collect_garbage(sorted((w for w in self.workers.values() if w.serving), key=lambda w: w.pid), done)

    def snapshot(self) -> list[dict[str, Any]]:
        return [describe(w) for w in sorted(self.workers.values(), key=lambda w: w.pid)]

    def memory(self) -> list[dict[str, Any]]:
        return [{**entry, **memory.process_memory(entry["pid"])} for entry in self.snapshot()]

    # -- stop ----------------------------------------------------------------------------------

    def begin_stop(self) -> None:
        """No new work: queued jobs are answered SHUTTING_DOWN, prefetched ones handed back (and
        answered so), workers stop once their running job is done."""
        self.stopping = True
        self.forks.cancel()
        self.generations.restarts.cancel()
        for job in self.queue.drain():
            self.ledger.shut_out(job)
        for worker in list(self.workers.values()):
            self.stop_worker(worker)

    def abort_running(self) -> None:
        """The grace period is over: kill what still runs and answer its callers."""
        for worker in list(self.workers.values()):
            worker.child.abort()
            worker.phase = "stopping"

    def close(self) -> None:
        self.generations.close()
        for worker in self.workers.values():
            worker.child.close()
