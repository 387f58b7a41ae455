"""The zygotes, as the pool sees them: one generation of task code each, started, served, lost.

Runs in: the master.

A generation is one import of the task code (`[pool] preload`, `[tasks] modules`) in a zygote
(zygote.py): the first at boot, one more per reload, and the same generation again when its
zygote dies (its standby takes over, or, without one, the code is imported again after a
back-off). This module owns the zygotes, which generation serves and its config; what concerns
workers and jobs it tells its owner, the pool (pool/backend.py), through the Owner interface,
never by writing the pool's fields.

Generation numbers only grow, and a restart keeps its generation's number: a reload started
before a crash restart still has the newest number, so the restart never retires it.
"""

from __future__ import annotations

import collections
import logging
import os
import time
from collections.abc import Callable
from typing import Any, Protocol

from workerctl import protocol
from workerd import memory, messages
from workerd.config import Config
from workerd.core.backoff import RESTART_FIRST_S, RESTART_MAX_S, Backoff
from workerd.core.processes import describe_exit
from workerd.core.reactor import Reactor
from workerd.pool.zygotes import ZygoteHandle

log = logging.getLogger("workerd.pool")


class Owner(Protocol):
    """What the zygotes' events mean to the pool that owns the workers and the queue."""

    @property
    def stopping(self) -> bool: ...
    def worker_forked(self, zygote: ZygoteHandle, pid: int, fd: int) -> None: ...
    def worker_exited(self, pid: int, status: int) -> None: ...
    def fork_failed(self, error: str) -> None: ...
    def generation_serves(self, generation: int, modules: frozenset[str]) -> None: ...
    def zygote_lost(self, generation: int, how: str) -> None: ...
    def fail_queue(self, code: str, message: str) -> None: ...
    def has_workers(self, generation: int) -> bool: ...
    def has_live_workers(self) -> bool: ...
    def changed(self) -> None: ...


class Generations:
    def __init__(
        self,
        owner: Owner,
        config: Config,
        stack_dir: str,
        reactor: Reactor,
        counters: collections.Counter[str],
    ) -> None:
        self.owner = owner
        self.config = config  # the serving generation's: a reload's applies once its code imported
        self.stack_dir = stack_dir
        self.reactor = reactor
        self.counters = counters
        self.zygotes: dict[int, ZygoteHandle] = {}
        self.generation = 0  # the generation serving now; numbers are never reused
        self.last_generation = 0
        self.failure: str | None = None  # why there is no usable zygote, if there is none
        self.restarts = Backoff(RESTART_FIRST_S, RESTART_MAX_S)
        # Called with (generation, ok, message) when a zygote is ready or failed to import.
        self.on_generation: Callable[[int, bool, str], None] = lambda generation, ok, message: None

    def serving(self) -> ZygoteHandle | None:
        """The zygote of the serving generation, if it is ready to fork."""
        zygote = self.zygotes.get(self.generation)
        return zygote if zygote is not None and zygote.ready else None

    def tick(self, now: float) -> None:
        if self.restarts.ready(now):
            log.info("restarting the zygote")
            self.restart()

    def close(self) -> None:
        for zygote in list(self.zygotes.values()):
            zygote.retire()

    def settings(self, config: Config) -> dict[str, Any]:
        pool = config.pool
        return {
            "preload": list(pool.preload),
            "task_modules": list(config.tasks.modules),
            "task_path": list(config.tasks.path),
            "gc_freeze": pool.gc_freeze,
            "stack_dir": self.stack_dir,
            "max_message_bytes": config.daemon.max_message_bytes,
            "max_tasks_per_worker": pool.max_tasks_per_worker,
            "max_worker_memory_mb": pool.max_worker_memory_mb,
        }

    def start(self, config: Config, generation: int | None = None) -> int:
        """Start a zygote for a new generation of task code; workers follow once it is ready.

        The config takes effect only when the zygote is ready: a reload whose code fails to
        import leaves the running generation, and its settings, untouched. Raises OSError if
        the zygote cannot be started (the caller answers for it)."""
        if generation is None:
            generation = self.last_generation + 1
        zygote = ZygoteHandle.start(self.settings(config), generation, config)
        self.last_generation = max(self.last_generation, generation)
        self.add(zygote)
        log.info("zygote generation %d starting (pid %d)", generation, zygote.pid)
        return generation

    def add(self, zygote: ZygoteHandle) -> None:
        self.zygotes[zygote.generation] = zygote
        self.reactor.watch(zygote.fileno(), lambda: self.handle(zygote))

    def handle(self, zygote: ZygoteHandle) -> None:
        events = zygote.read_events()
        if events is None:
            # Its end closed: it is exiting. Reaping it (SIGCHLD) says how; stop listening.
            self.reactor.unwatch(zygote.fileno())
            return
        for event, fd in events:
            self.event(zygote, event, fd)
        self.owner.changed()

    def event(self, zygote: ZygoteHandle, event: dict[str, Any], fd: int | None) -> None:
        kind = event.get("event")
        if kind == messages.ZYGOTE_FORKED and fd is not None:
            self.owner.worker_forked(zygote, event["pid"], fd)
        elif kind == messages.ZYGOTE_EXITED:
            self.owner.worker_exited(event["pid"], event["status"])
        elif kind == messages.ZYGOTE_FORK_FAILED:
            self.owner.fork_failed(event["error"])
        elif kind == messages.ZYGOTE_READY:
            zygote.adopt_standby(fd, event.get("standby_pid", 0))
            self.ready(zygote, event)
        elif kind == messages.ZYGOTE_STANDBY:
            zygote.adopt_standby(fd, event["pid"])
        elif kind == messages.ZYGOTE_FAILED:
            self.failed(zygote, f"task code failed to import: {event['error']}", event["traceback"])
        elif fd is not None:
            os.close(fd)

    def ready(self, zygote: ZygoteHandle, event: dict[str, Any]) -> None:
        zygote.ready = True
        zygote.sys_path = event.get("sys_path", [])
        self.restarts.reset()
        log.info("zygote generation %d ready: imports took %.3f s", zygote.generation, event["import_s"])
        self.failure = None
        if zygote.generation > self.generation:  # a new generation, not a restart of this one
            self.generation = zygote.generation
            self.config = zygote.config
            self.owner.generation_serves(zygote.generation, zygote.modules)
            self.on_generation(zygote.generation, True, f"generation {zygote.generation} ready")

    def failed(self, zygote: ZygoteHandle, message: str, details: str = "") -> None:
        log.error("zygote generation %d: %s\n%s", zygote.generation, message, details)
        self.drop(zygote)
        current = self.zygotes.get(self.generation)
        if current is None or not current.ready:
            # Nothing to fall back on: stay up (ping, status, reload work) but refuse CPU tasks
            # until a reload brings good code. Never retried on our own: that is a fork loop.
            self.failure = message
            self.owner.fail_queue(protocol.INTERNAL, f"CPU pool unavailable: {message}")
        self.on_generation(zygote.generation, False, message)

    def drop(self, zygote: ZygoteHandle) -> None:
        if self.zygotes.get(zygote.generation) is zygote:
            del self.zygotes[zygote.generation]
        if zygote.sock.fileno() >= 0:
            self.reactor.unwatch(zygote.fileno())
        zygote.retire()

    def reaped(self, pid: int, status: int) -> bool:
        """A child of the master exited (SIGCHLD): was it one of our zygotes?"""
        zygote = next((z for z in self.zygotes.values() if z.pid == pid), None)
        if zygote is None:
            return False
        how = describe_exit(status)
        if zygote.retiring:
            self.drop(zygote)
        elif zygote.taking_over and not zygote.ready:
            self.lose(zygote, how)  # the standby died before it served: import again
        elif not zygote.ready:
            self.failed(zygote, f"the zygote died while importing task code ({how})")
        else:
            self.lose(zygote, how)
        self.owner.changed()
        return True

    def lose(self, zygote: ZygoteHandle, how: str) -> None:
        """The zygote died (its workers die with it): settle their jobs, let the standby serve."""
        log.error("zygote generation %d (pid %d) %s", zygote.generation, zygote.pid, how)
        standby, zygote.standby = zygote.standby, None
        self.owner.zygote_lost(zygote.generation, how)
        self.drop(zygote)
        if self.owner.stopping or zygote.generation != self.generation:
            if standby is not None:
                standby.close()
            return
        self.counters["zygote_restarts"] += 1
        if standby is not None:
            log.info("the standby zygote (pid %d) takes over generation %d", standby.pid, zygote.generation)
            standby.send({"cmd": messages.ZYGOTE_SERVE})
            standby.taking_over = True
            self.add(standby)
            return
        # No standby (it died too, or could not be forked): import again, after a back-off.
        log.warning(
            "no standby zygote: generation %d restarts by importing its code again", zygote.generation
        )
        self.restarts.next(time.monotonic())

    def restart(self) -> None:
        if self.generation in self.zygotes:
            # A reload's zygote came ready during the back-off and serves this generation: a
            # restart now would start a second one beside it (never retired, never reaped).
            return
        try:
            self.start(self.config, self.generation)
        except OSError as exc:
            self.spawn_failed(exc)

    def spawn_failed(self, exc: OSError) -> None:
        message = f"cannot start a zygote: {exc}"
        log.error("%s", message)
        if not self.owner.has_live_workers():
            self.owner.fail_queue(protocol.INTERNAL, f"CPU pool unavailable: {message}; retrying")
        self.restarts.next(time.monotonic())

    def retire_old(self) -> None:
        """Close the channel of each older zygote left without workers; it exits."""
        for generation, zygote in list(self.zygotes.items()):
            if generation >= self.generation or zygote.retiring:
                continue
            if not self.owner.has_workers(generation):
                log.info("zygote generation %d retired", generation)
                self.reactor.unwatch(zygote.fileno())
                zygote.retire()

    def sys_path(self) -> list[str]:
        """Where the serving generation's zygote found the task code ([] until one is ready)."""
        zygote = self.zygotes.get(self.generation)
        return list(zygote.sys_path) if zygote is not None else []

    def memory(self) -> list[dict[str, Any]]:
        entries: list[dict[str, Any]] = []
        for generation, zygote in sorted(self.zygotes.items()):
            entries.append({"pid": zygote.pid, "generation": generation, "role": "serving"})
            if zygote.standby is not None and zygote.standby.pid > 0:
                entries.append({"pid": zygote.standby.pid, "generation": generation, "role": "standby"})
        return [{**entry, **memory.process_memory(entry["pid"])} for entry in entries]
