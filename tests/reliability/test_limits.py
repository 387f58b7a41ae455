"""Resource limits under load: memory recycling, result sizes, the queue bound.

- a task that leaks memory gets its worker recycled at max_worker_memory_mb, and no request
  fails for it;
- results over the size limit (plain, streamed, chunked, raw frames) get a clear TASK_ERROR
  and the worker goes on;
- past max_queue, requests get BUSY at once: the queue and the daemon's memory do not grow;
- a client that never reads its replies is cut off once they hold 16 x max_message_mb in the
  master, or once 10,000 of them wait (they were dropped silently before, or held for good);
- a message of many frames is whole in the master's memory before any check (libzmq cannot
  bound it); once refused, that memory is given back.
"""

from __future__ import annotations

import os
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import msgpack
import pytest
import zmq

from tests.conftest import Daemon, wait_until
from tests.reliability.harness import Counter, mib, report, request, rss, scaled, workers_of
from workerd import limits

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


class PeakRss:
    """The highest RSS of a process, sampled every 10 ms on a thread while the block runs."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak = rss(pid)

    @contextmanager
    def watching(self) -> Iterator[PeakRss]:
        done = threading.Event()

        def sample() -> None:
            while not done.wait(0.01):
                self.peak = max(self.peak, rss(self.pid))

        thread = threading.Thread(target=sample)
        thread.start()
        try:
            yield self
        finally:
            done.set()
            thread.join()


@contextmanager
def non_reader(path: str) -> Iterator[zmq.Socket[bytes]]:
    """A DEALER whose libzmq stops taking replies after one: a client that never reads."""
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVHWM, 1)
    sock.setsockopt(zmq.RCVBUF, 4096)
    sock.setsockopt(zmq.SNDTIMEO, 10_000)
    sock.connect(f"ipc://{path}")
    try:
        yield sock
    finally:
        sock.close()


def cut_offs(daemon: Daemon) -> int:
    with daemon.client() as client:
        return int(client.status()["counters"].get("clients_cut_off", 0))


@pytest.mark.timeout(scaled(120, 600))
def test_replies_to_a_client_that_never_reads_are_bounded_in_bytes(
    start_daemon: Callable[..., Daemon], tmp_path: Path
) -> None:
    """The review's case at 1/16 scale: 40 replies of 3.5 MB (140 MB) to a client that reads
    none, against a backlog limit of 16 x 4 MiB. Before, the master held all of them."""
    limit_mb = 4
    daemon = start(start_daemon, tmp_path, config(2, extra_daemon=f"max_message_mb = {limit_mb}"))
    budget = limits.BACKLOG_MESSAGES * limit_mb * 2**20
    size, count = 3_500_000, scaled(40, 200)
    base = rss(daemon.proc.pid)
    with PeakRss(daemon.proc.pid).watching() as peak, non_reader(daemon.socket) as sock:
        for n in range(count):
            sock.send_multipart(request(n, "execute", name=f"{TASKS}:payload", args=[size]))
        wait_until(lambda: cut_offs(daemon) == 1, timeout=60)
        # Everyone else is served meanwhile, big results included.
        with daemon.client() as client:
            assert client.execute(f"{TASKS}:payload", size) == b"x" * size
        settled = wait_until(lambda: (now := rss(daemon.proc.pid)) < base + 24 * 2**20 and now, timeout=20)
    report(
        "reply backlog",
        replies_asked=count,
        reply_bytes_asked=mib(count * size),
        backlog_limit=mib(budget),
        clients_cut_off=cut_offs(daemon),
        rss_before=mib(base),
        rss_peak=mib(peak.peak),
        rss_after=mib(settled),
    )
    # The backlog limit, plus replies on their way and what the allocator keeps.
    assert peak.peak - base < budget + 8 * limit_mb * 2**20


@pytest.mark.timeout(scaled(120, 600))
def test_a_client_whose_reply_queue_fills_is_cut_off_not_dropped(
    start_daemon: Callable[..., Daemon], tmp_path: Path
) -> None:
    """Past SNDHWM replies, libzmq used to drop them silently: requests that never end. Now
    the connection is cut, which the client sees as soon as it reads again."""
    daemon = start(start_daemon, tmp_path, config(1))
    pings = limits.CLIENT_SNDHWM + 8_000  # the queue, and what the kernel's buffers take
    with non_reader(daemon.socket) as sock:
        monitor = sock.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        # Once cut, our own queue fills (this client is not reading): a send that waits 0.2 s
        # asks whether the cut came, rather than waiting out the socket's 10 s (a daemon that
        # stops reading without a cut fails below, after 30 s).
        sock.setsockopt(zmq.SNDTIMEO, 200)
        deadline = time.monotonic() + 30
        try:
            sent = 0
            while sent < pings:
                try:
                    sock.send_multipart(request(sent, "ping"))
                    sent += 1
                except zmq.Again:
                    if cut_offs(daemon) or time.monotonic() > deadline:
                        break
            wait_until(lambda: cut_offs(daemon) == 1, timeout=30)
            received = 0
            while sock.poll(200):  # reading again: the replies that made it, then the cut
                msgpack.unpackb(sock.recv_multipart()[1])
                received += 1
            assert monitor.poll(5_000), "the client never saw its connection end"
        finally:
            monitor.close()
    report("reply queue", pings_sent=sent, replies_received=received, clients_cut_off=cut_offs(daemon))
    assert sent >= limits.CLIENT_SNDHWM and received < sent
    with daemon.client() as client:
        assert client.ping()["pid"] == daemon.proc.pid


@pytest.mark.timeout(scaled(120, 600))
def test_a_message_of_many_frames_is_given_back_once_refused(
    start_daemon: Callable[..., Daemon], tmp_path: Path
) -> None:
    """What libzmq cannot bound: ZMQ_MAXMSGSIZE is per frame, and a message is delivered only
    when whole, so its size is in the master's memory before any check. This pins what the
    master does then: refuse it, give the memory back, go on serving."""
    daemon = start(start_daemon, tmp_path, config(1))
    frames, frame = scaled(200, 1000), b"\x00" * 2**20
    base = rss(daemon.proc.pid)
    with PeakRss(daemon.proc.pid).watching() as peak, non_reader(daemon.socket) as sock:
        sock.send_multipart([*request("big", "execute", name=ECHO), *([frame] * frames)], copy=False)
        assert sock.poll(30_000)
        reply = msgpack.unpackb(sock.recv_multipart()[1])
        time.sleep(0.1)
    settled = wait_until(lambda: (now := rss(daemon.proc.pid)) < base + 24 * 2**20 and now, timeout=20)
    report(
        "many frames", frames=frames, rss_before=mib(base), rss_peak=mib(peak.peak), rss_after=mib(settled)
    )
    assert (
        reply["error"]["code"] == "BAD_REQUEST"
        and "over the 67108864 byte message limit" in reply["error"]["message"]
    )
    assert peak.peak - base > frames * 2**20 // 2  # it was all there at once: libzmq's doing
    with daemon.client() as client:
        assert client.execute(ECHO, "still serving") == "still serving"
