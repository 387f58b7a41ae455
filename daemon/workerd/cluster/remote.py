"""What runs inside Ray's processes, on any node: task runs, pipeline hosts, memory probes.

Runs in: Ray's worker processes, on any node (never the master, nor the bridge).

Ray imports this module by name in its worker processes, so workerd (the same version) must be
installed on every node; the task modules must be importable there too, installed or shipped
by the bridge in the job's runtime_env (`[cluster] ship_modules`).

  run_task, stream_task  one execute of a CPU task through tasks.run, as a CPU worker runs it.
                         The name is checked against [tasks] modules again here (a node never
                         imports a module on the say-so of the wire), and must be a public
                         function defined in its module. A chunk (`calls`) is one task. A plain
                         run returns all its messages at once; a generator's run streams them
                         (a Ray streaming generator), one protocol stream item per Ray object.
  PipelineHost           an actor holding the same PipelineCache as the GPU worker: memory
                         budget, LRU eviction by measured footprint, OOM retry, the host tier.
                         Each run brings the SHA-256 of its pipeline's source (and the source,
                         the first time this actor sees that digest): an edited file loads anew.
  node_memory            the memory of one node's Ray processes, for memory_status.

What crosses Ray here is Ray-pickled inside the cluster (never on workerd's wire): the request
body and raw frames in, encoded reply frames out. A buffer of RAW_THRESHOLD bytes or more
crosses as a numpy uint8 array, which Ray's serializer passes out of band: written once into
its object store, read there without a copy.
"""

from __future__ import annotations

import functools
import inspect
import json
import os
import tempfile
from collections.abc import Iterator, Sequence
from typing import Any

import numpy
import psutil
import ray

from workerctl import protocol
from workerd import memory, tasks
from workerd.config import PipelineConfig

TASK_MODULES, MAX_MESSAGE_BYTES = "WORKERD_TASK_MODULES", "WORKERD_MAX_MESSAGE_BYTES"
Message = tuple[bytes, list[Any]]  # (kind: tasks.ITEM | OK | ERROR, [reply body, *raw frames])


def to_ray(frames: Sequence[Any]) -> list[Any]:
    """Frames as Ray should carry them: large buffers as zero-copy uint8 arrays (a memoryview
    cannot be pickled at all), small ones as bytes."""
    out: list[Any] = []
    for frame in frames:
        if isinstance(frame, bytes):
            out.append(frame)
        elif protocol.frame_size(frame) >= protocol.RAW_THRESHOLD:
            out.append(numpy.frombuffer(frame, dtype=numpy.uint8))
        else:
            out.append(bytes(frame))
    return out


@functools.lru_cache(maxsize=1024)
def check_public(name: str, allowed: frozenset[str]) -> bool:
    """Whether the allowed task `name` is a generator function; raises TaskLookupError unless it
    is a task of its module (tasks.resolve: the same rule as on a local worker)."""
    return inspect.isgeneratorfunction(tasks.resolve(name, allowed))


@functools.cache
def limits() -> tuple[frozenset[str], int]:
    """[tasks] modules and the message size limit, from the job's runtime_env (env_vars): set
    once per bridge, since a reload starts a new bridge, hence a new Ray job. Measured, four
    arguments per task instead of one cost the bridge ~30 % more per submission."""
    modules = json.loads(os.environ[TASK_MODULES])
    return frozenset(modules), int(os.environ[MAX_MESSAGE_BYTES])


def messages(body: bytes, raw: Sequence[Any]) -> tuple[bool, Iterator[Message]]:
    """(is it a generator function, the run's messages) for one execute request."""
    allowed, limit = limits()
    request, error = tasks.decode(body, list(raw))
    if request is None:
        return False, iter([(tasks.ERROR, [error])])
    try:
        generator = check_public(request["name"], allowed)
    except tasks.TaskLookupError as exc:
        return False, iter([(tasks.ERROR, [protocol.encode_error(request.get("id"), exc.code, exc.message)])])
    run = tasks.run(request, allowed, limit)
    return generator, ((kind, to_ray(frames)) for kind, frames in run)


def packed(generator: bool, run: list[Message]) -> bytes | tuple[bool, list[Message]]:
    """A plain run's messages as Ray should return them: as one msgpack'd bytes when every frame
    is bytes (the usual case: small replies), which Ray serializes and the bridge reads cheaper
    than nested tuples (measured on 2 cores: ~35 us less per task on each side); as they are
    when a frame is a large buffer (a uint8 array, which Ray passes out of band)."""
    if all(type(frame) is bytes for _, frames in run for frame in frames):
        return protocol.pack([generator, run])
    return generator, run


# max_retries=0: retries are the request's own (`retries`), decided by the master's Ledger,
# which knows whether a stream item has reached the caller; Ray would retry blind.
@ray.remote(max_retries=0)
def run_task(body: bytes, *raw: Any) -> bytes | tuple[bool, list[Message]]:
    generator, run = messages(body, raw)
    return packed(generator, list(run))


@ray.remote(max_retries=0, num_returns="streaming")
def stream_task(body: bytes, *raw: Any) -> Iterator[Message]:
    _, run = messages(body, raw)
    yield from run


def where() -> dict[str, Any]:
    return {"pid": os.getpid(), "node_id": ray.get_runtime_context().get_node_id()}


@ray.remote(num_cpus=0, max_retries=0)
def node_memory() -> dict[str, Any]:
    """The memory of this node's Ray processes: the children of its raylet (our parent), which
    are its task workers, actors and agents."""
    raylet = psutil.Process().parent()
    processes = []
    for child in raylet.children() if raylet is not None else []:
        try:
            name = child.name()
        except psutil.Error:
            continue
        processes.append({"pid": child.pid, "name": name, **memory.process_memory(child.pid)})
    return {**where(), "raylet_pid": raylet.pid if raylet else None, "processes": processes}


# One run at a time (the default group); memory answers beside a run, as the GPU worker's main
# thread does (PipelineCache.snapshot is written to be read from another thread).
@ray.remote(max_restarts=0, max_task_retries=0, concurrency_groups={"query": 1})
class PipelineHost:
    def __init__(self, settings: dict[str, Any]) -> None:
        from workerd.pipelines.cache import PipelineCache  # torch, where installed: in this actor only

        self.cache = PipelineCache(
            {},
            settings["device"],
            settings["memory_budget_mb"],
            settings["host_memory_budget_mb"],
            settings["retained_warn_mb"],
        )
        self.max_retained_mb: dict[str, float] = settings["max_retained_mb"]
        self.limit: int = settings["max_message_bytes"]
        self.directory = tempfile.mkdtemp(prefix="workerd-pipelines-")

    def describe(self) -> dict[str, Any]:
        return {**where(), "device": self.cache.device}

    def install(self, name: str, sha256: str, source: bytes) -> None:
        """Keep this digest's source as a file of its own: the cache sees a new SHA-256 for the
        pipeline and loads it again on its next prepare, whichever tier the old one was in."""
        path = os.path.join(self.directory, f"{name}-{sha256[:16]}.py")
        if not os.path.exists(path):
            with open(path, "wb") as handle:
                handle.write(source)
        self.cache.configs[name] = PipelineConfig(
            name=name, path=path, max_retained_mb=self.max_retained_mb.get(name, 0)
        )

    def run(
        self, name: str, sha256: str, source: bytes | None, body: bytes, *raw: Any
    ) -> tuple[bytes, list[Any], dict[str, Any]]:
        """(kind, reply frames, placement state) of one pipeline run."""
        from workerd.pipelines.cache import run_request

        self.cache.settle()  # the leak watch for the run before, whose reply is long out
        if source is not None:
            self.install(name, sha256, source)
        kind, frames = run_request(self.cache, body, list(raw), self.limit)
        return kind, to_ray(frames), self.cache.placement_state()

    @ray.method(concurrency_group="query")
    def memory(self) -> dict[str, Any]:
        return {**where(), **self.cache.snapshot()}

    def clear(self, level: str) -> dict[str, Any]:
        self.cache.settle()
        return {**where(), **self.cache.clear(level)}
