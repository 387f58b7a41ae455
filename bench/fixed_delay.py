"""The baseline for bench/batching.py: a fixed-delay batcher shaped like TorchServe's.

TorchServe has a frontend that queues requests and a backend worker process that runs the
model. When the worker is free, the frontend takes the first queued request and then waits for
more until it has `batch_size` or `max_batch_delay` has passed since that first one
(Model.pollBatch), sends the batch to the worker over a socket, and collects the next batch
once the worker has answered. This is that shape: a frontend over the same socket and codec as
workerd (a ZeroMQ ROUTER, msgpack), and one worker process running the same model's
run_batch(), reached over a Unix socket as workerd's master reaches its GPU worker.

    python bench/fixed_delay.py ENDPOINT BATCH_SIZE MAX_BATCH_DELAY_MS PIPELINE_FILE DEVICE
"""

from __future__ import annotations

import collections
import importlib.util
import multiprocessing
import sys
import time
from typing import Any

import msgpack
import zmq

from benchlib import die_with_parent


def worker(endpoint: str, pipeline_file: str, device: str) -> None:
    """The backend: one batch in, its outputs out."""
    die_with_parent()
    spec = importlib.util.spec_from_file_location("baseline_pipeline", pipeline_file)
    assert spec is not None and spec.loader is not None
    pipeline = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(pipeline)
    model = pipeline.load(device)
    channel = zmq.Context().socket(zmq.PAIR)
    channel.connect(endpoint)
    while True:
        inputs = msgpack.unpackb(channel.recv(), raw=False)
        channel.send(msgpack.packb(pipeline.run_batch(model, inputs)))


def frontend(endpoint: str, batch_size: int, delay_s: float, pipeline_file: str, device: str) -> None:
    # Started before this process has a ZeroMQ context (a forked one does not work), and with
    # nothing of CUDA initialised here.
    backend = (endpoint + ".backend", pipeline_file, device)
    multiprocessing.Process(target=worker, args=backend, daemon=True).start()
    context = zmq.Context()
    router = context.socket(zmq.ROUTER)
    router.bind(endpoint)
    channel = context.socket(zmq.PAIR)
    channel.bind(endpoint + ".backend")
    poller = zmq.Poller()
    poller.register(router, zmq.POLLIN)
    poller.register(channel, zmq.POLLIN)
    queued: collections.deque[tuple[bytes, dict[str, Any]]] = collections.deque()
    running: list[tuple[bytes, dict[str, Any]]] = []
    first_at: float | None = None  # when the free worker took the first request of its next batch
    while True:
        timeout = None if first_at is None else max(0.0, first_at + delay_s - time.monotonic())
        ready = dict(poller.poll(None if timeout is None else timeout * 1000))
        while router.poll(0):
            ident, _, body = router.recv_multipart()
            request = msgpack.unpackb(body, raw=False)
            if request.get("cmd") == "execute":
                queued.append((ident, request))
            else:  # the client's ping, and anything else: a plain answer
                reply(router, ident, request["id"], {"pid": 0, "protocols": [1]})
        if channel in ready:
            outputs = msgpack.unpackb(channel.recv(), raw=False)
            for (ident, request), output in zip(running, outputs, strict=True):
                reply(router, ident, request["id"], {"output": output, "batch": len(running)})
            running = []
        if running or not queued:
            continue
        if first_at is None:
            first_at = time.monotonic()
        if len(queued) >= batch_size or time.monotonic() >= first_at + delay_s:
            running = [queued.popleft() for _ in range(min(batch_size, len(queued)))]
            channel.send(msgpack.packb([request.get("kwargs", {}) for _, request in running]))
            first_at = None


def reply(router: zmq.Socket[Any], ident: bytes, request_id: Any, result: Any) -> None:
    body = msgpack.packb({"v": 1, "id": request_id, "ok": True, "result": result})
    router.send_multipart([ident, b"", body])


if __name__ == "__main__":
    frontend(sys.argv[1], int(sys.argv[2]), float(sys.argv[3]) / 1000, sys.argv[4], sys.argv[5])
