"""The GPU worker process: a fresh interpreter (never forked: CUDA does not survive a fork).

Runs in: the GPU worker (spawned by the master; gpu/handle.py is the master's side).

Two threads. The runner thread owns the pipeline cache and does the slow work one step at a
time (load, run, restore, clear). The main thread reads the channel and answers `memory` at
once, even while a run takes minutes. Both write to the channel (core/transport.py), one whole
message at a time under a lock; only the main thread reads it.

Messages (GPU worker <-> master, on the socketpair the master spawned us with; kinds named in
messages.py):

    master -> gpu   [RUN, job id, request body, *raw]
                    [BATCH, msgpack({"max_batch", "runs": [[job id, raw count], ...]}),
                            body, *raw, body, *raw, ...]
                                                          runs of one pipeline, run together
                    [RESTORE, msgpack([names])]          load these, in the background
                    [CLEAR, token, level]                 after the run in progress
                    [MEMORY, token]                       answered at once
                    [STOP]
    gpu -> master   [READY, msgpack({"pid", "device", "import_s", "device_count",
                                            "cached", "parked", "free_bytes"})]
                    [START, job id, ...]                  the run (each run of the batch)
                                                          begins now, its timeout too
                    [DONE, job id, OK | ERROR, reply frame, msgpack(state)]
                    [RESTORED, msgpack({"loaded": [names], "failed": [names], "cached",
                                           "parked", "free_bytes"})]
                    [CLEARED, token, msgpack(result), msgpack(placement state)]
                    [MEMORY, token, msgpack(snapshot)]

    state = {"cached": [names on the device, least recently used first: what to restore],
             "parked": [names in host memory], "free_bytes": device budget left,
             "hits", "misses", "wakes", "parks", "evictions", "leak_reloads": counted since
             the last report (metrics.CACHE_EVENTS)}

`device_count` is how many CUDA devices this process sees: the master counts the devices for
`[gpu] devices = "all"` through the first worker (it never imports torch itself). With several
devices, the master names this worker's device in `device_name` ("cuda:1"; the process itself,
seeing only that GPU, loads on "cuda"); results, memory and clear answers say that name.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from workerctl import protocol
from workerd.config import PipelineConfig
from workerd.core.processes import kill_own_group, put_first_on_path, take_group_down_with_parent
from workerd.core.stacks import open_dump
from workerd.core.transport import Channel
from workerd.logs import setup_logging
from workerd.messages import (
    BATCH,
    CLEAR,
    CLEARED,
    DONE,
    MEMORY,
    READY,
    RESTORE,
    RESTORED,
    RUN,
    START,
    STOP,
)

log = logging.getLogger("workerd.gpu")


class Runner(threading.Thread):
    """Runs the queued steps on the pipeline cache, one at a time, in order."""

    def __init__(self, settings: dict[str, Any], send: Callable[[list[Any]], None]) -> None:
        super().__init__(name="gpu-runner", daemon=True)
        from workerd.pipelines.cache import PipelineCache  # imports torch: only ever in this process

        configs = {name: PipelineConfig(**fields) for name, fields in settings["pipelines"].items()}
        self.cache = PipelineCache(
            configs,
            settings["device"],
            settings["memory_budget_mb"],
            settings.get("host_memory_budget_mb", 0),
            settings.get("retained_warn_mb", 500),
        )
        self.reported = dict(self.cache.counts)  # the counts as of the last report to the master
        self.name: str = settings.get("device_name") or self.cache.device
        self.max_message_bytes: int = settings["max_message_bytes"]
        self.inbox: queue.Queue[list[Any] | None] = queue.Queue()
        self.send = send

    def run(self) -> None:
        while True:
            frames = self.inbox.get()
            if frames is None:
                return
            op = frames[0]
            if op == RUN:
                self.send([START, frames[1]])
                self.send(self.run_pipeline(frames[1], frames[2], frames[3:]))
                self.cache.settle()  # the leak watch, once the reply is on its way
            elif op == BATCH:
                self.run_batch(frames)
                self.cache.settle()
            elif op == RESTORE:
                self.send([RESTORED, protocol.pack(self.restore(protocol.unpack(frames[1])))])
            elif op == CLEAR:
                result = self.cache.clear(bytes(frames[2]).decode())
                cleared = protocol.pack(result | {"device": self.name})
                self.send([CLEARED, frames[1], cleared, protocol.pack(self.cache.placement_state())])

    def run_pipeline(self, job: bytes, body: bytes, raw: list[bytes]) -> list[Any]:
        """One pipeline run: [DONE, job, kind, reply body, extra, *raw frames of the reply]."""
        from workerd.pipelines.cache import run_request

        frames = run_request(self.cache, body, raw, self.max_message_bytes, {"device": self.name})
        return self.done(job, *frames)

    def run_batch(self, frames: list[Any]) -> None:
        """A batch (pipelines/batching.py): all of its runs start now, each is answered alone."""
        from workerd.pipelines.batching import run_requests, split_frames

        max_batch, runs = split_frames(frames)
        self.send([START, *(job for job, _, _ in runs)])
        where = {"device": self.name}
        for job, kind, reply in run_requests(self.cache, runs, max_batch, self.max_message_bytes, where):
            self.send(self.done(job, kind, reply))

    def done(self, job: bytes, kind: bytes, frames: list[Any]) -> list[Any]:
        return [DONE, job, kind, frames[0], protocol.pack(self.state()), *frames[1:]]

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

    def snapshot(self) -> dict[str, Any]:
        return self.cache.snapshot() | {"device": self.name}

    def ready(self, import_s: float) -> dict[str, Any]:
        from workerd.pipelines.gpumemory import device_count

        return {
            "pid": os.getpid(),
            "device": self.name,
            "import_s": import_s,
            "device_count": device_count(),
            **self.cache.placement_state(),
        }


def serve(settings: dict[str, Any], sock: socket.socket) -> bool:
    """Run until told to stop (True) or until the master goes (False: EOF on the channel)."""
    dump = open_dump(settings["stack_dir"])  # SIGUSR1: our stacks, for a timeout's TIMEOUT reply
    channel = Channel(sock, max_frame=settings["max_message_bytes"], blocking=True)
    lock = threading.Lock()

    def send(frames: list[Any]) -> None:
        with lock:
            channel.send(frames)

    started = time.monotonic()
    runner = Runner(settings, send)
    runner.start()
    send([READY, protocol.pack(runner.ready(time.monotonic() - started))])
    try:
        while (messages := channel.receive(block=True)) is not None:
            for frames in messages:
                if frames[0] == MEMORY:
                    send([MEMORY, frames[1], protocol.pack(runner.snapshot())])
                elif frames[0] == STOP:
                    return True
                else:
                    runner.inbox.put(frames)
        return False
    finally:
        runner.inbox.put(None)
        runner.join(timeout=5)
        channel.close()
        dump.close()
        os.unlink(dump.name)


def main() -> None:
    settings = json.loads(sys.argv[1])
    take_group_down_with_parent(settings["master_pid"])
    put_first_on_path(settings.get("task_path", []))  # before any pipeline module is imported
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the master decides what Ctrl-C means
    setup_logging(logging.getLevelName(settings.get("log_level", logging.INFO)))
    if not serve(settings, socket.socket(fileno=int(sys.argv[2]))):
        # The master closed our channel without a stop: it is gone (its death signal may come
        # only after we exit), or it gave up on us. What a pipeline started goes with us.
        kill_own_group()


if __name__ == "__main__":
    main()
