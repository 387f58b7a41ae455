"""The seams of the shared backend layer (issue 18, item 3): the kill window, the stop drain, the
back-off, fan-outs and cancel, each once for every backend it holds for, against the real daemon.

Same rules as test_seams.py, whose helpers these tests use: replies are counted at the wire, and
a test listens a while after the last reply it expects, so a late second reply fails it.
"""

from __future__ import annotations

import os
import random
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Daemon, wait_until
from tests.reliability.harness import Counter, report, request, workers_of
from tests.reliability.test_seams import (
    code,
    exactly_once,
    execute,
    idle_cpu,
    pipeline_config,
    seams_config,
    start_seams,
    wait_for,
    wait_replies,
)


def with_pool(config: str, **keys: Any) -> str:
    """A seams config with more [pool] keys."""
    extra = "".join(f"{key} = {value}\n" for key, value in keys.items())
    return config.replace("[pool]\n", "[pool]\n" + extra, 1)


# -- the kill window (3a, 3b) ------------------------------------------------------------------


def test_a_timeout_whose_worker_finishes_and_recycles_in_the_kill_window(
    start_daemon: Callable[..., Daemon], tmp_path: Path
) -> None:
    """max_tasks_per_worker = 1 and a task of 0.55 s with timeout_s 0.5: the task ends inside
    its kill window, and its worker then recycles and exits on its own. Every request gets
    exactly one reply, TIMEOUT (5 in 10 got none: the recycle turned "killing" into "stopping"
    and the TIMEOUT owed by the kill was never sent)."""
    config = with_pool(seams_config(["moda"], workers=2), max_tasks_per_worker=1)
    daemon = start_seams(start_daemon, tmp_path, config)
    ids = set(range(10))
    with Counter(daemon.socket) as counter:
        for n in ids:
            counter.send(execute(n, "moda:sleep", 0.55, timeout_s=0.5))
        wait_replies(counter, len(ids), 30)
        exactly_once(counter, ids)
        assert {code(counter, n) for n in ids} == {"TIMEOUT"}, counter.tally.results


def busy(status: dict[str, Any], cpu: bool) -> bool:
    """Is the one CPU worker (or the GPU worker) running something?"""
    return bool(status["pool"]["busy"] == 1 if cpu else status["gpu"]["state"] == "busy")


@pytest.mark.parametrize("side", ["cpu", "gpu"])
def test_a_stop_inside_a_timeout(start_daemon: Callable[..., Daemon], tmp_path: Path, side: str) -> None:
    """SIGTERM 0.2 s into a task (or a pipeline run, on the CPU device) of 0.55 s with timeout_s
    0.5: the stop lets it run, its timeout ends, it finishes inside the kill window and exits as
    told: TIMEOUT, once (it got no reply: the result was dropped for the TIMEOUT, and the TIMEOUT
    for the exit)."""
    cpu = side == "cpu"
    config = seams_config(["moda"]) if cpu else pipeline_config(tmp_path)
    daemon = start_seams(start_daemon, tmp_path, config)
    with Counter(daemon.socket) as counter, daemon.client(timeout=60) as client:
        if cpu:
            counter.send(execute("late", "moda:sleep", 0.55, timeout_s=0.5))
        else:
            assert client.execute("p")["output"]["pid"] > 0  # loaded: the next run starts at once
            counter.send(execute("late", "p", kwargs={"sleep": 0.55}, timeout_s=0.5))
        wait_until(lambda: busy(client.status(), cpu))
        time.sleep(0.2)
        daemon.proc.send_signal(signal.SIGTERM)
        wait_for(counter, "late")
        exactly_once(counter, {"late"})
        assert code(counter, "late") == "TIMEOUT", counter.tally.results
    assert daemon.proc.wait(timeout=30) == 0


# -- the stop and a pending back-off (3d) ------------------------------------------------------


def test_stop_while_the_bridge_backs_off(start_daemon: Callable[..., Daemon], tmp_path: Path) -> None:
    """The Ray bridge cannot be spawned (every spawn after the zygote's refused), so it backs
    off; a stop comes while a CPU task still runs. The master must sleep through the grace
    period, not poll at 0 ms on the back-off that came due and will never be acted on."""
    config = seams_config(["moda"]) + '[cluster]\nengine = "ray"\naddress = "local"\nmode = "overflow"\n'
    daemon = start_seams(start_daemon, tmp_path, config, env={"WORKERD_FAULTS": "spawn=EAGAIN:1000@1"})
    hold = tmp_path / "hold"
    with Counter(daemon.socket) as counter:
        wait_until(lambda: "cannot start the Ray bridge" in daemon.output())
        counter.send(execute("held", "moda:hold", str(hold)))
        wait_until(lambda: Path(str(hold) + ".started").exists())
        daemon.proc.send_signal(signal.SIGTERM)
        wait_until(lambda: "stopping" in daemon.output())
        # The retries were due 1 s and 3 s after boot (1 s, then 2 s): measure past both, inside
        # the 5 s grace period the held task keeps open.
        time.sleep(3.0)
        share = idle_cpu(daemon.proc.pid)
        hold.touch()
        wait_for(counter, "held")
        exactly_once(counter, {"held"})
        assert counter.tally.results["held"] == "released"
    report("stop during a bridge back-off: master CPU share", share=f"{share:.3f}")
    assert share < 0.2, share
    assert daemon.proc.wait(timeout=30) == 0


# -- a fan-out and a worker that leaves (3f) ---------------------------------------------------


def test_clear_memory_while_a_worker_recycles(start_daemon: Callable[..., Daemon], tmp_path: Path) -> None:
    """clear_memory(gc) reaches a busy worker that recycles after its task without reading it:
    the answer comes once the worker is gone, naming it skipped, not after the 10 s fan-out
    timeout (a fan-out with nobody left to answer is answered at once)."""
    # Over 1 MB of private memory after every task, as every worker is: it always recycles
    # (max_tasks_per_worker = 1 may allow 2, by its jitter).
    config = with_pool(seams_config(["moda"]), max_worker_memory_mb=1)
    daemon = start_seams(start_daemon, tmp_path, config)
    hold = tmp_path / "hold"
    with Counter(daemon.socket) as counter, daemon.client() as client:
        worker = workers_of(client.status())[0]
        counter.send(execute("held", "moda:hold", str(hold)))
        wait_until(lambda: Path(str(hold) + ".started").exists())
        counter.send(request("clear", "clear_memory", level="gc"))
        time.sleep(0.2)  # the gc ask is written to the busy worker
        hold.touch()
        asked = time.monotonic()
        answer = wait_for(counter, "clear", 20)
        waited = time.monotonic() - asked
        exactly_once(counter, {"held", "clear"})
    report("clear_memory across a recycle", waited_s=f"{waited:.2f}")
    assert {"pid": worker, "skipped": "gone"} in answer["workers"], answer
    assert waited < 5.0, waited  # FANOUT_WAIT_S is 10 s: the answer did not wait for it


# -- cancel says what will happen (3e) ---------------------------------------------------------


@pytest.mark.parametrize("terminate", [False, True])
def test_cancel_storm_lists_say_what_happens(
    start_daemon: Callable[..., Daemon], tmp_path: Path, terminate: bool
) -> None:
    """Short tasks on two workers with prefetch 2, and a cancel of a recent request after every
    few sends. Whatever the race with the workers, each cancel's lists say what happened:
    "cancelled" ids got CANCELLED before the cancel's reply; "running" ids ran to a reply of
    their own (never CANCELLED), and there are none with terminate; "unknown" ids had been
    answered before the cancel's reply. Every request gets exactly one reply. (Seen: "running"
    for requests then answered CANCELLED, and "running" with terminate.)"""
    daemon = start_seams(start_daemon, tmp_path, seams_config(["moda"], workers=2, prefetch=2))
    seed = int(os.environ.get("WORKERD_CHAOS_SEED", random.randrange(2**32)))
    rng = random.Random(seed)
    count = 240
    order: list[Any] = []  # terminal replies, in the order they arrived
    cancels: dict[str, list[int]] = {}
    with Counter(daemon.socket) as counter:
        for n in range(count):
            counter.send(execute(n, "moda:sleep", rng.choice((0.0, 0.005, 0.02))))
            if n % 4 == 3:  # one of the last four, each id at most once: one cancel, one fate
                ids = [rng.randrange(n - 3, n + 1)]
                counter.send(request(f"cancel-{n}", "cancel", ids=ids, terminate=terminate))
                cancels[f"cancel-{n}"] = ids
            # About six in flight: most are running or prefetched when a cancel comes, where
            # the races are, rather than queued.
            while counter.sent - counter.tally.replies > 6:
                order += counter.receive(0.05)
        deadline = time.monotonic() + 60
        while counter.tally.replies < counter.sent and time.monotonic() < deadline:
            order += counter.receive(0.1)
        exactly_once(counter, set(range(count)) | set(cancels))
    results, position = counter.tally.results, {key: i for i, key in enumerate(order)}
    listed = {"cancelled": 0, "running": 0, "unknown": 0}
    for key in cancels:
        lists = results[key]
        for fate in listed:
            listed[fate] += len(lists[fate])
        for n in lists["cancelled"]:
            assert code(counter, n) == "CANCELLED" and position[n] < position[key], (seed, key, n, results[n])
        for n in lists["running"]:
            assert not terminate, (seed, key, lists)
            assert code(counter, n) != "CANCELLED", (seed, key, n, results[n])
        for n in lists["unknown"]:
            assert position[n] < position[key] and code(counter, n) != "CANCELLED", (seed, key, n, results[n])
    uncancelled = set(range(count)) - {n for key in cancels for n in results[key]["cancelled"]}
    assert {code(counter, n) for n in uncancelled} == {"OK"}, seed
    report(f"cancel storm, terminate={terminate}", seed=seed, **listed)
    assert listed["cancelled"] > 0, "no cancel landed: the storm proves nothing"
