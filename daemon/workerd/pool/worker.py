"""A CPU worker: forked from the zygote, runs the jobs the master sends, in the order sent.

Messages on its channel (transport.py), the first frame naming the kind:

    master -> worker   [b"run", job id, request body, *raw]     body as the client sent it
                       [b"drop", msgpack([job ids])]          do not start these
                       [b"gc"]                                 gc.collect() before the next job
                       [b"stop"]                               exit; jobs not started are dropped
    worker -> master   [b"ready", msgpack({"pid", "generation"})]
                       [b"item", job id, reply frame, *raw]           a generator's item
                       [b"done", job id, b"ok"|b"error", reply frame, *raw]
                       [b"dropped", msgpack([job ids])]       the ones it had and did not start
                       [b"recycling", reason]                 it leaves (max_tasks | max_memory)
                                                              and starts nothing more
                       [b"gc", msgpack({"pid", "freed_objects", "uss_before", "uss_after"})]

The master may send several jobs ahead (`[pool] prefetch`); the worker keeps them in arrival
order, and before it starts each one it reads everything that has arrived. The master relies on
both (lifecycle.Lane): a drop written before the worker's current job ends is always seen in
time, and of the jobs a dead worker held only the first unfinished one can have run.

Recycling (`max_tasks_per_worker`, `max_worker_memory_mb`) is decided here, after each job: the
worker holds the next job already, and only it can stop itself from starting it. It drops what
it holds (the master hands it on) and exits.

Reply frames are encoded here, complete with the client's request id, so the master forwards
them without decoding: the master's per-task cost stays flat whatever the result size.
"""

from __future__ import annotations

import collections
import faulthandler
import gc
import math
import os
import random
import signal
import socket
from typing import Any

from workerctl import protocol
from workerd import memory, tasks
from workerd.core.transport import Channel, Message


class WorkerSettings:
    """What the zygote hands each worker (all plain data, decided before the fork)."""

    def __init__(self, settings: dict[str, Any], generation: int) -> None:
        self.stack_dir: str = settings["stack_dir"]
        self.allowed: frozenset[str] = frozenset(settings["task_modules"])
        self.max_message_bytes: int = settings["max_message_bytes"]
        self.max_tasks: int = settings["max_tasks_per_worker"]
        self.max_uss = int(settings["max_worker_memory_mb"] * 1024 * 1024)
        self.generation = generation

    def task_limit(self) -> float:
        """max_tasks with jitter, so workers started together do not all recycle together
        (random is reseeded in each forked child)."""
        if not self.max_tasks:
            return math.inf
        return self.max_tasks + random.randint(0, max(1, self.max_tasks // 10))


def stack_path(stack_dir: str, pid: int) -> str:
    return os.path.join(stack_dir, f"stack-{pid}.txt")


def serve(settings: WorkerSettings, sock: socket.socket) -> None:
    """The worker's whole life: announce, run jobs until told to stop or the master goes."""
    pid = os.getpid()
    # SIGUSR1 dumps every thread's stack from C, even while Python is stuck in a long call: the
    # master reads it when a task times out, just before it kills us.
    dump = open(stack_path(settings.stack_dir, pid), "w")  # noqa: SIM115 (kept open for life)
    faulthandler.register(signal.SIGUSR1, file=dump, all_threads=True)
    channel = Channel(sock, max_frame=settings.max_message_bytes, blocking=True)
    channel.send([b"ready", protocol.pack({"pid": pid, "generation": settings.generation})])
    jobs: collections.deque[Message] = collections.deque()
    limit, done = settings.task_limit(), 0
    try:
        while True:
            messages = channel.receive(block=not jobs)
            if messages is None:
                return  # the master is gone
            if not take(channel, messages, jobs):
                return
            if not jobs:
                continue
            run_job(channel, settings, jobs.popleft())
            done += 1
            reason = recycle_reason(settings, done, limit, pid)
            if reason:
                drop(channel, jobs, {job[1] for job in jobs})
                channel.send([b"recycling", reason])
                return
    finally:
        channel.close()
        dump.close()
        os.unlink(dump.name)


def take(channel: Channel, messages: list[Message], jobs: collections.deque[Message]) -> bool:
    """Act on what the master sent; False once told to stop."""
    for frames in messages:
        op = frames[0]
        if op == b"run":
            jobs.append(frames)
        elif op == b"drop":
            drop(channel, jobs, {b"%d" % n for n in protocol.unpack(bytes(frames[1]))})
        elif op == b"gc":
            channel.send([b"gc", protocol.pack(collect_garbage(os.getpid()))])
        elif op == b"stop":
            drop(channel, jobs, {job[1] for job in jobs})
            return False
    return True


def drop(channel: Channel, jobs: collections.deque[Message], ids: set[Any]) -> None:
    dropped = [job for job in jobs if job[1] in ids]
    if dropped:
        for job in dropped:
            jobs.remove(job)
        channel.send([b"dropped", protocol.pack([int(job[1]) for job in dropped])])


def recycle_reason(settings: WorkerSettings, done: int, limit: float, pid: int) -> bytes:
    if done >= limit:
        return b"max_tasks"
    if settings.max_uss and memory.uss_bytes(pid) > settings.max_uss:
        return b"max_memory"
    return b""


def run_job(channel: Channel, settings: WorkerSettings, frames: Message) -> None:
    job, body, raw = frames[1], frames[2], frames[3:]
    request, error = tasks.decode(body, raw)  # type: ignore[arg-type]
    if request is None:
        channel.send([b"done", job, tasks.ERROR, error])
        return
    for kind, reply in tasks.run(request, settings.allowed, settings.max_message_bytes):
        if kind is tasks.ITEM:
            channel.send([b"item", job, *reply])
        else:
            channel.send([b"done", job, kind, *reply])


def collect_garbage(pid: int) -> dict[str, Any]:
    before = memory.uss_bytes(pid)
    freed = gc.collect()
    return {"pid": pid, "freed_objects": freed, "uss_before": before, "uss_after": memory.uss_bytes(pid)}
