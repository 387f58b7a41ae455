"""The host tier and the leak watch on a real daemon (the GPU worker runs on the CPU here).

The pipelines are tests/tier_pipelines.py's: real 16 MiB tensors whose to_host/to_device copy
them and log each move to a file the test reads. Budgets are real: the device holds two of
them, host memory two more.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests import tier_pipelines
from tests.conftest import Daemon, wait_until
from tests.integration.test_control import workerctl
from tests.integration.test_gpu import gpu_config
from tests.integration.test_metrics import METRICS, endpoint, sample, scrape
from tests.tier_pipelines import MB, events
from workerctl import Client, errors


def tier_config(
    directory: Path, names: str = "abc", budget_mb: int = 40, gpu: str = "", pipeline: str = ""
) -> str:
    """Pipelines `names`, a device budget that holds two of them and a host budget that holds
    two; `gpu` and `pipeline` are more lines for [gpu] and for each [pipelines.NAME]."""
    lines = [gpu_config(directory, budget_mb=budget_mb, names=()), "host_memory_budget_mb = 40", gpu]
    for name in names:
        path = tier_pipelines.write(directory, name)
        lines += [f"[pipelines.{name}]", f'path = "{path}"', pipeline]
    return "\n".join(lines) + "\n"


def tiers(client: Client) -> dict[str, str]:
    gpu = client.memory_status()["gpu"] or {}  # None, or an error, while the worker restarts
    return {p["name"]: p["tier"] for p in gpu.get("pipelines", [])}


def pipeline(client: Client, name: str) -> dict[str, Any]:
    """Its line in memory_status, or {} while it is not cached."""
    return next((p for p in client.memory_status()["gpu"]["pipelines"] if p["name"] == name), {})


def test_park_wake_and_clear_through_the_daemon(start_daemon: Callable[..., Daemon], tmp_path: Path) -> None:
    daemon = start_daemon(config=tier_config(tmp_path))
    with daemon.client() as client:
        starts = [client.execute(name)["start"] for name in "aba"]
        assert starts == ["cold", "cold", "warm"]
        client.execute("c")
        assert tiers(client) == {"a": "device", "b": "host", "c": "device"}
        b = pipeline(client, "b")
        assert b["host_bytes"] == b["bytes"] >= 14 * MB and b["device_bytes"] == 0
        shown = workerctl("--socket", daemon.socket, "memory").stdout  # what an operator sees
        assert "host tier  parked 16." in shown and any(
            line.split()[:1] == ["b"] and "host" in line.split() for line in shown.splitlines()
        ), shown
        woken = client.execute("b")
        assert woken["start"] == "woken" and woken["warm"] is False and woken["output"]["sum"] == 8.0
        assert events(tmp_path)[-2:] == [("a", "to_host"), ("b", "to_device")]
        status = client.status()
        assert status["gpu"]["cached"] == ["c", "b"]  # the device tier, least recently used first
        assert status["metrics"]["pipeline_cache"] == {
            "hits": 1, "misses": 3, "wakes": 1, "parks": 2, "evictions": 0, "leak_reloads": 0,
            "batch_reruns": 0,
        }  # fmt: skip

        cleared = client.clear_memory("cache")["gpu"]
        assert cleared["dropped"] == [] and tiers(client)["a"] == "host"
        assert cleared["host_bytes_after"] == cleared["host_bytes_before"] > 0
        cleared = client.clear_memory("full")["gpu"]
        assert sorted(cleared["dropped"]) == ["a", "b", "c"] and cleared["host_bytes_after"] == 0
        assert tiers(client) == {} and client.execute("a")["start"] == "cold"


def test_a_crash_restores_the_device_tier(start_daemon: Callable[..., Daemon], tmp_path: Path) -> None:
    daemon = start_daemon(config=tier_config(tmp_path))
    with daemon.client() as client:
        for name in "abc":
            client.execute(name)
        assert tiers(client) == {"a": "host", "b": "device", "c": "device"}
        pid = client.status()["gpu"]["pid"]
        with pytest.raises(errors.WorkerLost, match="killed by signal 6"):
            client.execute("c", crash=True)
        wait_until(lambda: client.status()["gpu"]["pid"] not in (None, pid))
        # What was on the device is loaded again in the background; the parked copy died with
        # the process (restoring it would mean loading it cold and parking it: left to its run).
        wait_until(lambda: tiers(client) == {"b": "device", "c": "device"}, timeout=30)
        assert client.execute("b")["start"] == "warm"
        assert client.execute("a")["start"] == "cold"


def test_leak_watch_warns_reloads_and_exports(start_daemon: Callable[..., Daemon], tmp_path: Path) -> None:
    config = tier_config(tmp_path, "a", 400, "retained_warn_mb = 5", "max_retained_mb = 15")
    daemon = start_daemon(config=config + METRICS)
    with daemon.client() as client:
        url = endpoint(client)
        client.execute("a")
        client.execute("a", leak_mb=6)
        client.execute("a", leak_mb=6)  # about 12 MiB retained: warned, not yet reloaded
        retained = pipeline(client, "a")["retained_bytes"]
        assert 10 * MB < retained < 16 * MB
        samples = scrape(url)
        device = client.memory_status()["gpu"]["device"]  # cpu here, cuda on a GPU machine
        assert sample(samples, "workerd_pipeline_retained_bytes", device=device, pipeline="a") == retained
        held = sample(samples, "workerd_pipeline_bytes", device=device, pipeline="a", tier="device")
        assert held >= 14 * MB + retained
        client.execute("a", leak_mb=6)  # about 18: reloaded once its reply is out
        wait_until(lambda: pipeline(client, "a").get("runs") == 0)
        assert pipeline(client, "a")["retained_bytes"] == 0
        assert client.execute("a")["start"] == "warm"
        # Counted with the next run's report (the reload came after the last one).
        assert client.status()["metrics"]["pipeline_cache"]["leak_reloads"] == 1
    assert daemon.output().count("beyond its") == 1
    assert events(tmp_path).count(("a", "load")) == 2
