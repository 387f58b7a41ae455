"""The Prometheus endpoint ([metrics] listen), scraped over real HTTP, against `status`."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import BASE_CONFIG, Daemon, clean_environment, wait_until
from tests.integration.test_gpu import gpu_config
from workerctl import Client, errors

ECHO = "workerd.examples.tasks:echo"
FAIL = "workerd.examples.tasks:fail"
METRICS = '\n[metrics]\nlisten = "127.0.0.1:0"\n'

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(url: str) -> Samples:
    """Every sample of the endpoint, keyed by (name, sorted labels)."""
    with urllib.request.urlopen(url, timeout=10) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain")
        text = response.read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def sample(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


def endpoint(client: Client) -> str:
    url = client.status()["metrics"]["endpoint"]
    assert isinstance(url, str) and url.startswith("http://127.0.0.1:")
    return url


@pytest.fixture
def metrics_daemon(start_daemon: Callable[..., Daemon]) -> Daemon:
    return start_daemon(config=BASE_CONFIG.format(workers=2) + METRICS)


def test_requests_and_latency_match_status(metrics_daemon: Daemon) -> None:
    with metrics_daemon.client() as client:
        url = endpoint(client)
        for n in range(5):
            client.execute(ECHO, n)
        with pytest.raises(errors.TaskError):
            client.execute(FAIL)
        with pytest.raises(errors.Denied):
            client.execute("nosuch.module:task")
        client.ping()
        samples = scrape(url)
        metrics = client.status()["metrics"]

    requests = {(r["command"], r["pool"], r["outcome"]): r["count"] for r in metrics["requests"]}
    assert requests[("execute", "cpu", "ok")] == 5
    assert requests[("execute", "cpu", "task_error")] == 1
    assert requests[("execute", "", "denied")] == 1  # refused by the master, before any pool
    assert requests[("ping", "", "ok")] == 1
    for (command, pool, outcome), count in requests.items():
        labels = {"command": command, "pool": pool, "outcome": outcome}
        assert sample(samples, "workerd_requests_total", **labels) == count

    latency = {(h["command"], h["pool"]): h for h in metrics["latency_seconds"]}
    cpu = latency[("execute", "cpu")]
    assert cpu["count"] == 6 and 0 < cpu["sum"] < 30
    assert sample(samples, "workerd_request_duration_seconds_count", command="execute", pool="cpu") == 6
    cpu_requests = sum(
        n for (command, pool, _), n in requests.items() if (command, pool) == ("execute", "cpu")
    )
    assert cpu_requests == 6
    inf = sample(samples, "workerd_request_duration_seconds_bucket", command="execute", pool="cpu", le="+Inf")
    assert inf == cpu_requests  # every request in one bucket, none twice
    # Buckets are cumulative and agree with status bucket by bucket.
    counts = [count for _, count in cpu["buckets"]]
    assert counts == sorted(counts)
    for bound, count in cpu["buckets"]:
        labels = {"command": "execute", "pool": "cpu", "le": repr(float(bound))}
        assert sample(samples, "workerd_request_duration_seconds_bucket", **labels) == count


def test_workers_queue_and_memory_gauges(metrics_daemon: Daemon) -> None:
    with metrics_daemon.client() as client:
        url = endpoint(client)
        pids = {w["pid"] for w in client.status()["pool"]["workers"]}
        samples = scrape(url)
    assert sample(samples, "workerd_workers", kind="cpu", state="idle") == 2
    assert sample(samples, "workerd_queue_depth", queue="cpu") == 0
    assert sample(samples, "workerd_queue_depth", queue="gpu") == 0
    uss = {
        int(dict(labels)["pid"]): value
        for (name, labels), value in samples.items()
        if name == "workerd_worker_uss_bytes"
    }
    assert set(uss) == pids
    # Read from /proc: a live Python process has at least a few hundred KiB of its own.
    assert all(value > 100_000 for value in uss.values())


def test_queue_depth_counts_waiting_requests(start_daemon: Callable[..., Daemon]) -> None:
    daemon = start_daemon(config=BASE_CONFIG.format(workers=1) + METRICS)
    with daemon.client() as client:
        url = endpoint(client)
        # Long sleeps, never awaited: the fixture kills the daemon, and a loaded machine cannot
        # make the scrape miss the moment.
        for _ in range(4):
            client.send("execute", name="workerd.examples.tasks:sleep", args=[60.0])
        wait_until(lambda: client.status()["queue"]["depth"] == 3)
        samples = scrape(url)
    assert sample(samples, "workerd_queue_depth", queue="cpu") == 3
    assert sample(samples, "workerd_workers", kind="cpu", state="busy") == 1
    assert sample(samples, "workerd_workers", kind="cpu", state="idle") == 0  # zeros are series too


def test_restarts_and_recycles_by_reason(start_daemon: Callable[..., Daemon]) -> None:
    config = BASE_CONFIG.format(workers=1).replace("[pool]\n", "[pool]\nmax_tasks_per_worker = 1\n") + METRICS
    daemon = start_daemon(config=config)
    with daemon.client() as client:
        url = endpoint(client)
        for _ in range(3):
            client.execute(ECHO, 1)  # each worker is recycled after one task (+ jitter of up to 1)
        # The recycled workers must be gone, not just stopping: a stopping worker's exit is no
        # restart.
        wait_until(lambda: [w["state"] for w in client.status()["pool"]["workers"]] == ["idle"])
        victim = client.status()["pool"]["workers"][0]["pid"]
        os.kill(victim, signal.SIGKILL)
        wait_until(lambda: client.status()["metrics"]["restarts"][0]["count"] == 1)
        metrics = client.status()["metrics"]
        samples = scrape(url)
    recycled = metrics["recycles"]["max_tasks"]
    assert recycled >= 1
    assert sample(samples, "workerd_worker_recycles_total", reason="max_tasks") == recycled
    assert sample(samples, "workerd_worker_restarts_total", kind="cpu", reason="died") == 1
    assert sample(samples, "workerd_worker_restarts_total", kind="cpu", reason="timeout") == 0


def test_pipeline_cache_and_gpu_memory(start_daemon: Callable[..., Daemon], tmp_path: Path) -> None:
    # Each pipeline holds 40 MiB; a 60 MiB budget holds one: loading the other evicts it.
    text = gpu_config(tmp_path, budget_mb=60, names=("a", "b"), size_mb=40, load_s=0) + METRICS
    daemon = start_daemon(config=text)
    with daemon.client() as client:
        url = endpoint(client)
        client.execute("a")  # miss
        client.execute("a")  # hit
        client.execute("b")  # miss, evicts a
        samples = scrape(url)
        metrics = client.status()["metrics"]
    assert metrics["pipeline_cache"] == {
        "hits": 1, "misses": 2, "wakes": 0, "parks": 0, "evictions": 1, "leak_reloads": 0,
        "batch_reruns": 0,
    }  # fmt: skip
    assert sample(samples, "workerd_pipeline_cache_hits_total") == 1
    assert sample(samples, "workerd_pipeline_cache_misses_total") == 2
    assert sample(samples, "workerd_pipeline_cache_evictions_total") == 1
    # Each run went alone: a batch of 1 per run, by pipeline.
    assert sample(samples, "workerd_pipeline_batch_size_count", pipeline="a") == 2
    assert sample(samples, "workerd_pipeline_batch_size_bucket", pipeline="a", le="1.0") == 2
    assert sample(samples, "workerd_pipeline_batch_size_sum", pipeline="b") == 1
    assert sample(samples, "workerd_pipeline_cache_batch_reruns_total") == 0
    assert sample(samples, "workerd_requests_total", command="execute", pool="gpu", outcome="ok") == 3
    device: Any = next(
        dict(labels)["device"] for name, labels in samples if name == "workerd_gpu_allocated_bytes"
    )
    assert sample(samples, "workerd_gpu_allocated_bytes", device=device) >= 30 * 1024 * 1024
    # The caching allocator reserves at least what is allocated; on the CPU the figure is the
    # GPU worker's private memory, which holds the pipeline's tensors.
    reserved = sample(samples, "workerd_gpu_reserved_bytes", device=device)
    assert reserved >= sample(samples, "workerd_gpu_allocated_bytes", device=device)
    assert sample(samples, "workerd_workers", kind="gpu", state="idle") == 1


def test_endpoint_is_off_by_default(daemon: Daemon) -> None:
    with daemon.client() as client:
        status = client.status()
    assert status["metrics"]["endpoint"] is None
    # Only the status requests of wait_ready so far (this one counts once its reply is out).
    assert [r["command"] for r in status["metrics"]["requests"]] == ["status"]


def test_a_taken_port_stops_the_daemon_with_a_clear_error(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = tmp_path / "workerd.toml"
        config.write_text(BASE_CONFIG.format(workers=1) + f'\n[metrics]\nlisten = "127.0.0.1:{port}"\n')
        proc = subprocess.run(
            [sys.executable, "-m", "workerd", "--config", str(config), "--socket", str(tmp_path / "w.sock")],
            capture_output=True,
            text=True,
            timeout=60,
            env=clean_environment(),
        )
    assert proc.returncode == 69
    assert f"cannot serve metrics on 127.0.0.1:{port}" in proc.stderr
