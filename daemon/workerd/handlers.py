"""Command handlers: one method per protocol command, no sockets.

Runs in: the master.

Each takes an Incoming (the decoded request and who sent it) and returns the result, raises
RequestRejected for a typed error, or returns DEFERRED when the answer comes later (execute,
memory_status, clear_memory and reload answer once the work is done).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import itertools
import os
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

import zmq

from workerctl import protocol
from workerd import __version__, memory
from workerd.access import Access, peer_of
from workerd.admission import (
    MAX_CANCEL_IDS,
    RequestRejected,
    check_die_with_client,
    check_execute,
    check_priority,
    check_raw_frames,
)
from workerd.clients import Clients
from workerd.cluster.backend import Cluster
from workerd.config import Config
from workerd.core.backend import Backend
from workerd.core.fanout import Ask, gather
from workerd.core.lifecycle import ANSWERED, STOP_MESSAGE, Job, Ledger, Tenant
from workerd.gpu.backend import GpuWorkers
from workerd.metrics import Metrics
from workerd.pool.backend import Pool
from workerd.tasks import TaskLookupError, check_allowed

if TYPE_CHECKING:  # prometheus_client is imported only when the endpoint is configured
    from workerd.exporter import Exporter

DEFERRED = object()


@dataclasses.dataclass(slots=True)  # not frozen: a frozen __init__ costs µs per request
class Incoming:
    """A decoded request and where it came from."""

    client: bytes  # the ROUTER routing id to answer
    body: bytes  # the request as it arrived, forwarded to workers untouched
    request: dict[str, Any]
    raw: list[zmq.Frame]  # raw buffer frames after the body (see docs/protocol.md), as received
    arrived_at: float  # time.monotonic() when it was read, for the latency metrics
    origin: Any = None  # the routing-id zmq.Frame: the connection's metadata (peer credentials)

    @property
    def id(self) -> Any:
        return self.request["id"]


CLEAR_LEVELS = ("gc", "cache", "full")
COMMANDS = ("ping", "status", "memory_status", "clear_memory", "execute", "cancel", "scale", "reload")


class Daemon(Protocol):
    """What the handlers read of the master (master.py) and ask it to do."""

    config: Config
    state: str
    started: float
    socket_path: str
    max_message_bytes: int
    metrics: Metrics
    counters: collections.Counter[str]
    exporter: Exporter | None
    ledger: Ledger
    pool: Pool
    gpu: GpuWorkers
    cluster: Cluster
    backends: list[Backend]
    access: Access
    clients: Clients

    def answer(self, msg: Incoming, result: Any) -> None: ...
    def reload(self, requester: Incoming | None) -> None: ...


class Commands:
    def __init__(self, master: Daemon) -> None:
        self.master = master
        self.job_ids = itertools.count(1)

    def lookup(self, cmd: str) -> Any:
        if cmd not in COMMANDS:
            return None
        return getattr(self, cmd)

    def ping(self, msg: Incoming) -> dict[str, Any]:
        return {
            "pid": os.getpid(),
            "version": __version__,
            "uptime_s": time.monotonic() - self.master.started,
            "protocols": list(protocol.SUPPORTED_VERSIONS),
            "max_message_bytes": self.master.max_message_bytes,
            # Why CPU tasks cannot run now (the task code failed to import), or None.
            "degraded": self.master.pool.unavailable() if self.master.pool.generations.failure else None,
        }

    def status(self, msg: Incoming) -> dict[str, Any]:
        master, pool = self.master, self.master.pool
        depth = pool.depth()  # first: it places what can go, which the workers' states then show
        workers = pool.snapshot()
        return {
            **self.ping(msg),
            "state": master.state,
            "socket": master.socket_path,
            "config": master.config.source,
            # [tasks] path as configured (absolute), and the serving zygote's whole sys.path.
            "tasks": {
                "path": list(pool.generations.config.tasks.path),
                "sys_path": pool.generations.sys_path(),
            },
            "pool": {
                "target": pool.target,
                "size": sum(1 for w in workers if w["state"] in ("idle", "busy")),
                "idle": sum(1 for w in workers if w["state"] == "idle"),
                "busy": sum(1 for w in workers if w["state"] == "busy"),
                "generation": pool.generations.generation,
                "gc_freeze": master.config.pool.gc_freeze,
                "error": pool.generations.failure,
                "workers": workers,
            },
            "queue": {
                "depth": depth,
                "prefetched": depth - len(pool.queue),
                "max": master.config.daemon.max_queue,
            },
            **master.gpu.status(),  # "gpu" (the first device, as with one) and "gpus" (each)
            "cluster": master.cluster.status() if master.cluster.enabled else None,
            "clients": master.clients.status(),
            "counters": dict(+master.counters),  # only the non-zero ones
            "metrics": self.metrics(),
        }

    def metrics(self) -> dict[str, Any]:
        exporter = self.master.exporter
        return {**self.master.metrics.snapshot(), "endpoint": exporter.url if exporter else None}

    def memory_status(self, msg: Incoming) -> object:
        self.gather_memory(lambda result: self.master.answer(msg, result))
        return DEFERRED

    def gather_memory(self, callback: Callable[[dict[str, Any]], None]) -> None:
        """Memory of every process; the GPU figures come from the GPU workers themselves, the
        cluster's from the Ray bridge."""
        pool, gpu, cluster = self.master.pool, self.master.gpu, self.master.cluster
        result: dict[str, Any] = {
            "daemon": {"pid": os.getpid(), "rss_bytes": memory.process_memory(os.getpid())["rss_bytes"]},
            "zygotes": pool.generations.memory(),
            "workers": pool.memory() + gpu.describe() + cluster.describe(),
        }

        def done(answers: list[Any]) -> None:
            gpus, clusters = answers
            callback({**result, **gpus, "cluster": clusters})

        gather([gpu.memory, cluster.memory], done)

    def scrape(self, deliver: Callable[[dict[str, Any]], None]) -> None:
        """What the Prometheus endpoint shows (exporter.families): the counters and histograms
        of `status`, queue depths, and each worker's state and memory as memory_status reads them."""
        master = self.master
        queues = {
            "cpu": master.pool.depth(),
            "gpu": len(master.gpu.queue),
            "cluster": len(master.cluster.queue),
        }

        def answer(memory_result: dict[str, Any]) -> None:
            deliver(
                {
                    "metrics": master.metrics.snapshot(),
                    "queue": queues,
                    "workers": memory_result["workers"],
                    "gpus": [gpu for gpu in memory_result["gpus"] if "pipelines" in gpu],
                    "clients": master.clients.status(),
                }
            )

        self.gather_memory(answer)

    def clear_memory(self, msg: Incoming) -> object:
        """gc in every CPU worker; and in each GPU worker and the cluster's pipeline hosts gc,
        cache or full, as asked."""
        level = msg.request.get("level", "cache")
        if level not in CLEAR_LEVELS:
            raise RequestRejected(protocol.BAD_REQUEST, f"'level' must be one of {', '.join(CLEAR_LEVELS)}")
        master = self.master

        def done(answers: list[Any]) -> None:
            cpu, gpus, clusters = answers
            master.answer(msg, {"level": level, **cpu, **gpus, "cluster": clusters})

        asks: list[Ask] = [master.pool.collect_garbage, functools.partial(master.gpu.clear, level)]
        gather([*asks, functools.partial(master.cluster.clear, level)], done)
        return DEFERRED

    def still_waiting(self, tenant: Tenant) -> int:
        """Its requests waiting once the CPU pool placed what it can: the pool places new jobs
        once a turn (Pool.submit), and one an idle worker is about to start is not waiting."""
        self.master.pool.dispatch()
        return tenant.waiting

    def execute(self, msg: Incoming) -> object:
        master = self.master
        if master.state == "stopping":
            raise RequestRejected(protocol.SHUTTING_DOWN, STOP_MESSAGE)
        name, timeout_s, retries = check_execute(msg.request, master.config.pool.task_timeout_s)
        check_raw_frames(msg.raw, master.max_message_bytes)
        is_pipeline = ":" not in name
        if is_pipeline:
            self.check_pipeline(name)
            full = len(master.gpu.queue) >= master.config.daemon.max_queue
            module = ""
            if msg.request.get("timeout_s") is None:
                timeout_s = master.config.gpu.run_timeout_s
        else:
            try:
                module, _ = check_allowed(name, master.config.tasks.modules)
            except TaskLookupError as exc:
                raise RequestRejected(exc.code, exc.message) from None
            full = master.pool.full(master.config.daemon.max_queue)
        # The cluster hook: routing.destination, in one call (cluster/backend.py).
        to_cluster = master.cluster.takes(is_pipeline, master.pool.depth)
        if to_cluster:
            full = master.cluster.full(master.config.daemon.max_queue)
        if full:
            raise RequestRejected(
                protocol.BUSY, f"queue is full ({master.config.daemon.max_queue} waiting); retry later"
            )
        tenant = master.clients.of(msg.origin)
        limit = master.config.pool.max_queue_per_client
        if limit and tenant.waiting >= limit and self.still_waiting(tenant) >= limit:
            raise RequestRejected(
                protocol.BUSY,
                f"client {tenant.name} has {tenant.waiting} requests waiting, its limit "
                "([pool] max_queue_per_client); retry later",
            )
        job = Job(
            id=next(self.job_ids),
            client=msg.client,
            request_id=msg.id,
            body=msg.body,
            raw=msg.raw,
            name=name,
            key=name if is_pipeline else module,
            pool="cluster" if to_cluster else "gpu" if is_pipeline else "cpu",
            timeout_s=timeout_s,
            retries=retries,
            accepted_at=msg.arrived_at,  # latency metrics count from arrival, checks included
            die_with_client=check_die_with_client(msg.request),
            origin=msg.origin,
            tenant=tenant,
            priority=check_priority(msg.request),
        )
        if msg.request.get("notify_start") is True:  # opt-in: docs/protocol.md §6.1
            job.on_start = master.ledger.started
        master.ledger.accept(job)
        (master.cluster if to_cluster else master.gpu if is_pipeline else master.pool).submit(job)
        return DEFERRED

    def cancel(self, msg: Incoming) -> dict[str, Any]:
        """Cancel requests of this connection, or with `any_connection` of every connection of
        the same uid: see docs/protocol.md (cancel)."""
        ids = msg.request.get("ids")
        terminate = msg.request.get("terminate", False)
        any_connection = msg.request.get("any_connection", False)
        if not isinstance(ids, list) or len(ids) > MAX_CANCEL_IDS:
            raise RequestRejected(
                protocol.BAD_REQUEST, f"'ids' must be an array of at most {MAX_CANCEL_IDS} request ids"
            )
        if not isinstance(terminate, bool):
            raise RequestRejected(protocol.BAD_REQUEST, "'terminate' must be true or false")
        if not isinstance(any_connection, bool):
            raise RequestRejected(protocol.BAD_REQUEST, "'any_connection' must be true or false")
        result: dict[str, list[Any]] = {"cancelled": [], "running": [], "unknown": []}
        master = self.master
        find: Callable[[Any], list[Job] | None] = functools.partial(master.ledger.find, msg.client)
        if any_connection:
            find = self.peer_jobs(msg, ids).get
        for request_id in ids:
            try:
                jobs = find(request_id) or []
            except TypeError:  # an unhashable id (a list): never one of ours
                jobs = []
            fates = [self.backend(job.pool).cancel(job, terminate) for job in jobs]
            fate = "running" if "running" in fates else "cancelled" if "cancelled" in fates else "unknown"
            result[fate].append(request_id)
        return result

    def depart(self, client: bytes) -> None:
        """A client's connection is gone (limits.py): nobody can read its replies. What it has
        waiting or prefetched ends now, with no reply (Ledger.cancel_reply of a departed job);
        what runs goes on, unless its request asked to die with its client (then it is
        cancelled with terminate: its worker is killed and replaced)."""
        ledger = self.master.ledger
        jobs = ledger.of_client(client)
        if not jobs:
            return
        self.master.counters["clients_departed"] += 1  # with work in flight
        for job in jobs:
            job.departed = True
        for backend in self.master.backends:
            for job in backend.queue.remove_client(client):
                ledger.cancel_reply(job)
        # What is left is held by a child: a few per worker at most.
        for job in jobs:
            if job.state is not ANSWERED:
                self.backend(job.pool).cancel(job, job.die_with_client)

    def peer_jobs(self, msg: Incoming, ids: list[Any]) -> dict[Any, list[Job]]:
        """The jobs in flight under `ids` that the sender of `msg` may cancel from any of its
        connections: those whose requests came from its uid. Killing work is what execute
        does, so [access] execute applies to this, as to the requests themselves."""
        denial = self.master.access.denial("execute", msg.origin)
        if denial is not None:
            raise RequestRejected(protocol.DENIED, f"cancel with any_connection: {denial[0]}")
        peer = peer_of(msg.origin)
        if peer is None:
            raise RequestRejected(
                protocol.DENIED, "cancel with any_connection needs the peer's credentials, which are unknown"
            )

        def same_uid(job: Job) -> bool:
            owner = peer_of(job.origin)
            return owner is not None and owner.uid == peer.uid

        return self.master.ledger.find_any(ids, same_uid)

    def backend(self, kind: str) -> Backend:
        """Where a job of this kind (Job.pool) is."""
        return next(backend for backend in self.master.backends if backend.kind == kind)

    def check_pipeline(self, name: str) -> None:
        config = self.master.config
        if name not in config.pipelines:
            raise RequestRejected(
                protocol.UNKNOWN_TASK,
                f"no pipeline named {name!r} (tasks are named 'package.module:function')",
            )
        if not self.master.gpu.enabled and not self.master.cluster.runs_pipelines:
            raise RequestRejected(
                protocol.UNKNOWN_TASK, f"pipeline {name!r}: the GPU worker is disabled ([gpu] enabled)"
            )

    def scale(self, msg: Incoming) -> dict[str, Any]:
        workers = msg.request.get("workers")
        if (
            isinstance(workers, bool)
            or not isinstance(workers, int)
            or not 1 <= workers <= protocol.MAX_WORKERS
        ):
            raise RequestRejected(
                protocol.BAD_REQUEST, f"'workers' must be an integer from 1 to {protocol.MAX_WORKERS}"
            )
        if self.master.state == "stopping":
            raise RequestRejected(protocol.SHUTTING_DOWN, STOP_MESSAGE)
        self.master.pool.scale(workers)
        return {"workers": workers}

    def reload(self, msg: Incoming) -> object:
        self.master.reload(msg)
        return DEFERRED
