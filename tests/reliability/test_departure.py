"""Work dies with its client (issue 20, item 1): a client process killed by a signal leaves no
queue behind it; its running jobs go on, unless its requests asked to die with it.

Real processes throughout: the daemon, and a client process (workerctl.Client) that sends its
requests and is then killed with SIGTERM, SIGHUP or SIGKILL. Nothing in the client says
goodbye: the daemon learns of the departure from its socket alone. Bounds are generous: the
departure is seen within milliseconds, and the tests allow seconds.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Daemon, wait_until
from tests.reliability.harness import Counter
from tests.reliability.test_seams import code, execute, seams_config, wait_for, wait_replies

# `slow(marker, seconds, gate)` writes its marker only once it has run to its end: a job that
# was dropped or killed leaves none. With `gate`, a path, it then runs on until that file exists
# (a minute at most): a running job the test ends when it has seen what it looks for, neither
# before (as a sleep might on a slow machine) nor seconds after.
DEPARTING = """\
import os
import time


def slow(marker, seconds, gate=None):
    time.sleep(seconds)
    deadline = time.monotonic() + 60
    while gate is not None and not os.path.exists(gate) and time.monotonic() < deadline:
        time.sleep(0.01)
    with open(marker, "w") as handle:
        handle.write("done")
    return marker
"""

# Sends `count` requests (the first runs until the gate opens, the rest would run QUEUED_S
# each), says so, and waits to be killed. One Client, one connection: the daemon sees one client.
CLIENT = """\
import signal
import sys
import time

from workerctl import Client

# A client as a terminal starts it: a runner under nohup would have it ignore SIGHUP.
signal.signal(signal.SIGHUP, signal.SIG_DFL)

socket, marker, count, die, gate = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4] == "1", sys.argv[5]
client = Client(socket, timeout=60)
fields = {"die_with_client": True} if die else {}
for n in range(count):
    args = [f"{marker}.{n}", 0, gate] if n == 0 else [f"{marker}.{n}", QUEUED_S]
    client.send("execute", name="departing:slow", args=args, **fields)
print("sent", flush=True)
time.sleep(600)
"""
QUEUED_S = 5.0
JOBS = 12  # one running, one prefetched, ten queued: a minute of work on one worker
SIGNALS = [signal.SIGTERM, signal.SIGHUP, signal.SIGKILL]
GONE_WITHIN_S = 5.0  # measured: the disconnect is seen in about 2 ms


@pytest.fixture
def clients() -> Iterator[list[subprocess.Popen[str]]]:
    started: list[subprocess.Popen[str]] = []
    yield started
    for proc in started:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


def start(start_daemon: Callable[..., Daemon], tmp_path: Path, workers: int = 1) -> Daemon:
    (tmp_path / "departing.py").write_text(DEPARTING)
    config = seams_config(["departing"], workers=workers, prefetch=1)
    return start_daemon(config=config, env={"PYTHONPATH": str(tmp_path)})


def spawn_client(
    clients: list[subprocess.Popen[str]],
    daemon: Daemon,
    marker: Path,
    die: bool,
    gate: Path,
    count: int = JOBS,
) -> subprocess.Popen[str]:
    source = CLIENT.replace("QUEUED_S", repr(QUEUED_S))
    command = [sys.executable, "-c", source, daemon.socket, str(marker), str(count), "1" if die else "0"]
    proc = subprocess.Popen([*command, str(gate)], stdout=subprocess.PIPE, text=True)
    clients.append(proc)
    assert proc.stdout is not None and proc.stdout.readline() == "sent\n"
    return proc


def status(daemon: Daemon) -> dict[str, Any]:
    with daemon.client(timeout=10) as client:
        return client.status()


def busy_pids(daemon: Daemon) -> set[int]:
    return {w["pid"] for w in status(daemon)["pool"]["workers"] if w["state"] == "busy"}


def all_accepted(daemon: Daemon, depth: int, busy: int = 1) -> dict[str, Any] | None:
    """Status once `busy` workers run and `depth` jobs wait or are prefetched."""
    now = status(daemon)
    return now if now["queue"]["depth"] == depth and now["pool"]["busy"] == busy else None


def counter(daemon: Daemon, name: str) -> int:
    return int(status(daemon)["counters"].get(name, 0))


def kill(proc: subprocess.Popen[str], sig: int) -> None:
    proc.send_signal(sig)
    proc.wait(10)
    assert proc.returncode == -sig


def queue_gone(daemon: Daemon) -> bool:
    return bool(status(daemon)["queue"]["depth"] == 0)


@pytest.mark.parametrize("sig", SIGNALS, ids=[s.name for s in SIGNALS])
def test_a_killed_clients_waiting_jobs_are_dropped_and_its_running_job_goes_on(
    start_daemon: Callable[..., Daemon], tmp_path: Path, clients: list[subprocess.Popen[str]], sig: int
) -> None:
    """Twelve slow jobs from one client on one worker (prefetch 1), the client killed: the
    eleven not started go at once (status: nothing waits, departed_dropped 11), with no reply;
    the running one runs to its end (its marker appears) on the same worker. Before: the queue
    went on for a minute after its client."""
    daemon = start(start_daemon, tmp_path)
    marker, gate = tmp_path / "marker", tmp_path / "gate"
    proc = spawn_client(clients, daemon, marker, die=False, gate=gate)
    wait_until(lambda: all_accepted(daemon, JOBS - 1), 20)
    running = busy_pids(daemon)
    kill(proc, sig)
    wait_until(lambda: queue_gone(daemon), GONE_WITHIN_S)
    now = status(daemon)["counters"]
    assert now.get("departed_dropped") == JOBS - 1, now
    assert now.get("clients_departed") == 1, now
    assert "departed_killed" not in now, now
    gate.touch()  # the running job, which outlived its client, may end now
    wait_until(lambda: Path(f"{marker}.0").exists(), 10)
    wait_until(lambda: counter(daemon, "execute_ok") == 1, 5)
    assert {w["pid"] for w in status(daemon)["pool"]["workers"]} == running  # never replaced
    time.sleep(1.0)  # nothing else starts: the dropped jobs are gone for good
    assert not [p for p in tmp_path.glob("marker.*") if p.name != "marker.0"]
    assert status(daemon)["pool"]["busy"] == 0


@pytest.mark.parametrize("sig", SIGNALS, ids=[s.name for s in SIGNALS])
def test_die_with_client_kills_its_running_job_and_replaces_the_worker(
    start_daemon: Callable[..., Daemon], tmp_path: Path, clients: list[subprocess.Popen[str]], sig: int
) -> None:
    """The same with `die_with_client: true` on every request: the running job's worker is
    killed (departed_killed 1) and replaced, so its task never reaches its end (no marker)."""
    daemon = start(start_daemon, tmp_path)
    marker, gate = tmp_path / "marker", tmp_path / "gate"
    proc = spawn_client(clients, daemon, marker, die=True, gate=gate)
    wait_until(lambda: all_accepted(daemon, JOBS - 1), 20)
    running = busy_pids(daemon)
    kill(proc, sig)
    wait_until(lambda: queue_gone(daemon) and counter(daemon, "departed_killed") == 1, GONE_WITHIN_S)
    assert counter(daemon, "departed_dropped") == JOBS - 1

    def replaced() -> bool:
        workers = status(daemon)["pool"]["workers"]
        pids = {w["pid"] for w in workers if w["state"] == "idle"}
        return len(pids) == 1 and not pids & running

    wait_until(replaced, 20)
    gate.touch()
    time.sleep(0.5)  # past the end the killed task would have reached, the gate open
    assert not list(tmp_path.glob("marker.*"))
    assert counter(daemon, "execute_ok") == 0


def test_another_clients_jobs_are_untouched(
    start_daemon: Callable[..., Daemon], tmp_path: Path, clients: list[subprocess.Popen[str]]
) -> None:
    """Two workers. Another client (here, a DEALER of the test's own) has one job running and
    three waiting behind the departing client's, which asked to die with it and runs one.
    Killed, its jobs go, its worker is killed; the other's running job finishes on the worker it
    ran on and its three waiting ones run, each answered once."""
    daemon = start(start_daemon, tmp_path, workers=2)
    mine, gate = tmp_path / "mine", tmp_path / "gate"
    with Counter(daemon.socket) as other:
        other.send(execute("running", "departing:slow", f"{mine}.running", 0, str(gate)))
        wait_until(lambda: status(daemon)["pool"]["busy"] == 1, 10)
        other_pid = busy_pids(daemon)
        proc = spawn_client(clients, daemon, tmp_path / "marker", die=True, gate=gate)
        # Both busy, the departing client's first job on the other worker; one prefetched each.
        wait_until(lambda: all_accepted(daemon, JOBS - 1, busy=2), 20)
        waiting = [f"waiting{n}" for n in range(3)]
        for name in waiting:
            other.send(execute(name, "departing:slow", f"{mine}.{name}", 0.1))
        wait_until(lambda: all_accepted(daemon, JOBS - 1 + 3, busy=2), 20)
        kill(proc, signal.SIGKILL)
        wait_until(lambda: counter(daemon, "departed_killed") == 1, GONE_WITHIN_S)
        gate.touch()  # the other's running job, which went on, may end now
        wait_replies(other, 4, 20)
        assert {code(other, n) for n in ["running", *waiting]} == {"OK"}, other.tally.results
        assert wait_for(other, "running") == f"{mine}.running"
        assert not other.tally.duplicates()
    now = status(daemon)
    assert now["counters"].get("departed_dropped") == JOBS - 1, now["counters"]
    assert other_pid <= {w["pid"] for w in now["pool"]["workers"]}  # the other's worker lived on
    assert not list(tmp_path.glob("marker.*"))
    assert now["queue"]["depth"] == 0


def test_a_bad_die_with_client_is_refused(start_daemon: Callable[..., Daemon], tmp_path: Path) -> None:
    daemon = start(start_daemon, tmp_path)
    with Counter(daemon.socket) as counter_:
        counter_.send(execute(1, "departing:slow", str(tmp_path / "x"), 0.0, die_with_client="yes"))
        reply = wait_for(counter_, 1)
    assert isinstance(reply, dict) and reply.get("code") == "BAD_REQUEST", reply
    assert "die_with_client" in reply["message"], reply


def test_a_client_that_closes_its_socket_has_departed_too(
    start_daemon: Callable[..., Daemon], tmp_path: Path
) -> None:
    """No signal: a DEALER that sends and closes (nobody can read its replies any more). Its
    job running goes on; the rest are dropped."""
    daemon = start(start_daemon, tmp_path)
    with Counter(daemon.socket) as leaving:
        for n in range(JOBS):
            leaving.send(execute(n, "departing:slow", str(tmp_path / f"marker.{n}"), 1.0 if n == 0 else 5.0))
        wait_until(lambda: all_accepted(daemon, JOBS - 1), 20)
    wait_until(lambda: queue_gone(daemon), GONE_WITHIN_S)
    assert counter(daemon, "departed_dropped") == JOBS - 1
    wait_until(lambda: counter(daemon, "execute_ok") == 1, 10)
    assert (tmp_path / "marker.0").exists()


# The same client as a workerctl.Executor: its calls die with it, the running one too.
EXECUTOR_CLIENT = """\
import sys
import time

from workerctl import Executor

socket, marker, gate = sys.argv[1], sys.argv[2], sys.argv[3]
executor = Executor(socket)
futures = [executor.submit("departing:slow", f"{marker}.0", 0, gate)]
futures += [executor.submit("departing:slow", f"{marker}.{n}", 5.0) for n in range(1, 4)]
while not futures[0].running():
    time.sleep(0.01)
print("sent", flush=True)
time.sleep(600)
"""


def test_an_executors_calls_die_with_its_process(
    start_daemon: Callable[..., Daemon], tmp_path: Path, clients: list[subprocess.Popen[str]]
) -> None:
    """A process using workerctl.Executor is SIGKILLed with a call running and three waiting:
    the Executor asks for die_with_client, so the running call's worker is killed too and no
    call reaches its end, as a ProcessPoolExecutor's workers die with their parent."""
    daemon = start(start_daemon, tmp_path)
    marker, gate = tmp_path / "marker", tmp_path / "gate"
    command = [sys.executable, "-c", EXECUTOR_CLIENT, daemon.socket, str(marker), str(gate)]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    clients.append(proc)
    assert proc.stdout is not None and proc.stdout.readline() == "sent\n"
    kill(proc, signal.SIGKILL)
    wait_until(lambda: queue_gone(daemon) and counter(daemon, "departed_killed") == 1, GONE_WITHIN_S)
    gate.touch()
    time.sleep(0.5)  # past the end the killed call would have reached, the gate open
    assert not list(tmp_path.glob("marker.*"))
