"""Dynamic batching on a real daemon, on the CPU: a small torch MLP (mlp_pipeline.py) whose
run_batch() fails, crashes or sleeps on chosen inputs.

To make runs queue up, a test first makes the GPU worker busy with a run of its own (`occupy`,
on `lone`, a pipeline without batching); what it sends next waits behind that run and goes to
the worker together once it is free. Replies are counted at the wire (harness.Counter), so a
second terminal reply for one request would show. One daemon serves the checks that leave it
as they found it (its worker idle, respawned if they killed it); reload, stop and the device
list start their own.
"""

from __future__ import annotations

import itertools
import os
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Daemon, wait_until
from tests.integration.test_control import workerctl
from tests.reliability.harness import Counter, request
from workerctl import Client

MLP = Path(__file__).with_name("mlp_pipeline.py")
PIPELINES = {
    "mlp": {"max_batch": 4},
    "lone": {},  # max_batch 1: what keeps the worker busy, and the runs alone to compare with
    "waits": {"max_batch": 4, "max_wait_ms": 400},
    "plain": {"module": '"workerd.examples.demo_pipeline"', "max_batch": 4},  # no run_batch
}
ids = itertools.count(1)


def batch_config(pipelines: dict[str, dict[str, Any]], *gpu_lines: str) -> str:
    lines = ["[daemon]", "stop_timeout_s = 10", "[pool]", "workers = 1", "[tasks]", "modules = []"]
    lines += ["[gpu]", 'enabled = "auto"', 'device = "cpu"', "run_timeout_s = 30", 'start = "boot"']
    lines += gpu_lines
    for name, keys in pipelines.items():
        lines += [f"[pipelines.{name}]", *([] if "module" in keys else [f'path = "{MLP}"'])]
        lines += [f"{key} = {value}" for key, value in keys.items()]
    return "\n".join(lines) + "\n"


def gpu_idle(client: Client, index: int = 0) -> bool:
    return client.status()["gpus"][index]["state"] == "idle"  # type: ignore[no-any-return]


class Batches:
    """A Counter on one daemon, with the requests it sent by name."""

    def __init__(self, daemon: Daemon, marks: Path) -> None:
        self.daemon = daemon
        self.marks = marks
        self.counter = Counter(daemon.socket)

    def send(self, name: str = "mlp", timeout_s: float | None = None, **kwargs: Any) -> int:
        key = next(ids)
        fields: dict[str, Any] = {"name": name, "kwargs": kwargs}
        if timeout_s is not None:
            fields["timeout_s"] = timeout_s
        self.counter.send(request(key, "execute", **fields))
        return key

    def mark(self) -> Path:
        return self.marks / f"mark-{next(ids)}"

    def occupy(self, seconds: float = 0.5, name: str = "lone") -> int:
        """Keep the GPU worker busy for `seconds`, once that run has begun: runs sent next queue."""
        mark = self.mark()
        key = self.send(name, sleep=seconds, mark=str(mark))
        wait_until(mark.exists, timeout=30)
        return key

    def replies(self, *keys: int) -> list[Any]:
        """Each one's result (or error map), once every request sent so far has one reply;
        fails on a second reply for any of them."""
        assert self.counter.wait_replies(self.counter.sent, timeout_s=60)
        self.counter.settle(0.3)
        assert self.counter.tally.replies == self.counter.sent and not self.counter.tally.duplicates()
        return [self.counter.tally.results[key] for key in keys]

    def __enter__(self) -> Batches:
        return self

    def __exit__(self, *exc: object) -> None:
        self.counter.close()

    def counters(self) -> dict[str, int]:
        with self.daemon.client() as client:
            return client.status()["counters"]  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    directory = tmp_path_factory.mktemp("batching")
    daemon = Daemon(directory, batch_config(PIPELINES), [], {"WORKERD_DEMO_LOAD_S": "0"}, None)
    try:
        daemon.wait_ready()
        with daemon.client() as client:
            wait_until(lambda: gpu_idle(client), timeout=60)
        yield daemon
    finally:
        daemon.stop(signal.SIGKILL if daemon.proc.poll() is None else signal.SIGTERM, timeout=5)


@pytest.fixture
def batches(shared: Daemon, tmp_path: Path) -> Iterator[Batches]:
    with shared.client() as client:  # a check before may have killed the worker: back, and idle
        wait_until(lambda: gpu_idle(client), timeout=60)
    with Batches(shared, tmp_path) as batches:
        yield batches


def test_runs_that_queue_go_together_in_order_and_each_gets_its_own_output(batches: Batches) -> None:
    alone = batches.send("mlp", seed=9)  # an idle device: it waits for nobody
    [first] = batches.replies(alone)
    assert first["batch"] == 1 and first["output"]["position"] == 0
    busy = batches.occupy()
    mark = batches.mark()
    keys = [batches.send(seed=10, sleep=0.5, mark=str(mark))] + [batches.send(seed=s) for s in range(11, 16)]
    wait_until(mark.exists, timeout=30)
    with batches.daemon.client() as client:  # the batch runs: status shows its size
        assert client.status()["gpus"][0]["batch"] == 4
    assert "busy, batch of 4 on cpu" in workerctl("--socket", batches.daemon.socket, "status").stdout
    results = batches.replies(busy, *keys)
    assert results[0]["batch"] == 1
    ran = results[1:]
    assert [r["batch"] for r in ran] == [4, 4, 4, 4, 2, 2]  # up to max_batch, oldest first
    assert [r["output"]["position"] for r in ran] == [0, 1, 2, 3, 0, 1]
    assert [r["output"]["seed"] for r in ran] == list(range(10, 16))
    lone = [batches.send("lone", seed=s) for s in range(10, 16)]  # the same inputs, one at a time
    for batched, single in zip(ran, batches.replies(*lone), strict=True):
        assert single["batch"] == 1
        assert batched["output"]["sum"] == pytest.approx(single["output"]["sum"], abs=1e-4)

    with batches.daemon.client() as client:
        sizes = {h["pipeline"]: h for h in client.status()["metrics"]["batch_sizes"]}
        assert sizes["mlp"]["count"] == 3 and sizes["mlp"]["sum"] == 7  # batches of 1, 4 and 2
        assert dict(sizes["mlp"]["buckets"])[2] == 2  # two of them of 2 or fewer
        cached = {p["name"]: p for p in client.memory_status()["gpu"]["pipelines"]}
        assert cached["mlp"]["batch_sizes"] == {"1": 1, "2": 1, "4": 1}


def test_max_wait_ms_waits_only_at_an_idle_device(batches: Batches) -> None:
    started = time.monotonic()
    keys = [batches.send("waits", seed=s) for s in range(3)]
    results = batches.replies(*keys)
    assert [r["batch"] for r in results] == [3, 3, 3]  # held for more, up to 400 ms
    assert time.monotonic() - started >= 0.35
    busy = batches.occupy(0.8)
    queued = [batches.send("waits", seed=s) for s in range(2)]
    waited = time.monotonic()
    results = batches.replies(busy, *queued)
    # They waited behind a busy device: taken as soon as it was free, with no timer on top.
    assert [r["batch"] for r in results[1:]] == [2, 2]
    assert time.monotonic() - waited < 0.8 + 0.35


def test_a_failing_input_fails_only_its_own_request(batches: Batches) -> None:
    reruns = batches.counters().get("pipeline_batch_reruns", 0)
    busy = batches.occupy()
    split = [batches.send(seed=s, fail=s == 21) for s in range(20, 24)]
    broken = [batches.send(seed=s, short=s == 26) for s in range(24, 28)]
    results = batches.replies(busy, *split, *broken)[1:]
    ok = [results[i] for i in (0, 2, 3)]
    assert [r["output"]["seed"] for r in ok] == [20, 22, 23]
    assert all(r["batch"] == 4 and r["reruns"] == 4 for r in ok)  # halves: 4 calls after the first
    assert results[1]["code"] == "TASK_ERROR" and results[1]["message"] == "ValueError: bad input: seed 21"
    # A run_batch that returns too few outputs: every request of that call says so, nothing split.
    for error in results[4:]:
        assert error["code"] == "TASK_ERROR"
        assert "returned 3 outputs for 4 inputs" in error["message"]
    assert batches.counters()["pipeline_batch_reruns"] == reruns + 4


def test_an_output_that_cannot_be_sent_fails_only_its_own_request(batches: Batches) -> None:
    """An output msgpack cannot encode is its request's TASK_ERROR, at once: the batch's other
    requests get their outputs, and the worker goes on (it once lost the whole batch's replies,
    which then timed out, and its worker was killed)."""
    with batches.daemon.client() as client:
        pid = client.status()["gpus"][0]["pid"]
    busy = batches.occupy()
    keys = [batches.send(seed=s, opaque=s == 81) for s in range(80, 83)]
    results = batches.replies(busy, *keys)[1:]
    assert [(r["output"]["seed"], r["batch"]) for r in (results[0], results[2])] == [(80, 3), (82, 3)]
    assert results[1]["code"] == "TASK_ERROR" and "cannot serialize" in results[1]["message"]
    with batches.daemon.client() as client:
        assert client.status()["gpus"][0]["pid"] == pid


def test_max_batch_without_run_batch_answers_each_run_why(batches: Batches) -> None:
    [error] = batches.replies(batches.send("plain", prompt="a cat"))
    assert error["code"] == "UNKNOWN_TASK"
    assert error["message"] == "pipeline 'plain' has max_batch = 4 but no run_batch(model, inputs) function"


def test_a_batched_pipeline_takes_keyword_arguments_only(batches: Batches) -> None:
    key = next(ids)
    batches.counter.send(request(key, "execute", name="mlp", args=[3]))
    [error] = batches.replies(key)
    assert error["code"] == "BAD_REQUEST" and "pass keyword arguments, not args" in error["message"]


def test_a_timeout_inside_a_batch_kills_it_once_and_requeues_the_rest(batches: Batches) -> None:
    with batches.daemon.client() as client:
        pid = client.status()["gpus"][0]["pid"]
    busy = batches.occupy()
    late = batches.send(timeout_s=0.4, seed=30, sleep=3)
    rest = [batches.send(seed=s) for s in (31, 32)]
    timed_out, *others = batches.replies(busy, late, *rest)[1:]
    assert timed_out["code"] == "TIMEOUT" and timed_out["details"]["timeout_s"] == 0.4
    # The others were not failed: queued again, they ran together on the respawned worker.
    assert [(r["output"]["seed"], r["batch"]) for r in others] == [(31, 2), (32, 2)]
    counters = batches.counters()
    assert counters["batch_requeued"] == 2 and counters["pipeline_timeout"] == 1
    with batches.daemon.client() as client:
        status = client.status()
    assert status["gpus"][0]["pid"] != pid
    # Queued again while running: its client's running count went back down (Job.unstart).
    assert status["clients"] and all((c["queued"], c["running"]) == (0, 0) for c in status["clients"])


def test_cancel_reaches_one_run_of_a_batch(batches: Batches) -> None:
    with batches.daemon.client() as client:
        pid = client.status()["gpus"][0]["pid"]
    busy = batches.occupy()
    mark = batches.mark()
    running = [batches.send(seed=40, sleep=1.0, mark=str(mark)), batches.send(seed=41), batches.send(seed=42)]
    wait_until(mark.exists, timeout=30)
    queued = batches.send(seed=43)
    batches.counter.send(request("cancel-running", "cancel", ids=[running[1]], terminate=True))
    batches.counter.send(request("cancel-queued", "cancel", ids=[queued]))
    results = batches.replies(busy, *running, queued, "cancel-running")
    first, cancelled, last, dropped, answer = results[1:]
    assert cancelled["code"] == "CANCELLED" and cancelled["details"]["terminated"] is False
    assert cancelled["message"] == "cancelled by the client (its batch runs on; its output is dropped)"
    assert dropped["code"] == "CANCELLED"
    assert answer["cancelled"] == [running[1]]
    assert [(r["output"]["seed"], r["batch"]) for r in (first, last)] == [(40, 3), (42, 3)]
    with batches.daemon.client() as client:  # the rest of the batch ran on: nothing was killed
        assert client.status()["gpus"][0]["pid"] == pid


def test_a_crash_mid_batch_answers_each_run_once(batches: Batches) -> None:
    busy = batches.occupy()
    keys = [batches.send(seed=50), batches.send(seed=51, crash=True), batches.send(seed=52)]
    results = batches.replies(busy, *keys)[1:]
    assert [r["code"] for r in results] == ["WORKER_LOST"] * 3  # each may have run: none retried


def test_reload_and_stop_wait_for_the_batch(start_daemon: Callable[..., Daemon], tmp_path: Path) -> None:
    daemon = start_daemon(config=batch_config(PIPELINES))
    with daemon.client() as client:
        wait_until(lambda: gpu_idle(client), timeout=60)
        pid = client.status()["gpus"][0]["pid"]
    with Batches(daemon, tmp_path) as batches:
        busy = batches.occupy()
        mark = batches.mark()
        keys = [batches.send(seed=60, sleep=1.0, mark=str(mark))] + [batches.send(seed=s) for s in (61, 62)]
        wait_until(mark.exists, timeout=30)
        daemon.config_path.write_text(batch_config({**PIPELINES, "mlp": {"max_batch": 2}}))
        with daemon.client() as client:
            client.reload()
        # The batch ran to its end; the new max_batch holds from the next batch, on the same worker
        # (tuning it loads no model again).
        assert [r["batch"] for r in batches.replies(busy, *keys)[1:]] == [3, 3, 3]
        mark = batches.mark()
        busy = batches.occupy()
        keys = [batches.send(seed=70, sleep=1.0, mark=str(mark))] + [batches.send(seed=s) for s in (71, 72)]
        wait_until(mark.exists, timeout=30)
        os.kill(daemon.proc.pid, signal.SIGTERM)  # mid-batch: the batch finishes, what waits is refused
        results = batches.replies(busy, *keys)[1:]
        assert [r.get("batch") for r in results[:2]] == [2, 2]
        assert results[2]["code"] == "SHUTTING_DOWN"
        assert daemon.stop() == 0
        log = daemon.log_path.read_text()
        assert f"GPU worker starting (pid {pid})" in log and log.count("GPU worker starting") == 1


def test_one_worker_per_device_batches_on_its_own(
    start_daemon: Callable[..., Daemon], tmp_path: Path
) -> None:
    pinned = {"a": {"max_batch": 4, "devices": [0]}, "b": {"max_batch": 4, "devices": [1]}, "lone": {}}
    daemon = start_daemon(config=batch_config(pinned, "devices = [0, 1]"))
    with daemon.client() as client:
        wait_until(lambda: [g["state"] for g in client.status()["gpus"]] == ["idle", "idle"], timeout=60)
    with Batches(daemon, tmp_path) as batches:
        mark = batches.mark()
        busy = batches.send("a", sleep=0.5, mark=str(mark))
        wait_until(mark.exists, timeout=30)
        queued = [batches.send("a", seed=s) for s in range(3)]
        other = batches.send("b", seed=9)  # device 1 is idle: it runs at once, alone
        results = batches.replies(busy, *queued, other)
        ran = [(r["device"], r["batch"]) for r in results]
        assert ran == [("cpu:0", 1)] + [("cpu:0", 3)] * 3 + [("cpu:1", 1)]
