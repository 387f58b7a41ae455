"""The seams: each guarantee where two mechanisms meet (reload and the queue, a crash and a
reload, a timeout and a death, a restart and edited code, prefetch and chaos, cancel and
prefetch), one regression test each, against the real daemon (issue 11, items 2 and 5). Each
section names the defect of issue 11 item 2 it pins down; the others are seams this suite found.

Where "exactly one terminal reply" matters, replies are counted at the wire (harness.Counter
counts every reply, duplicates included) and the test listens a while after the last one it
expects (`settle`), so a late second reply fails it. Spawn and fork failures are injected with
WORKERD_FAULTS (daemon/workerd/faults.py), in the real daemon.

The task modules are written under tmp_path and put on the daemon's PYTHONPATH.
"""

from __future__ import annotations

import functools
import json
import os
import signal
import socket
import textwrap
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Daemon, wait_until
from tests.reliability.harness import Chaos, Counter, report, request, workers_of
from workerctl import Client

# Busy until the test says so: `path` exists (no guess at how long the other side takes).
# PATH.started says it runs (a worker shown busy may not have read the job yet).
HOLD = textwrap.dedent("""
    import os, time

    def hold(path):
        open(path + ".started", "w").close()
        while not os.path.exists(path):
            time.sleep(0.01)
        return "released"
""")
MODA = HOLD + textwrap.dedent("""
    def sleep(seconds):
        time.sleep(seconds)
        return seconds

    def echo(value):
        return value

    def version():
        return 1
""")
MODB = HOLD + "\ndef echo(value):\n    return ['b', value]\n"
# A module whose import takes a while: a slow reload.
SLOWMOD = "import time\ntime.sleep(2)\n\ndef ready():\n    return True\n"
# Appends "TOKEN PID" to a file each time it runs: how often each request ran, and where.
RECORD = textwrap.dedent("""
    import os, time

    def record(token, path, sleep_s=0.0):
        with open(path, "a") as handle:
            handle.write(f"{token} {os.getpid()}\\n")
        time.sleep(sleep_s)
        return os.getpid()
""")
# Dies in its timeout's kill window: it waits for the stack dump that the master's SIGUSR1
# makes faulthandler write, then exits before the SIGKILL that follows 0.2 s later. The same
# code serves as a CPU task and (from the runner thread) as a pipeline run.
DIE_AFTER_DUMP = textwrap.dedent("""
    import os, time

    def die_after_dump():
        name = f"stack-{os.getpid()}.txt"
        fds = "/proc/self/fd"
        path = next(
            target for target in (os.readlink(f"{fds}/{fd}") for fd in os.listdir(fds))
            if os.path.basename(target) == name
        )
        while os.path.getsize(path) == 0:
            time.sleep(0.005)
        os._exit(3)
""")
PIPELINE = (
    HOLD
    + DIE_AFTER_DUMP
    + textwrap.dedent("""
    LOAD_S = float(os.environ.get("SEAMS_LOAD_S", "0"))

    def load(device):
        time.sleep(LOAD_S)
        return {"device": device}

    def run(model, sleep=0.0, die=False, token=None, log=None, until=None):
        if until is not None:
            hold(until)
        if log is not None:
            with open(log, "a") as handle:
                handle.write(f"{token} {os.getpid()}\\n")
        if die:
            die_after_dump()
        time.sleep(sleep)
        return {"pid": os.getpid()}
""")
)


def seams_config(
    modules: Sequence[str],
    workers: int = 1,
    prefetch: int = 1,
    preload: Sequence[str] = (),
    gpu: str = "false",
) -> str:
    return f"""\
[daemon]
stop_timeout_s = 5
[pool]
workers = {workers}
prefetch = {prefetch}
task_timeout_s = 60
preload = {json.dumps(list(preload))}
[tasks]
modules = {json.dumps(list(modules))}
[gpu]
enabled = "{gpu}"
run_timeout_s = 60
"""


def pipeline_config(directory: Path, gpu: str = "auto", modules: Sequence[str] = ()) -> str:
    """Pipeline `p` (PIPELINE); no task modules unless given."""
    return seams_config(modules, gpu=gpu) + f'[pipelines.p]\npath = "{directory / "pipe.py"}"\n'


def start_seams(
    start_daemon: Callable[..., Daemon],
    directory: Path,
    config: str,
    env: dict[str, str] | None = None,
    wait: bool = True,
) -> Daemon:
    """The daemon with the seams' task modules on its PYTHONPATH."""
    modules = {"moda": MODA, "modb": MODB, "slowmod": SLOWMOD, "record": RECORD, "dying": DIE_AFTER_DUMP}
    for name, source in modules.items():
        (directory / f"{name}.py").write_text(source)
    (directory / "pipe.py").write_text(PIPELINE)
    return start_daemon(config=config, env={"PYTHONPATH": str(directory), **(env or {})}, wait=wait)


def execute(request_id: Any, name: str, *args: Any, **fields: Any) -> list[bytes]:
    return request(request_id, "execute", name=name, args=list(args), **fields)


def exactly_once(counter: Counter, ids: set[Any]) -> None:
    """Every id in `ids` has had exactly one terminal reply, and nothing else came."""
    counter.settle()
    assert not counter.tally.duplicates(), f"answered twice: {counter.tally.duplicates()}"
    assert set(counter.tally.terminal) == ids, counter.tally.results


def wait_replies(counter: Counter, count: int, timeout_s: float = 20.0) -> None:
    assert counter.wait_replies(count, timeout_s), f"only these replies came: {counter.tally.results}"


def wait_for(counter: Counter, request_id: Any, timeout_s: float = 20.0) -> Any:
    """The terminal reply for `request_id` (its result, or its error), once it has come."""
    deadline = time.monotonic() + timeout_s
    while request_id not in counter.tally.results:
        assert time.monotonic() < deadline, f"no reply for {request_id!r}: {counter.tally.results}"
        counter.receive(0.1)
    return counter.tally.results[request_id]


def code(counter: Counter, request_id: Any) -> str:
    result = counter.tally.results[request_id]
    return result["code"] if isinstance(result, dict) and "code" in result else "OK"


def zygote(client: Client, generation: int = 0, role: str = "serving") -> int:
    """A zygote's pid, by its generation (0: the newest) and role (serving or standby)."""
    zygotes = [z for z in client.memory_status()["zygotes"] if z["role"] == role]
    if generation:
        zygotes = [z for z in zygotes if z["generation"] == generation]
    return int(max(zygotes, key=lambda z: z["generation"])["pid"])


def replaced(client: Client, old: set[int], target: int) -> bool:
    """The pool is back at its target with none of the `old` workers."""
    status = client.status()
    pids = set(workers_of(status))
    return status["pool"]["idle"] == target and len(pids) == target and not pids & old


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, from /proc/PID/stat."""
    with open(f"/proc/{pid}/stat") as handle:
        fields = handle.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def idle_cpu(pid: int, seconds: float = 1.0) -> float:
    """The share of one CPU the process used over `seconds`."""
    before = cpu_seconds(pid)
    time.sleep(seconds)
    return (cpu_seconds(pid) - before) / seconds


def zombies_of(parent: int) -> list[int]:
    """Children of `parent` that exited and were never reaped."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as handle:
                fields = handle.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] == "Z" and int(fields[1]) == parent:
            found.append(int(entry))
    return found


def forked_processes(master: int) -> list[int]:
    """The zygotes (serving and standby) and CPU workers (forked from them) of the daemon
    whose master is `master`: every process that runs `python -m workerd.pool.zygote FD MASTER`."""
    found = []
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as handle:
                argv = handle.read().split(b"\0")
        except OSError:
            continue
        if b"workerd.pool.zygote" in argv and argv[-2:-1] == [str(master).encode()]:
            found.append(int(entry))
    return found


def runs_of(path: Path) -> dict[str, list[int]]:
    """token -> the pids that ran it, in order."""
    runs: dict[str, list[int]] = {}
    for line in path.read_text().splitlines():
        token, pid = line.split()
        runs.setdefault(token, []).append(int(pid))
    return runs


# -- reload x queued jobs (2a) ---------------------------------------------------------------------


@pytest.mark.parametrize("prefetch", [0, 1])
def test_reload_dropping_a_module_ends_its_queued_jobs(
    start_daemon: Callable[..., Daemon], tmp_path: Path, prefetch: int
) -> None:
    """1 worker busy (moda:hold, for as long as the test needs: issue 11's moda:sleep 3);
    modb:echo and moda:echo wait (with prefetch 1 the busy worker holds modb:echo); a reload
    drops modb. modb:echo ends with an error naming the reload, moda:echo runs on the new
    worker at once (the queue is never blocked), a later moda:echo too."""
    daemon = start_seams(start_daemon, tmp_path, seams_config(["moda", "modb"], prefetch=prefetch))
    with Counter(daemon.socket) as counter, daemon.client() as client:
        release = tmp_path / "release"
        counter.send(execute("busy", "moda:hold", str(release)))
        wait_until(lambda: client.status()["pool"]["busy"] == 1)
        counter.send(execute("b", "modb:echo", "b"))
        counter.send(execute("a", "moda:echo", "a"))
        queue = wait_until(lambda: (q := client.status()["queue"])["depth"] == 2 and q)
        assert queue["prefetched"] == prefetch
        daemon.config_path.write_text(seams_config(["moda"], prefetch=prefetch))
        counter.send(request("reload", "reload"))
        wait_replies(counter, 3)  # the reload, b and a, while the old worker is busy
        assert "busy" not in counter.tally.results
        assert counter.tally.results["reload"] == {"generation": 2}
        assert code(counter, "b") == "DENIED"
        assert "reload" in counter.tally.results["b"]["message"]
        assert counter.tally.results["a"] == "a"
        counter.send(execute("later", "moda:echo", "later"))
        assert wait_for(counter, "later") == "later"
        release.touch()
        assert wait_for(counter, "busy") == "released"
        exactly_once(counter, {"busy", "b", "a", "reload", "later"})


def test_retry_of_a_module_a_reload_dropped(start_daemon: Callable[..., Daemon], tmp_path: Path) -> None:
    """A modb job with retries=1 runs on an old worker when a reload drops modb; that worker
    then dies: the retry can run nowhere, so it ends with an error naming the reload (it waited
    for good: a retry went back to the queue unchecked)."""
    daemon = start_seams(start_daemon, tmp_path, seams_config(["moda", "modb"]))
    with Counter(daemon.socket) as counter, daemon.client() as client:
        counter.send(execute("b", "modb:hold", str(tmp_path / "never"), retries=1))
        wait_until(lambda: client.status()["pool"]["busy"] == 1)
        old = workers_of(client.status())[0]
        daemon.config_path.write_text(seams_config(["moda"]))
        assert client.reload() == {"generation": 2}
        wait_until(lambda: client.status()["pool"]["idle"] == 1)  # the new worker, beside the old
        os.kill(old, signal.SIGKILL)
        reply = wait_for(counter, "b")
        assert reply["code"] == "DENIED" and "reload" in reply["message"], reply
        exactly_once(counter, {"b"})
        assert client.execute("moda:echo", 1) == 1


# -- reload x zygote death (2b) -------------------------------------------------------------------


# Which zygotes die during the slow reload, as (generation, role).
VICTIMS = {
    "serving": [(1, "serving")],
    "serving+standby": [(1, "serving"), (1, "standby")],  # the restart imports generation 1 again
    "importing": [(2, "serving")],  # the reload's own zygote
}


@pytest.mark.parametrize("victims", list(VICTIMS))
def test_zygote_killed_during_a_slow_reload(
    start_daemon: Callable[..., Daemon], tmp_path: Path, victims: str
) -> None:
    """Zygotes SIGKILLed while a reload's zygote imports for 2 s: the reload is answered (its
    new generation, or INTERNAL if its own zygote died), the state returns to running, the next
    reload works."""
    daemon = start_seams(start_daemon, tmp_path, seams_config(["moda"]))
    with Counter(daemon.socket) as counter, daemon.client() as client:
        daemon.config_path.write_text(seams_config(["moda", "slowmod"]))
        counter.send(request("reload", "reload"))
        wait_until(lambda: client.status()["state"] == "reloading")
        for pid in [zygote(client, generation, role) for generation, role in VICTIMS[victims]]:
            os.kill(pid, signal.SIGKILL)
        reply = wait_for(counter, "reload")
        assert client.status()["state"] == "running"
        if victims == "importing":
            assert reply["code"] == "INTERNAL" and "died while importing" in reply["message"]
        else:
            assert reply == {"generation": 2}
            assert client.execute("slowmod:ready") is True
        daemon.config_path.write_text(seams_config(["moda"]))
        assert client.reload() == {"generation": 3}
        assert client.status()["state"] == "running"
        assert client.execute("moda:echo", 1) == 1
        exactly_once(counter, {"reload"})


# -- spawn and fork failures (2c) -----------------------------------------------------------------


def test_gpu_worker_that_cannot_be_spawned_answers_once(
    start_daemon: Callable[..., Daemon], tmp_path: Path
) -> None:
    """Spawn 1 is the zygote; 2 and 3 (the GPU worker, at the first run, then its respawn in the
    loop's tick) fail. The run waiting for it gets INTERNAL once; the fourth spawn works."""
    daemon = start_seams(
        start_daemon, tmp_path, pipeline_config(tmp_path), env={"WORKERD_FAULTS": "spawn=EAGAIN:2@1"}
    )
    with Counter(daemon.socket) as counter, daemon.client(timeout=60) as client:
        counter.send(execute("first", "p"))
        wait_replies(counter, 1)
        assert code(counter, "first") == "INTERNAL"
        assert "cannot start the GPU worker" in counter.tally.results["first"]["message"]
        wait_until(lambda: client.status()["gpu"]["state"] == "idle", timeout=30)
        counter.send(execute("second", "p"))
        wait_replies(counter, 2, 30)
        exactly_once(counter, {"first", "second"})
        assert code(counter, "second") == "OK"
        assert daemon.proc.poll() is None


def test_stop_while_the_gpu_worker_backs_off(start_daemon: Callable[..., Daemon], tmp_path: Path) -> None:
    """Every GPU worker spawn fails, so a respawn is always pending; a stop waits for a CPU task
    meanwhile: the master sleeps through the stop (a respawn left due made it spin), then exits."""
    config = pipeline_config(tmp_path, modules=["moda"])
    daemon = start_seams(start_daemon, tmp_path, config, env={"WORKERD_FAULTS": "spawn=EAGAIN:99@1"})
    release = tmp_path / "release"
    with Counter(daemon.socket) as counter, daemon.client() as client:
        counter.send(execute("run", "p"))
        assert wait_for(counter, "run")["code"] == "INTERNAL"
        counter.send(execute("busy", "moda:hold", str(release)))
        wait_until((tmp_path / "release.started").exists)  # running, so the stop waits for it
        daemon.proc.send_signal(signal.SIGTERM)
        wait_until(lambda: client.status()["state"] == "stopping")
        share = idle_cpu(daemon.proc.pid, 1.5)  # past the back-off pending at the stop
        release.touch()
        assert wait_for(counter, "busy") == "released"
    assert daemon.proc.wait(20) == 0
    report("stop during a GPU back-off: master CPU share", share=f"{share:.3f}")
    assert share < 0.2


def test_worker_forks_failing_in_the_zygote(start_daemon: Callable[..., Daemon], tmp_path: Path) -> None:
    """The zygote's first two worker forks fail: the master lives, backs off, and the pool
    reaches its target (it stayed empty for good when a status request woke the loop just as
    the back-off ended), and then the master sleeps."""
    daemon = start_seams(
        start_daemon, tmp_path, seams_config(["moda"], workers=2), env={"WORKERD_FAULTS": "fork=EAGAIN:2"}
    )
    with daemon.client() as client:
        status = client.status()
        assert status["pool"]["idle"] == 2
        assert status["counters"]["fork_failures"] == 2
        assert client.execute("moda:echo", 1) == 1
    assert idle_cpu(daemon.proc.pid, 0.5) < 0.2


def test_zygote_restart_whose_spawn_fails(start_daemon: Callable[..., Daemon], tmp_path: Path) -> None:
    """The zygote and its standby killed: the restart (a spawn from the loop's tick) fails once;
    the master lives, retries after a back-off, and the pool comes back."""
    daemon = start_seams(
        start_daemon, tmp_path, seams_config(["moda"]), env={"WORKERD_FAULTS": "spawn=EAGAIN:1@1"}
    )
    with daemon.client() as client:
        old = set(workers_of(client.status()))
        for pid in [zygote(client, role=role) for role in ("serving", "standby")]:
            os.kill(pid, signal.SIGKILL)
        wait_until(lambda: replaced(client, old, 1), timeout=20)
        assert daemon.proc.poll() is None
        assert client.execute("moda:echo", 1) == 1
    assert "cannot start a zygote" in daemon.output()


def test_reload_while_a_zygote_restart_backs_off(start_daemon: Callable[..., Daemon], tmp_path: Path) -> None:
    """The zygote and its standby die and the restart's spawns fail (2, 3), so it backs off; a
    reload (spawn 4) brings generation 2 meanwhile. The restart, due later, must not start a
    second zygote for generation 2 beside the one serving (it did: a zygote never retired)."""
    daemon = start_seams(
        start_daemon, tmp_path, seams_config(["moda"]), env={"WORKERD_FAULTS": "spawn=EAGAIN:2@1"}
    )
    with daemon.client() as client:
        for pid in [zygote(client, role=role) for role in ("serving", "standby")]:
            os.kill(pid, signal.SIGKILL)
        wait_until(lambda: daemon.output().count("cannot start a zygote") == 2)
        assert client.reload() == {"generation": 2}
        wait_until(lambda: daemon.output().count("restarting the zygote") == 3)  # its back-off ended
        wait_until(lambda: client.status()["pool"]["idle"] == 1)
        workers = client.status()["pool"]["workers"]
        assert [w["generation"] for w in workers] == [2]
        zygotes = set(forked_processes(daemon.proc.pid)) - {w["pid"] for w in workers}
        assert len(zygotes) == 2, zygotes  # generation 2 and its standby
        assert client.execute("moda:echo", 1) == 1


def test_reload_whose_zygote_cannot_start(start_daemon: Callable[..., Daemon], tmp_path: Path) -> None:
    """Spawn 2 (the reload's zygote) fails: the reload is answered INTERNAL, the state returns
    to running, the next reload is answered, and a stop after it answers neither again."""
    daemon = start_seams(
        start_daemon, tmp_path, seams_config(["moda"]), env={"WORKERD_FAULTS": "spawn=EAGAIN:1@1"}
    )
    with Counter(daemon.socket) as counter, daemon.client() as client:
        counter.send(request("failed", "reload"))
        wait_replies(counter, 1)
        assert code(counter, "failed") == "INTERNAL"
        assert "cannot start a zygote" in counter.tally.results["failed"]["message"]
        assert client.status()["state"] == "running"
        counter.send(request("next", "reload"))
        wait_replies(counter, 2)
        assert code(counter, "next") == "OK"
        assert client.status()["state"] == "running"
        daemon.proc.send_signal(signal.SIGTERM)
        assert daemon.proc.wait(20) == 0
        exactly_once(counter, {"failed", "next"})


# -- reload x GPU disabled (2d) -------------------------------------------------------------------


def test_reload_disabling_the_gpu_worker_answers_its_queue(
    start_daemon: Callable[..., Daemon], tmp_path: Path
) -> None:
    """One run holds the GPU worker, two wait; a reload sets [gpu] enabled = "false": the two
    end with an error naming the reload, the running one finishes, the worker then stops."""
    daemon = start_seams(start_daemon, tmp_path, pipeline_config(tmp_path))
    with Counter(daemon.socket) as counter, daemon.client(timeout=60) as client:
        release = tmp_path / "release"
        counter.send(execute("running", "p", kwargs={"until": str(release)}))
        wait_until(lambda: client.status()["gpu"]["state"] == "busy", timeout=30)
        counter.send(execute("q1", "p"))
        counter.send(execute("q2", "p"))
        wait_until(lambda: client.status()["gpu"]["queue"] == 2)
        daemon.config_path.write_text(pipeline_config(tmp_path, gpu="false"))
        counter.send(request("reload", "reload"))
        wait_replies(counter, 3, 30)  # the reload, q1 and q2, while the run holds the worker
        assert "running" not in counter.tally.results
        release.touch()
        wait_for(counter, "running")
        exactly_once(counter, {"running", "q1", "q2", "reload"})
        for queued in ("q1", "q2"):
            assert code(counter, queued) == "UNKNOWN_TASK"
            assert "reload" in counter.tally.results[queued]["message"]
        assert code(counter, "running") == "OK"  # it had started: it finishes
        wait_until(lambda: client.status()["gpu"]["pid"] is None, timeout=20)
        assert client.status()["gpu"]["enabled"] is False


def test_reload_changing_pipelines_while_the_gpu_worker_starts(
    start_daemon: Callable[..., Daemon], tmp_path: Path
) -> None:
    """A reload that changes [pipelines] lands while the GPU worker is still importing: once
    ready, the worker is replaced by one with the new config, and the run that started it is
    answered (it used to wait for good: the replacement waited for an "idle" never checked)."""
    daemon = start_seams(start_daemon, tmp_path, pipeline_config(tmp_path))
    with Counter(daemon.socket) as counter, daemon.client(timeout=60) as client:
        counter.send(execute("first", "p"))
        wait_until(lambda: client.status()["gpu"]["state"] == "starting")
        changed = pipeline_config(tmp_path) + f'[pipelines.q]\npath = "{tmp_path / "pipe.py"}"\n'
        daemon.config_path.write_text(changed)
        counter.send(request("reload", "reload"))
        wait_for(counter, "reload")
        assert client.status()["gpu"]["state"] == "starting", "the reload came too late to test"
        wait_for(counter, "first", 30)
        counter.send(execute("second", "q"))
        wait_for(counter, "second", 30)
        exactly_once(counter, {"first", "reload", "second"})
        assert code(counter, "first") == "OK" and code(counter, "second") == "OK"


# -- zygote death seen, whatever holds its fds (2e) -------------------------------------------------

FORKER = textwrap.dedent("""
    import os, time

    # A preload that forks: the child keeps every fd the zygote has, its channel to the master
    # included, so the master cannot learn of the zygote's death from that channel's EOF.
    child = os.fork()
    if child == 0:
        time.sleep(120)
        os._exit(0)
    with open(os.environ["SEAMS_FORKER_PID"], "w") as handle:
        handle.write(str(child))
""")


def test_zygote_death_seen_when_a_preload_child_holds_its_fds(
    start_daemon: Callable[..., Daemon], tmp_path: Path
) -> None:
    (tmp_path / "forker.py").write_text(FORKER)
    pid_file = tmp_path / "forker.pid"
    daemon = start_seams(
        start_daemon,
        tmp_path,
        seams_config(["moda"], workers=2, preload=["forker"]),
        env={"SEAMS_FORKER_PID": str(pid_file)},
    )
    forker = int(pid_file.read_text())
    try:
        with Counter(daemon.socket) as counter, daemon.client() as client:
            old = set(workers_of(client.status()))
            counter.send(execute("running", "moda:sleep", 30))
            wait_until(lambda: client.status()["pool"]["busy"] == 1)
            victim = zygote(client)
            killed_at = time.monotonic()
            os.kill(victim, signal.SIGKILL)
            wait_replies(counter, 1, 10)
            assert code(counter, "running") == "WORKER_LOST"  # at once, not at its 60 s timeout
            assert time.monotonic() - killed_at < 10
            wait_until(lambda: replaced(client, old, 2), timeout=20)
            for n in range(4):
                counter.send(execute(n, "moda:echo", n))
            wait_replies(counter, 5)
            exactly_once(counter, {"running", 0, 1, 2, 3})
            assert all(counter.tally.results[n] == n for n in range(4))
            wait_until(lambda: not zombies_of(daemon.proc.pid))
            assert not os.path.exists(f"/proc/{victim}")  # reaped, not a zombie
    finally:
        os.kill(forker, signal.SIGKILL)


# -- timeout x death in the kill window (2f) --------------------------------------------------------


@pytest.mark.parametrize("task", ["dying:die_after_dump", "moda:sleep"])
def test_cpu_timeout_is_never_retried(start_daemon: Callable[..., Daemon], tmp_path: Path, task: str) -> None:
    """A task past its timeout, with retries=1, whether its worker dies inside the kill window
    (between SIGUSR1 and SIGKILL) or is killed by the daemon: TIMEOUT, answered once, never
    retried. The job its worker held ahead (prefetched) runs once, on the replacement."""
    daemon = start_seams(start_daemon, tmp_path, seams_config(["moda", "dying", "record"]))
    log = tmp_path / "runs.log"
    args = [] if task.startswith("dying") else [30]
    with Counter(daemon.socket) as counter, daemon.client() as client:
        old = set(workers_of(client.status()))
        counter.send(execute("late", task, *args, timeout_s=0.5, retries=1))
        counter.send(execute("next", "record:record", "next", str(log)))
        wait_until(lambda: client.status()["queue"]["prefetched"] == 1)
        wait_replies(counter, 2, 10)
        exactly_once(counter, {"late", "next"})
        assert code(counter, "late") == "TIMEOUT"
        assert runs_of(log) == {"next": [counter.tally.results["next"]]}
        assert counter.tally.results["next"] not in old
        wait_until(lambda: replaced(client, old, 1))
        counters = client.status()["counters"]
        assert counters.get("retries", 0) == 0 and counters["timeouts"] == 1


def test_gpu_run_timing_out_leaves_the_master_idle(
    start_daemon: Callable[..., Daemon], tmp_path: Path
) -> None:
    """A pipeline run past its timeout, once killed by the daemon and once dying inside the kill
    window: TIMEOUT once each (retries=1 notwithstanding), and then the master sleeps: its CPU
    time over the next second stays near zero (it used to spin on a stale kill deadline)."""
    daemon = start_seams(start_daemon, tmp_path, pipeline_config(tmp_path))
    master = daemon.proc.pid
    usage = {}
    with Counter(daemon.socket) as counter, daemon.client(timeout=60) as client:
        assert client.execute("p")["output"]["pid"] > 0  # the GPU worker is up
        for key, kwargs in (("killed", {"sleep": 30}), ("dies", {"die": True})):
            counter.send(execute(key, "p", kwargs=kwargs, timeout_s=0.5, retries=1))
            wait_for(counter, key)
            assert code(counter, key) == "TIMEOUT", counter.tally.results[key]
            usage[key] = idle_cpu(master)  # while the worker is respawned: the master waits
        exactly_once(counter, {"killed", "dies"})
        counters = client.status()["counters"]
        assert counters.get("retries", 0) == 0 and counters["gpu_timeouts"] == 2
    report("GPU timeout: master CPU share afterwards", **{k: f"{v:.3f}" for k, v in usage.items()})
    assert all(share < 0.2 for share in usage.values()), usage


# -- GPU restore x a request's time (2g) -----------------------------------------------------------


def test_gpu_restore_does_not_count_in_a_runs_timeout(
    start_daemon: Callable[..., Daemon], tmp_path: Path
) -> None:
    """A pipeline whose load takes 1.2 s is cached; the GPU worker is SIGKILLed; the next run,
    with timeout_s = 0.6, waits for the restore (the load again) and then succeeds: its clock
    starts when it starts. Then a run handed to a worker still restoring (so not started) is
    terminated: CANCELLED once, and it never runs, there or on the next worker."""
    load_s, timeout_s = 1.2, 0.6
    env = {"SEAMS_LOAD_S": str(load_s)}
    daemon = start_seams(start_daemon, tmp_path, pipeline_config(tmp_path), env=env)
    log = tmp_path / "runs.log"
    with Counter(daemon.socket) as counter, daemon.client(timeout=60) as client:
        first = client.execute("p")
        assert first["start"] == "cold"
        pid = kill_gpu_worker(client)
        started = time.monotonic()
        result = client.call("p", timeout_s=timeout_s)
        waited = time.monotonic() - started
        assert result["start"] == "warm"  # restored before it ran
        assert waited > timeout_s  # it did wait behind the restore, longer than its own timeout

        kill_gpu_worker(client)
        counter.send(execute("X", "p", kwargs={"token": "X", "log": str(log)}))
        wait_until(lambda: client.status()["gpu"]["state"] == "busy")  # X is with the worker
        counter.send(request("cancel", "cancel", ids=["X"], terminate=True))
        assert wait_for(counter, "cancel")["cancelled"] == ["X"]
        wait_until(lambda: client.status()["gpu"]["state"] == "idle", timeout=30)
        counter.send(execute("Y", "p", kwargs={"token": "Y", "log": str(log)}))
        wait_for(counter, "Y", 30)
        exactly_once(counter, {"X", "Y", "cancel"})
        assert code(counter, "X") == "CANCELLED" and code(counter, "Y") == "OK"
        assert runs_of(log) == {"Y": [counter.tally.results["Y"]["output"]["pid"]]}
        assert pid != counter.tally.results["Y"]["output"]["pid"]
    report("GPU restore before a run", load_s=load_s, waited_s=f"{waited:.2f}")


def kill_gpu_worker(client: Client) -> int:
    """SIGKILL the GPU worker and wait for its successor; returns the killed pid."""
    pid = client.status()["gpu"]["pid"]
    os.kill(pid, signal.SIGKILL)
    wait_until(lambda: client.status()["gpu"]["pid"] not in (None, pid), timeout=20)
    return int(pid)


# -- restart x edited code (2h) ---------------------------------------------------------------------


def test_zygote_restart_runs_the_same_code(start_daemon: Callable[..., Daemon], tmp_path: Path) -> None:
    """moda edited on disk (not reloaded), then the zygote SIGKILLed: the standby takes over
    and the old code runs. Then moda half-written (a syntax error) and the zygote killed again:
    the pool stays available, still on the old code."""
    daemon = start_seams(start_daemon, tmp_path, seams_config(["moda"]))
    with daemon.client() as client:
        assert client.execute("moda:version") == 1
        for edit in (MODA.replace("return 1", "return 2"), "def version(:\n"):
            (tmp_path / "moda.py").write_text(edit)
            old = set(workers_of(client.status()))
            os.kill(zygote(client), signal.SIGKILL)
            wait_until(functools.partial(replaced, client, old, 1), timeout=20)
            assert client.execute("moda:version") == 1
            assert client.status()["pool"]["error"] is None
        assert client.status()["counters"]["zygote_restarts"] == 2


# -- Master.run start failure (2i) -----------------------------------------------------------------


def test_failed_start_leaves_nothing_behind(start_daemon: Callable[..., Daemon], tmp_path: Path) -> None:
    """The metrics port is taken: the daemon exits at start, after binding its socket. Neither
    the socket nor a private workerd-* directory is left behind (the directory is made after
    the last check that can fail: this holds that order too)."""
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    assert taken.getsockname()[0] == "127.0.0.1"
    private = tmp_path / "private"
    private.mkdir()
    config = seams_config(["moda"]) + f'[metrics]\nlisten = "127.0.0.1:{port}"\n'
    try:
        daemon = start_seams(start_daemon, tmp_path, config, env={"TMPDIR": str(private)}, wait=False)
        assert daemon.proc.wait(30) != 0
    finally:
        taken.close()
    assert "cannot serve metrics" in daemon.output()
    assert not os.path.exists(daemon.socket)
    assert not list(private.glob("workerd-*"))


def test_start_refused_on_a_served_socket_leaves_it_alone(
    start_daemon: Callable[..., Daemon], tmp_path: Path
) -> None:
    """A second daemon on the socket a live one serves is refused at start: it exits 69, and
    the live daemon's socket is still there and still serves."""
    first = start_seams(start_daemon, tmp_path, seams_config(["moda"]))
    private, elsewhere = tmp_path / "private", tmp_path / "second"
    private.mkdir()
    elsewhere.mkdir()
    second = Daemon(elsewhere, first.config_path.read_text(), [], {"TMPDIR": str(private)}, first.socket)
    try:
        assert second.proc.wait(30) == 69  # EX_UNAVAILABLE
    finally:
        second.stop()
    assert "already serving" in second.log_path.read_text()
    assert not list(private.glob("workerd-*"))
    with first.client() as client:
        assert client.execute("moda:echo", 1) == 1


# -- prefetch x chaos (issue 12, item 6) -------------------------------------------------------------


@pytest.mark.parametrize("retries", [0, 1])
def test_workers_killed_while_holding_prefetched_jobs(
    start_daemon: Callable[..., Daemon], tmp_path: Path, retries: int
) -> None:
    """Busy workers, each holding a prefetched job, SIGKILLed under load: every request gets
    exactly one terminal reply, and no job runs more often than its retries allow. A
    prefetched job handed back from a dead worker never ran: it runs once, and is no retry."""
    daemon = start_seams(start_daemon, tmp_path, seams_config(["record"], workers=3, prefetch=2))
    log = tmp_path / "runs.log"
    count = 400

    def busy(client: Client) -> list[int]:
        return [
            w["pid"] for w in client.status()["pool"]["workers"] if w["state"] == "busy" and w["jobs"] > 1
        ]

    requests = (
        (n, execute(n, "record:record", str(n), str(log), 0.01, retries=retries)) for n in range(count)
    )
    with Counter(daemon.socket) as counter, Chaos(busy, daemon.socket, (0.1, 0.25)) as chaos:
        lost = counter.drive(requests, window=24, timeout_s=60)
    tally, runs = counter.tally, runs_of(log)
    killed = set(chaos.killed)
    report(
        f"prefetch chaos, retries={retries}",
        requests=count,
        replies=tally.replies,
        killed=len(killed),
        codes=dict(tally.codes),
    )
    assert not lost and not tally.duplicates()
    assert set(tally.terminal) == set(range(count))
    assert len(killed) >= 3, "too few kills to mean anything"
    for n in range(count):
        pids = runs.get(str(n), [])
        result = tally.results[n]
        # Each run but the last was cut short by a kill: only those may be followed by a retry.
        assert len(pids) <= 1 + retries, (n, pids, result)
        assert all(pid in killed for pid in pids[:-1]), (n, pids)
        if isinstance(result, int):  # OK: it ran to the end exactly once, in that worker
            assert pids and pids[-1] == result and pids.count(result) == 1, (n, pids, result)
        else:
            # Its worker died while it was first in line: it ran there, or had not yet written
            # its line (the daemon cannot tell, so it says WORKER_LOST, not a silent re-run).
            assert result["code"] == "WORKER_LOST", result
            assert all(pid in killed for pid in pids), (n, pids, result)
    if retries:
        assert tally.codes["OK"] >= count - 2, tally.codes


# -- cancel x prefetch ----------------------------------------------------------------------------------


def test_cancel_queued_prefetched_and_running(start_daemon: Callable[..., Daemon], tmp_path: Path) -> None:
    """One worker, prefetch 1. R runs, P is prefetched, Q and S queued. Cancel Q (queued) and
    P (prefetched): CANCELLED, and neither ever runs. Terminate R: CANCELLED, its worker is
    replaced, and S, which the worker held by then, runs exactly once, on the new worker."""
    daemon = start_seams(start_daemon, tmp_path, seams_config(["record"], prefetch=1))
    log = tmp_path / "runs.log"
    with Counter(daemon.socket) as counter, daemon.client() as client:
        counter.send(execute("R", "record:record", "R", str(log), 30))
        wait_until(lambda: log.exists() and "R" in runs_of(log))
        for key in ("P", "Q", "S"):
            counter.send(execute(key, "record:record", key, str(log)))
        wait_until(lambda: client.status()["queue"] == {"depth": 3, "prefetched": 1, "max": 10000})
        worker = workers_of(client.status())[0]

        def cancel(key: str, terminate: bool = False) -> dict[str, Any]:
            counter.send(request(f"cancel-{key}", "cancel", ids=[key], terminate=terminate))
            return wait_for(counter, f"cancel-{key}")  # type: ignore[no-any-return]

        assert cancel("Q")["cancelled"] == ["Q"]  # queued
        assert cancel("P")["cancelled"] == ["P"]  # prefetched: S is prefetched in its place
        wait_until(lambda: client.status()["queue"]["prefetched"] == 1)  # S, at the turn's end
        assert cancel("R", terminate=True)["cancelled"] == ["R"]
        wait_for(counter, "S")
        exactly_once(counter, {"R", "P", "Q", "S", "cancel-Q", "cancel-P", "cancel-R"})
        for key in ("Q", "P", "R"):
            assert code(counter, key) == "CANCELLED", counter.tally.results[key]
            assert counter.tally.results[key]["details"] == {"terminated": key == "R"}
        runs = runs_of(log)
        assert set(runs) == {"R", "S"}, runs
        assert runs["R"] == [worker] and len(runs["S"]) == 1 and runs["S"][0] != worker
        assert counter.tally.results["S"] == runs["S"][0]
        wait_until(lambda: replaced(client, {worker}, 1))
