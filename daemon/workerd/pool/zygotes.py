"""The master's side of a zygote: its channel, its pid, what it serves, its standby.

Runs in: the master. The zygote itself, and the packets on its channel, are pool/zygote.py's.
"""

from __future__ import annotations

import os
import socket
from typing import Any

from workerd.config import Config
from workerd.core import processes
from workerd.messages import ZYGOTE_FORK, ZYGOTE_FORK_FAILED, ZYGOTE_FORKED
from workerd.pool.packets import Event, receive, send


class ZygoteHandle:
    """The master's view of one zygote (or standby): its channel, pid and what it serves."""

    def __init__(
        self, sock: socket.socket, pid: int, generation: int, config: Config, modules: frozenset[str]
    ) -> None:
        self.sock = sock
        self.pid = pid
        self.generation = generation
        self.config = config  # takes effect in the pool once this zygote is ready
        self.modules = modules
        self.ready = False
        self.sys_path: list[str] = []  # the zygote's, once ready
        self.retiring = False
        self.taking_over = False  # a standby told to serve, not ready yet
        self.pending_forks = 0
        self.standby: ZygoteHandle | None = None

    @classmethod
    def start(cls, settings: dict[str, Any], generation: int, config: Config) -> ZygoteHandle:
        """Spawn a fresh zygote and send it what to import. Raises OSError if it cannot start."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            pid = processes.spawn(
                "workerd.pool.zygote", [str(theirs.fileno()), str(os.getpid())], [theirs.fileno()]
            )
        except OSError:
            ours.close()
            raise
        finally:
            theirs.close()
        handle = cls(ours, pid, generation, config, frozenset(settings["task_modules"]))
        handle.send({"settings": settings, "generation": generation})
        return handle

    def adopt_standby(self, fd: int | None, pid: int) -> None:
        """Keep the channel of this zygote's standby (replacing an earlier one)."""
        if self.standby is not None:
            self.standby.close()
            self.standby = None
        if fd is not None:
            sock = socket.socket(fileno=fd)
            self.standby = ZygoteHandle(sock, pid, self.generation, self.config, self.modules)

    def fileno(self) -> int:
        return self.sock.fileno()

    def send(self, message: dict[str, Any]) -> None:
        try:
            send(self.sock, message)
        except OSError:
            pass  # the zygote died; reaping it reports that

    def fork(self, count: int = 1) -> None:
        self.pending_forks += count
        self.send({"cmd": ZYGOTE_FORK, "count": count})

    def read_events(self) -> list[Event] | None:
        events = receive(self.sock)
        if events is not None:
            self.pending_forks -= sum(
                1 for e, _ in events if e.get("event") in (ZYGOTE_FORKED, ZYGOTE_FORK_FAILED)
            )
        return events

    def retire(self) -> None:
        """Close the channel: the zygote exits once it has read everything (its standby too)."""
        self.retiring = True
        self.close()

    def close(self) -> None:
        if self.standby is not None:
            self.standby.close()
            self.standby = None
        if self.sock.fileno() >= 0:
            self.sock.close()
