"""The Ray bridge, as the master sees it: start it, feed it jobs, watch it, reconnect it.

The bridge (bridge.py) is spawned as a fresh interpreter at boot when `[cluster] engine = "ray"`
and reached over its channel (transport.py), as the GPU worker is. Its jobs go through the one
job lifecycle: a JobQueue while they wait here, a WHEN_ASSIGNED Lane once the bridge holds them
(it runs them all at once, each started when assigned, each with its own deadline), and the
Ledger for every reply. What the bridge says of a job maps onto the Ledger:

    item   -> Ledger.item          done  -> Ledger.result
    lost   -> Ledger.lost          (the Ray worker or node died: the request's retries apply,
                                    never for a stream that sent items)
    failed -> Ledger.fail          (Ray could not run it: runtime_env, scheduling)

A job past its deadline is answered TIMEOUT here and the bridge is told to cancel it
(ray.cancel(force=True)); the bridge lives on. If the bridge dies, every job it held may have
run (lifecycle.settle). A bridge that cannot reach the head says `down` with one line and exits;
that line is the cluster's state in `status` and the error of each request that needed the
cluster, and a new bridge tries again after a back-off. Meanwhile in overflow mode the local
pool takes the CPU jobs (routing.py).
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import signal
import time
from collections.abc import Callable
from typing import Any

from workerctl import protocol
from workerd import memory
from workerd.cluster import routing
from workerd.config import Config, gpu_worker_settings
from workerd.core import processes
from workerd.core.backoff import Backoff
from workerd.core.child import frame_limit
from workerd.core.lifecycle import STOPPING, WHEN_ASSIGNED, Job, JobQueue, Lane, Ledger, settle
from workerd.core.reactor import Reactor
from workerd.core.transport import Channel, ChannelError, channel_pair
from workerd.metrics import Metrics

log = logging.getLogger("workerd.cluster")

# Jobs the bridge holds at once, per CPU of the cluster (and never fewer than MIN_IN_FLIGHT):
# enough that Ray's own queue never runs dry between two of our messages, few enough that a
# job's timeout (which counts from here) is mostly its run.
IN_FLIGHT_PER_CPU = 32
MIN_IN_FLIGHT = 16
# Overflow jobs the cluster may hold per CPU: one running, one next (as [pool] prefetch = 1).
SPILL_PER_CPU = 2
# Reconnecting: the first retry after 1 s, doubling up to 10 s.
RETRY_FIRST_S = 1.0
RETRY_MAX_S = 10.0
# memory_status waits this long for the bridge (which itself waits ANSWER_WAIT_S per node).
ANSWER_WAIT_S = 10.0
CLEAR_WAIT_S = 130.0

Callback = Callable[[Any], None]


class Cluster:
    kind = "cluster"

    def __init__(
        self,
        config: Config,
        private_dir: str,
        ledger: Ledger,
        reactor: Reactor,
        metrics: Metrics,
        fallback: Callable[[Job], None],
    ) -> None:
        self.config = config
        self.private_dir = private_dir
        self.ledger = ledger
        self.reactor = reactor
        self.counters = metrics.events
        self.fallback = fallback  # the local pool's submit, for overflow jobs while the head is down
        self.pid: int | None = None
        self.channel: Channel | None = None
        self.phase = "off"  # off | starting | ready | stopping | stopped
        self.error: str | None = None  # why the head cannot be reached: the one line
        self.info: dict[str, Any] = {}  # the bridge's last word: address, nodes, cpus, gpus, hosts
        self.queue = JobQueue()
        self.lane = Lane(MIN_IN_FLIGHT, starts=WHEN_ASSIGNED)
        self.respawn = Backoff(RETRY_FIRST_S, RETRY_MAX_S)  # reconnecting
        self.started_at = 0.0
        self.jobs_done = 0
        self.stopping = False
        self.restart_pending = False
        self.tokens = (b"%d" % n for n in itertools.count(1))
        self.waiting: dict[bytes, tuple[Callback, float]] = {}
        self.on_connect: Callable[[], None] = lambda: None  # the bridge's first word: ready or down

    @property
    def enabled(self) -> bool:
        return self.config.cluster.enabled

    @property
    def connected(self) -> bool:
        return self.phase == "ready" and not self.restart_pending

    @property
    def connecting(self) -> bool:
        """Started, and not yet connected nor known to be down."""
        return self.phase == "starting" and self.error is None

    @property
    def busy(self) -> bool:
        return bool(self.lane.jobs)

    @property
    def exited(self) -> bool:
        return self.pid is None

    @property
    def state(self) -> str:
        if self.error is not None and self.phase != "ready":
            return "down"
        return self.phase

    # -- routing -------------------------------------------------------------------------------

    def takes(self, is_pipeline: bool, local_waiting: Callable[[], int]) -> bool:
        """Does this execute go to the cluster? (handlers.py asks for each one.)"""
        where = routing.destination(
            self.config.cluster, is_pipeline, self.connected, local_waiting, self.has_room
        )
        return where == routing.CLUSTER

    def take_overflow(self, queue: JobQueue, local_waiting: Callable[[], int]) -> None:
        """Move jobs waiting in the local pool's queue (oldest first) to the cluster while the
        overflow rule holds (routing.spills). The master calls it each turn, after the local
        workers took what they could."""
        cluster = self.config.cluster
        while queue and routing.spills(cluster, self.connected, local_waiting, self.has_room):
            job = queue.take(lambda key: True)
            if job is None:
                return
            job.pool = "cluster"
            self.counters["cluster_spilled"] += 1
            self.submit(job)

    def has_room(self) -> bool:
        """Can an overflow job start on the cluster about now? (SPILL_PER_CPU per CPU held.)"""
        cpus = max(float(self.info.get("cpus", 0)), 1.0)
        return len(self.lane) + len(self.queue) < SPILL_PER_CPU * cpus

    @property
    def runs_pipelines(self) -> bool:
        return self.enabled and self.config.cluster.pipelines

    def full(self, limit: int) -> bool:
        return len(self.queue) >= limit

    # -- process -------------------------------------------------------------------------------

    def settings(self) -> dict[str, Any]:
        cluster = self.config.cluster
        gpu = gpu_worker_settings(self.config)
        return {
            "master_pid": os.getpid(),
            "log_level": logging.getLogger().getEffectiveLevel(),
            "address": cluster.address,
            "ship_modules": cluster.ship_modules,
            "task_modules": list(self.config.tasks.modules),
            "pipelines_on_cluster": cluster.pipelines,
            "pipelines": gpu.pop("pipelines"),
            "gpu": gpu,
            "num_gpus": cluster.num_gpus,
            "max_message_bytes": self.config.daemon.max_message_bytes,
            # A private head keeps its sockets and logs here: short (AF_UNIX paths are), ours.
            "temp_dir": os.path.join(self.private_dir, "ray"),
        }

    def start(self) -> None:
        if self.enabled and self.pid is None and not self.stopping:
            self.spawn()

    def spawn(self) -> None:
        self.respawn.cancel()
        channel, theirs = channel_pair(frame_limit(self.config.daemon.max_message_bytes))
        try:
            pid = processes.spawn(
                "workerd.cluster.bridge",
                [json.dumps(self.settings()), str(theirs.fileno())],
                [theirs.fileno()],
            )
        except OSError as exc:
            channel.close()
            self.went_down(f"cannot start the Ray bridge: {exc}")
            self.retry_later()
            return
        finally:
            theirs.close()
        self.pid, self.channel, self.phase = pid, channel, "starting"
        self.started_at = time.monotonic()
        self.reactor.watch(channel.fileno(), self.handle_channel)
        log.info("Ray bridge starting (pid %d) for %s", pid, self.config.cluster.address)

    def retry_later(self) -> None:
        self.respawn.next(time.monotonic())

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
        elif self.error is None or self.phase == "ready":
            self.queue.push(job, front=True)
        elif self.config.cluster.mode == "overflow" and ":" in job.name:
            job.pool = "cpu"  # it runs here after all, and is counted so
            self.fallback(job)
        else:
            self.ledger.fail(job, protocol.INTERNAL, self.unavailable())

    def unavailable(self) -> str:
        return f"cluster unavailable: {self.error}"

    def reconfigure(self, config: Config) -> None:
        """Take a reloaded config. The bridge is replaced once idle on every reload: Ray's
        worker processes keep the task code they imported, and a new job (a new driver) is how
        Ray starts fresh ones with the new code (and a new runtime_env)."""
        self.config = config
        if self.pid is not None:
            self.restart_pending = True
            self.restart_if_idle()
        elif self.enabled:
            self.start()
        if not self.enabled:
            for job in self.queue.drain():
                self.ledger.fail(
                    job, protocol.UNKNOWN_TASK, "the cluster is off ([cluster] engine) after a reload"
                )

    def restart_if_idle(self) -> None:
        if self.restart_pending and not self.lane.jobs and self.pid is not None:
            self.stop_process()

    def reaped(self, pid: int, status: int) -> bool:
        """A child of the master exited: is it the bridge?"""
        if pid != self.pid:
            return False
        processes.kill_group(pid)  # Ray processes of a private head that outlive the bridge
        how = processes.describe_exit(status)
        was = self.phase
        self.close_channel()
        self.pid, self.phase = None, "stopped"
        retry = None if self.stopping else self.resubmit
        replaced = was == "stopping" and self.restart_pending
        if self.error is None and not (self.stopping or replaced):
            where = f"the Ray head at {self.info.get('address', self.config.cluster.address)}"
            self.went_down(f"lost {where} (the Ray bridge {how} while {was})")
        settle(self.ledger, self.lane, pid, "the Ray bridge", how, retry, self.resubmit)
        self.answer_waiting(f"the Ray bridge {how}")
        if self.stopping:
            return True
        if replaced:  # after a reload
            self.restart_pending = False
            self.start()
            return True
        self.counters["bridge_restarts"] += 1
        self.retry_later()
        return True

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
        if self.channel is not None:
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
            log.error("the Ray bridge broke its channel (%s): killing it", exc)
            messages = None
        if messages is None:
            self.reactor.unwatch(channel.fileno())
            if not channel.closed and self.pid is not None:
                processes.signal_quietly(self.pid, signal.SIGKILL)
            return
        for frames in messages:
            self.message(frames)

    def message(self, frames: list[Any]) -> None:
        kind = frames[0]
        if kind == b"done":
            job = self.lane.done(int(frames[1]), 0.0)
            if job is not None:
                self.jobs_done += 1
                self.ledger.result(job, frames[2], frames[3], frames[4:])
                self.after_job()
        elif kind == b"item":
            job = self.lane.find(int(frames[1]))
            if job is not None:
                self.ledger.item(job, frames[2], frames[3:])
        elif kind in (b"lost", b"failed"):
            job = self.lane.done(int(frames[1]), 0.0)
            if job is not None:
                self.job_failed(job, kind, protocol.unpack(frames[2]))
                self.after_job()
        elif kind == b"ready":
            self.ready(protocol.unpack(frames[1]))
        elif kind == b"state":
            self.take_state(protocol.unpack(frames[1]))
        elif kind == b"down":
            self.went_down(str(protocol.unpack(frames[1])["error"]))
        elif kind in (b"memory", b"cleared"):
            waiting = self.waiting.pop(bytes(frames[1]), None)
            if waiting:
                waiting[0](protocol.unpack(frames[2]))

    def job_failed(self, job: Job, kind: bytes, details: dict[str, Any]) -> None:
        if kind == b"lost":
            self.counters["cluster_lost"] += 1
            retry = None if self.stopping else self.resubmit
            self.ledger.lost(job, 0, str(details["what"]), str(details["how"]), retry)
        else:
            self.ledger.fail(job, str(details["code"]), str(details["message"]))

    def after_job(self) -> None:
        if self.stopping and not self.lane.jobs:
            self.stop_process()
        self.restart_if_idle()

    def ready(self, info: dict[str, Any]) -> None:
        if self.error is not None:
            log.info("cluster reachable again: %s", info["address"])
        self.error = None
        self.respawn.reset()
        self.phase = "ready"
        self.take_state(info)
        log.info(
            "Ray bridge ready (pid %d): %s, %d node(s), %g CPUs, connected in %.2f s",
            self.pid or 0,
            info["address"],
            sum(1 for node in info["nodes"] if node["alive"]),
            info["cpus"],
            info["connect_s"],
        )
        if self.stopping:
            self.stop_process()
        self.on_connect()

    def take_state(self, state: dict[str, Any]) -> None:
        self.info.update(state)
        self.lane.capacity = max(int(IN_FLIGHT_PER_CPU * state.get("cpus", 0)), MIN_IN_FLIGHT)

    # -- jobs ----------------------------------------------------------------------------------

    def submit(self, job: Job) -> None:
        if self.error is not None and self.phase != "ready":
            self.resubmit(job)
            return
        self.queue.push(job)
        self.dispatch()

    def dispatch(self) -> None:
        if not self.connected or self.stopping:
            return
        now = time.monotonic()
        while self.queue and self.lane.free() > 0:
            job = self.queue.take(lambda key: True)
            if job is None:
                return
            self.lane.add(job, now)
            self.send([b"run", b"%d" % job.id, job.name.encode(), job.body, *job.raw])

    def cancel(self, job: Job, terminate: bool) -> str:
        """`cancel` for a cluster job: queued ones surely; one the bridge holds is "running"
        (Ray may have started it) unless terminated: ray.cancel(force=True), CANCELLED now."""
        if self.queue.remove(job):
            self.ledger.cancel_reply(job)
            return "cancelled"
        if job not in self.lane.jobs:
            return "unknown"
        if not terminate:
            return "running"
        job.cancelled = True
        self.lane.remove(job, time.monotonic())
        self.ledger.cancel_reply(job, terminated=True)
        self.send([b"cancel", b"%d" % job.id])
        self.after_job()
        return "cancelled"

    def next_deadline(self) -> float:
        times = [self.respawn.due, self.lane.next_deadline()]
        times.extend(deadline for _, deadline in self.waiting.values())
        return min(times)

    def tick(self) -> None:
        now = time.monotonic()
        late = self.lane.overdue(now)
        for job in late:
            job.expired = True
            self.ledger.timed_out(job, self.pid, "", "its Ray task")
            self.send([b"cancel", b"%d" % job.id])
        if late:
            self.after_job()
        for token, (callback, deadline) in list(self.waiting.items()):
            if now >= deadline:
                del self.waiting[token]
                callback({"error": "the Ray bridge did not answer in time", "state": self.state})
        if not self.stopping and self.respawn.ready(now):
            self.spawn()
        self.dispatch()

    # -- requests to the bridge ------------------------------------------------------------------

    def ask(self, op: bytes, args: list[bytes], callback: Callback, wait: float) -> None:
        if not self.connected or self.channel is None:
            callback(None)
            return
        token = next(self.tokens)
        self.waiting[token] = (callback, time.monotonic() + wait)
        self.send([op, token, *args])

    def memory(self, callback: Callback) -> None:
        """memory_status's "cluster": None when off; the bridge's snapshot when connected."""
        if not self.enabled:
            callback(None)
            return

        def answer(snapshot: dict[str, Any] | None) -> None:
            callback({**self.status(), **(snapshot or {})})

        self.ask(b"memory", [], answer, ANSWER_WAIT_S)

    def clear(self, level: str, callback: Callback) -> None:
        if not self.enabled:
            callback(None)
            return
        self.ask(b"clear", [level.encode()], callback, CLEAR_WAIT_S)

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
            "pid": self.pid,
            "nodes": [node for node in nodes if node["alive"]],
            "cpus": self.info.get("cpus", 0),
            "gpus": self.info.get("gpus", 0),
            "hosts": self.info.get("hosts", 0),
            "queue": len(self.queue),
            "running": len(self.lane),
            "capacity": self.lane.capacity,
            "done": self.jobs_done,
        }

    def describe(self) -> list[dict[str, Any]]:
        """The bridge's line in memory_status's `workers`."""
        if self.pid is None:
            return []
        return [
            {"pid": self.pid, "kind": "bridge", "state": self.state, "tasks_done": self.jobs_done}
            | memory.process_memory(self.pid)
        ]

    # -- stop ----------------------------------------------------------------------------------

    def begin_stop(self) -> None:
        self.stopping = True
        # A reconnect left pending would come due and stay due (tick never spawns while
        # stopping): the loop polled at 0 ms for the whole grace period.
        self.respawn.cancel()
        for job in self.queue.drain():
            self.ledger.shut_out(job)
        self.answer_waiting(STOPPING)
        if not self.lane.jobs and self.pid is not None:
            self.stop_process()

    def stop_process(self) -> None:
        """Ask the bridge to end (ray.shutdown(): a private head stops with it)."""
        if self.pid is None:
            return
        if self.phase == "ready":
            self.send([b"stop"])
        else:
            processes.signal_quietly(self.pid, signal.SIGTERM)
        self.phase = "stopping"

    def abort_running(self) -> None:
        """The grace period is over: answer what still runs and kill the bridge. An idle bridge
        was told to stop already, and is left to shut Ray down (a private head with it)."""
        if not self.lane.jobs:
            return
        for job in list(self.lane.jobs):
            self.ledger.cut_short(job)
        self.lane.jobs.clear()
        if self.pid is not None:
            processes.signal_quietly(self.pid, signal.SIGKILL)
            self.phase = "stopping"
