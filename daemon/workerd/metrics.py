"""What the daemon counts: kept by the master whether or not Prometheus is on.

Runs in: the master.

Three kinds of figures, all owned by the master's thread:

  * `events`: the flat counters `status` has always shown (requests_<cmd>, execute_<outcome>,
    recycled_<reason>, retries, worker_deaths, pipeline_cache_hits, ...): the backends and
    master.py add to them where the event happens;
  * `requests`: every request counted once, when its final reply goes out, by command, pool
    ("cpu" or "gpu" for execute, "" for the rest) and outcome ("ok", or the error code in
    lower case);
  * `latency`: the time from a request's arrival to that final reply, by command and pool.

`snapshot()` is what `workerctl status` shows under "metrics" and what exporter.py turns into
Prometheus metric families, so the two always agree.
"""

from __future__ import annotations

import bisect
import collections
import time
from typing import Any

from workerctl import protocol

# Upper bounds in seconds. From a ping (~0.2 ms) to a model run of minutes.
LATENCY_BUCKETS_S = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
)  # fmt: skip

# Restarts, by process kind and reason, from the event counters that record them.
RESTART_EVENTS = {
    "worker_deaths": ("cpu", "died"),
    "timeouts": ("cpu", "timeout"),
    "zygote_restarts": ("zygote", "died"),
    "gpu_worker_deaths": ("gpu", "died"),
    "gpu_timeouts": ("gpu", "timeout"),
}
# What the GPU worker counts (pipelines.PipelineCache.counts) -> the event counter it adds to.
CACHE_EVENTS = {
    "hits": "pipeline_cache_hits",  # runs that found their pipeline on the device
    "misses": "pipeline_cache_misses",  # runs that loaded it
    "wakes": "pipeline_wakes",  # runs that moved it back from host memory first
    "parks": "pipeline_parks",  # pipelines moved to host memory to make room
    "evictions": "pipeline_evictions",  # pipelines dropped, from either tier, to make room
    "leak_reloads": "pipeline_leak_reloads",  # reloaded past [pipelines.NAME] max_retained_mb
    "batch_reruns": "pipeline_batch_reruns",  # calls of run_batch() again, on halves (the split rule)
}
# Upper bounds of the batch-size histograms: powers of two up to config.MAX_BATCH.
BATCH_BUCKETS = tuple(2**n for n in range(11))
RECYCLED = "recycled_"


def error_outcome(frame: bytes) -> str:
    """The code of an error reply a worker sent, in lower case: read only for errors."""
    try:
        return str(protocol.unpack(frame, strict=False)["error"]["code"]).lower()
    except (protocol.ProtocolError, KeyError, TypeError):
        return "error"


class Histogram:
    """Counts per bucket (not cumulative; the last slot is above every bound) and a sum."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...] = LATENCY_BUCKETS_S) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        # bisect_left: a value equal to a bound belongs to that bucket (Prometheus's "le").
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value

    def snapshot(self) -> dict[str, Any]:
        """{"count", "sum", "buckets": [[upper bound, cumulative count], ...]} (count is +Inf's)."""
        cumulative, buckets = 0, []
        for bound, count in zip(self.bounds, self.counts, strict=False):
            cumulative += count
            buckets.append([bound, cumulative])
        return {"count": cumulative + self.counts[-1], "sum": self.sum, "buckets": buckets}


class Metrics:
    def __init__(self) -> None:
        self.events: collections.Counter[str] = collections.Counter()
        self.requests: collections.Counter[tuple[str, str, str]] = collections.Counter()
        self.latency: collections.defaultdict[tuple[str, str], Histogram] = collections.defaultdict(Histogram)
        self.batches: dict[str, Histogram] = {}  # pipeline -> the sizes of the batches it ran in

    def answered(self, command: str, outcome: str, arrived_at: float, pool: str = "") -> None:
        """A request's final reply is going out now."""
        self.requests[(command, pool, outcome)] += 1
        self.latency[(command, pool)].observe(time.monotonic() - arrived_at)

    def batched(self, pipeline: str, size: int) -> None:
        """A GPU worker was handed `size` runs of `pipeline` together (1: a run alone)."""
        histogram = self.batches.get(pipeline)
        if histogram is None:
            histogram = self.batches[pipeline] = Histogram(BATCH_BUCKETS)
        histogram.observe(size)

    def snapshot(self) -> dict[str, Any]:
        events = self.events
        return {
            "requests": [
                {"command": command, "pool": pool, "outcome": outcome, "count": count}
                for (command, pool, outcome), count in sorted(self.requests.items())
            ],
            "latency_seconds": [
                {"command": command, "pool": pool, **histogram.snapshot()}
                for (command, pool), histogram in sorted(self.latency.items())
            ],
            "recycles": {
                key[len(RECYCLED) :]: n for key, n in sorted(events.items()) if key.startswith(RECYCLED)
            },
            "restarts": [
                {"kind": kind, "reason": reason, "count": events[key]}
                for key, (kind, reason) in RESTART_EVENTS.items()
            ],
            "pipeline_cache": {name: events[key] for name, key in CACHE_EVENTS.items()},
            "batch_sizes": [
                {"pipeline": name, **histogram.snapshot()} for name, histogram in sorted(self.batches.items())
            ],
        }
