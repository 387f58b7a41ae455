"""The metrics' pure parts: histogram buckets, the status snapshot, and status's rendering."""

from __future__ import annotations

from workerctl.protocol import encode_error, encode_result
from workerctl.render import bucket_bound, render_metrics
from workerd.metrics import LATENCY_BUCKETS_S, Histogram, Metrics, error_outcome


def test_histogram_puts_a_value_on_a_bound_in_that_bucket() -> None:
    histogram = Histogram()
    for value in (0.0001, 0.0005, 0.0006, 1.0, 1000.0):
        histogram.observe(value)
    snapshot = histogram.snapshot()
    cumulative = dict((bound, count) for bound, count in snapshot["buckets"])
    assert cumulative[0.0005] == 2  # 0.0001 and 0.0005 itself ("le")
    assert cumulative[0.001] == 3
    assert cumulative[1.0] == 4
    assert cumulative[LATENCY_BUCKETS_S[-1]] == 4  # 1000 s is only in +Inf
    assert snapshot["count"] == 5
    assert abs(snapshot["sum"] - 1001.0012) < 1e-9


def test_snapshot_groups_requests_events_and_restarts() -> None:
    metrics = Metrics()
    metrics.answered("execute", "ok", arrived_at=0.0, pool="cpu")
    metrics.answered("execute", "ok", arrived_at=0.0, pool="cpu")
    metrics.answered("ping", "ok", arrived_at=0.0)
    metrics.events.update(
        {"recycled_max_tasks": 3, "worker_deaths": 2, "pipeline_cache_hits": 5, "pipeline_wakes": 4}
    )
    snapshot = metrics.snapshot()
    assert snapshot["requests"] == [
        {"command": "execute", "pool": "cpu", "outcome": "ok", "count": 2},
        {"command": "ping", "pool": "", "outcome": "ok", "count": 1},
    ]
    assert [(h["command"], h["pool"], h["count"]) for h in snapshot["latency_seconds"]] == [
        ("execute", "cpu", 2),
        ("ping", "", 1),
    ]
    assert snapshot["recycles"] == {"max_tasks": 3}
    assert {"kind": "cpu", "reason": "died", "count": 2} in snapshot["restarts"]
    assert snapshot["pipeline_cache"] == {
        "hits": 5, "misses": 0, "wakes": 4, "parks": 0, "evictions": 0, "leak_reloads": 0, "batch_reruns": 0
    }  # fmt: skip


def test_batch_sizes_are_one_histogram_per_pipeline() -> None:
    metrics = Metrics()
    for size in (1, 3, 8, 8):
        metrics.batched("mlp", size)
    metrics.batched("other", 2000)  # above every bound: only in +Inf
    mlp, other = metrics.snapshot()["batch_sizes"]
    assert (mlp["pipeline"], mlp["count"], mlp["sum"]) == ("mlp", 4, 20)
    assert [count for bound, count in mlp["buckets"] if bound in (1, 2, 4, 8)] == [1, 1, 2, 4]
    assert other["count"] == 1 and other["buckets"][-1] == [1024, 0]


def test_error_outcome_reads_the_code_of_an_error_reply() -> None:
    assert error_outcome(encode_error(1, "TASK_ERROR", "boom")) == "task_error"
    assert error_outcome(encode_result(1, 42)) == "error"  # not an error reply: no code to read
    assert error_outcome(b"\xc1 not msgpack") == "error"


def test_bucket_bound_is_the_first_bound_covering_the_quantile() -> None:
    buckets = [[0.001, 50], [0.01, 99], [0.1, 100]]
    assert bucket_bound(buckets, 100, 0.5) == "1"
    assert bucket_bound(buckets, 100, 0.99) == "10"
    assert bucket_bound([[0.001, 0]], 10, 0.5) == "> 1"


def test_status_rendering_shows_counts_and_latency() -> None:
    metrics = Metrics()
    metrics.answered("execute", "task_error", arrived_at=0.0, pool="cpu")
    text = "\n".join(render_metrics({**metrics.snapshot(), "endpoint": None}))
    assert "endpoint off" in text
    assert "task_error" in text and "execute" in text
