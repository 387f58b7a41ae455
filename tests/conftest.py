"""Fixtures that start the real daemon as a process, on a socket under tmp_path."""

from __future__ import annotations

import contextlib
import importlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from workerctl import Client, errors

BASE_CONFIG = """\
[daemon]
stop_timeout_s = 10

[pool]
workers = {workers}
task_timeout_s = 60

[tasks]
modules = ["workerd.examples.tasks"]

[gpu]
enabled = "false"
"""


def wait_until(predicate: Callable[[], Any], timeout: float = 10.0, interval: float = 0.02) -> Any:
    """Poll `predicate` until it returns something truthy; fail the test after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        time.sleep(interval)


def environment(extra: dict[str, str]) -> dict[str, str]:
    """Ours with `extra` on top; a PYTHONPATH in `extra` goes before ours, not instead of it,
    so a test's task modules are found and the daemon is still the code under test (a checkout
    run with PYTHONPATH pointing at its own daemon/ and client/ would otherwise test another's)."""
    env = {**os.environ, **extra}
    if "PYTHONPATH" in extra and os.environ.get("PYTHONPATH"):
        env["PYTHONPATH"] = os.pathsep.join([extra["PYTHONPATH"], os.environ["PYTHONPATH"]])
    return env


def clean_environment() -> dict[str, str]:
    """Our environment without systemd's variables: a test daemon must never talk to a real
    systemd (if the suite itself runs under one) or adopt a socket that is not its own."""
    systemd = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")
    return {key: value for key, value in os.environ.items() if key not in systemd}


class Daemon:
    """A workerd process under test."""

    def __init__(
        self,
        directory: Path,
        config_text: str | None,
        args: list[str],
        env: dict[str, str],
        socket: str | None,
    ) -> None:
        self.directory = directory
        self.socket = socket or str(directory / "workerd.sock")
        self.log_path = directory / "workerd.log"
        command = [sys.executable, "-m", "workerd", "--socket", self.socket, *args]
        if config_text is not None:
            self.config_path = directory / "workerd.toml"
            self.config_path.write_text(config_text)
            command += ["--config", str(self.config_path)]
        self.log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(command, stdout=self.log, stderr=subprocess.STDOUT, env=environment(env))

    def client(self, timeout: float = 30.0) -> Client:
        return Client(self.socket, timeout=timeout)

    def wait_ready(self, timeout: float = 60.0) -> dict[str, Any]:
        """Wait until the daemon answers status with its full pool of idle workers."""

        def ready() -> dict[str, Any] | None:
            if self.proc.poll() is not None:
                raise AssertionError(f"workerd exited with {self.proc.returncode}:\n{self.output()}")
            try:
                with self.client(timeout=1.0) as client:
                    status = client.status()
            except errors.WorkerdError:
                return None
            pool = status["pool"]
            if status["state"] == "running" and (pool["error"] or pool["idle"] == pool["target"]):
                return status
            return None

        return wait_until(ready, timeout)  # type: ignore[no-any-return]

    def output(self) -> str:
        self.log.flush()
        return self.log_path.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        return self.proc.returncode


@pytest.fixture
def start_daemon(tmp_path: Path) -> Iterator[Callable[..., Daemon]]:
    """Start workerd; by default with BASE_CONFIG, waiting until its pool is ready."""
    started: list[Daemon] = []

    def start(
        config: str | None = None,
        workers: int = 2,
        args: list[str] | None = None,
        env: dict[str, str] | None = None,
        wait: bool = True,
        embedded: bool = False,
        socket: str | None = None,
    ) -> Daemon:
        text = None if embedded else (config if config is not None else BASE_CONFIG.format(workers=workers))
        daemon = Daemon(tmp_path, text, args or [], env or {}, socket)
        started.append(daemon)
        if wait:
            daemon.wait_ready()
        return daemon

    yield start
    for daemon in started:
        daemon.stop(signal.SIGKILL if daemon.proc.poll() is None else signal.SIGTERM, timeout=5)


@pytest.fixture
def daemon(start_daemon: Callable[..., Daemon]) -> Daemon:
    return start_daemon()


@contextlib.contextmanager
def serving_module(directory: Path, name: str, source: str, also: str = "") -> Iterator[tuple[Daemon, Any]]:
    """A daemon with 2 workers allowing task module `name` (written from `source` under
    `directory`), which this process imports too (as a ProcessPoolExecutor's caller would);
    `also`: another allowed module. Yields the daemon and the module."""
    (directory / f"{name}.py").write_text(source)
    modules = ", ".join(f'"{m}"' for m in (also, name) if m)
    default = 'modules = ["workerd.examples.tasks"]'
    config = BASE_CONFIG.format(workers=2).replace(default, f"modules = [{modules}]")
    daemon = Daemon(directory, config, [], {"PYTHONPATH": str(directory)}, None)
    sys.path.insert(0, str(directory))
    try:
        daemon.wait_ready()
        yield daemon, importlib.import_module(name)
    finally:
        sys.path.remove(str(directory))
        sys.modules.pop(name, None)
        daemon.stop(signal.SIGKILL if daemon.proc.poll() is None else signal.SIGTERM, timeout=5)
