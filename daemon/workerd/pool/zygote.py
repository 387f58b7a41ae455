"""The zygote: imports the task code once, freezes that heap, and forks CPU workers from it.

Runs in: the zygote (spawned by the master), and in its standby and workers until they leave
it. Its master-side handle is pool/zygotes.py; its packets, pool/packets.py.

Why a separate process: the master holds a ZeroMQ context, whose I/O threads do not survive a
fork, and the master must never import task code (a module that crashes on import must not take
the control socket down). The zygote is a fresh interpreter with no threads and no ZeroMQ, so a
fork of it is clean.

The master talks to it over one SOCK_SEQPACKET socketpair, one JSON object per packet; a packet
may carry a file descriptor (SCM_RIGHTS):

    master -> zygote   {"settings": {...}, "generation": n}   first: what to import, how to fork
                       {"cmd": "fork", "count": n}
                       {"cmd": "serve"}                        to a standby: take over
    zygote -> master   {"event": "ready", "pid", "import_s", "sys_path"}  + fd: the standby's channel
                       {"event": "failed", "error", "traceback"}  import failed; zygote exits
                       {"event": "forked", "pid"}              + fd: the worker's channel
                       {"event": "fork_failed", "error"}       the kernel refused a fork
                       {"event": "exited", "pid", "status"}    a worker; status < 0: a signal
                       {"event": "standby", "pid"}             + fd: a new standby's channel

The standby: once imported, the zygote forks a copy of itself that does nothing but wait. If the
zygote dies (killed, out of memory), the master tells the standby to serve, and it becomes the
zygote of the same generation: the same code, never what is on disk now (an edit not yet
reloaded, or a half-written file, would otherwise run or break the pool). It costs page tables:
its heap is the zygote's, shared copy-on-write.

The zygote exits when the master closes its end, and dies with the master (PR_SET_PDEATHSIG);
workers die with their zygote the same way. The master reaps the zygote by SIGCHLD (it is the
master's child, and the master is a subreaper, so the standby becomes its child too).

The zygote leads a process group (processes.spawn) that its standby, its workers and whatever
they start share; when the zygote ends, retired or bereft of the master, it SIGKILLs that group,
so a preload's helper or a task's child process does not outlive its generation.

Descriptors: fds arrive close-on-exec (MSG_CMSG_CLOEXEC), or every process the master spawned
later would hold them; a fork copies every descriptor whatever its flag, so the zygote holds
nothing but its channel and wake pipe when it forks (a worker's or standby's channel end only
between its fork and its send), and each child closes those first.
"""

from __future__ import annotations

import gc
import importlib
import json
import os
import select
import signal
import socket
import sys
import time
import traceback
from typing import Any

from workerd import faults
from workerd.core import processes
from workerd.messages import (
    ZYGOTE_EXITED,
    ZYGOTE_FAILED,
    ZYGOTE_FORK,
    ZYGOTE_FORK_FAILED,
    ZYGOTE_FORKED,
    ZYGOTE_READY,
    ZYGOTE_SERVE,
    ZYGOTE_STANDBY,
)
from workerd.pool.packets import MAX_PACKET, receive, send


def import_modules(names: list[str]) -> None:
    for name in names:
        importlib.import_module(name)


def freeze(enabled: bool) -> None:
    """Collect, then move every survivor to the permanent generation before a batch of forks.

    Collect first: freezing garbage would pin it for good. After the freeze a child's collector
    never walks the shared heap, so it never writes to (and copies) those pages.
    """
    if enabled:
        gc.collect()
        gc.freeze()


class Zygote:
    """The serving loop: fork workers on request, report their exits, keep a standby."""

    def __init__(self, sock: socket.socket, settings: dict[str, Any], generation: int, master: int) -> None:
        self.sock = sock
        self.settings = settings
        self.generation = generation
        self.master = master
        self.standby_pid = 0
        self.wake_read, self.wake_write = os.pipe()
        os.set_blocking(self.wake_write, False)

    def closed_in_children(self) -> list[int]:
        return [self.sock.fileno(), self.wake_read, self.wake_write]

    def serve(self, import_s: float) -> None:
        try:
            self.loop(import_s)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the master is gone: so are we (and our workers, by their death signal)
        # Retired (no workers left) or bereft of the master: the standby, and anything a preload
        # or a task started, go with us. Us included: there is nothing left to do.
        processes.kill_own_group()

    def loop(self, import_s: float) -> None:
        signal.set_wakeup_fd(self.wake_write)
        signal.signal(signal.SIGCHLD, lambda signum, frame: None)
        freeze(self.settings["gc_freeze"])
        standby = self.fork_standby()
        ready = {
            "event": ZYGOTE_READY,
            "pid": os.getpid(),
            "import_s": import_s,
            "standby_pid": self.standby_pid,
            "sys_path": sys.path,  # where it found the task code: `status` shows it
        }
        send(self.sock, ready, standby)
        if standby is not None:
            os.close(standby)
        while True:
            readable, _, _ = select.select([self.sock.fileno(), self.wake_read], [], [])
            if self.wake_read in readable:
                os.read(self.wake_read, 4096)
                self.reap()
            if self.sock.fileno() in readable:
                commands = receive(self.sock)
                if commands is None:
                    break  # the master closed the channel: retire
                for command, _ in commands:
                    if command.get("cmd") == ZYGOTE_FORK:
                        self.fork_workers(command["count"])

    def reap(self) -> None:
        for pid, status in processes.reap():
            if pid == self.standby_pid:
                self.standby_pid = 0
                fd = self.fork_standby()  # a zygote always has a standby
                if fd is not None:
                    send(self.sock, {"event": ZYGOTE_STANDBY, "pid": self.standby_pid}, fd)
                    os.close(fd)
            else:
                send(self.sock, {"event": ZYGOTE_EXITED, "pid": pid, "status": status})

    def fork_workers(self, count: int) -> None:
        freeze(self.settings["gc_freeze"])
        for _ in range(count):
            try:
                pid, fd = self.fork_worker()
            except OSError as exc:
                send(self.sock, {"event": ZYGOTE_FORK_FAILED, "error": f"cannot fork a worker: {exc}"})
                continue
            send(self.sock, {"event": ZYGOTE_FORKED, "pid": pid}, fd)
            os.close(fd)

    def fork_worker(self) -> tuple[int, int]:
        """Fork one worker; returns its pid and the master's end of its channel."""
        faults.check("fork")
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            pid = os.fork()
        except OSError:
            ours.close()
            theirs.close()
            raise
        if pid == 0:
            ours.close()
            self.become_worker(theirs)
        theirs.close()
        return pid, ours.detach()

    def become_worker(self, sock: socket.socket) -> None:
        zygote = os.getppid()
        code = 0
        try:
            self.leave()
            processes.die_with_parent(zygote)
            from workerd.pool.worker import WorkerSettings, serve

            serve(WorkerSettings(self.settings, self.generation), sock)
        except BaseException:
            traceback.print_exc()
            code = 1
        finally:
            os._exit(code)

    def leave(self) -> None:
        """In a child: drop the zygote's channel and signal plumbing."""
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        signal.signal(processes.MASTER_GONE, signal.SIG_DFL)  # only a serving zygote kills the group
        for fd in self.closed_in_children():
            os.close(fd)

    def fork_standby(self) -> int | None:
        """Fork the standby; returns the master's end of its channel (None if the fork failed)."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            pid = os.fork()
        except OSError as exc:
            print(f"workerd zygote: cannot fork a standby: {exc}", file=sys.stderr)
            ours.close()
            theirs.close()
            return None
        if pid == 0:
            ours.close()
            self.become_standby(theirs)
        theirs.close()
        self.standby_pid = pid
        return ours.detach()

    def become_standby(self, sock: socket.socket) -> None:
        """Wait, doing nothing, until the master says serve (or goes away)."""
        code = 0
        try:
            self.leave()
            while True:
                data = sock.recv(MAX_PACKET)
                if not data:
                    break  # the master or our zygote retired us
                if json.loads(data).get("cmd") == ZYGOTE_SERVE:
                    # Our zygote is dead and we are the master's child now (it is a subreaper).
                    processes.take_group_down_with_parent(self.master)
                    Zygote(sock, self.settings, self.generation, self.master).serve(0.0)
                    break
        except BaseException:
            traceback.print_exc()
            code = 1
        finally:
            os._exit(code)


def main(fd: int, master: int) -> None:
    processes.take_group_down_with_parent(master)
    # The master decides what Ctrl-C means (a graceful stop): the zygote and its workers must
    # not die of it mid-task. A terminal's Ctrl-C reaches only the master's process group, not
    # ours; this covers a SIGINT sent to our group on purpose (workers inherit it).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    sock = socket.socket(fileno=fd)
    data = sock.recv(MAX_PACKET)
    if not data:
        sys.exit(0)
    first = json.loads(data)
    settings, generation = first["settings"], first["generation"]
    started = time.monotonic()
    processes.put_first_on_path(settings.get("task_path", []))
    try:
        import_modules(settings["preload"] + settings["task_modules"])
    except BaseException as exc:
        send(
            sock,
            {
                "event": ZYGOTE_FAILED,
                "error": f"{type(exc).__name__}: {exc}",
                "traceback": traceback.format_exc(),
            },
        )
        sys.exit(1)
    Zygote(sock, settings, generation, master).serve(time.monotonic() - started)


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]))
