"""Several GPU workers on a real daemon: placement, pins, one worker's death, per-device status.

On the CPU, `device = "cpu"` with `devices = [0, 1, 2]` gives one GPU worker process per index
(the test-only device list, placement.worker_slots), each with its own cache and budget, named
"cpu:0", "cpu:1", ... in results and status. Tests marked `gpu` need two CUDA devices.
"""

from __future__ import annotations

import os
import signal
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Daemon, wait_until
from tests.integration.test_control import workerctl
from tests.integration.test_gpu import gpu_config
from workerctl import Client, errors

SIZES_MB = {"a": 40, "b": 8, "c": 8, "p": 8}  # a is the big one: its worker has the least room left

PIPELINE = """
import os, time
import torch

def load(device):
    time.sleep(0.2)
    return torch.ones({size_mb} * 1024 * 1024 // 4, device=device)

def run(weights, sleep=0.0, mark=""):
    if mark:  # the run has begun: the test may kill its worker now
        open(mark, "w").close()
    time.sleep(sleep)
    return {{"pid": os.getpid()}}
"""


def devices_config(
    directory: Path, pins: dict[str, list[int]], device: str = "cpu", devices: Any = (0, 1, 2)
) -> str:
    listed = '"all"' if devices == "all" else str(list(devices))
    # gpu_config without pipelines ends inside [gpu]: the devices keys join it.
    lines = [gpu_config(directory, budget_mb=200, names=()), f'device = "{device}"', f"devices = {listed}"]
    lines.append('start = "boot"')
    for name, size in SIZES_MB.items():
        path = directory / f"{name}.py"
        path.write_text(PIPELINE.format(size_mb=size))
        lines += [f"[pipelines.{name}]", f'path = "{path}"']
        if name in pins:
            lines.append(f"devices = {pins[name]}")
    return "\n".join(lines) + "\n"


def cuda_devices() -> int:
    try:
        import torch
    except ImportError:
        return 0
    return int(torch.cuda.device_count()) if torch.cuda.is_available() else 0


without_cuda = pytest.mark.skipif(cuda_devices() > 0, reason="about a machine without CUDA")


def gpus(client: Client) -> list[dict[str, Any]]:
    return client.status()["gpus"]  # type: ignore[no-any-return]


def all_idle(client: Client, count: int) -> bool:
    states = [gpu["state"] for gpu in gpus(client)]
    return states == ["idle"] * count


def device(client: Client, name: str, **kwargs: Any) -> str:
    return client.execute(name, **kwargs)["device"]  # type: ignore[no-any-return]


def test_runs_spread_stick_to_their_pipeline_and_pins_hold(
    start_daemon: Callable[..., Daemon], tmp_path: Path
) -> None:
    daemon = start_daemon(config=devices_config(tmp_path, pins={"p": [0]}))
    with daemon.client() as client:
        wait_until(lambda: all_idle(client, 3), timeout=60)
        # Cold runs of different pipelines go where the most budget is free.
        assert [device(client, name) for name in "abc"] == ["cpu:0", "cpu:1", "cpu:2"]
        # A run goes to the worker that holds its pipeline, even while it is busy.
        slow = client.send("execute", name="a", kwargs={"sleep": 1})
        fast = client.send("execute", name="a")
        results = [client.wait_result(slow, 30), client.wait_result(fast, 30)]
        assert [(r["device"], r["warm"]) for r in results] == [("cpu:0", True), ("cpu:0", True)]
        # p alone would go to a device with more room; pinned to 0, it always runs there.
        assert [device(client, "p") for _ in range(2)] == ["cpu:0", "cpu:0"]

        status = client.status()
        each = status["gpus"]
        assert [(g["index"], g["device"], g["state"]) for g in each] == [
            (0, "cpu:0", "idle"),
            (1, "cpu:1", "idle"),
            (2, "cpu:2", "idle"),
        ]
        assert [g["cached"] for g in each] == [["a", "p"], ["b"], ["c"]]
        assert len({g["pid"] for g in each}) == 3
        assert status["gpu"]["pid"] == each[0]["pid"] and status["gpu"]["device"] == "cpu:0"

        shown = workerctl("--socket", daemon.socket, "status").stdout  # what an operator sees
        assert "gpu     3 workers, 0 waiting" in shown
        for g in each:
            assert (
                f"  {g['device']}  idle, pid {g['pid']}, 0 waiting, cached: {', '.join(g['cached'])}" in shown
            )
        assert workerctl("--socket", daemon.socket, "memory").stdout.count("\ngpu cpu:") == 3

        memory = client.memory_status()
        assert [(g["index"], g["device"]) for g in memory["gpus"]] == [
            (0, "cpu:0"),
            (1, "cpu:1"),
            (2, "cpu:2"),
        ]
        assert [sorted(p["name"] for p in g["pipelines"]) for g in memory["gpus"]] == [
            ["a", "p"],
            ["b"],
            ["c"],
        ]
        assert memory["gpu"]["device"] == "cpu:0" and memory["gpu"]["runs"] == memory["gpus"][0]["runs"] == 5
        held = [g["allocated_bytes"] for g in memory["gpus"]]
        assert held[0] > held[1] > 0 and held[2] > 0  # each device's own budget and figures
        workers = [(w["index"], w["pid"]) for w in memory["workers"] if w["kind"] == "gpu"]
        assert workers == [(g["index"], g["pid"]) for g in each]

        cleared = client.clear_memory("full")
        assert [sorted(g["dropped"]) for g in cleared["gpus"]] == [["a", "p"], ["b"], ["c"]]
        assert cleared["gpu"]["device"] == "cpu:0"
        assert [g["cached"] for g in gpus(client)] == [[], [], []]


def test_sigkill_of_one_worker_touches_only_its_runs(
    start_daemon: Callable[..., Daemon], tmp_path: Path
) -> None:
    daemon = start_daemon(config=devices_config(tmp_path, pins={"p": [0]}))
    with daemon.client() as client:
        wait_until(lambda: all_idle(client, 3), timeout=60)
        assert [device(client, name) for name in ("a", "b", "p")] == ["cpu:0", "cpu:1", "cpu:0"]
        before = gpus(client)
        mark = tmp_path / "running"
        running = client.send("execute", name="a", kwargs={"sleep": 2, "mark": str(mark)}, retries=1)
        wait_until(mark.exists)
        pinned = client.send("execute", name="p")  # waits for device 0, the only one it may use
        behind = client.send("execute", name="a")  # waits for device 0, which holds a
        other = client.send("execute", name="b", kwargs={"sleep": 1})  # on device 1
        os.kill(before[0]["pid"], signal.SIGKILL)

        # The run that was running is retried on a live device with room (2; 1 is busy with b).
        assert client.wait_result(running, 30)["device"] == "cpu:2"
        # The one that had not started goes to a live holder of a (2, or 0 once it is back).
        assert client.wait_result(behind, 30)["output"]["pid"] != before[0]["pid"]
        assert client.wait_result(other, 30)["device"] == "cpu:1"
        # The pinned run waited for device 0's new worker, which had restored its pipelines.
        result = client.wait_result(pinned, 60)
        assert (result["device"], result["warm"]) == ("cpu:0", True)

        after = gpus(client)
        assert after[0]["pid"] != before[0]["pid"]
        assert [g["pid"] for g in after[1:]] == [g["pid"] for g in before[1:]]
        wait_until(lambda: set(gpus(client)[0]["cached"]) >= {"a", "p"}, timeout=30)
        counters = client.status()["counters"]
        assert counters["gpu_worker_deaths"] == 1 and counters["retries"] == 1
        assert counters.get("pipeline_worker_lost", 0) == 0


def test_a_hung_worker_is_killed_alone(start_daemon: Callable[..., Daemon], tmp_path: Path) -> None:
    daemon = start_daemon(config=devices_config(tmp_path, pins={}, devices=(0, 1)))
    with daemon.client() as client:
        wait_until(lambda: all_idle(client, 2), timeout=60)
        assert [device(client, name) for name in "ab"] == ["cpu:0", "cpu:1"]
        before = gpus(client)
        hung = client.send("execute", name="b", kwargs={"sleep": 30}, timeout_s=1)
        assert [device(client, "a") for _ in range(3)] == ["cpu:0"] * 3  # device 0 serves meanwhile
        with pytest.raises(errors.TaskTimeout) as info:
            client.wait_result(hung, 30)
        assert info.value.details["pid"] == before[1]["pid"]
        wait_until(
            lambda: gpus(client)[1]["state"] == "idle" and gpus(client)[1]["cached"] == ["b"], timeout=30
        )
        result = client.execute("b")
        assert (result["device"], result["warm"]) == ("cpu:1", True)  # restored on its own device
        after = gpus(client)
        assert after[0]["pid"] == before[0]["pid"] and after[1]["pid"] != before[1]["pid"]
        assert client.status()["counters"]["gpu_timeouts"] == 1


@without_cuda
def test_the_first_worker_counts_the_devices(start_daemon: Callable[..., Daemon], tmp_path: Path) -> None:
    # "all" on "auto", without CUDA: the first worker counts 0 CUDA devices, so one worker
    # serves, on the CPU; a pin to device 1 names a device that is not there.
    daemon = start_daemon(config=devices_config(tmp_path, pins={"p": [1]}, device="auto", devices="all"))
    with daemon.client() as client:
        wait_until(lambda: all_idle(client, 1), timeout=60)
        assert [(g["index"], g["device"]) for g in gpus(client)] == [(0, "cpu:0")]
        assert device(client, "a") == "cpu:0"
        assert client.status()["counters"].get("gpu_worker_deaths", 0) == 0  # the counting one was stopped
        with pytest.raises(errors.UnknownTask, match=r"pinned to devices \[1\], which are not present"):
            client.execute("p")


@without_cuda
def test_devices_the_machine_lacks_answer_every_run(
    start_daemon: Callable[..., Daemon], tmp_path: Path
) -> None:
    daemon = start_daemon(config=devices_config(tmp_path, pins={}, device="cuda", devices="all"))
    with daemon.client() as client:
        wait_until(lambda: client.status()["gpu"]["error"], timeout=60)
        status = client.status()
        assert "no CUDA device is visible" in status["gpu"]["error"] and status["gpus"] == []
        with pytest.raises(errors.UnknownTask, match="no CUDA device is visible"):
            client.execute("a")
        assert client.memory_status()["gpus"] == []


# -- CUDA, two devices or more -------------------------------------------------------------------


WHERE = """
import os
import torch

def load(device):
    return torch.ones(64 * 1024 * 1024, device=device)  # 256 MiB

def run(weights):
    return {"visible": os.environ.get("CUDA_VISIBLE_DEVICES"), "count": torch.cuda.device_count(),
            "on": str(weights.device)}
"""


@pytest.mark.gpu
@pytest.mark.skipif(cuda_devices() < 2, reason="needs two CUDA devices")
def test_cuda_one_worker_per_device(start_daemon: Callable[..., Daemon], tmp_path: Path) -> None:
    lines = ["[pool]", "workers = 1", "[tasks]", "modules = []", "[gpu]", 'devices = "all"', 'start = "boot"']
    for name in ("a", "b"):
        (tmp_path / f"{name}.py").write_text(textwrap.dedent(WHERE))
        lines += [f"[pipelines.{name}]", f'path = "{tmp_path / name}.py"']
    daemon = start_daemon(config="\n".join(lines) + "\n")
    count = cuda_devices()
    with daemon.client() as client:
        wait_until(lambda: all_idle(client, count), timeout=120)
        assert [g["device"] for g in gpus(client)] == [f"cuda:{i}" for i in range(count)]
        first, second = client.execute("a"), client.execute("b")
        # Each worker sees only its own GPU, and the runs went to different ones.
        assert {first["device"], second["device"]} == {"cuda:0", "cuda:1"}
        for result in (first, second):
            assert result["output"]["count"] == 1 and result["output"]["on"].startswith("cuda")
        assert first["output"]["visible"] != second["output"]["visible"]
        memory = client.memory_status()["gpus"]
        for index in (0, 1):
            assert memory[index]["allocated_bytes"] >= 256 * 1024 * 1024
        # Kill a's worker: b's keeps serving warm on its device; a comes back warm on its own.
        index_a = int(first["device"].split(":")[1])
        index_b = 1 - index_a
        os.kill(gpus(client)[index_a]["pid"], signal.SIGKILL)
        assert client.execute("b")["device"] == second["device"]
        wait_until(
            lambda: gpus(client)[index_a]["state"] == "idle" and "a" in gpus(client)[index_a]["cached"], 120
        )
        again = client.execute("a")
        assert again["device"] == first["device"] and again["warm"] is True
        assert gpus(client)[index_b]["cached"] == ["b"]
