"""The GPU worker process: a fresh interpreter (never forked: CUDA does not survive a fork).

Two threads. The runner thread owns the pipeline cache and does the slow work one step at a
time (load, run, restore, clear). The main thread owns the ZeroMQ sockets and answers `memory`
at once, even while a run takes minutes. ZeroMQ sockets are not thread-safe, so the runner
hands its replies to the main thread over an inproc PAIR socket instead of touching the DEALER.

Frames (GPU worker DEALER <-> master ROUTER, routing id b"gpu"):

    master -> gpu   [b"run", job id, request body, *raw]
                    [b"restore", msgpack([names])]          load these, in the background
                    [b"clear", token, level]                 after the run in progress
                    [b"memory", token]                       answered at once
                    [b"stop"]
    gpu -> master   [b"ready", msgpack({"pid", "device", "import_s"})]
                    [b"done", job id, b"ok"|b"error", reply frame, msgpack(state)]
                    [b"restored", msgpack({"loaded": [names], "failed": [names], "cached",
                                           "parked", "free_bytes"})]
                    [b"cleared", token, msgpack(result)]
                    [b"memory", token, msgpack(snapshot)]

    state = {"cached": [names on the device, least recently used first: what to restore],
             "parked": [names in host memory], "free_bytes": device budget left,
             "hits", "misses", "wakes", "parks", "evictions", "leak_reloads": counted since
             the last report (metrics.CACHE_EVENTS)}
"""

from __future__ import annotations

import faulthandler
import json
import logging
import os
import queue
import signal
import sys
import threading
import time
from typing import Any

import zmq

from workerctl import protocol

from . import tasks
from .config import PipelineConfig
from .logs import setup_logging
from .worker import stack_path
from .zygote import die_with_parent

log = logging.getLogger("workerd.gpu")
GPU_ID = b"gpu"
RESULTS = "inproc://gpu-results"


class Runner(threading.Thread):
    """Runs the queued steps on the pipeline cache, one at a time, in order."""

    def __init__(self, context: zmq.Context[Any], settings: dict[str, Any]) -> None:
        super().__init__(name="gpu-runner", daemon=True)
        from .pipelines import PipelineCache  # imports torch: only ever in this process

        configs = {name: PipelineConfig(**fields) for name, fields in settings["pipelines"].items()}
        self.cache = PipelineCache(
            configs,
            settings["device"],
            settings["memory_budget_mb"],
            settings.get("host_memory_budget_mb", 0),
            settings.get("retained_warn_mb", 500),
        )
        self.reported = dict(self.cache.counts)  # the counts as of the last report to the master
        self.max_message_bytes: int = settings["max_message_bytes"]
        self.inbox: queue.Queue[list[bytes] | None] = queue.Queue()
        self.out = context.socket(zmq.PAIR)
        self.out.connect(RESULTS)

    def run(self) -> None:
        while True:
            frames = self.inbox.get()
            if frames is None:
                return
            op = frames[0]
            if op == b"run":
                self.out.send_multipart(self.run_pipeline(frames[1], frames[2], frames[3:]), copy=False)
                self.cache.settle()  # the leak watch, once the reply is on its way
            elif op == b"restore":
                self.out.send_multipart(
                    [b"restored", protocol.pack(self.restore(protocol.unpack(frames[1])))]
                )
            elif op == b"clear":
                result = self.cache.clear(frames[2].decode())
                self.out.send_multipart([b"cleared", frames[1], protocol.pack(result)])

    def run_pipeline(self, job: bytes, body: bytes, raw: list[bytes]) -> list[Any]:
        """One pipeline run: [b"done", job, kind, reply body, extra, *raw frames of the reply]."""
        from .pipelines import PipelineError

        request, error = tasks.decode(body, raw)
        if request is None:
            return self.done(job, tasks.ERROR, [error])
        request_id = request.get("id")
        frames: list[Any]
        try:
            result = self.cache.run(request["name"], request.get("args", []), request.get("kwargs", {}))
            kind, frames = tasks.bounded_frames(
                tasks.OK,
                protocol.encode_result_frames(request_id, result),
                request_id,
                self.max_message_bytes,
            )
        except PipelineError as exc:
            kind, frames = (
                tasks.ERROR,
                [protocol.encode_error(request_id, exc.code, exc.message, exc.details)],
            )
        except Exception as exc:
            kind, frames = tasks.ERROR, [tasks.task_error(request_id, exc)]
        return self.done(job, kind, frames)

    def done(self, job: bytes, kind: bytes, frames: list[Any]) -> list[Any]:
        return [b"done", job, kind, frames[0], protocol.pack(self.state()), *frames[1:]]

    def state(self) -> dict[str, Any]:
        """The cache's tiers ride along, so the master knows what to restore after a crash (and,
        with several devices, where to place runs); and what was counted since the last report
        (a reload for retained memory happens after a reply), for the daemon's metrics."""
        counts = dict(self.cache.counts)
        counted = {name: n - self.reported[name] for name, n in counts.items()}
        self.reported = counts
        return {**self.cache.placement_state(), **counted}

    def restore(self, names: list[str]) -> dict[str, Any]:
        """Load these pipelines again (after a crash: the device tier it had, oldest first)."""
        loaded, failed = [], []
        for name in names:
            try:
                self.cache.prepare(name)
                loaded.append(name)
            except Exception:
                log.exception("restoring pipeline %s failed", name)
                failed.append(name)
        self.reported = dict(self.cache.counts)  # what a restore moved is not counted, as before
        return {"loaded": loaded, "failed": failed, **self.cache.placement_state()}


def serve(settings: dict[str, Any]) -> None:
    pid = os.getpid()
    dump = open(stack_path(settings["stack_dir"], pid), "w")  # noqa: SIM115 (kept open for life)
    faulthandler.register(signal.SIGUSR1, file=dump, all_threads=True)
    context: zmq.Context[Any] = zmq.Context()
    results = context.socket(zmq.PAIR)
    results.bind(RESULTS)
    started = time.monotonic()
    runner = Runner(context, settings)
    runner.start()
    sock = context.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 2000)
    sock.setsockopt(zmq.ROUTING_ID, GPU_ID)
    sock.connect(settings["endpoint"])
    ready = {"pid": pid, "device": runner.cache.device, "import_s": time.monotonic() - started}
    sock.send_multipart([b"ready", protocol.pack(ready)])
    poller = zmq.Poller()
    poller.register(sock, zmq.POLLIN)
    poller.register(results, zmq.POLLIN)
    try:
        while True:
            events = dict(poller.poll())
            if results in events:
                sock.send_multipart(results.recv_multipart())
            if sock in events:
                frames = sock.recv_multipart()
                if frames[0] == b"memory":
                    sock.send_multipart([b"memory", frames[1], protocol.pack(runner.cache.snapshot())])
                elif frames[0] == b"stop":
                    break
                else:
                    runner.inbox.put(frames)
    finally:
        runner.inbox.put(None)
        runner.join(timeout=5)
        sock.close()
        results.close()
        runner.out.close()
        context.term()
        dump.close()
        os.unlink(dump.name)


def main() -> None:
    settings = json.loads(sys.argv[1])
    die_with_parent(settings["master_pid"])
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the master decides what Ctrl-C means
    setup_logging(logging.getLevelName(settings.get("log_level", logging.INFO)))
    serve(settings)


if __name__ == "__main__":
    main()
