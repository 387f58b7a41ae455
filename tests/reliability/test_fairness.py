"""Fair share between clients, with a real daemon and real clients running as distinct uids.

Each client is a process started through `setpriv --reuid=UID` (uids with no passwd entry: the
kernel's credentials are all the daemon reads), talking over its own DEALER sockets and counting
every reply at the wire (harness.Counter), so that "exactly one terminal reply" is checked
where a second one would show. The task stamps when a worker started it (CLOCK_MONOTONIC is one
clock for every process on the machine), which gives the order of starts and each wait.

Needs root and setpriv; skipped otherwise.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Daemon, wait_until
from tests.reliability.harness import report
from workerctl import errors

pytestmark = pytest.mark.skipif(
    os.getuid() != 0 or not shutil.which("setpriv"), reason="needs root and setpriv to act as other users"
)

ALICE, BOB = 40101, 40102  # no passwd entries: clients are told apart by uid alone
REPO = str(Path(__file__).resolve().parents[2])

TASKS = '''
import time


def stamp(tag: str, seconds: float = 0.0, log: str = "") -> dict:
    """When a worker started this call (one monotonic clock for every process); each run is
    written to `log` too, if given (a job that ran twice shows there, whatever was replied)."""
    start = time.monotonic()
    if log:
        with open(log, "a") as runs:
            print(tag, file=runs)
    time.sleep(seconds)
    return {"tag": tag, "start": start}
'''

CONFIG = """\
[daemon]
stop_timeout_s = {stop}

[pool]
workers = {workers}
prefetch = {prefetch}
max_queue_per_client = {per_client}

[tasks]
modules = ["fairtasks"]
path = ["{tasks}"]

[gpu]
enabled = "false"

[fairness]
identity = "{identity}"
weights = {{{weights}}}
max_priority = {{{caps}}}
"""

# A client: sends its requests (spread over `connections` sockets, `gap_s` apart), then counts
# every reply until each request has one terminal reply and nothing more comes.
CLIENT = textwrap.dedent(
    """
    import json, sys, time
    from tests.reliability.harness import Counter, request

    path, spec = sys.argv[1], json.loads(sys.argv[2])
    counters = [Counter(path) for _ in range(spec.get("connections", 1))]
    sent = {}
    for n, (key, tag, seconds, priority) in enumerate(spec["requests"]):
        fields = {"name": "fairtasks:stamp", "args": [tag, seconds, spec.get("log", "")], "kwargs": {}}
        if priority:
            fields["priority"] = priority
        sent[key] = time.monotonic()
        counters[n % len(counters)].send(request(key, "execute", **fields))
        if spec.get("gap_s"):
            time.sleep(spec["gap_s"])
            for counter in counters:
                counter.receive(0)
    deadline = time.monotonic() + spec.get("timeout_s", 60)
    while sum(c.tally.replies for c in counters) < len(sent) and time.monotonic() < deadline:
        for counter in counters:
            counter.receive(0.05)
    for counter in counters:
        counter.settle(0.3)
    out = {}
    for counter in counters:
        for key, count in counter.tally.terminal.items():
            out[key] = {"replies": count, "result": counter.tally.results.get(key), "sent": sent.get(key)}
    print(json.dumps(out))
    """
)


class Fair:
    """One daemon with the test's task module, and clients started as other uids."""

    def __init__(self, start: Callable[..., Daemon], directory: Path, **settings: Any) -> None:
        (directory / "fairtasks.py").write_text(TASKS)
        options = {"stop": 10, "workers": 1, "prefetch": 0, "per_client": 0, "identity": "uid"}
        options |= {"weights": "", "caps": ""}
        options.update(settings)
        self.sockets = tempfile.mkdtemp(prefix="workerd-fair-")
        os.chmod(self.sockets, 0o755)  # the socket's own mode (0660, group root) admits our clients
        config = CONFIG.format(tasks=directory, **options)
        self.daemon = start(config=config, socket=os.path.join(self.sockets, "workerd.sock"))
        self.clients: list[subprocess.Popen[str]] = []

    def client(
        self, uid: int, requests: list[tuple[Any, ...]], cgroup: Path | None = None, **spec: Any
    ) -> subprocess.Popen[str]:
        """Start a client as `uid` sending (id, tag, seconds, priority) requests; in `cgroup`
        (of systemd's hierarchy) if given, moved there before it drops root."""
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "PYTHONPATH": os.pathsep.join(filter(None, [os.environ.get("PYTHONPATH"), REPO])),
            "PYTHONDONTWRITEBYTECODE": "1",
            "HOME": "/",
        }
        command = ["setpriv", f"--reuid={uid}", "--regid=0", "--clear-groups", sys.executable, "-c", CLIENT]
        if cgroup is not None:
            command = ["sh", "-c", f'echo $$ > {cgroup}/cgroup.procs && exec "$@"', "sh", *command]
        spec = {"requests": requests, **spec}
        arguments = [*command, self.daemon.socket, json.dumps(spec)]
        process = subprocess.Popen(arguments, stdout=subprocess.PIPE, text=True, env=env, cwd="/")
        self.clients.append(process)
        return process

    def status(self) -> dict[str, Any]:
        with self.daemon.client() as client:
            return client.status()

    def clients_status(self) -> dict[str, dict[str, Any]]:
        return {entry["client"]: entry for entry in self.status()["clients"]}

    def wait_queued(self, name: str, count: int) -> None:
        wait_until(lambda: self.clients_status().get(name, {}).get("queued", 0) >= count, timeout=30)

    def close(self) -> None:
        for process in self.clients:
            if process.poll() is None:
                process.kill()
                process.wait()
        shutil.rmtree(self.sockets, ignore_errors=True)


def results(process: subprocess.Popen[str], timeout: float = 90) -> dict[str, dict[str, Any]]:
    out, _ = process.communicate(timeout=timeout)
    assert process.returncode == 0, out
    answered: dict[str, dict[str, Any]] = json.loads(out)
    assert all(entry["replies"] == 1 for entry in answered.values()), answered
    return answered


@pytest.fixture
def fair(start_daemon: Callable[..., Daemon], tmp_path: Path) -> Iterator[Callable[..., Fair]]:
    made: list[Fair] = []

    def make(**settings: Any) -> Fair:
        made.append(Fair(start_daemon, tmp_path, **settings))
        return made[-1]

    yield make
    for each in made:
        each.close()


def start_order(*answers: dict[str, dict[str, Any]]) -> list[str]:
    ok = [entry["result"] for answer in answers for entry in answer.values() if "tag" in entry["result"]]
    return [result["tag"] for result in sorted(ok, key=lambda result: result["start"])]


def test_a_trickle_waits_for_one_running_task_not_behind_a_flood(fair: Callable[..., Fair]) -> None:
    """2 workers holding 4 jobs ahead each (the default prefetch): a flood of 50 ms tasks, and
    another client's request every 100 ms. FIFO would make each wait for the whole flood."""
    setup = fair(workers=2, prefetch=4)
    log = str(setup.daemon.directory / "runs.log")  # written by the workers (the daemon's user)
    flood = setup.client(ALICE, [(n, f"a{n}", 0.05, 0) for n in range(100)], timeout_s=60, log=log)
    setup.wait_queued(f"uid:{ALICE}", 60)
    trickle = setup.client(BOB, [(n, f"b{n}", 0.0, 0) for n in range(6)], gap_s=0.1, log=log)
    bob = results(trickle)
    waits = sorted(entry["result"]["start"] - entry["sent"] for entry in bob.values())
    alice = results(flood)
    assert len(alice) == 100 and all(entry["result"]["tag"].startswith("a") for entry in alice.values())
    runs = Path(log).read_text().split()
    assert len(runs) == len(set(runs)) == 106, sorted(tag for tag in set(runs) if runs.count(tag) > 1)
    report("trickle_beside_flood", bob_waits_ms=[round(w * 1000) for w in waits])
    # One 50 ms task to wait for at most (plus a loaded machine's slack); behind the flood each
    # would have waited seconds (60+ queued x 50 ms / 2 workers).
    assert waits[-1] < 0.35, waits
    assert statistics.median(waits) < 0.12, waits
    after = setup.clients_status()
    assert after[f"uid:{ALICE}"]["completed"] == 100 and after[f"uid:{BOB}"]["completed"] == 6
    assert setup.status()["counters"].get("prefetch_yielded", 0) >= 1


def test_weights_count_per_client_not_per_connection(fair: Callable[..., Fair]) -> None:
    """One worker, held by a first task while both queue: alice (weight 3, over 3 connections)
    and bob (weight 1, one) then start in turns of 3 and 1, not 9 and 1."""
    setup = fair(weights=f'"uid:{ALICE}" = 3')
    blocker = setup.client(BOB, [("hold", "hold", 0.6, 0)])
    wait_until(lambda: setup.clients_status().get(f"uid:{BOB}", {}).get("running"))
    alice = setup.client(ALICE, [(n, "a", 0.0, 0) for n in range(24)], connections=3)
    setup.wait_queued(f"uid:{ALICE}", 24)
    bob = setup.client(BOB, [(n, "b", 0.0, 0) for n in range(8)])
    setup.wait_queued(f"uid:{BOB}", 8)
    shown = setup.clients_status()
    assert (shown[f"uid:{ALICE}"]["weight"], shown[f"uid:{ALICE}"]["share"]) == (3, 0.75)
    order = start_order(results(alice), results(bob), results(blocker))
    assert order[0] == "hold"
    assert "".join(order[1:]) == "aaab" * 8, order


def test_priority_orders_a_clients_own_jobs_and_passes_others_only_as_granted(
    fair: Callable[..., Fair],
) -> None:
    """alice may not pass anyone (max_priority 0, the default) but orders her own jobs; bob is
    granted 5. Held behind a first task, the queue then starts: bob's 5 (level 5), then by turns
    at level 0: alice's 9 (first among hers), bob's 0, alice's 0s, and alice's -2 last of hers."""
    setup = fair(caps=f'"uid:{BOB}" = 5')
    blocker = setup.client(ALICE, [("hold", "hold", 0.6, 0)])
    wait_until(lambda: setup.clients_status().get(f"uid:{ALICE}", {}).get("running"))
    mine = [(1, "a0", 0.0, 0), (2, "a-2", 0.0, -2), (3, "a0", 0.0, 0), (4, "a9", 0.0, 9)]
    alice = setup.client(ALICE, mine)
    setup.wait_queued(f"uid:{ALICE}", 4)
    bob = setup.client(BOB, [(1, "b0", 0.0, 0), (2, "b5", 0.0, 5)])
    setup.wait_queued(f"uid:{BOB}", 2)
    order = start_order(results(alice), results(bob), results(blocker))
    assert order == ["hold", "b5", "a9", "b0", "a0", "a0", "a-2"], order


def test_a_client_past_its_own_limit_is_busy_while_others_get_in(fair: Callable[..., Fair]) -> None:
    setup = fair(per_client=3)
    alice = setup.client(ALICE, [(n, f"a{n}", 0.3, 0) for n in range(5)])  # 1 runs, 3 wait, 1 BUSY
    setup.wait_queued(f"uid:{ALICE}", 3)
    bob = setup.client(BOB, [(1, "b", 0.0, 0)])
    answered_bob = results(bob)
    answered = results(alice)
    busy = [entry["result"] for entry in answered.values() if "code" in entry["result"]]
    assert len(busy) == 1 and busy[0]["code"] == "BUSY", answered
    assert f"uid:{ALICE}" in busy[0]["message"] and "max_queue_per_client" in busy[0]["message"]
    assert answered_bob["1"]["result"]["tag"] == "b"
    assert sum(1 for entry in answered.values() if "tag" in entry["result"]) == 4
    with setup.daemon.client() as client:  # execute's priority: an integer from -9 to 9
        for bad in (10, -10, True, 1.5):
            with pytest.raises(errors.BadRequest, match="'priority' must be an integer from -9 to 9"):
                client.request("execute", name="fairtasks:stamp", args=["x"], kwargs={}, priority=bad)


@pytest.mark.skipif(
    not os.access("/sys/fs/cgroup/systemd", os.W_OK), reason="needs systemd's cgroup hierarchy, writable"
)
def test_with_identity_unit_a_client_is_its_systemd_unit(fair: Callable[..., Fair]) -> None:
    """Two processes of one user, each in a unit of its own (a cgroup made for the test in
    systemd's hierarchy): two clients, named and weighted by unit."""
    units = [f"wdfair{os.getpid()}-{n}.service" for n in (1, 2)]
    slice_dir = Path(f"/sys/fs/cgroup/systemd/wdfair{os.getpid()}.slice")
    for unit in units:
        (slice_dir / unit).mkdir(parents=True)
    try:
        setup = fair(identity="unit", weights=f'"unit:{units[0]}" = 4')
        blocker = setup.client(ALICE, [("hold", "hold", 0.5, 0)])
        wait_until(lambda: setup.clients_status().get(f"uid:{ALICE}", {}).get("running"))
        first = setup.client(ALICE, [(1, "u1", 0.0, 0)], cgroup=slice_dir / units[0])
        second = setup.client(ALICE, [(1, "u2", 0.0, 0)], cgroup=slice_dir / units[1])
        wait_until(lambda: all(f"unit:{unit}" in setup.clients_status() for unit in units))
        shown = setup.clients_status()
        assert [shown[f"unit:{unit}"]["weight"] for unit in units] == [4, 1]
        assert shown[f"unit:{units[0]}"]["user"] is None  # uid 40101 has no passwd entry
        for process in (first, second, blocker):
            results(process)
    finally:
        for unit in units:
            (slice_dir / unit).rmdir()
        slice_dir.rmdir()


@pytest.mark.parametrize("event", ["reload", "stop"])
def test_every_queued_request_of_every_client_gets_one_reply(fair: Callable[..., Fair], event: str) -> None:
    """Two clients with work queued, then a reload (both finish, in turns) or a stop (what had
    not started is SHUTTING_DOWN): one terminal reply each, counted at the wire."""
    setup = fair(workers=1, prefetch=2, stop=0.5)
    alice = setup.client(ALICE, [(n, "a", 0.1, 0) for n in range(12)], timeout_s=30)
    bob = setup.client(BOB, [(n, "b", 0.1, n % 3 - 1) for n in range(12)], timeout_s=30)
    setup.wait_queued(f"uid:{ALICE}", 6)
    setup.wait_queued(f"uid:{BOB}", 6)
    if event == "reload":
        with setup.daemon.client() as client:
            client.request("reload")
    else:
        setup.daemon.proc.send_signal(signal.SIGTERM)
    answered = {"alice": results(alice), "bob": results(bob)}
    codes: dict[str, int] = {}
    for answer in answered.values():
        assert len(answer) == 12
        for entry in answer.values():
            code = entry["result"].get("code", "OK")
            codes[code] = codes.get(code, 0) + 1
    report(f"fair_{event}", codes=codes)
    if event == "reload":
        assert codes == {"OK": 24}
    else:
        assert set(codes) <= {"OK", "SHUTTING_DOWN"} and codes.get("SHUTTING_DOWN", 0) >= 10, codes
        assert setup.daemon.proc.wait(20) == 0
