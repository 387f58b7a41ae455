"""The GPU worker and its pipeline cache on a real daemon, on the CPU (tests marked `gpu` need CUDA)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Daemon, wait_until
from workerctl import Client, errors

# A pipeline whose size, load time and behaviour are set by its file, so tests can edit it.
PIPELINE = """
import os, time
import torch

SIZE_MB = {size_mb}
VERSION = {version}

def load(device):
    time.sleep({load_s})
    return torch.ones(int(SIZE_MB * 1024 * 1024 / 4), device=device)

def run(weights, sleep=0.0, oom=False, crash=False, mark="", gate=""):
    if mark:  # the run has begun (its worker said so): a test may kill the worker now
        open(mark, "w").close()
    if crash:
        os.abort()
    if oom:
        if weights.is_cuda:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        raise MemoryError()
    time.sleep(sleep)
    while gate and not os.path.exists(gate):  # held until the test opens it ([gpu] run_timeout_s)
        time.sleep(0.01)
    return {{"version": VERSION, "sum": float(weights[:10].sum())}}
"""


def write_pipeline(path: Path, size_mb: float = 8, load_s: float = 0.3, version: int = 1) -> None:
    path.write_text(textwrap.dedent(PIPELINE.format(size_mb=size_mb, load_s=load_s, version=version)))


def gpu_config(
    directory: Path, budget_mb: float = 0, names: tuple[str, ...] = ("a", "b"), **pipelines: Any
) -> str:
    lines = [
        "[pool]",
        "workers = 1",
        "[tasks]",
        "modules = []",
        "[gpu]",
        'enabled = "auto"',
        "run_timeout_s = 30",
    ]
    if budget_mb:
        lines.append(f"memory_budget_mb = {budget_mb}")
    for name in names:
        path = directory / f"{name}.py"
        if not path.exists():
            write_pipeline(path, **pipelines)
        lines += [f"[pipelines.{name}]", f'path = "{path}"']
    return "\n".join(lines) + "\n"


def cached(client: Client) -> list[str]:
    gpu = client.memory_status()["gpu"]
    return [p["name"] for p in gpu["pipelines"]] if gpu else []  # None while it restarts


@pytest.fixture
def gpu_daemon(start_daemon: Callable[..., Daemon], tmp_path: Path) -> Daemon:
    return start_daemon(config=gpu_config(tmp_path))


def test_cold_then_warm(gpu_daemon: Daemon) -> None:
    with gpu_daemon.client() as client:
        cold = client.execute("a")
        warm = client.execute("a")
    assert cold["warm"] is False and cold["load_s"] >= 0.3
    assert warm["warm"] is True and warm["load_s"] == 0.0
    assert warm["output"] == cold["output"] == {"version": 1, "sum": 10.0}
    assert warm["sha256"] == cold["sha256"] and len(warm["sha256"]) == 64


def test_edited_pipeline_reloads_alone(gpu_daemon: Daemon, tmp_path: Path) -> None:
    with gpu_daemon.client() as client:
        first = client.execute("a")
        client.execute("b")
        time.sleep(0.01)  # a new mtime even on coarse clocks
        write_pipeline(tmp_path / "a.py", version=2)
        edited = client.execute("a")
        other = client.execute("b")
    assert edited["warm"] is False and edited["output"]["version"] == 2
    assert edited["sha256"] != first["sha256"]
    assert other["warm"] is True


def test_budget_evicts_least_recently_used(start_daemon: Callable[..., Daemon], tmp_path: Path) -> None:
    # Each pipeline holds 40 MiB; a 100 MiB budget holds two of them, not three.
    daemon = start_daemon(
        config=gpu_config(tmp_path, budget_mb=100, names=("a", "b", "c"), size_mb=40, load_s=0)
    )
    with daemon.client() as client:
        client.execute("a")
        client.execute("b")
        client.execute("a")  # b is now the least recently used
        client.execute("c")
        assert sorted(cached(client)) == ["a", "c"]
        stats = client.memory_status()["gpu"]
        assert stats["budget_bytes"] == 100 * 1024 * 1024
        assert all(p["bytes"] >= 30 * 1024 * 1024 for p in stats["pipelines"])


def test_memory_status_answers_during_a_long_run(gpu_daemon: Daemon, tmp_path: Path) -> None:
    # The run is held on the gate until memory_status has answered: a memory_status that waited
    # for the run would not answer before the run's timeout (30 s), and the run would end in
    # TIMEOUT, not "warm", so no clock is needed to tell the two apart; bench/ measures the time.
    gate = tmp_path / "gate"
    with gpu_daemon.client() as client:
        client.execute("a")
        run = client.send("execute", name="a", kwargs={"gate": str(gate)})
        wait_until(lambda: client.status()["gpu"]["state"] == "busy")
        memory = client.memory_status()
        assert client.status()["gpu"]["state"] == "busy"  # the run was still going
        gate.touch()
        assert memory["gpu"]["pipelines"][0]["name"] == "a"
        assert [w["kind"] for w in memory["workers"]] == ["cpu", "gpu"]
        assert client.wait_result(run, 30)["warm"] is True


def test_clear_full_drops_every_pipeline(gpu_daemon: Daemon) -> None:
    with gpu_daemon.client() as client:
        client.execute("a")
        client.execute("b")
        cleared = client.clear_memory("full")
        assert sorted(cleared["gpu"]["dropped"]) == ["a", "b"]
        assert cleared["gpu"]["allocated_after"] == 0 < cleared["gpu"]["allocated_before"]
        assert cached(client) == []
        assert client.execute("a")["warm"] is False


def test_clear_gc_keeps_pipelines(gpu_daemon: Daemon) -> None:
    with gpu_daemon.client() as client:
        client.execute("a")
        cleared = client.clear_memory("gc")
        assert cleared["gpu"]["dropped"] == [] and cached(client) == ["a"]
        assert len(cleared["workers"]) == 1  # the CPU worker collected too


def test_out_of_memory_evicts_retries_then_reports(gpu_daemon: Daemon) -> None:
    with gpu_daemon.client() as client:
        client.execute("a")
        client.execute("b")
        with pytest.raises(errors.OutOfMemory, match="ran out of memory"):
            client.execute("b", oom=True)
        assert cached(client) == ["b"]  # a, the least recently used other, was evicted for the retry
        assert client.execute("b")["warm"] is True  # the worker survived and the cache is intact


def test_timeout_kills_respawns_and_restores_warm(gpu_daemon: Daemon) -> None:
    with gpu_daemon.client() as client:
        client.execute("a")
        pid = client.status()["gpu"]["pid"]
        with pytest.raises(errors.TaskTimeout) as info:
            client.call("a", kwargs={"sleep": 30}, timeout_s=1)
        assert info.value.details["pid"] == pid
        assert "in run" in info.value.details["traceback"]
        wait_until(lambda: client.status()["gpu"]["state"] == "idle" and client.status()["gpu"]["pid"] != pid)
        wait_until(lambda: cached(client) == ["a"])  # restored in the background
        assert client.execute("a")["warm"] is True


def test_crash_gives_worker_lost_and_restores(gpu_daemon: Daemon) -> None:
    with gpu_daemon.client() as client:
        client.execute("a")
        client.execute("b")
        with pytest.raises(errors.WorkerLost, match="killed by signal 6"):
            client.execute("b", crash=True)
        wait_until(lambda: sorted(cached(client)) == ["a", "b"], timeout=30)
        assert client.execute("a")["warm"] is True


def test_pipeline_retries_on_a_respawned_worker(gpu_daemon: Daemon) -> None:
    with gpu_daemon.client() as client:
        with pytest.raises(errors.WorkerLost) as info:
            client.call("a", kwargs={"crash": True}, retries=1)  # crashes both times
        assert info.value.details["attempts"] == 2
        assert client.status()["counters"]["retries"] == 1


def test_sigkill_of_the_gpu_worker_mid_run(gpu_daemon: Daemon, tmp_path: Path) -> None:
    with gpu_daemon.client() as client:
        client.execute("a")
        # Killed once the run has begun: "busy" alone is a run handed over, maybe not started,
        # and one that never started is run again, not WORKER_LOST.
        mark = tmp_path / "running"
        run = client.send("execute", name="a", kwargs={"sleep": 30, "mark": str(mark)})
        wait_until(mark.exists)
        os.kill(client.status()["gpu"]["pid"], signal.SIGKILL)
        with pytest.raises(errors.WorkerLost):
            client.wait_result(run, 10)
        wait_until(lambda: cached(client) == ["a"], timeout=30)


def test_master_and_zygote_never_load_torch(gpu_daemon: Daemon) -> None:
    with gpu_daemon.client() as client:
        client.execute("a")
        pids = [gpu_daemon.proc.pid] + [z["pid"] for z in client.memory_status()["zygotes"]]
        gpu_pid = client.status()["gpu"]["pid"]

    def maps(pid: int) -> str:
        return Path(f"/proc/{pid}/maps").read_text()

    assert "libtorch" in maps(gpu_pid)
    for pid in pids:
        assert "libtorch" not in maps(pid)


def test_unknown_and_disabled_pipelines(start_daemon: Callable[..., Daemon], tmp_path: Path) -> None:
    daemon = start_daemon(config=gpu_config(tmp_path).replace('enabled = "auto"', 'enabled = "false"'))
    with daemon.client() as client:
        with pytest.raises(errors.UnknownTask, match="GPU worker is disabled"):
            client.execute("a")
        with pytest.raises(errors.UnknownTask, match="no pipeline named 'zzz'"):
            client.execute("zzz")
        assert client.memory_status()["gpu"] is None


def test_a_missing_module_is_one_line_naming_the_install(
    start_daemon: Callable[..., Daemon], tmp_path: Path
) -> None:
    """No traceback for what only an install fixes. (Without torch, the demo says
    `pip install 'workerd[gpu]'`: tests/integration/test_install.py, on a real base install.)"""
    (tmp_path / "a.py").write_text(
        "def load(device):\n    import workerd_absent_xyz\n\ndef run(obj):\n    pass\n"
    )
    daemon = start_daemon(config=gpu_config(tmp_path, names=("a",)))
    with daemon.client() as client, pytest.raises(errors.TaskError) as caught:
        client.execute("a")
    wanted = "pipeline 'a' needs 'workerd_absent_xyz', which is not installed: install 'workerd_absent_xyz'"
    assert caught.value.message.startswith(wanted) and "traceback" not in caught.value.details
    result = subprocess.run(
        [sys.executable, "-m", "workerctl.cli", "--socket", daemon.socket, "run", "a"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == errors.EXIT_FAILED
    assert result.stderr.splitlines() == [f"workerctl: TASK_ERROR: {caught.value.message}"]


def test_demo_pipeline_on_the_embedded_default(start_daemon: Callable[..., Daemon]) -> None:
    daemon = start_daemon(embedded=True, env={"WORKERD_DEMO_LOAD_S": "0.1"}, args=["--workers", "1"])
    with daemon.client() as client:
        result = client.execute("demo", prompt="a cat")
        again = client.execute("demo", prompt="a cat")
    assert result["output"]["prompt"] == "a cat" and result["output"]["shape"] == [1, 512]
    assert again["warm"] is True and again["output"]["checksum"] == result["output"]["checksum"]


# -- CUDA only ---------------------------------------------------------------------------------


def cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


cuda = pytest.mark.skipif(not cuda_available(), reason="needs a CUDA device")


@pytest.mark.gpu
@cuda
def test_cuda_cold_warm_and_clear_returns_reserved(
    start_daemon: Callable[..., Daemon], tmp_path: Path
) -> None:
    daemon = start_daemon(config=gpu_config(tmp_path, names=("a",), size_mb=512, load_s=0))
    with daemon.client() as client:
        cold = client.execute("a")
        warm = client.execute("a")
        assert cold["device"].startswith("cuda") and not cold["warm"] and warm["warm"]
        baseline = client.memory_status()["gpu"]
        assert baseline["allocated_bytes"] >= 512 * 1024 * 1024
        cleared = client.clear_memory("full")["gpu"]
        assert cleared["reserved_after"] < cleared["reserved_before"]
        assert cleared["reserved_after"] < 64 * 1024 * 1024  # back to a fresh worker's baseline


@pytest.mark.gpu
@cuda
def test_cuda_real_oom_recovers(start_daemon: Callable[..., Daemon], tmp_path: Path) -> None:
    path = tmp_path / "hog.py"
    path.write_text(
        textwrap.dedent("""
        import torch

        def load(device):
            return device

        def run(device, gib=10_000):
            block = torch.empty(int(gib * 2**30), dtype=torch.uint8, device=device)
            return int(block.numel())
    """)
    )
    config = gpu_config(tmp_path, names=("a",), size_mb=256, load_s=0) + f'[pipelines.hog]\npath = "{path}"\n'
    daemon = start_daemon(config=config)
    with daemon.client() as client:
        client.execute("a")
        with pytest.raises(errors.OutOfMemory):
            client.execute("hog", gib=10_000)  # 10 TB: never fits
        assert client.execute("hog", gib=1)["output"] == 2**30
        assert client.execute("a")["device"].startswith("cuda")


@pytest.mark.gpu
@cuda
def test_cuda_no_growth_over_50_runs(start_daemon: Callable[..., Daemon], tmp_path: Path) -> None:
    daemon = start_daemon(config=gpu_config(tmp_path, names=("a",), size_mb=256, load_s=0))
    with daemon.client() as client:
        client.execute("a")
        figures = []
        for _ in range(50):
            client.execute("a")
            gpu = client.memory_status()["gpu"]
            figures.append((gpu["allocated_bytes"], gpu["reserved_bytes"]))
    assert len(set(figures[5:])) == 1, figures


def test_reload_applies_new_pipelines_and_restores_the_rest(gpu_daemon: Daemon, tmp_path: Path) -> None:
    with gpu_daemon.client() as client:
        client.execute("a")
        old_pid = client.status()["gpu"]["pid"]
        write_pipeline(tmp_path / "c.py", version=3)
        text = gpu_daemon.config_path.read_text() + f'[pipelines.c]\npath = "{tmp_path / "c.py"}"\n'
        gpu_daemon.config_path.write_text(text)
        client.reload()
        wait_until(lambda: client.status()["gpu"]["pid"] not in (None, old_pid))
        assert client.execute("c")["output"]["version"] == 3
        wait_until(lambda: "a" in cached(client))
        assert client.execute("a")["warm"] is True


def test_numpy_arrays_travel_to_and_from_pipelines_as_raw_frames(
    start_daemon: Callable[..., Daemon], tmp_path: Path
) -> None:
    numpy = pytest.importorskip("numpy")
    path = tmp_path / "double.py"
    path.write_text("def load(device):\n    return 2\n\ndef run(factor, array):\n    return array * factor\n")
    daemon = start_daemon(config=gpu_config(tmp_path, names=()) + f'[pipelines.double]\npath = "{path}"\n')
    array = numpy.arange(300_000, dtype=numpy.float32)
    with daemon.client() as client:
        result = client.execute("double", array)
    assert isinstance(result["output"], numpy.ndarray)
    assert numpy.array_equal(result["output"], array * 2)
