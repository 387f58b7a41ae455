"""A CPU worker: forked from the zygote, runs one task at a time for the master.

Internal frames (worker DEALER <-> master ROUTER; the master sees our routing id first):

    worker -> master   [b"ready", msgpack({"pid", "generation"})]
                       [b"item", job id, reply frame, *raw]         a generator's item
                       [b"done", job id, b"ok"|b"error", reply frame, msgpack({"uss"}), *raw]
                       [b"gc", msgpack({"pid", "freed_objects", "uss_before", "uss_after"})]
    master -> worker   [b"run", job id, request body, *raw]         body as the client sent it
                       [b"gc"]                                      gc.collect() now
                       [b"stop"]                                    exit after this message

Reply frames are encoded here, complete with the client's request id, so the master forwards
them without decoding: the master's per-task cost stays flat whatever the result size. `*raw`
are the raw buffer frames a body refers to (docs/protocol.md); the master forwards them as is.
"""

from __future__ import annotations

import faulthandler
import gc
import os
import signal
from typing import Any

import zmq

from workerctl import protocol
from workerctl.frames import send_frames

from . import memory, tasks


class WorkerSettings:
    """What the zygote hands each worker (all plain data, decided before the fork)."""

    def __init__(self, settings: dict[str, Any], generation: int) -> None:
        self.endpoint: str = settings["endpoint"]
        self.stack_dir: str = settings["stack_dir"]
        self.allowed: frozenset[str] = frozenset(settings["task_modules"])
        self.max_message_bytes: int = settings["max_message_bytes"]
        self.report_uss: bool = settings["report_uss"]
        self.generation = generation


def stack_path(stack_dir: str, pid: int) -> str:
    return os.path.join(stack_dir, f"stack-{pid}.txt")


def serve(settings: WorkerSettings) -> None:
    """The worker's whole life: connect, announce, run tasks until told to stop."""
    pid = os.getpid()
    # SIGUSR1 dumps every thread's stack from C, even while Python is stuck in a long call: the
    # master reads it when a task times out, just before it kills us.
    dump = open(stack_path(settings.stack_dir, pid), "w")  # noqa: SIM115 (kept open for life)
    faulthandler.register(signal.SIGUSR1, file=dump, all_threads=True)
    context = zmq.Context()
    sock = context.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 2000)  # let the last reply out before exit
    sock.setsockopt(zmq.ROUTING_ID, worker_id(pid))
    sock.connect(settings.endpoint)
    sock.send_multipart([b"ready", protocol.pack({"pid": pid, "generation": settings.generation})])
    try:
        while True:
            frames = sock.recv_multipart()
            op = frames[0]
            if op == b"run":
                run_job(sock, settings, frames[1], frames[2], frames[3:])
            elif op == b"gc":
                sock.send_multipart([b"gc", protocol.pack(collect_garbage(pid))])
            elif op == b"stop":
                break
    finally:
        sock.close()
        context.term()
        dump.close()
        os.unlink(dump.name)


def worker_id(pid: int) -> bytes:
    return b"w%d" % pid


NO_EXTRA = protocol.pack({})


def run_job(
    sock: zmq.Socket[Any], settings: WorkerSettings, job: bytes, body: bytes, raw: list[bytes]
) -> None:
    request, error = tasks.decode(body, raw)
    if request is None:
        send_frames(sock, [b"done", job, tasks.ERROR, error, NO_EXTRA])
        return
    for kind, frames in tasks.run(request, settings.allowed, settings.max_message_bytes):
        # copy=False: raw frames (numpy arrays, large bytes) leave zero-copy; pyzmq still copies
        # frames under its copy threshold, which is cheaper for them.
        if kind is tasks.ITEM:
            send_frames(sock, [b"item", job, *frames], copy=False)
            continue
        extra = protocol.pack({"uss": memory.uss_bytes(os.getpid())}) if settings.report_uss else NO_EXTRA
        send_frames(sock, [b"done", job, kind, frames[0], extra, *frames[1:]], copy=False)


def collect_garbage(pid: int) -> dict[str, Any]:
    before = memory.uss_bytes(pid)
    freed = gc.collect()
    return {"pid": pid, "freed_objects": freed, "uss_before": before, "uss_after": memory.uss_bytes(pid)}
