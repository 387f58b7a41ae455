"""The Ray bridge: a fresh interpreter, spawned by the master when `[cluster] engine = "ray"`.

Runs in: the bridge (cluster/process.py and backend.py are the master's side; driver.py is how
it connects to Ray; remote.py is what runs in Ray's own processes).

It is the one Ray driver of the daemon (the master never imports ray, as it never imports
torch): it connects to the head (or, with `address = "local"`, starts a private one on
127.0.0.1, whose processes live and die with this one), submits the jobs the master sends as
Ray tasks and actor calls (cluster/remote.py), and reports each job's messages back. It runs
every job it holds at once; the master's Lane for it starts each job when assigned.

Messages (bridge <-> master, on the socketpair the master spawned us with; kinds named in
messages.py):

    master -> bridge  [RUN, job id, name, request body, *raw]    a CPU task or a pipeline run
                      [CANCEL, job id]        stop it: ray.cancel(force=True) for a task, the
                                                 host actor killed and replaced for a pipeline
                                                 run; nothing more is said of that job
                      [MEMORY, token]         nodes, their Ray processes, the pipeline hosts
                      [CLEAR, token, level]   clear_memory in every pipeline host
                      [STOP]                  ray.shutdown() and exit (sent once idle)
    bridge -> master  [READY, msgpack({"pid", "address", "connect_s", **state})]
                      [DOWN, msgpack({"error"})]       the head is out of reach; we exit
                      [STATE, msgpack(state)]          the nodes changed
                      [ITEM, job id, reply frame, *raw]
                      [DONE, job id, OK | ERROR, reply frame, *raw]
                      [LOST, job id, msgpack({"what", "how"})]   the Ray worker, node or
                                                 actor running it died: it may have run
                      [FAILED, job id, msgpack({"code", "message"})]  Ray could not run it
                      [MEMORY, token, msgpack(snapshot)]
                      [CLEARED, token, msgpack(result)]

    state = {"nodes": [{"node_id", "address", "alive", "cpus", "gpus"}], "cpus", "gpus",
             "hosts": pipeline host actors}

Which tasks stream: the bridge cannot know whether a task is a generator before it runs (it
never imports task code). A name runs as a plain Ray task until one of its runs says it is a
generator function (its items then arrive with its result); from then on it runs as a Ray
streaming generator, whose items arrive as they are yielded. Measured on 2 cores, a streaming
task costs ~1.6x a plain one, which is why plain is the default.

If the head goes away, Ray ends this driver (after RAY_gcs_rpc_server_reconnect_timeout_s,
set to 5 s here unless the environment says otherwise); the master settles what it held and
starts a new bridge, which reports `down` until the head answers again.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import functools
import json
import logging
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from workerctl import protocol
from workerd.cluster.driver import RAY_ENVIRONMENT, classify, cluster_state, connect, gather, one_line
from workerd.config import PipelineConfig
from workerd.core.processes import take_group_down_with_parent
from workerd.core.transport import Channel
from workerd.logs import setup_logging
from workerd.messages import (
    CANCEL,
    CLEAR,
    CLEARED,
    DONE,
    DOWN,
    FAILED,
    ITEM,
    LOST,
    MEMORY,
    READY,
    RUN,
    STATE,
    STOP,
)
from workerd.pipelines.placement import WorkerView, place
from workerd.pipelines.sources import SourceError, Sources

log = logging.getLogger("workerd.cluster.bridge")

EXIT_DOWN = 3
# CPUs a pipeline host holds: none. Its runs wait on the device (or sleep between calls); a
# CPU held for its life would be one no task can use, and the master's in-flight cap and
# overflow's room (both per cluster CPU) would count it as free.
HOST_CPUS = 0
STATE_POLL_S = 2.0
ANSWER_WAIT_S = 5.0
CLEAR_WAIT_S = 120.0


@dataclasses.dataclass(eq=False)
class Host:
    """One pipeline host actor, and the runs placed on it (one at a time reaches it)."""

    index: int
    actor: Any
    queue: collections.deque[tuple[int, str, bytes, list[Any]]] = dataclasses.field(
        default_factory=collections.deque
    )
    running_id: int | None = None  # the job id of the run it has
    call: Any = None  # that run's ObjectRef
    installed: dict[str, str] = dataclasses.field(default_factory=dict)  # name -> sha256 it has
    cached: frozenset[str] = frozenset()
    parked: frozenset[str] = frozenset()
    free_bytes: int = 0

    def view(self) -> WorkerView:
        return WorkerView(
            self.index,
            True,
            self.cached,
            self.parked,
            self.free_bytes,
            len(self.queue) + (self.running_id is not None),
        )


class Bridge:
    def __init__(self, settings: dict[str, Any], channel: Channel, ray: Any) -> None:
        from workerd.cluster import remote

        self.settings = settings
        self.channel = channel
        self.ray = ray
        self.remote: Any = remote  # its Ray-decorated names are untyped
        self.loop: asyncio.AbstractEventLoop  # set by serve(), which runs on it
        self.limit: int = settings["max_message_bytes"]
        self.tasks: dict[int, Any] = {}  # job id -> its ObjectRef or streaming generator
        self.generators: set[str] = set()  # task names whose runs stream
        self.hosts: list[Host] = []
        self.pipelines = {name: PipelineConfig(**fields) for name, fields in settings["pipelines"].items()}
        self.sources = Sources()
        self.state: dict[str, Any] = {}
        self.flush_scheduled = False
        self.completed: collections.deque[Callable[[], None]] = collections.deque()
        self.wake_pending = False
        self.stopped = asyncio.Event()

    # -- channel -------------------------------------------------------------------------------

    def send(self, frames: list[Any]) -> None:
        self.channel.send(frames)
        if not self.flush_scheduled:
            self.flush_scheduled = True
            self.loop.call_soon(self.flush)

    def flush(self) -> None:
        self.flush_scheduled = False
        try:
            done = self.channel.flush()
        except OSError:
            self.stopped.set()  # the master is gone
            return
        if done:
            self.loop.remove_writer(self.channel.fileno())
        else:
            self.loop.add_writer(self.channel.fileno(), self.flush)

    def readable(self) -> None:
        messages = self.channel.receive()
        if messages is None:
            self.stopped.set()
            return
        for frames in messages:
            self.message(frames)

    def message(self, frames: list[Any]) -> None:
        op = frames[0]
        if op == RUN:
            job_id, name = int(frames[1]), bytes(frames[2]).decode()
            if ":" in name:
                self.run_task(job_id, name, frames[3], frames[4:])
            else:
                self.run_pipeline(job_id, name, frames[3], frames[4:])
        elif op == CANCEL:
            self.cancel(int(frames[1]))
        elif op == MEMORY:
            self.loop.create_task(self.answer(MEMORY, frames[1], self.memory()))
        elif op == CLEAR:
            self.loop.create_task(self.answer(CLEARED, frames[1], self.clear(bytes(frames[2]).decode())))
        elif op == STOP:
            self.stopped.set()

    def on_loop(self, handler: Callable[..., None], *args: Any) -> Callable[[Any], None]:
        """A callback for ObjectRef._on_completed, which Ray calls on a thread of its own: it
        hands the value (or the exception) to `handler` on the loop's thread.

        Completions are queued and the loop woken once per batch, not once each (each wake is
        a write to asyncio's self-pipe and a turn of the loop). The loop clears `wake_pending`
        before it drains, so a completion queued meanwhile is drained or wakes it again."""

        def callback(value: Any) -> None:
            self.completed.append(functools.partial(handler, *args, value))
            if not self.wake_pending:
                self.wake_pending = True
                self.loop.call_soon_threadsafe(self.drain_completed)

        return callback

    def drain_completed(self) -> None:
        self.wake_pending = False
        completed = self.completed
        while completed:
            completed.popleft()()

    # -- CPU tasks -----------------------------------------------------------------------------

    def run_task(self, job_id: int, name: str, body: bytes, raw: list[Any]) -> None:
        args = (body, *self.remote.to_ray(raw))
        if name in self.generators:
            stream = self.remote.stream_task.remote(*args)
            self.tasks[job_id] = stream
            self.loop.create_task(self.follow(job_id, stream))
            return
        ref = self.remote.run_task.remote(*args)
        self.tasks[job_id] = ref
        ref._on_completed(self.on_loop(self.task_done, job_id, name))

    def task_done(self, job_id: int, name: str, value: Any) -> None:
        if self.tasks.pop(job_id, None) is None:
            return  # cancelled: the master has answered it
        if isinstance(value, BaseException):
            self.report_failure(job_id, value)
            return
        generator, messages = protocol.unpack(value) if type(value) is bytes else value
        if generator:
            self.generators.add(name)
        for kind, frames in messages:
            self.send_message(job_id, kind, frames)

    async def follow(self, job_id: int, stream: Any) -> None:
        """Forward a streaming task's messages as they come."""
        try:
            async for ref in stream:
                kind, frames = await ref
                if job_id not in self.tasks:
                    return
                self.send_message(job_id, kind, frames)
        except Exception as exc:
            if job_id in self.tasks:
                self.report_failure(job_id, exc)
        finally:
            self.tasks.pop(job_id, None)

    def send_message(self, job_id: int, kind: bytes, frames: list[Any]) -> None:
        frames = [f if isinstance(f, bytes) else memoryview(f) for f in frames]
        if kind == ITEM:
            self.send([ITEM, b"%d" % job_id, *frames])
        else:
            self.send([DONE, b"%d" % job_id, kind, *frames])

    def report_failure(self, job_id: int, exc: BaseException) -> None:
        kind, details = classify(exc)
        if kind == FAILED:
            log.warning("job %d: %s", job_id, details["message"])
        self.send([kind, b"%d" % job_id, protocol.pack(details)])

    def cancel(self, job_id: int) -> None:
        task = self.tasks.pop(job_id, None)
        if task is not None:
            try:
                self.ray.cancel(task, force=True)
            except Exception as exc:  # finished meanwhile, or its node is gone
                log.debug("cancel of job %d: %s", job_id, exc)
            return
        for host in self.hosts:
            if host.running_id == job_id:
                self.replace_host(host, "its run was cancelled or timed out")
                return
            for entry in list(host.queue):
                if entry[0] == job_id:
                    host.queue.remove(entry)
                    return

    # -- pipelines -----------------------------------------------------------------------------

    def host_settings(self) -> dict[str, Any]:
        gpu = self.settings["gpu"]
        return {
            "device": gpu["device"],
            "memory_budget_mb": gpu["memory_budget_mb"],
            "host_memory_budget_mb": gpu["host_memory_budget_mb"],
            "retained_warn_mb": gpu["retained_warn_mb"],
            "max_retained_mb": {name: p.max_retained_mb for name, p in self.pipelines.items()},
            "max_message_bytes": self.limit,
        }

    def new_actor(self) -> Any:
        """A pipeline host asking Ray for `num_gpus` GPUs and HOST_CPUS CPUs. Named explicitly:
        an actor whose options name any resource (num_gpus=0 included) holds Ray's default of
        1 CPU for its whole life, which took a CPU from the tasks on every node with a host
        (measured on a 2-CPU private head: 10 x 0.5 s took 5.05 s instead of 2.53 s)."""
        return self.remote.PipelineHost.options(
            num_cpus=HOST_CPUS, num_gpus=self.settings["num_gpus"], scheduling_strategy="SPREAD"
        ).remote(self.host_settings())

    def ensure_hosts(self) -> None:
        """As many hosts as the cluster has room for: one per `num_gpus` GPUs, or (num_gpus = 0)
        one per live node. Never fewer once made: a dead one is replaced when its run fails."""
        if not self.settings["pipelines_on_cluster"] or not self.pipelines:
            return
        num_gpus = self.settings["num_gpus"]
        if num_gpus:
            wanted = max(int(self.state.get("gpus", 0) // num_gpus), 1)
        else:
            wanted = max(sum(1 for node in self.state.get("nodes", []) if node["alive"]), 1)
        while len(self.hosts) < wanted:
            self.hosts.append(Host(len(self.hosts), self.new_actor()))

    def run_pipeline(self, job_id: int, name: str, body: bytes, raw: list[Any]) -> None:
        self.ensure_hosts()
        index = place(name, [host.view() for host in self.hosts])
        if index is None:
            self.send(
                [
                    FAILED,
                    b"%d" % job_id,
                    protocol.pack(
                        {"code": protocol.UNKNOWN_TASK, "message": f"no pipeline host for {name!r}"}
                    ),
                ]
            )
            return
        host = self.hosts[index]
        host.queue.append((job_id, name, body, raw))
        self.pump(host)

    def pump(self, host: Host) -> None:
        """Hand the host its next run, with the source's digest (and the source, if it has not
        got this digest yet)."""
        while host.running_id is None and host.queue:
            job_id, name, body, raw = host.queue.popleft()
            try:
                source = self.sources.read(self.sources.path(self.pipelines[name]))
            except (SourceError, KeyError) as exc:
                message = exc.message if isinstance(exc, SourceError) else f"no pipeline named {name!r}"
                self.send(
                    [
                        FAILED,
                        b"%d" % job_id,
                        protocol.pack({"code": protocol.UNKNOWN_TASK, "message": message}),
                    ]
                )
                continue
            data = None if host.installed.get(name) == source.sha256 else source.data
            host.installed[name] = source.sha256
            host.running_id = job_id
            host.call = host.actor.run.remote(name, source.sha256, data, body, *self.remote.to_ray(raw))
            host.call._on_completed(self.on_loop(self.run_done, host, host.actor, job_id))

    def run_done(self, host: Host, actor: Any, job_id: int, value: Any) -> None:
        if host.actor is not actor or host.running_id != job_id:
            return  # the host was replaced (its run cancelled): the master has answered it
        host.running_id = host.call = None
        if isinstance(value, BaseException):
            self.report_failure(job_id, value)
            if classify(value)[0] == LOST:
                self.replace_host(host, one_line(value))
        else:
            kind, frames, state = value
            host.cached, host.parked = frozenset(state["cached"]), frozenset(state["parked"])
            host.free_bytes = state["free_bytes"]
            self.send_message(job_id, kind, frames)
        self.pump(host)

    def replace_host(self, host: Host, why: str) -> None:
        """A fresh actor in the place of this one; the runs queued for it never reached it."""
        log.warning("pipeline host %d replaced: %s", host.index, why)
        try:
            self.ray.kill(host.actor, no_restart=True)
        except Exception:
            pass
        host.actor = self.new_actor()
        host.running_id = host.call = None
        host.installed.clear()
        host.cached = host.parked = frozenset()
        host.free_bytes = 0
        self.pump(host)

    # -- state, memory, clear --------------------------------------------------------------------

    def read_state(self) -> dict[str, Any]:
        return {**cluster_state(self.ray), "hosts": len(self.hosts)}

    async def watch_state(self) -> None:
        while True:
            await asyncio.sleep(STATE_POLL_S)
            state = await self.loop.run_in_executor(None, self.read_state)
            if state != self.state:
                self.state = state
                self.ensure_hosts()
                state["hosts"] = len(self.hosts)
                self.send([STATE, protocol.pack(state)])

    async def answer(self, kind: bytes, token: bytes, work: Any) -> None:
        try:
            result = await work
        except Exception as exc:
            result = {"error": one_line(exc)}
        self.send([kind, token, protocol.pack(result)])

    async def memory(self) -> dict[str, Any]:
        state = await self.loop.run_in_executor(None, self.read_state)
        node_ids = [node["node_id"] for node in state["nodes"] if node["alive"]]
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy as affinity

        probes = [
            self.remote.node_memory.options(scheduling_strategy=affinity(node_id, soft=False)).remote()
            for node_id in node_ids
        ]
        found = dict(zip(node_ids, await gather(probes, ANSWER_WAIT_S), strict=True))
        for node in state["nodes"]:
            node["processes"] = found.get(node["node_id"], {}).get("processes", [])
        hosts = await gather([host.actor.memory.remote() for host in self.hosts], ANSWER_WAIT_S)
        for host, entry in zip(self.hosts, hosts, strict=True):
            entry["index"] = host.index
            entry["busy"] = host.running_id is not None
        return {**state, "address": self.settings["address_info"], "hosts": hosts}

    async def clear(self, level: str) -> dict[str, Any]:
        hosts = await gather([host.actor.clear.remote(level) for host in self.hosts], CLEAR_WAIT_S)
        return {"hosts": hosts}


async def serve(bridge: Bridge) -> None:
    loop = asyncio.get_running_loop()
    bridge.loop = loop
    bridge.state = await loop.run_in_executor(None, bridge.read_state)
    bridge.ensure_hosts()
    bridge.state["hosts"] = len(bridge.hosts)
    info = {"pid": os.getpid(), "address": bridge.settings["address_info"], **bridge.state}
    bridge.send([READY, protocol.pack(info | {"connect_s": bridge.settings["connect_s"]})])
    loop.add_reader(bridge.channel.fileno(), bridge.readable)
    watcher = loop.create_task(bridge.watch_state())
    await bridge.stopped.wait()
    watcher.cancel()
    loop.remove_reader(bridge.channel.fileno())


def main() -> None:
    started = time.monotonic()
    settings = json.loads(sys.argv[1])
    take_group_down_with_parent(settings["master_pid"])  # Ray's private head is in our group
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the master decides what Ctrl-C means
    setup_logging(logging.getLevelName(settings.get("log_level", logging.INFO)))
    for key, value in RAY_ENVIRONMENT.items():
        os.environ.setdefault(key, value)
    channel = Channel(socket.socket(fileno=int(sys.argv[2])), settings["max_message_bytes"], blocking=False)
    said = threading.Lock()

    def down(error: str) -> None:
        """Tell the master the head is out of reach, and end: Ray may hold threads that never do."""
        log.error("%s", error)
        with said:
            channel.send([DOWN, protocol.pack({"error": error})])
            while not channel.flush():
                time.sleep(0.001)
            os._exit(EXIT_DOWN)

    try:
        ray, address = connect(settings, down)
    except ConnectionError as exc:
        down(str(exc))
    with said:  # past the timer's reach
        settings["address_info"] = address
        settings["connect_s"] = time.monotonic() - started
    bridge = Bridge(settings, channel, ray)
    asyncio.run(serve(bridge))
    ray.shutdown()
    channel.close()


if __name__ == "__main__":
    main()
