"""Resource limits under load: memory recycling, result sizes, the queue bound.

- a task that leaks memory gets its worker recycled at max_worker_memory_mb, and no request
  fails for it;
- results over the size limit (plain, streamed, chunked, raw frames) get a clear TASK_ERROR
  and the worker goes on;
- past max_queue, requests get BUSY at once: the queue and the daemon's memory do not grow.
"""

from __future__ import annotations

import os
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import Daemon, wait_until
from tests.reliability.harness import Counter, mib, report, request, rss, scaled, workers_of

TASKS = "workerd.examples.tasks"
ECHO = f"{TASKS}:echo"
LIMIT_TASKS = textwrap.dedent("""
    import os
    import numpy as np

    def big_items(n, size):
        for _ in range(n):
            yield b"x" * size

    def array(size):
        return np.zeros(size, dtype=np.uint8)

    def hold(fifo):
        with open(fifo, "rb") as handle:
            handle.read()
        return os.getpid()
""")


def config(workers: int, extra_daemon: str = "", extra_pool: str = "") -> str:
    return f"""\
[daemon]
stop_timeout_s = 5
{extra_daemon}
[pool]
workers = {workers}
task_timeout_s = 60
{extra_pool}
[tasks]
modules = ["{TASKS}", "limit_tasks"]
[gpu]
enabled = "false"
"""


def start(start_daemon: Callable[..., Daemon], directory: Path, text: str) -> Daemon:
    (directory / "limit_tasks.py").write_text(LIMIT_TASKS)
    return start_daemon(config=text, env={"PYTHONPATH": str(directory)})


@pytest.mark.timeout(scaled(120, 900))
def test_leaking_task_is_recycled_without_a_failed_request(
    start_daemon: Callable[..., Daemon], tmp_path: Path
) -> None:
    limit_mb, leak_mb = 60, 8
    daemon = start(start_daemon, tmp_path, config(2, extra_pool=f"max_worker_memory_mb = {limit_mb}"))
    count = scaled(100, 1_000)
    requests = (
        (n, request(n, "execute", name=f"{TASKS}:leak", kwargs={"mb": leak_mb})) for n in range(count)
    )
    with Counter(daemon.socket) as counter:
        lost = counter.drive(requests, window=4, timeout_s=scaled(100, 800))
    tally = counter.tally
    with daemon.client() as client:
        status = client.status()
        workers = client.memory_status()["workers"]
    recycled = status["counters"].get("recycled_max_memory", 0)
    pids = {
        result["pid"] for result in tally.results.values() if isinstance(result, dict) and "pid" in result
    }
    largest = max(result["leaked_mb"] for result in tally.results.values() if "leaked_mb" in result)
    report(
        "recycling by memory",
        requests=count,
        replies_received=tally.replies,
        requests_lost=len(lost),
        failed=tally.replies - tally.codes["OK"],
        recycled_max_memory=recycled,
        workers_used=len(pids),
        largest_leak_mb=largest,
        uss_now=[mib(w["uss_bytes"]) for w in workers],
    )
    assert not lost and not tally.duplicates()
    assert tally.codes == {"OK": count}
    # A worker is recycled after the task that took it past the limit, so none ever held more
    # than the limit plus one leak (plus what it started with).
    assert largest <= limit_mb + leak_mb
    assert recycled >= count * leak_mb // (limit_mb + leak_mb) - 2
    # The workers that ran tasks: every recycled one, and at most the current pool besides.
    assert recycled <= len(pids) <= recycled + len(workers_of(status))
    assert all(w["uss_bytes"] < (limit_mb + 2 * leak_mb) * 2**20 for w in workers)


@pytest.mark.timeout(scaled(120, 900))
def test_results_over_the_size_limit_get_a_clear_error(
    start_daemon: Callable[..., Daemon], tmp_path: Path
) -> None:
    daemon = start(start_daemon, tmp_path, config(2, extra_daemon="max_message_mb = 1"))
    limit = 1024 * 1024
    rounds = scaled(25, 250)
    with daemon.client() as client:
        pids_before = set(workers_of(client.status()))
    oversized = {
        "plain": lambda n: request(n, "execute", name=f"{TASKS}:payload", args=[2 * limit]),
        "stream": lambda n: request(n, "execute", name="limit_tasks:big_items", args=[3, 2 * limit]),
        "chunk": lambda n: request(n, "execute", name=f"{TASKS}:payload", calls=[[[limit // 2], {}]] * 3),
        "array": lambda n: request(n, "execute", name="limit_tasks:array", args=[2 * limit]),
    }
    kinds = [*oversized, "small"]

    def make(n: int) -> list[bytes]:
        kind = kinds[n % len(kinds)]
        if kind == "small":
            return request(n, "execute", name=ECHO, args=[n])
        return oversized[kind](n)

    with Counter(daemon.socket) as counter:
        lost = counter.drive(((n, make(n)) for n in range(rounds * len(kinds))), window=8, timeout_s=100)
    tally = counter.tally
    report(
        "results over the limit",
        requests=rounds * len(kinds),
        replies_received=tally.replies,
        requests_lost=len(lost),
        stream_items=tally.items,
        codes=dict(tally.codes),
    )
    assert not lost and not tally.duplicates()
    for n, result in tally.results.items():
        if kinds[n % len(kinds)] == "small":
            assert result == n
            continue
        assert result["code"] == "TASK_ERROR", result
        assert "over the 1048576 byte message limit" in result["message"]
        assert result["details"]["type"] == "ResultTooLarge" and result["details"]["limit"] == limit
    assert tally.items == 0  # the first item was already too large: no item went out
    with daemon.client() as client:
        assert set(workers_of(client.status())) == pids_before  # no worker died of it
        assert client.execute(f"{TASKS}:payload", 1000) == b"x" * 1000


@pytest.mark.timeout(scaled(120, 900))
def test_queue_bound_gives_busy_not_growth(start_daemon: Callable[..., Daemon], tmp_path: Path) -> None:
    max_queue = 100
    daemon = start(start_daemon, tmp_path, config(1, extra_daemon=f"max_queue = {max_queue}"))
    fifo = tmp_path / "release.fifo"
    os.mkfifo(fifo)
    release = os.open(fifo, os.O_RDWR)
    flood = scaled(5_000, 50_000)
    try:
        with Counter(daemon.socket) as counter, daemon.client() as client:
            counter.send(request("hold", "execute", name="limit_tasks:hold", args=[str(fifo)]))
            wait_until(lambda: client.status()["pool"]["busy"] == 1)
            rss_before = rss(daemon.proc.pid)
            for n in range(flood):
                counter.send(request(n, "execute", name=ECHO, args=["x" * 1000]))
                if n % 500 == 0:
                    counter.receive(0)
            assert counter.wait_replies(flood - max_queue, timeout_s=60)
            depth = client.status()["queue"]["depth"]
            rss_full = rss(daemon.proc.pid)
            os.close(release)
            release = -1
            assert counter.wait_replies(flood + 1, timeout_s=60)
            counter.settle()
    finally:
        if release >= 0:
            os.close(release)
    tally = counter.tally
    report(
        "queue bound",
        max_queue=max_queue,
        sent=flood + 1,
        replies_received=tally.replies,
        requests_lost=flood + 1 - tally.replies,
        busy=tally.codes["BUSY"],
        ok=tally.codes["OK"],
        queue_depth_at_peak=depth,
        rss_before=mib(rss_before),
        rss_with_full_queue=mib(rss_full),
    )
    assert not tally.duplicates()
    assert set(tally.terminal) == {"hold", *range(flood)}
    assert depth == max_queue
    assert tally.codes == {"OK": max_queue + 1, "BUSY": flood - max_queue}
    # The first max_queue requests were queued; every later one got BUSY.
    assert all(tally.results[n] == "x" * 1000 for n in range(max_queue))
    assert rss_full - rss_before < 10 * 2**20
