"""A leak check: many mixed requests, and the memory and descriptors of every process stay flat.

The mix touches every path a request can take: each command, results and errors, streams, chunks,
raw frames, rejections at the master, bad requests, and connections opened and closed. After a
warm-up (a fifth of the run) the daemon's and each worker's RSS and open descriptors are taken;
at the end they must be where they were, within a small tolerance. No request may be lost.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.conftest import Daemon
from tests.reliability.harness import Counter, fds, mib, report, request, rss, scaled, workers_of
from workerctl import Raw, protocol

TASKS = "workerd.examples.tasks"
ECHO = f"{TASKS}:echo"
CONFIG = f"""\
[daemon]
stop_timeout_s = 5
[pool]
workers = 2
task_timeout_s = 60
[tasks]
modules = ["{TASKS}"]
[gpu]
enabled = "false"
"""
RSS_TOLERANCE = 8 * 2**20
FD_TOLERANCE = 2
# Requests per connection: each segment of the run is a new client connection.
SEGMENT = 2_000


def mixed(n: int) -> tuple[str, list[Any]]:
    """The n-th request of the mix: (its kind, its frames)."""
    kind = n % 16
    if kind in (0, 1):
        return "ping", request(n, "ping")
    if kind == 2:
        return "status", request(n, "status")
    if kind in (3, 4, 5):
        return "echo", request(n, "execute", name=ECHO, args=[n])
    if kind == 6:
        return "echo_10k", request(n, "execute", name=ECHO, args=["y" * 10_000])
    if kind == 7:
        body = protocol.encode_request_frames(n, "execute", {"name": ECHO, "args": [Raw(b"z" * 100_000)]})
        return "raw_100k", [b"", *body]
    if kind == 8:
        return "chunk", request(n, "execute", name=ECHO, calls=[[[i], {}] for i in range(20)])
    if kind == 9:
        return "stream", request(n, "execute", name=f"{TASKS}:count", kwargs={"n": 5})
    if kind == 10:
        return "task_error", request(n, "execute", name=f"{TASKS}:fail")
    if kind == 11:
        return "unknown_task", request(n, "execute", name=f"{TASKS}:absent")
    if kind == 12:
        return "denied", request(n, "execute", name="os:system", args=["true"])
    if kind == 13:
        return "bad_request", [b"", protocol.encode_request(n, "execute", name=ECHO, args={})]
    if kind == 14 and n % 160 == 14:
        return "memory_status", request(n, "memory_status")
    if kind == 14 and n % 1600 == 30:
        return "clear_memory", request(n, "clear_memory", level="gc")
    return "word_lengths", request(n, "execute", name=f"{TASKS}:word_lengths", kwargs={"text": "a bb ccc"})


EXPECTED = {
    "task_error": "TASK_ERROR",
    "unknown_task": "UNKNOWN_TASK",
    "denied": "DENIED",
    "bad_request": "BAD_REQUEST",
}


def snapshot(daemon: Daemon, workers: list[int]) -> dict[str, Any]:
    """RSS and descriptors of the daemon and its workers, once the daemon had time to give
    freed memory back (it trims its heap after a second of idleness)."""
    time.sleep(1.5)
    pid = daemon.proc.pid
    return {
        "daemon_rss": rss(pid),
        "daemon_fds": fds(pid),
        "worker_rss": {w: rss(w) for w in workers},
        "worker_fds": {w: fds(w) for w in workers},
    }


@pytest.mark.timeout(scaled(240, 1800))
def test_memory_and_descriptors_stay_flat(start_daemon: Callable[..., Daemon]) -> None:
    daemon = start_daemon(config=CONFIG)
    total = scaled(10_000, 100_000)
    warm_up = max(total // 5, SEGMENT)
    alive = lambda: daemon.proc.poll() is None  # noqa: E731
    with daemon.client() as client:
        workers = sorted(workers_of(client.status()))
    kinds: dict[int, str] = {}
    tallies = []
    lost: set[Any] = set()
    samples: dict[str, dict[str, Any]] = {}

    def segment(first: int, last: int) -> Iterator[tuple[int, list[Any]]]:
        for n in range(first, last):
            kind, frames = mixed(n)
            kinds[n] = kind
            yield n, frames

    for first in range(0, total, SEGMENT):
        if first == warm_up:
            samples["baseline"] = snapshot(daemon, workers)
        if first == warm_up + (total - warm_up) // 2 // SEGMENT * SEGMENT:
            samples["middle"] = snapshot(daemon, workers)
        with Counter(daemon.socket) as counter:  # a new connection per segment
            lost |= counter.drive(
                segment(first, min(first + SEGMENT, total)), window=64, timeout_s=120, alive=alive
            )
        tallies.append(counter.tally)
    samples["end"] = snapshot(daemon, workers)

    replies = sum(t.replies for t in tallies)
    codes: collections.Counter[str] = collections.Counter()
    for tally in tallies:
        codes.update(tally.codes)
    base, middle, end = samples["baseline"], samples["middle"], samples["end"]
    report(
        "leak check",
        requests=total,
        replies_received=replies,
        requests_lost=len(lost),
        stream_items=sum(t.items for t in tallies),
        connections=len(tallies),
        codes=dict(codes),
        daemon_rss=" -> ".join(mib(s["daemon_rss"]) for s in (base, middle, end)),
        daemon_fds=" -> ".join(str(s["daemon_fds"]) for s in (base, middle, end)),
        worker_rss=" -> ".join(
            "/".join(mib(v) for v in s["worker_rss"].values()) for s in (base, middle, end)
        ),
        worker_fds=" -> ".join(
            "/".join(str(v) for v in s["worker_fds"].values()) for s in (base, middle, end)
        ),
    )
    assert alive(), daemon.output()[-3000:]
    assert not lost, f"{len(lost)} requests lost"
    assert all(not t.duplicates() for t in tallies)
    assert replies == total
    for tally in tallies:
        for n, result in tally.results.items():
            kind = kinds[n]
            if kind in EXPECTED:
                assert result["code"] == EXPECTED[kind], (n, kind, result)
            else:
                assert not (isinstance(result, dict) and set(result) == {"code", "message", "details"}), (
                    n,
                    result,
                )
    assert end["daemon_rss"] - base["daemon_rss"] < RSS_TOLERANCE
    assert abs(end["daemon_fds"] - base["daemon_fds"]) <= FD_TOLERANCE
    with daemon.client() as client:
        assert sorted(workers_of(client.status())) == workers, "a worker was replaced"
    for worker in workers:
        assert end["worker_rss"][worker] - base["worker_rss"][worker] < RSS_TOLERANCE
        assert abs(end["worker_fds"][worker] - base["worker_fds"][worker]) <= FD_TOLERANCE
