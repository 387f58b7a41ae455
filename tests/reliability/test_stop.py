"""Stop and restart under load: SIGTERM with requests running and many more queued.

- the requests running finish with their results; the queued ones, and any sent during the
  stop, get SHUTTING_DOWN; every request gets exactly one terminal reply;
- the daemon sends STOPPING=1 (to a real datagram socket standing in for systemd's) and exits 0
  within its grace period;
- clients that were connected (a workerctl.Client and a bare DEALER) work with a restarted
  daemon on the same socket without being restarted themselves.
"""

from __future__ import annotations

import os
import signal
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Daemon, wait_until
from tests.integration.test_systemd import NotifySocket
from tests.reliability.harness import Counter, report, request, scaled
from workerctl import Client

ECHO = "workerd.examples.tasks:echo"
STOP_TIMEOUT_S = 30
# Runs until the test lets it go: it blocks reading a FIFO until the last writer (the test)
# closes it. No polling, so a hundred of them cost nothing while they wait.
STOP_TASKS = textwrap.dedent("""
    import os

    def hold(fifo):
        with open(fifo, "rb") as handle:
            handle.read()
        return os.getpid()
""")


def config(workers: int, queue: int) -> str:
    return f"""\
[daemon]
stop_timeout_s = {STOP_TIMEOUT_S}
max_queue = {queue}
[pool]
workers = {workers}
task_timeout_s = 120
[tasks]
modules = ["workerd.examples.tasks", "stop_tasks"]
[gpu]
enabled = "false"
"""


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[NotifySocket]:
    listener = NotifySocket(tmp_path / "notify.sock")
    yield listener
    listener.close()


@pytest.mark.timeout(scaled(180, 900))
def test_sigterm_under_load_then_clients_reconnect(
    start_daemon: Callable[..., Daemon], tmp_path: Path, notify_socket: NotifySocket
) -> None:
    running, queued, late = scaled(100, 200), scaled(1_000, 5_000), scaled(50, 500)
    (tmp_path / "stop_tasks.py").write_text(STOP_TASKS)
    fifo = tmp_path / "release.fifo"
    os.mkfifo(fifo)
    # Held open for writing (and reading, so that opening it never blocks): the holds block in
    # read() until this descriptor closes.
    release = os.open(fifo, os.O_RDWR)
    env = {"PYTHONPATH": str(tmp_path), "NOTIFY_SOCKET": notify_socket.path}
    text = config(workers=running, queue=running + queued)
    daemon = start_daemon(config=text, env=env)
    try:
        with Counter(daemon.socket) as counter, Client(daemon.socket, timeout=60) as client:
            for n in range(running):
                counter.send(request(f"run:{n}", "execute", name="stop_tasks:hold", args=[str(fifo)]))
            wait_until(lambda: client.status()["pool"]["busy"] == running, timeout=60)
            for n in range(queued):
                counter.send(request(f"queued:{n}", "execute", name=ECHO, args=[n]))
            wait_until(lambda: client.status()["queue"]["depth"] == queued, timeout=60)
            assert counter.tally.replies == 0

            mark = len(notify_socket.snapshot())
            daemon.proc.send_signal(signal.SIGTERM)
            stopping = notify_socket.wait_for("STOPPING=1", after=mark)
            for n in range(late):  # sent during the stop: refused, not queued
                counter.send(request(f"late:{n}", "execute", name=ECHO, args=[n]))
            assert counter.wait_replies(queued + late, timeout_s=60)
            assert daemon.proc.poll() is None, "exited with requests still running"
            os.close(release)
            release = -1
            started = time.monotonic()
            assert daemon.proc.wait(STOP_TIMEOUT_S + 10) == 0
            exit_s = time.monotonic() - started
            counter.settle()
            tally = counter.tally

            # The same clients, a daemon restarted on the same socket.
            second = start_daemon(config=text, env={"PYTHONPATH": str(tmp_path)}, socket=daemon.socket)
            assert client.ping()["pid"] == second.proc.pid
            assert client.execute(ECHO, "again") == "again"
            counter.send(request("after", "ping"))
            assert counter.wait_replies(running + queued + late + 1, timeout_s=30)
    finally:
        if release >= 0:
            os.close(release)

    def codes(kind: str) -> dict[str, int]:
        found: dict[str, int] = {}
        for key, result in tally.results.items():
            if isinstance(key, str) and key.startswith(f"{kind}:"):
                code = result["code"] if isinstance(result, dict) and "code" in result else "OK"
                found[code] = found.get(code, 0) + 1
        return found

    report(
        "stop under load",
        running=running,
        queued=queued,
        sent_during_stop=late,
        replies_received=tally.replies,
        requests_lost=running + queued + late + 1 - tally.replies,
        duplicates=len(tally.duplicates()),
        running_codes=codes("run"),
        queued_codes=codes("queued"),
        late_codes=codes("late"),
        exit_after_release_s=round(exit_s, 2),
    )
    expected: set[Any] = {f"run:{n}" for n in range(running)} | {"after"}
    expected |= {f"queued:{n}" for n in range(queued)} | {f"late:{n}" for n in range(late)}
    assert set(tally.terminal) == expected
    assert not tally.duplicates()
    assert codes("run") == {"OK": running}
    assert codes("queued") == {"SHUTTING_DOWN": queued}
    assert codes("late") == {"SHUTTING_DOWN": late}
    assert tally.results["after"]["pid"] == second.proc.pid
    # Every datagram came from the daemon itself, and none said READY after STOPPING.
    messages = notify_socket.snapshot()
    assert {pid for _, pid, _ in messages} == {daemon.proc.pid}
    assert not any("READY=1" in lines for _, _, lines in messages[stopping:])


def test_an_idle_client_goes_on_with_a_restarted_daemon(start_daemon: Callable[..., Daemon]) -> None:
    """Regression: a Client with nothing in flight when the daemon stopped took in the news of
    the lost connection only after registering its next request, and failed that request with
    ConnectionLost before sending it."""
    first = start_daemon(workers=1)
    with Client(first.socket, timeout=30) as client:
        assert client.ping()["pid"] == first.proc.pid
        first.proc.send_signal(signal.SIGTERM)
        assert first.proc.wait(20) == 0
        second = start_daemon(workers=1, socket=first.socket)
        assert client.ping()["pid"] == second.proc.pid
        assert client.map(ECHO, range(10)) == list(range(10))
