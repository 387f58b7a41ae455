"""Nothing outlives a SIGKILLed master (issue 18, item 3k), and a terminal's Ctrl-C still
stops the daemon gracefully.

Outside systemd there is no cgroup to take the daemon's processes down: each child the master
spawns leads a process group of its own and SIGKILLs it when the master dies (core/processes.py).
The test starts what used to be left behind with ppid 1: a preload's own child process, a task's
child, a pipeline's child; then SIGKILLs the master and waits for every process of its tree.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import psutil

from tests.conftest import Daemon, clean_environment, wait_until
from tests.reliability.harness import Counter, report
from tests.reliability.test_seams import MODA, execute, seams_config, start_seams, wait_for
from workerctl import Client, errors

# Imported once by the zygote: a helper process of its own, as a preload may start.
HELPER = 'import subprocess\nHELPER = subprocess.Popen(["sleep", "300"])\n'
# A task that starts a child and waits on it; `path` says the child runs.
SPAWNER = textwrap.dedent("""
    import subprocess

    def spawn(path):
        child = subprocess.Popen(["sleep", "300"])
        with open(path, "w") as handle:
            handle.write(str(child.pid))
        return child.wait()
""")
# A pipeline whose load starts a child that it keeps.
SPAWNING_PIPELINE = textwrap.dedent("""
    import subprocess

    def load(device):
        return subprocess.Popen(["sleep", "300"])

    def run(child):
        return child.pid
""")


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def tree(pid: int) -> dict[int, str]:
    return {p.pid: " ".join(p.cmdline()) for p in psutil.Process(pid).children(recursive=True)}


def assert_nothing_outlives_the_master(daemon: Daemon, before: dict[int, str]) -> None:
    """SIGKILL the master; every process of `before` (its tree) must be gone within seconds."""
    daemon.proc.kill()
    daemon.proc.wait()
    try:
        wait_until(lambda: not any(alive(pid) for pid in before), timeout=15)
    except AssertionError:
        pass  # the assert below names them
    left = {pid: command for pid, command in before.items() if alive(pid)}
    for pid in left:
        os.kill(pid, signal.SIGKILL)  # leave nothing running, whatever the outcome
    assert not left, f"outlived the master: {left}"


def test_nothing_outlives_a_sigkilled_master(start_daemon: Callable[..., Daemon], tmp_path: Path) -> None:
    (tmp_path / "helper.py").write_text(HELPER)
    (tmp_path / "spawner.py").write_text(SPAWNER)
    (tmp_path / "spawning.py").write_text(SPAWNING_PIPELINE)
    config = seams_config(["spawner"], workers=2, preload=["helper"], gpu="true")
    config += f'[pipelines.spawning]\npath = "{tmp_path / "spawning.py"}"\n'
    daemon = start_seams(start_daemon, tmp_path, config)
    started = tmp_path / "task-child.pid"
    with Counter(daemon.socket) as counter, daemon.client() as client:
        pipeline_child = client.execute("spawning")["output"]
        counter.send(execute("task", "spawner:spawn", str(started)))
        wait_until(started.exists, timeout=20)
        wait_until(lambda: started.read_text(), timeout=5)
        before = tree(daemon.proc.pid)
    sleepers = [pid for pid, command in before.items() if command == "sleep 300"]
    assert int(started.read_text()) in sleepers and pipeline_child in sleepers
    assert len(sleepers) == 3, before  # the preload's, the task's, the pipeline's
    assert_nothing_outlives_the_master(daemon, before)
    report("orphans", processes=len(before), sleepers=len(sleepers))


def test_ctrl_c_stops_the_daemon_and_its_running_task_finishes(tmp_path: Path) -> None:
    """A terminal's Ctrl-C reaches its foreground process group: here the daemon's master,
    started in a group of its own as a shell starts a job. The task running then finishes with
    its result (its worker is not in that group), and the daemon exits 0."""
    (tmp_path / "moda.py").write_text(MODA)
    config = tmp_path / "workerd.toml"
    config.write_text(seams_config(["moda"], workers=1))
    socket, release = str(tmp_path / "workerd.sock"), tmp_path / "release"
    path = os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")]))
    command = [sys.executable, "-m", "workerd", "--socket", socket, "--config", str(config)]
    with open(tmp_path / "workerd.log", "wb") as log:
        proc = subprocess.Popen(
            command,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**clean_environment(), "PYTHONPATH": path},
            process_group=0,
        )
    try:
        wait_until(lambda: os.path.exists(socket) or proc.poll() is not None, timeout=60)
        with Counter(socket) as counter, Client(socket, timeout=30) as client:
            wait_until(lambda: pool_state(client, proc) == (1, 0), timeout=60)
            counter.send(execute("held", "moda:hold", str(release)))
            wait_until(lambda: os.path.exists(f"{release}.started"), timeout=20)
            os.killpg(proc.pid, signal.SIGINT)
            wait_until(lambda: "stopping" in (tmp_path / "workerd.log").read_text(), timeout=20)
            release.touch()
            assert wait_for(counter, "held", timeout_s=30) == "released"
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def pool_state(client: Client, proc: subprocess.Popen[bytes]) -> tuple[int, int] | None:
    """(idle, busy) workers; None while the daemon does not answer yet."""
    assert proc.poll() is None, "workerd exited"
    try:
        pool = client.status()["pool"]
    except errors.WorkerdError:
        return None
    return pool["idle"], pool["busy"]
