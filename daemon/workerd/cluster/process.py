"""One Ray bridge process, as the master sees it: its pid and channel, the jobs it holds, its
phase, and what was asked of it and not yet answered.

The cluster backend (backend.py) holds one serving bridge and, after a reload, retiring ones
that finish the jobs they hold and stop. A BridgeProcess only does the mechanics of its own
process (spawn with its channel, send, flush, read, kill on a broken channel, asks with
deadlines) and says by return values what it read; the backend decides what each message
means for the job lifecycle, so that a reaped pid, a message or a deadline reaches the bridge
it belongs to and no other.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import os
import signal
import time
from collections.abc import Callable
from typing import Any

from workerd import memory
from workerd.config import Config, gpu_worker_settings
from workerd.core import processes
from workerd.core.lifecycle import WHEN_ASSIGNED, Lane
from workerd.core.reactor import Reactor
from workerd.core.transport import Channel, ChannelError, channel_pair
from workerd.pool.backend import FRAME_SLACK

log = logging.getLogger("workerd.cluster")

# Jobs a bridge holds at first, before it says how many CPUs the cluster has (backend.py).
MIN_IN_FLIGHT = 16

Callback = Callable[[Any], None]
Frames = list[Any]

# Phases: starting (spawned, not connected) -> ready -> stopping (told to stop, or killed).
STARTING, READY, STOPPING = "starting", "ready", "stopping"


def bridge_settings(config: Config, max_frame: int, temp_dir: str) -> dict[str, Any]:
    """What a bridge is started with (bridge.py main)."""
    cluster = config.cluster
    gpu = gpu_worker_settings(config)
    return {
        "master_pid": os.getpid(),
        "log_level": logging.getLogger().getEffectiveLevel(),
        "address": cluster.address,
        "ship_modules": cluster.ship_modules,
        "task_modules": list(config.tasks.modules),
        "pipelines_on_cluster": cluster.pipelines,
        "pipelines": gpu.pop("pipelines"),
        "gpu": gpu,
        "num_gpus": cluster.num_gpus,
        "max_message_bytes": max_frame,
        "temp_dir": temp_dir,
    }


class BridgeProcess:
    def __init__(self, pid: int, channel: Channel, reactor: Reactor) -> None:
        self.pid = pid
        self.channel: Channel | None = channel
        self.reactor = reactor
        self.phase = STARTING
        self.lane = Lane(MIN_IN_FLIGHT, starts=WHEN_ASSIGNED)
        self.jobs_done = 0
        self.tokens = (b"%d" % n for n in itertools.count(1))
        self.asks: dict[bytes, tuple[Callback, float]] = {}  # token -> (its answer's callback, deadline)

    @classmethod
    def spawn(
        cls,
        settings: dict[str, Any],
        max_frame: int,
        reactor: Reactor,
        on_readable: Callable[[BridgeProcess], None],
    ) -> BridgeProcess:
        """Start `python -m workerd.cluster.bridge` with its end of a new channel. Raises
        OSError when the kernel refuses."""
        channel, theirs = channel_pair(max_frame + FRAME_SLACK)
        try:
            pid = processes.spawn(
                "workerd.cluster.bridge",
                [json.dumps(settings), str(theirs.fileno())],
                [theirs.fileno()],
            )
        except OSError:
            channel.close()
            raise
        finally:
            theirs.close()
        bridge = cls(pid, channel, reactor)
        reactor.watch(channel.fileno(), lambda: on_readable(bridge))
        return bridge

    # -- channel -------------------------------------------------------------------------------

    def send(self, frames: Frames) -> None:
        if self.channel is not None:
            self.channel.send(frames)
            self.flush()

    def flush(self) -> None:
        channel = self.channel
        if channel is None:
            return
        try:
            done = channel.flush()
        except OSError:
            done = True  # gone: reaping it settles everything
            channel.out.clear()
        self.reactor.want_write(channel.fileno(), None if done else self.flush)

    def receive(self) -> list[Frames]:
        """What the bridge sent. At the channel's end the bridge is exiting, and its reaping
        settles what it held; a bridge that broke its channel is killed, to the same end."""
        messages = self.read()
        if messages is None:
            if self.channel is not None and not self.channel.closed:
                self.kill()
            return []
        return messages

    def close(self) -> list[Frames]:
        """The process was reaped: its last messages (sent before it went), the channel closed."""
        channel = self.channel
        if channel is None:
            return []
        last = self.read() or []
        self.reactor.unwatch(channel.fileno())
        channel.close()
        self.channel = None
        return last

    def read(self) -> list[Frames] | None:
        """The messages waiting; None once the channel is broken or at its end (never read
        again)."""
        channel = self.channel
        if channel is None:
            return []
        try:
            messages = channel.receive()
        except ChannelError as exc:
            log.error("the Ray bridge (pid %d) broke its channel (%s)", self.pid, exc)
            messages = None
        if messages is None:
            self.reactor.unwatch(channel.fileno())
        return messages

    # -- asks ----------------------------------------------------------------------------------

    def ask(self, op: bytes, args: list[bytes], callback: Callback, wait: float) -> None:
        token = next(self.tokens)
        self.asks[token] = (callback, time.monotonic() + wait)
        self.send([op, token, *args])

    def answered(self, token: bytes) -> Callback | None:
        ask = self.asks.pop(token, None)
        return None if ask is None else ask[0]

    def overdue_asks(self, now: float) -> list[Callback]:
        late = [token for token, (_, deadline) in self.asks.items() if now >= deadline]
        return [self.asks.pop(token)[0] for token in late]

    def drop_asks(self) -> list[Callback]:
        callbacks = [callback for callback, _ in self.asks.values()]
        self.asks.clear()
        return callbacks

    def next_deadline(self) -> float:
        asks = min((deadline for _, deadline in self.asks.values()), default=math.inf)
        return min(asks, self.lane.next_deadline())

    # -- stop ----------------------------------------------------------------------------------

    def stop(self) -> None:
        """Ask it to end: ray.shutdown() when connected (a private head stops with it), SIGTERM
        while it is still connecting. Once."""
        if self.phase == STOPPING:
            return
        if self.phase == READY:
            self.send([b"stop"])
        else:
            processes.signal_quietly(self.pid, signal.SIGTERM)
        self.phase = STOPPING

    def kill(self) -> None:
        processes.signal_quietly(self.pid, signal.SIGKILL)
        self.phase = STOPPING

    def describe(self, state: str) -> dict[str, Any]:
        """Its line in memory_status's `workers`."""
        line = {"pid": self.pid, "kind": "bridge", "state": state, "tasks_done": self.jobs_done}
        return line | memory.process_memory(self.pid)
