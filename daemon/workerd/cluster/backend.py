"""The Ray bridge, as the master sees it: start it, feed it jobs, watch it, replace it.

The bridge (bridge.py) is spawned as a fresh interpreter at boot when `[cluster] engine = "ray"`
and reached through a core.child.Child (process.py: one bridge process), as the GPU worker is.
Its jobs go through the one job lifecycle: a JobQueue while they wait here, a
WHEN_ASSIGNED Lane once a bridge holds them (it runs them all at once, each started when
assigned, each with its own deadline), and the Ledger for every reply. What a bridge says of a
job maps onto the Ledger:

    item   -> Ledger.item          done  -> Ledger.result
    lost   -> Ledger.lost          (the Ray worker or node died: the request's retries apply,
                                    never for a stream that sent items)
    failed -> Ledger.fail          (Ray could not run it: runtime_env, scheduling)

A job past its deadline is answered TIMEOUT here and its bridge is told to cancel it
(ray.cancel(force=True)); the bridge lives on. If a bridge dies, every job it held may have run
(lifecycle.settle). A bridge that cannot reach the head says `down` with one line and exits;
that line is the cluster's state in `status` and the error of each request that needed the
cluster, and a new bridge tries again after a back-off. Meanwhile in overflow mode the local
pool takes the CPU jobs (routing.py).

One bridge serves: it alone gets new jobs. A reload retires it and starts a new one at once
(Ray's workers keep the task code they imported; a new driver, a new Ray job, is how new code
and a new runtime_env reach them). A retiring bridge finishes the jobs it holds, then stops, as
an old generation's CPU workers do; new jobs wait only for the new bridge to connect.

Runs in: the master.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from typing import Any

from workerctl import protocol
from workerd import messages
from workerd.cluster import routing
from workerd.cluster.process import (
    MIN_IN_FLIGHT,
    READY,
    STARTING,
    STOPPING,
    Bridge,
    Callback,
    Frames,
    bridge_settings,
)
from workerd.config import Config
from workerd.core.backend import Services
from workerd.core.backoff import Backoff
from workerd.core.child import Child, frame_limit
from workerd.core.lifecycle import STOP_MESSAGE, WHEN_ASSIGNED, Job, Lane
from workerd.core.processes import describe_exit
from workerd.core.queue import JobQueue

log = logging.getLogger("workerd.cluster")

# Jobs the serving bridge holds at once, per CPU of the cluster (and never fewer than
# MIN_IN_FLIGHT): enough that Ray's own queue never runs dry between two of our messages, few
# enough that a job's timeout (which counts from here) is mostly its run. Every CPU the bridge
# reports is one tasks can use: the pipeline hosts hold none (bridge.HOST_CPUS).
IN_FLIGHT_PER_CPU = 32
# Overflow jobs the cluster may hold per CPU: one running, one next (as [pool] prefetch = 1).
SPILL_PER_CPU = 2
# Reconnecting: the first retry after 1 s, doubling up to 10 s.
RETRY_FIRST_S = 1.0
RETRY_MAX_S = 10.0
# memory_status waits this long for the bridge (which itself waits ANSWER_WAIT_S per node).
ANSWER_WAIT_S = 10.0
CLEAR_WAIT_S = 130.0


class Cluster:
    kind = "cluster"

    def __init__(self, config: Config, services: Services, fallback: Callable[[Job], None]) -> None:
        self.config = config
        self.ledger, self.reactor, self.counters, self.private_dir = services
        self.fallback = fallback  # the local pool's submit, for overflow jobs while the head is down
        self.serving: Bridge | None = None  # the one that gets new jobs
        self.retiring: list[Bridge] = []  # replaced by a reload: finishing what they hold
        self.spawned = 0  # bridges started so far
        self.ended = "off"  # the state shown while no bridge serves: off, then stopped
        self.error: str | None = None  # why the head cannot be reached: the one line
        self.info: dict[str, Any] = {}  # the serving bridge's last word: address, nodes, cpus, hosts
        self.queue = JobQueue()
        self.respawn = Backoff(RETRY_FIRST_S, RETRY_MAX_S)  # reconnecting
        self.jobs_done = 0
        self.stopping = False
        self.on_connect: Callable[[], None] = lambda: None  # the bridge's first word: ready or down

    @property
    def enabled(self) -> bool:
        return self.config.cluster.enabled

    @property
    def connected(self) -> bool:
        return self.serving is not None and self.serving.phase == READY

    @property
    def connecting(self) -> bool:
        """Started, and not yet connected nor known to be down."""
        return self.serving is not None and self.serving.phase == STARTING and self.error is None

    @property
    def busy(self) -> bool:
        return any(bridge.lane.jobs for bridge in self.bridges())

    @property
    def exited(self) -> bool:
        """No bridge process is left, serving or retiring."""
        return self.serving is None and not self.retiring

    @property
    def state(self) -> str:
        phase = self.ended if self.serving is None else self.serving.phase
        if self.error is not None and phase != READY:
            return "down"
        return phase

    def bridges(self) -> list[Bridge]:
        """Every bridge process: the serving one first, then the retiring ones."""
        return ([] if self.serving is None else [self.serving]) + self.retiring

    def held(self) -> int:
        return sum(len(bridge.lane) for bridge in self.bridges())

    # -- routing -------------------------------------------------------------------------------

    def takes(self, is_pipeline: bool, local_depth: Callable[[], int]) -> bool:
        """Does this execute go to the cluster? (handlers.py asks for each one.)"""
        where = routing.destination(
            self.config.cluster, is_pipeline, self.connected, local_depth, self.has_room
        )
        return where == routing.CLUSTER

    def take_overflow(self, queue: JobQueue, local_depth: Callable[[], int]) -> None:
        """Move jobs waiting in the local pool's queue (oldest first) to the cluster while the
        overflow rule holds (routing.spills). The master calls it each turn, after the local
        workers took what they could."""
        cluster = self.config.cluster
        while queue and routing.spills(cluster, self.connected, local_depth, self.has_room):
            job = queue.take(lambda key: True)
            if job is None:
                return
            job.pool = "cluster"
            self.counters["cluster_spilled"] += 1
            self.submit(job)

    def has_room(self) -> bool:
        """Can an overflow job start on the cluster about now? (SPILL_PER_CPU per CPU; the jobs
        retiring bridges still run use the same CPUs.)"""
        cpus = max(float(self.info.get("cpus", 0)), 1.0)
        return self.held() + len(self.queue) < SPILL_PER_CPU * cpus

    @property
    def runs_pipelines(self) -> bool:
        return self.enabled and self.config.cluster.pipelines

    def full(self, limit: int) -> bool:
        return len(self.queue) >= limit

    # -- processes -----------------------------------------------------------------------------

    def start(self) -> None:
        if self.enabled and self.serving is None and not self.stopping:
            self.spawn()

    def spawn(self) -> None:
        self.respawn.cancel()
        self.spawned += 1
        # A private head keeps its sockets and logs here: short (AF_UNIX paths are), ours, and
        # one per bridge, since a retiring bridge's head runs beside the new one's.
        settings = bridge_settings(self.config, os.path.join(self.private_dir, f"ray{self.spawned}"))
        bridge: Bridge

        def on_message(frames: Frames, now: float) -> None:
            self.message(bridge, frames)

        lane = Lane(MIN_IN_FLIGHT, starts=WHEN_ASSIGNED)
        child = Child(self.reactor, self.ledger, self.private_dir, "the Ray bridge", lane, on_message)
        try:
            child.spawn(
                "workerd.cluster.bridge", [json.dumps(settings)], frame_limit(settings["max_message_bytes"])
            )
        except OSError as exc:
            self.went_down(f"cannot start the Ray bridge: {exc}")
            self.respawn.next(time.monotonic())
            return
        bridge = self.serving = Bridge(child)
        log.info("Ray bridge starting (pid %d) for %s", bridge.pid, self.config.cluster.address)

    def went_down(self, error: str) -> None:
        """The head cannot be reached: say so once, and end what waits for it here (overflow
        jobs go to the local pool, which keeps serving; the others fail with the line)."""
        if error != self.error:
            log.error("cluster unavailable: %s", error)
        self.error = error
        for job in self.queue.drain():
            self.resubmit(job)
        self.on_connect()

    def resubmit(self, job: Job) -> None:
        """A job that waits for a cluster that is down (or to be retried on it)."""
        if self.stopping:
            self.ledger.shut_out(job)
        elif self.error is None or self.connected:
            self.queue.push(job)
        elif self.config.cluster.mode == "overflow" and ":" in job.name:
            job.pool = "cpu"  # it runs here after all, and is counted so
            self.fallback(job)
        else:
            self.ledger.fail(job, protocol.INTERNAL, self.unavailable())

    def unavailable(self) -> str:
        return f"cluster unavailable: {self.error}"

    def reconfigure(self, config: Config) -> None:
        """Take a reloaded config: the serving bridge retires and a new one starts at once."""
        self.config = config
        self.respawn.cancel()  # whatever a back-off waited for, the reload decides now
        if self.serving is not None:
            self.retire(self.serving)
        if self.enabled:
            self.start()
            return
        for job in self.queue.drain():
            self.ledger.fail(
                job, protocol.UNKNOWN_TASK, "the cluster is off ([cluster] engine) after a reload"
            )

    def retire(self, bridge: Bridge) -> None:
        """No new job for this bridge: it finishes the ones it holds, then stops."""
        self.serving = None
        self.retiring.append(bridge)
        log.info("Ray bridge (pid %d) retiring: %d job(s) to finish", bridge.pid, len(bridge.lane))
        self.stop_if_idle(bridge)

    def stop_if_idle(self, bridge: Bridge) -> None:
        if not bridge.lane.jobs and (self.stopping or bridge is not self.serving):
            bridge.stop()

    def reaped(self, pid: int, status: int) -> bool:
        """A child of the master exited: is it one of the bridges?"""
        bridge = next((b for b in self.bridges() if b.pid == pid), None)
        if bridge is None:
            return False
        how = describe_exit(status)
        bridge.child.close()  # what it sent before it went (a `down`, a last result)
        if bridge is self.serving:
            self.serving_exited(bridge, how)
        else:
            self.retiring.remove(bridge)
            log.info("retired Ray bridge (pid %d) %s", pid, how)
            self.settle(bridge, how)
        return True

    def serving_exited(self, bridge: Bridge, how: str) -> None:
        was = bridge.phase
        self.serving, self.ended = None, "stopped"
        if self.error is None and not self.stopping:
            where = f"the Ray head at {self.info.get('address', self.config.cluster.address)}"
            self.went_down(f"lost {where} (the Ray bridge {how} while {was})")
        self.settle(bridge, how)
        if not self.stopping:
            self.counters["bridge_restarts"] += 1
            self.respawn.next(time.monotonic())

    def settle(self, bridge: Bridge, how: str) -> None:
        """Every job the gone bridge held may have run (core.child.Child.gone)."""
        retry = None if self.stopping else self.resubmit
        bridge.child.gone(how, retry, self.resubmit)

    # -- channel -------------------------------------------------------------------------------

    def message(self, bridge: Bridge, frames: Frames) -> None:
        kind = frames[0]
        if kind == messages.DONE:
            job = bridge.lane.done(int(frames[1]), 0.0)
            if job is not None:
                bridge.jobs_done += 1
                self.jobs_done += 1
                self.ledger.result(job, frames[2], frames[3], frames[4:])
                self.stop_if_idle(bridge)
        elif kind == messages.ITEM:
            job = bridge.lane.find(int(frames[1]))
            if job is not None:
                self.ledger.item(job, frames[2], frames[3:])
        elif kind in (messages.LOST, messages.FAILED):
            job = bridge.lane.done(int(frames[1]), 0.0)
            if job is not None:
                self.job_failed(job, kind, protocol.unpack(frames[2]))
                self.stop_if_idle(bridge)
        elif kind in (messages.MEMORY, messages.CLEARED):
            bridge.child.answered(frames[1], protocol.unpack(frames[2]))
        elif bridge is not self.serving:
            return  # a retiring bridge's word on the cluster: the serving one's counts
        elif kind == messages.READY:
            self.ready(bridge, protocol.unpack(frames[1]))
        elif kind == messages.STATE:
            self.take_state(bridge, protocol.unpack(frames[1]))
        elif kind == messages.DOWN:
            self.went_down(str(protocol.unpack(frames[1])["error"]))

    def job_failed(self, job: Job, kind: bytes, details: dict[str, Any]) -> None:
        if kind == messages.LOST:
            self.counters["cluster_lost"] += 1
            retry = None if self.stopping else self.resubmit
            self.ledger.lost(job, 0, str(details["what"]), str(details["how"]), retry)
        else:
            self.ledger.fail(job, str(details["code"]), str(details["message"]))

    def ready(self, bridge: Bridge, info: dict[str, Any]) -> None:
        if self.error is not None:
            log.info("cluster reachable again: %s", info["address"])
        self.error = None
        self.respawn.reset()
        bridge.phase = READY
        self.take_state(bridge, info)
        log.info(
            "Ray bridge ready (pid %d): %s, %d node(s), %g CPUs, connected in %.2f s",
            bridge.pid,
            info["address"],
            sum(1 for node in info["nodes"] if node["alive"]),
            info["cpus"],
            info["connect_s"],
        )
        if self.stopping:
            bridge.stop()
        self.on_connect()

    def take_state(self, bridge: Bridge, state: dict[str, Any]) -> None:
        self.info.update(state)
        bridge.lane.capacity = max(int(IN_FLIGHT_PER_CPU * state.get("cpus", 0)), MIN_IN_FLIGHT)

    # -- jobs ----------------------------------------------------------------------------------

    def submit(self, job: Job) -> None:
        if self.error is not None and not self.connected:
            self.resubmit(job)
            return
        self.queue.push(job)
        self.dispatch()

    def dispatch(self) -> None:
        bridge = self.serving
        if bridge is None or bridge.phase != READY or self.stopping:
            return
        now = time.monotonic()
        while self.queue and bridge.lane.free() > 0:
            job = self.queue.take(lambda key: True)
            if job is None:
                return
            bridge.lane.add(job, now)
            bridge.child.send([messages.RUN, b"%d" % job.id, job.name.encode(), job.body, *job.raw])

    def cancel(self, job: Job, terminate: bool) -> str:
        """`cancel` for a cluster job: queued ones surely; one a bridge holds is "running"
        (Ray may have started it) unless terminated: ray.cancel(force=True), CANCELLED now."""
        if self.queue.remove(job):
            self.ledger.cancel_reply(job)
            return "cancelled"
        bridge = next((b for b in self.bridges() if b.lane.find(job.id) is job), None)
        if bridge is None:
            return "unknown"
        if not terminate:
            return "running"
        job.cancelled = True
        bridge.lane.remove(job, time.monotonic())
        self.ledger.cancel_reply(job, terminated=True)
        bridge.child.send([messages.CANCEL, b"%d" % job.id])
        self.stop_if_idle(bridge)
        return "cancelled"

    def next_deadline(self) -> float:
        return min([self.respawn.due, *(bridge.child.next_deadline() for bridge in self.bridges())])

    def tick(self) -> None:
        now = time.monotonic()
        for bridge in self.bridges():
            self.expire(bridge, now)
        if not self.stopping and self.respawn.ready(now):
            self.spawn()
        self.dispatch()

    def expire(self, bridge: Bridge, now: float) -> None:
        """Jobs past their deadline (TIMEOUT now, the Ray task cancelled) and asks unanswered."""
        late = bridge.lane.overdue(now)
        for job in late:
            job.expired = True
            self.ledger.timed_out(job, bridge.pid, "", "its Ray task")
            bridge.child.send([messages.CANCEL, b"%d" % job.id])
        if late:
            self.stop_if_idle(bridge)
        bridge.child.tick(now)  # asks past their deadline

    # -- requests to the bridge ------------------------------------------------------------------

    def ask(self, op: bytes, args: list[bytes], callback: Callback, wait: float) -> None:
        """Ask the serving bridge (retiring ones are on their way out)."""
        if self.serving is None or not self.connected:
            callback(None)
            return
        self.serving.child.ask(op, args, callback, wait)

    def memory(self, callback: Callback) -> None:
        """memory_status's "cluster": None when off; the bridge's snapshot when connected."""
        if not self.enabled:
            callback(None)
            return

        def answer(snapshot: dict[str, Any] | None) -> None:
            callback({**self.status(), **(snapshot or {})})

        self.ask(messages.MEMORY, [], answer, ANSWER_WAIT_S)

    def clear(self, level: str, callback: Callback) -> None:
        if not self.enabled:
            callback(None)
            return
        self.ask(messages.CLEAR, [level.encode()], callback, CLEAR_WAIT_S)

    def status(self) -> dict[str, Any]:
        """`status`'s "cluster" (also the head of memory_status's)."""
        cluster = self.config.cluster
        nodes = self.info.get("nodes", [])
        return {
            "engine": cluster.engine,
            "address": self.info.get("address", cluster.address),
            "mode": cluster.mode,
            "spill_queue": cluster.spill_queue,
            "pipelines": cluster.pipelines,
            "state": self.state,
            "error": self.error,
            "pid": None if self.serving is None else self.serving.pid,
            "nodes": [node for node in nodes if node["alive"]],
            "cpus": self.info.get("cpus", 0),
            "gpus": self.info.get("gpus", 0),
            "hosts": self.info.get("hosts", 0),
            "queue": len(self.queue),
            "running": self.held(),
            "capacity": MIN_IN_FLIGHT if self.serving is None else self.serving.lane.capacity,
            "done": self.jobs_done,
            "retiring": [{"pid": bridge.pid, "running": len(bridge.lane)} for bridge in self.retiring],
        }

    def describe(self) -> list[dict[str, Any]]:
        """The bridges' lines in memory_status's `workers`."""
        return [
            bridge.describe(self.state if bridge is self.serving else "retiring") for bridge in self.bridges()
        ]

    # -- stop ----------------------------------------------------------------------------------

    def begin_stop(self) -> None:
        self.stopping = True
        # A reconnect left pending would come due and stay due (tick never spawns while
        # stopping): the loop polled at 0 ms for the whole grace period.
        self.respawn.cancel()
        for job in self.queue.drain():
            self.ledger.shut_out(job)
        for bridge in self.bridges():
            bridge.child.drop_asks(STOP_MESSAGE)
            self.stop_if_idle(bridge)

    def abort_running(self) -> None:
        """The grace period is over: answer what still runs and kill the bridges holding it. An
        idle bridge was told to stop already, and is left to shut Ray down (a private head with
        it)."""
        for bridge in self.bridges():
            if bridge.lane.jobs:
                bridge.child.abort()
                bridge.phase = STOPPING
