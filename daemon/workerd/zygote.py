"""The zygote: imports the task code once, freezes that heap, and forks CPU workers from it.

Why a separate process: the master holds a ZeroMQ context, whose I/O threads do not survive a
fork, and the master must never import task code (a module that crashes on import must not take
the control socket down). The zygote is a fresh interpreter with no threads and no ZeroMQ, so a
fork of it is clean; each child creates its own context after the fork.

The master talks to it over two pipes, one JSON object per line:

    master -> zygote   {"settings": {...}}        first line: what to import, how to fork
                       {"cmd": "fork", "count": n}
    zygote -> master   {"event": "ready", "pid", "import_s"}
                       {"event": "failed", "error", "traceback"}     import failed; zygote exits
                       {"event": "forked", "pid"}
                       {"event": "exited", "pid", "status"}          status < 0: killed by signal

The zygote exits when the master closes the command pipe, and dies with the master
(PR_SET_PDEATHSIG); workers die with their zygote the same way, so nothing is ever orphaned.
EOF on the event pipe tells the master the zygote and all its workers are gone.
"""

from __future__ import annotations

import ctypes
import gc
import importlib
import json
import os
import select
import signal
import subprocess
import sys
import time
import traceback
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .config import Config

PR_SET_PDEATHSIG = 1


def die_with_parent(parent: int) -> None:
    """Ask the kernel to SIGKILL us when our parent exits.

    `parent` is the pid we expect as parent: if it died before the request was made (the race
    prctl leaves open), we have been re-parented already and exit now rather than live orphaned.
    """
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):  # pragma: no cover - not Linux
        return
    if os.getppid() != parent:
        os._exit(1)


class LineReader:
    """Splits what arrives on a non-blocking pipe into JSON objects, one per line."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._buffer = b""

    def read(self) -> list[dict[str, Any]] | None:
        """The complete messages available now, or None at EOF."""
        try:
            chunk = os.read(self.fd, 65536)
        except BlockingIOError:
            return []
        if not chunk:
            return None
        self._buffer += chunk
        *lines, self._buffer = self._buffer.split(b"\n")
        return [json.loads(line) for line in lines if line]


def write_line(fd: int, message: dict[str, Any]) -> None:
    os.write(fd, json.dumps(message).encode() + b"\n")


# -- master side ------------------------------------------------------------------------------


class ZygoteHandle:
    """The master's view of one zygote: start it, ask for forks, read its events."""

    def __init__(self, settings: dict[str, Any], generation: int, config: Config, restart: bool) -> None:
        self.generation = generation
        self.config = config  # takes effect in the pool once this zygote is ready
        self.restart = restart  # a restart of the same code after a crash, not a reload
        self.modules = frozenset(settings["task_modules"])
        self.ready = False
        self.retiring = False
        self.pending_forks = 0
        cmd_read, self._cmd_write = os.pipe()
        self.events_fd, event_write = os.pipe()
        os.set_blocking(self.events_fd, False)
        self._events = LineReader(self.events_fd)
        self.process = subprocess.Popen(
            [sys.executable, "-m", "workerd.zygote", str(cmd_read), str(event_write), str(os.getpid())],
            pass_fds=(cmd_read, event_write),
            stdin=subprocess.DEVNULL,
        )
        os.close(cmd_read)
        os.close(event_write)
        self._send({"settings": settings, "generation": generation})

    @property
    def pid(self) -> int:
        return self.process.pid

    def _send(self, message: dict[str, Any]) -> None:
        try:
            write_line(self._cmd_write, message)
        except OSError:
            pass  # the zygote died; its EOF on the event pipe reports that

    def fork(self, count: int = 1) -> None:
        self.pending_forks += count
        self._send({"cmd": "fork", "count": count})

    def read_events(self) -> list[dict[str, Any]] | None:
        """The complete events available now, or None at EOF (zygote gone)."""
        events = self._events.read()
        if events is None:
            return None
        self.pending_forks -= sum(1 for e in events if e.get("event") == "forked")
        return events

    def retire(self) -> None:
        """Close the command pipe: the zygote exits once it has read everything."""
        self.retiring = True
        if self._cmd_write >= 0:
            os.close(self._cmd_write)
            self._cmd_write = -1

    def close(self) -> None:
        self.retire()
        if self.events_fd >= 0:
            os.close(self.events_fd)
            self.events_fd = -1


# -- zygote side ------------------------------------------------------------------------------


def import_modules(names: list[str]) -> None:
    for name in names:
        importlib.import_module(name)


def fork_worker(settings: dict[str, Any], generation: int, close_fds: list[int]) -> int:
    zygote = os.getpid()
    pid = os.fork()
    if pid:
        return pid
    # The child: drop the zygote's pipes and signal plumbing, then become a worker.
    code = 0
    try:
        signal.set_wakeup_fd(-1)
        for fd in close_fds:
            os.close(fd)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        die_with_parent(zygote)
        from .worker import WorkerSettings, serve

        serve(WorkerSettings(settings, generation))
    except BaseException:
        traceback.print_exc()
        code = 1
    finally:
        os._exit(code)


def reap_children(event_fd: int) -> None:
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        write_line(event_fd, {"event": "exited", "pid": pid, "status": os.waitstatus_to_exitcode(status)})


def freeze(enabled: bool) -> None:
    """Collect, then move every survivor to the permanent generation before a batch of forks.

    Collect first: freezing garbage would pin it for good. After the freeze a child's collector
    never walks the shared heap, so it never writes to (and copies) those pages.
    """
    if enabled:
        gc.collect()
        gc.freeze()


def wait_first_message(commands: LineReader) -> dict[str, Any]:
    while True:
        select.select([commands.fd], [], [])
        messages = commands.read()
        if messages is None:
            sys.exit(0)
        if messages:
            return messages[0]


def main(cmd_fd: int, event_fd: int, master: int) -> None:
    die_with_parent(master)
    # Ctrl-C on a foreground daemon reaches the whole process group; the master decides what
    # it means (a graceful stop), so the zygote and its workers must not die of it mid-task.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    os.set_blocking(cmd_fd, False)
    commands = LineReader(cmd_fd)
    first = wait_first_message(commands)  # the master sends settings alone, then waits for us
    settings, generation = first["settings"], first["generation"]
    started = time.monotonic()
    try:
        import_modules(settings["preload"] + settings["task_modules"])
    except BaseException as exc:
        write_line(
            event_fd,
            {"event": "failed", "error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()},
        )
        sys.exit(1)
    write_line(event_fd, {"event": "ready", "pid": os.getpid(), "import_s": time.monotonic() - started})

    wake_read, wake_write = os.pipe()
    os.set_blocking(wake_write, False)
    signal.set_wakeup_fd(wake_write)
    signal.signal(signal.SIGCHLD, lambda signum, frame: None)
    inherited = [cmd_fd, event_fd, wake_read, wake_write]
    while True:
        try:
            readable, _, _ = select.select([cmd_fd, wake_read], [], [])
        except InterruptedError:  # pragma: no cover - PEP 475 retries select for us
            continue
        if wake_read in readable:
            os.read(wake_read, 4096)
            reap_children(event_fd)
        if cmd_fd in readable:
            messages = commands.read()
            if messages is None:
                break  # the master closed the pipe: retire
            for command in messages:
                if command.get("cmd") == "fork":
                    freeze(settings["gc_freeze"])
                    for _ in range(command["count"]):
                        pid = fork_worker(settings, generation, inherited)
                        write_line(event_fd, {"event": "forked", "pid": pid})
    reap_children(event_fd)


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]))
