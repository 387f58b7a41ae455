"""A CPU worker: forked from the zygote, runs the jobs the master sends, in the order sent.

Runs in: the CPU worker (a child of its zygote).

Messages on its channel (core/transport.py), the first frame naming the kind (messages.py):

    master -> worker   [RUN, job id, request body, *raw]     body as the client sent it
                       [DROP, msgpack([job ids])]           do not start these
                       [GC, token]                          gc.collect() before the next job
                       [STOP]                               exit; jobs not started are dropped
    worker -> master   [READY, msgpack({"pid", "generation"})]
                       [ITEM, job id, reply frame, *raw]           a generator's item
                       [DONE, job id, OK | ERROR, reply frame, *raw]
                       [DROPPED, msgpack([job ids])]        the ones it had and did not start
                       [RECYCLING, reason]                  it leaves (MAX_TASKS | MAX_MEMORY)
                                                            and starts nothing more
                       [GC, token, msgpack({"pid", "freed_objects", "uss_before", "uss_after"})]

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
import gc
import math
import os
import random
import socket
from typing import Any

from workerctl import protocol
from workerd import memory, tasks
from workerd.core.stacks import open_dump
from workerd.core.transport import Channel, Message
from workerd.messages import DONE, DROP, DROPPED, GC, ITEM, MAX_MEMORY, MAX_TASKS, READY, RECYCLING, RUN, STOP


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


def serve(settings: WorkerSettings, sock: socket.socket) -> None:
    """The worker's whole life: announce, run jobs until told to stop or the master goes."""
    pid = os.getpid()
    dump = open_dump(settings.stack_dir)  # SIGUSR1: our stacks, for a timeout's TIMEOUT reply
    channel = Channel(sock, max_frame=settings.max_message_bytes, blocking=True)
    channel.send([READY, protocol.pack({"pid": pid, "generation": settings.generation})])
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
                channel.send([RECYCLING, reason])
                return
    finally:
        channel.close()
        dump.close()
        os.unlink(dump.name)


def take(channel: Channel, messages: list[Message], jobs: collections.deque[Message]) -> bool:
    """Act on what the master sent; False once told to stop."""
    for frames in messages:
        op = frames[0]
        if op == RUN:
            jobs.append(frames)
        elif op == DROP:
            drop(channel, jobs, {b"%d" % n for n in protocol.unpack(bytes(frames[1]))})
        elif op == GC:
            channel.send([GC, frames[1], protocol.pack(collect_garbage(os.getpid()))])
        elif op == STOP:
            drop(channel, jobs, {job[1] for job in jobs})
            return False
    return True


def drop(channel: Channel, jobs: collections.deque[Message], ids: set[Any]) -> None:
    dropped = [job for job in jobs if job[1] in ids]
    if dropped:
        for job in dropped:
            jobs.remove(job)
        channel.send([DROPPED, protocol.pack([int(job[1]) for job in dropped])])


def recycle_reason(settings: WorkerSettings, done: int, limit: float, pid: int) -> bytes:
    if done >= limit:
        return MAX_TASKS
    if settings.max_uss and memory.uss_bytes(pid) > settings.max_uss:
        return MAX_MEMORY
    return b""


def run_job(channel: Channel, settings: WorkerSettings, frames: Message) -> None:
    job, body, raw = frames[1], frames[2], frames[3:]
    request, error = tasks.decode(body, raw)  # type: ignore[arg-type]
    if request is None:
        channel.send([DONE, job, tasks.ERROR, error])
        return
    for kind, reply in tasks.run(request, settings.allowed, settings.max_message_bytes):
        if kind is tasks.ITEM:
            channel.send([ITEM, job, *reply])
        else:
            channel.send([DONE, job, kind, *reply])


def collect_garbage(pid: int) -> dict[str, Any]:
    before = memory.uss_bytes(pid)
    freed = gc.collect()
    return {"pid": pid, "freed_objects": freed, "uss_before": before, "uss_after": memory.uss_bytes(pid)}
