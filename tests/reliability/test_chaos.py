"""Chaos under load: workers SIGKILLed at random moments while a batch runs, one task hanging.

Invariants, counted at the wire (harness.Counter): every request gets exactly one terminal reply,
none is lost, none answered twice; with retries=1 an idempotent task never fails, however many
workers die under it (each kill is spaced so that no request can be hit twice). The same for the
GPU worker killed during pipeline runs.
"""

from __future__ import annotations

import os
import random
import signal
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Daemon, wait_until
from tests.reliability.harness import Chaos, Counter, report, request, scaled
from workerctl import Client, errors

TASKS = "workerd.examples.tasks"
ECHO = f"{TASKS}:echo"
HANG_S = 2.0
# A task that hangs and says which worker it hangs in, so the chaos can spare that worker and
# the hang ends the way a hang does (TIMEOUT), not as one more killed worker.
CHAOS_TASKS = textwrap.dedent("""
    import os, time

    def hang(pid_file):
        with open(pid_file, "w") as handle:
            handle.write(str(os.getpid()))
        time.sleep(3600)
""")


def cpu_config(workers: int) -> str:
    return f"""\
[daemon]
stop_timeout_s = 5
max_queue = 100000
[pool]
workers = {workers}
task_timeout_s = 60
[tasks]
modules = ["{TASKS}", "chaos_tasks"]
[gpu]
enabled = "false"
"""


def start_with_tasks(start_daemon: Callable[..., Daemon], directory: Path, workers: int) -> Daemon:
    (directory / "chaos_tasks.py").write_text(CHAOS_TASKS)
    return start_daemon(config=cpu_config(workers), env={"PYTHONPATH": str(directory)})


def busy_cpu_workers(spare: Path) -> Callable[[Client], list[int]]:
    """Busy workers, except the one running the hang (which names itself in `spare`); none
    until the hang has started, so that it cannot be hit between its start and its naming."""

    def victims(client: Client) -> list[int]:
        if not spare.exists() or not spare.read_text():
            return []
        hanging = int(spare.read_text())
        return [
            w["pid"]
            for w in client.status()["pool"]["workers"]
            if w["state"] == "busy" and w["pid"] != hanging
        ]

    return victims


def cpu_requests(count: int, pid_file: Path) -> Iterator[tuple[Any, list[bytes]]]:
    """Idempotent work with retries=1: plain calls, chunks of ten, and small CPU-bound hashes;
    first of all, one task that hangs past its timeout."""
    yield "hang", request("hang", "execute", name="chaos_tasks:hang", args=[str(pid_file)], timeout_s=HANG_S)
    for n in range(count):
        if n % 10 == 3:
            calls = [[[n * 100 + i], {}] for i in range(10)]
            yield n, request(n, "execute", name=ECHO, calls=calls, retries=1)
        elif n % 10 == 7:
            yield n, request(n, "execute", name=f"{TASKS}:hash_work", kwargs={"rounds": 200}, retries=1)
        else:
            yield n, request(n, "execute", name=ECHO, args=[n], retries=1)


def expected_result(n: int) -> Any:
    if n % 10 == 3:
        return {"results": [{"ok": True, "result": n * 100 + i} for i in range(10)]}
    if n % 10 == 7:
        return None  # a digest: checked for its type only
    return n


@pytest.mark.timeout(scaled(240, 1800))
def test_workers_killed_under_load(start_daemon: Callable[..., Daemon], tmp_path: Path) -> None:
    daemon = start_with_tasks(start_daemon, tmp_path, workers=3)
    # Enough requests to outlast several kills (one each 0.1-0.3 s): 10,000 took under a second
    # once the fast path got faster, and the chaos thread then killed only two workers.
    count = scaled(20_000, 100_000)
    pid_file = tmp_path / "hang.pid"
    alive = lambda: daemon.proc.poll() is None  # noqa: E731
    chaos = Chaos(busy_cpu_workers(pid_file), daemon.socket, (0.1, 0.3))
    with Counter(daemon.socket) as counter, chaos:
        lost = counter.drive(
            cpu_requests(count, pid_file), window=64, timeout_s=scaled(180, 1500), alive=alive
        )
    tally = counter.tally
    with daemon.client() as client:
        counters = client.status()["counters"]
    hang = tally.results.get("hang", {})
    report(
        "chaos: CPU workers killed",
        requests=count + 1,
        replies_received=tally.replies,
        requests_lost=len(lost),
        duplicates=len(tally.duplicates()),
        workers_killed=len(chaos.killed),
        retries=counters.get("retries", 0),
        codes=dict(tally.codes),
        hang=hang.get("code") if isinstance(hang, dict) else hang,
    )
    assert alive(), daemon.output()[-3000:]
    assert not lost, f"{len(lost)} requests never answered, e.g. {sorted(map(str, lost))[:10]}"
    assert not tally.duplicates(), f"answered twice: {tally.duplicates()}"
    assert set(tally.terminal) == {*range(count), "hang"}
    assert len(chaos.killed) >= 3, "the chaos thread killed too few workers to mean anything"
    # The hanging task ends in TIMEOUT, its worker killed by the daemon, not by the chaos.
    assert tally.results["hang"]["code"] == "TIMEOUT"
    # With retries=1, no idempotent request failed, and each got its own result.
    failed = {n: r for n, r in tally.results.items() if n != "hang" and isinstance(r, dict) and "code" in r}
    assert not failed, f"{len(failed)} requests failed, e.g. {list(failed.items())[:3]}"
    for n in range(count):
        want = expected_result(n)
        if want is None:
            assert isinstance(tally.results[n], str) and len(tally.results[n]) == 64
        else:
            assert tally.results[n] == want, n
    assert counters.get("retries", 0) >= 1
    with daemon.client() as client:
        assert client.execute(ECHO, "after") == "after"


@pytest.mark.timeout(120)
def test_workers_forked_a_hundred_at_once_all_become_ready(start_daemon: Callable[..., Daemon]) -> None:
    """Regression: a worker whose "ready" overtook the zygote's "forked" event for it was
    dropped and stayed "starting" for good (one slot of the pool lost, never replaced)."""
    daemon = start_daemon(workers=1)
    rounds = scaled(3, 10)
    with daemon.client() as client:
        for _ in range(rounds):
            client.scale(100)
            wait_until(lambda: client.status()["pool"]["idle"] == 100, timeout=30)
            assert client.map(ECHO, range(300), window=100) == list(range(300))
            client.scale(1)
            wait_until(lambda: len(client.status()["pool"]["workers"]) == 1, timeout=30)
    report("hundred forks", rounds=rounds, workers_forked=100 * rounds)


def busy_zygote(client: Client) -> list[int]:
    status = client.status()
    if status["pool"]["busy"] < 2:
        return []
    return [z["pid"] for z in client.memory_status()["zygotes"]]


@pytest.mark.timeout(scaled(120, 900))
def test_zygote_killed_under_load(start_daemon: Callable[..., Daemon], tmp_path: Path) -> None:
    """The zygote's death takes every worker with it: each request still ends exactly once
    (retried, or WORKER_LOST once its retry is spent), and the pool comes back."""
    daemon = start_with_tasks(start_daemon, tmp_path, workers=2)
    minimum = scaled(1_000, 20_000)
    sent: list[int] = []

    def requests(chaos: Chaos) -> Iterator[tuple[int, list[bytes]]]:
        # At least `minimum`, and on until the zygote has been killed once: on a fast machine
        # the minimum can end before the first kill, and then the test would prove nothing.
        n = 0
        while n < minimum or (not chaos.killed and n < 20 * minimum):
            sent.append(n)
            yield n, request(n, "execute", name=f"{TASKS}:hash_work", kwargs={"rounds": 2000}, retries=1)
            n += 1

    alive = lambda: daemon.proc.poll() is None  # noqa: E731
    with Counter(daemon.socket) as counter, Chaos(busy_zygote, daemon.socket, (0.5, 1.0)) as chaos:
        lost = counter.drive(requests(chaos), window=32, timeout_s=scaled(100, 800), alive=alive)
    count = len(sent)
    tally = counter.tally
    report(
        "chaos: zygote killed",
        requests=count,
        replies_received=tally.replies,
        requests_lost=len(lost),
        duplicates=len(tally.duplicates()),
        zygotes_killed=len(chaos.killed),
        codes=dict(tally.codes),
    )
    assert alive(), daemon.output()[-3000:]
    assert not lost and not tally.duplicates()
    assert set(tally.terminal) == set(range(count))
    assert set(tally.codes) <= {"OK", "WORKER_LOST"}
    assert chaos.killed
    daemon.wait_ready()


# -- the GPU worker ----------------------------------------------------------------------------

PIPELINE = textwrap.dedent("""
    import time
    import torch

    def load(device):
        return torch.arange(16, dtype=torch.float32, device=device)

    def run(weights, n=0, sleep=0.02):
        time.sleep(sleep)
        return {"n": n, "sum": float(weights.sum())}
""")


def gpu_config(directory: Path) -> str:
    path = directory / "chaos_pipeline.py"
    path.write_text(PIPELINE)
    return f"""\
[daemon]
stop_timeout_s = 30
[pool]
workers = 1
[tasks]
modules = []
[gpu]
enabled = "auto"
run_timeout_s = 60
[pipelines.chaos]
path = "{path}"
"""


@pytest.mark.timeout(scaled(180, 1200))
def test_gpu_worker_killed_during_pipeline_runs(start_daemon: Callable[..., Daemon], tmp_path: Path) -> None:
    pytest.importorskip("torch")
    daemon = start_daemon(config=gpu_config(tmp_path))
    count = scaled(150, 1_500)
    kills = scaled(2, 12)
    with daemon.client(timeout=120) as client:
        assert client.execute("chaos", n=-1)["output"]["sum"] == 120.0  # started, pipeline loaded
    alive = lambda: daemon.proc.poll() is None  # noqa: E731
    killed: list[int] = []
    stop = threading.Event()

    def kill_during_runs() -> None:
        """Kill the GPU worker in the middle of a run, `kills` times, each time only after runs
        have completed since the last kill (so no run is hit twice: retries=1 covers it)."""
        rng = random.Random(0)
        with Client(daemon.socket, timeout=60) as client:
            done_at_kill = -1
            while len(killed) < kills and not stop.is_set():
                status = client.status()
                gpu, done = status["gpu"], status["counters"].get("pipeline_ok", 0)
                if gpu["state"] != "busy" or gpu["pid"] is None or done < done_at_kill + 5:
                    time.sleep(0.01)
                    continue
                time.sleep(rng.uniform(0, 0.015))
                try:
                    os.kill(gpu["pid"], signal.SIGKILL)
                except ProcessLookupError:
                    continue
                killed.append(gpu["pid"])
                done_at_kill = done

    killer = threading.Thread(target=kill_during_runs, daemon=True)
    killer.start()
    requests = ((n, request(n, "execute", name="chaos", kwargs={"n": n}, retries=1)) for n in range(count))
    try:
        with Counter(daemon.socket) as counter:
            lost = counter.drive(requests, window=8, timeout_s=scaled(150, 1000), alive=alive)
    finally:
        stop.set()
        killer.join(30)
    tally = counter.tally
    with daemon.client() as client:
        counters = client.status()["counters"]
    report(
        "chaos: GPU worker killed",
        requests=count,
        replies_received=tally.replies,
        requests_lost=len(lost),
        duplicates=len(tally.duplicates()),
        gpu_worker_killed=len(killed),
        retries=counters.get("retries", 0),
        codes=dict(tally.codes),
    )
    assert alive(), daemon.output()[-3000:]
    assert not lost and not tally.duplicates()
    assert set(tally.terminal) == set(range(count))
    assert tally.codes == {"OK": count}, tally.codes
    assert all(tally.results[n]["output"] == {"n": n, "sum": 120.0} for n in range(count))
    assert len(killed) == kills, "the runs ended before every planned kill"
    assert counters["gpu_worker_deaths"] == kills
    with daemon.client(timeout=120) as client:
        wait_until(lambda: client.status()["gpu"]["state"] == "idle", timeout=60)
        assert client.execute("chaos", n=7)["output"]["n"] == 7

        # Regression: the GPU worker dying while the daemon stops. Its run used to stay "in
        # flight" until the grace period (30 s here) ended, then got SHUTTING_DOWN.
        run = client.send("execute", name="chaos", kwargs={"n": 1, "sleep": 60}, retries=1)
        wait_until(lambda: client.status()["gpu"]["state"] == "busy", timeout=30)
        gpu_pid = client.status()["gpu"]["pid"]
        daemon.proc.send_signal(signal.SIGTERM)
        wait_until(lambda: client.status()["state"] == "stopping", timeout=10)
        os.kill(gpu_pid, signal.SIGKILL)
        with pytest.raises(errors.WorkerLost, match="killed by signal 9"):
            client.wait_result(run, 20)
    assert daemon.proc.wait(20) == 0
