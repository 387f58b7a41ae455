"""The optional Prometheus endpoint ([metrics] listen): an HTTP thread that asks the loop.

Runs in: the master. (Its own HTTP thread.)

The master's state belongs to its one thread, so the HTTP thread (prometheus_client's) never
reads it. A scrape writes a byte to a pipe that the master's poller watches; the master gathers
a snapshot (what `status` shows, plus memory read from /proc and from the GPU worker, as
`memory_status` does) and hands it back through a queue. A master that does not answer within
SCRAPE_WAIT_S fails the scrape (HTTP 500), which is what a monitor should see of a stuck loop.
"""

from __future__ import annotations

import contextlib
import os
import queue
import threading
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric

WORKER_STATES = {
    "cpu": ("starting", "idle", "busy", "killing", "stopping"),
    "gpu": ("starting", "idle", "busy", "killing", "stopping"),
}
# Longer than the GPU worker's memory answer may take (gpu.ANSWER_WAIT_S), shorter than a
# typical scrape timeout (10 s).
SCRAPE_WAIT_S = 8.0


class Exporter:
    def __init__(self, host: str, port: int) -> None:
        self.wake_read, self.wake_write = os.pipe()
        for fd in (self.wake_read, self.wake_write):
            os.set_blocking(fd, False)
        self.answers: queue.SimpleQueue[dict[str, Any]] = queue.SimpleQueue()
        self.lock = threading.Lock()  # one scrape at a time asks the loop
        self.closed = False
        registry = CollectorRegistry(auto_describe=False)
        registry.register(self)
        self.server, self.thread = start_http_server(port, host, registry)
        port = self.server.server_address[1]  # the one picked, if port 0 was asked for
        self.url = f"http://[{host}]:{port}/metrics" if ":" in host else f"http://{host}:{port}/metrics"

    # -- the master's side ---------------------------------------------------------------------

    def take_requests(self) -> int:
        """How many scrapes are waiting (the master calls this when wake_read is readable)."""
        try:
            return len(os.read(self.wake_read, 4096))
        except BlockingIOError:
            return 0

    def deliver(self, snapshot: dict[str, Any]) -> None:
        self.answers.put(snapshot)

    def close(self) -> None:
        """Stop serving. The pipe stays open until the process exits: a scrape already accepted
        runs on in a daemon thread and may still write to it (closed, its number could be reused
        by another file); it then fails after SCRAPE_WAIT_S."""
        self.closed = True
        self.server.shutdown()
        self.server.server_close()

    # -- the HTTP thread's side: a prometheus_client collector ---------------------------------

    def collect(self) -> Iterator[Metric]:
        # A stalled loop must not pile up waiting scrapes (threads, sockets) without bound.
        if not self.lock.acquire(timeout=SCRAPE_WAIT_S):
            raise TimeoutError("another scrape is still waiting for workerd's loop")
        try:
            if self.closed:
                raise RuntimeError("workerd is stopping")
            # An answer that came after an earlier scrape gave up is stale: drop it.
            with contextlib.suppress(queue.Empty):
                while True:
                    self.answers.get_nowait()
            with contextlib.suppress(BlockingIOError):  # full: the loop has wake-ups pending
                os.write(self.wake_write, b".")
            try:
                snapshot = self.answers.get(timeout=SCRAPE_WAIT_S)
            except queue.Empty:
                raise TimeoutError(f"workerd's loop did not answer within {SCRAPE_WAIT_S:g} s") from None
        finally:
            self.lock.release()
        yield from families(snapshot)


CACHE_HELP = {  # one counter per key of metrics.CACHE_EVENTS
    "hits": "Pipeline runs that found their pipeline on the device",
    "misses": "Pipeline runs that had to load their pipeline",
    "wakes": "Pipeline runs that moved their pipeline back from host memory first",
    "parks": "Pipelines moved to host memory to make room on the device",
    "evictions": "Pipelines dropped, from the device or host memory, to make room or after an out-of-memory",
    "leak_reloads": "Pipelines reloaded because their retained memory passed max_retained_mb",
    "batch_reruns": "Calls of a pipeline's run_batch() again on half a batch, after it raised",
}


def gpu_families(gpus: list[dict[str, Any]]) -> Iterator[Metric]:
    """Each GPU worker's memory, and each cached pipeline's bytes per tier and retained growth,
    labelled by device (one family per metric, whatever the number of devices)."""
    fields = (
        ("allocated_bytes", "Memory allocated by tensors on the GPU worker's device"),
        ("reserved_bytes", "Memory reserved by the caching allocator on the GPU worker's device"),
        ("host_bytes", "Host memory held by pipelines parked off the GPU worker's device"),
    )
    gauges = {
        field: GaugeMetricFamily(f"workerd_gpu_{field}", text, labels=["device"]) for field, text in fields
    }
    held = GaugeMetricFamily(
        "workerd_pipeline_bytes",
        "Bytes a cached pipeline holds, by tier",
        labels=["device", "pipeline", "tier"],
    )
    retained = GaugeMetricFamily(
        "workerd_pipeline_retained_bytes",
        "Device memory a pipeline's runs left allocated beyond its footprint since it was loaded",
        labels=["device", "pipeline"],
    )
    for gpu in gpus:
        device = str(gpu.get("device"))
        for field, gauge in gauges.items():
            if isinstance(gpu.get(field), int):
                gauge.add_metric([device], gpu[field])
        for pipeline in gpu.get("pipelines", []):
            for tier in ("device", "host"):
                held.add_metric([device, pipeline["name"], tier], pipeline.get(f"{tier}_bytes", 0))
            retained.add_metric([device, pipeline["name"]], pipeline.get("retained_bytes", 0))
    yield from gauges.values()
    yield held
    yield retained


def client_families(clients: list[dict[str, Any]]) -> Iterator[Metric]:
    """Each client's work and share (`status` "clients"; clients.py): one series per client the
    daemon knows, which is bounded (clients.CLIENTS_MAX)."""
    jobs = GaugeMetricFamily(
        "workerd_client_jobs",
        "Requests of a client in flight, by state (queued or running)",
        labels=["client", "state"],
    )
    completed = CounterMetricFamily(
        "workerd_client_completed", "Requests of a client answered", labels=["client"]
    )
    share = GaugeMetricFamily(
        "workerd_client_share",
        "The part of the workers a client's weight gives it among clients with work in flight",
        labels=["client"],
    )
    for client in clients:
        name = client["client"]
        jobs.add_metric([name, "queued"], client["queued"])
        jobs.add_metric([name, "running"], client["running"])
        completed.add_metric([name], client["completed"])
        share.add_metric([name], client["share"])
    yield jobs
    yield completed
    yield share


def buckets(histogram: dict[str, Any]) -> list[tuple[str, int]]:
    """A metrics.Histogram snapshot's buckets as prometheus_client takes them."""
    pairs = [(repr(float(bound)), count) for bound, count in histogram["buckets"]]
    return [*pairs, ("+Inf", histogram["count"])]


def families(snapshot: dict[str, Any]) -> Iterator[Metric]:
    """Prometheus metric families from a scrape snapshot (see Commands.scrape)."""
    metrics = snapshot["metrics"]
    requests = CounterMetricFamily(
        "workerd_requests",
        "Requests answered, by command, pool (cpu or gpu for execute) and outcome (ok or the error code)",
        labels=["command", "pool", "outcome"],
    )
    for entry in metrics["requests"]:
        requests.add_metric([entry["command"], entry["pool"], entry["outcome"]], entry["count"])
    yield requests

    latency = HistogramMetricFamily(
        "workerd_request_duration_seconds",
        "Time from a request's arrival to its final reply, by command and pool",
        labels=["command", "pool"],
    )
    for histogram in metrics["latency_seconds"]:
        latency.add_metric([histogram["command"], histogram["pool"]], buckets(histogram), histogram["sum"])
    yield latency

    sizes = HistogramMetricFamily(
        "workerd_pipeline_batch_size",
        "How many runs of a pipeline each GPU worker run took together (1: a run alone)",
        labels=["pipeline"],
    )
    for histogram in metrics.get("batch_sizes", []):
        sizes.add_metric([histogram["pipeline"]], buckets(histogram), histogram["sum"])
    yield sizes

    depth = GaugeMetricFamily("workerd_queue_depth", "Requests waiting for a worker", labels=["queue"])
    for name, value in snapshot["queue"].items():
        depth.add_metric([name], value)
    yield depth

    by_state = GaugeMetricFamily(
        "workerd_workers", "Worker processes by kind and state", labels=["kind", "state"]
    )
    uss = GaugeMetricFamily(
        "workerd_worker_uss_bytes", "Private memory (USS) of each worker process", labels=["kind", "pid"]
    )
    # Every state of every kind, zeros included: a series that vanishes is not a series at 0.
    counts = dict.fromkeys(((kind, state) for kind, states in WORKER_STATES.items() for state in states), 0)
    for worker in snapshot["workers"]:
        key = (worker["kind"], worker["state"])
        counts[key] = counts.get(key, 0) + 1
        if worker.get("uss_bytes") is not None:
            uss.add_metric([worker["kind"], str(worker["pid"])], worker["uss_bytes"])
    for (kind, state), count in sorted(counts.items()):
        by_state.add_metric([kind, state], count)
    yield by_state
    yield uss

    yield from gpu_families(snapshot.get("gpus") or [])
    yield from client_families(snapshot.get("clients") or [])
    for name, help_text in CACHE_HELP.items():
        yield CounterMetricFamily(
            f"workerd_pipeline_cache_{name}", help_text, value=metrics["pipeline_cache"][name]
        )

    recycles = CounterMetricFamily(
        "workerd_worker_recycles", "Workers replaced on purpose, by reason", labels=["reason"]
    )
    for reason, count in metrics["recycles"].items():
        recycles.add_metric([reason], count)
    yield recycles

    restarts = CounterMetricFamily(
        "workerd_worker_restarts", "Processes replaced after dying or timing out", labels=["kind", "reason"]
    )
    for entry in metrics["restarts"]:
        restarts.add_metric([entry["kind"], entry["reason"]], entry["count"])
    yield restarts
