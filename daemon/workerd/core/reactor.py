"""The master's one poller: which fd or ZeroMQ socket is watched, and who handles it.

Runs in: the master.

Every source of events registers a callback here: the control socket, the signal wakeup pipe,
each zygote's channel, each worker's channel, the metrics endpoint. The loop polls once and calls
the handlers of what is ready, so adding a kind of worker never touches the loop itself.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import zmq

Handler = Callable[[], object]
POLLIN, POLLOUT, POLLERR = int(zmq.POLLIN), int(zmq.POLLOUT), int(zmq.POLLERR)


class Flushable(Protocol):
    def flush(self) -> bool: ...


class Reactor:
    def __init__(self) -> None:
        self.poller = zmq.Poller()
        self.readers: dict[Any, Handler] = {}
        self.writers: dict[Any, Handler] = {}
        # Channels with messages queued this turn. Written at the end of the turn, in one
        # sendmsg each: several jobs for one worker cost one wake-up, not one each.
        self.unflushed: set[Flushable] = set()

    def watch(self, target: Any, on_read: Handler) -> None:
        """Call on_read whenever `target` (an fd or a zmq.Socket) is readable."""
        self.readers[target] = on_read
        self._register(target)

    def unwatch(self, target: Any) -> None:
        self.readers.pop(target, None)
        self.writers.pop(target, None)
        self._register(target)

    def want_write(self, target: Any, on_write: Handler | None) -> None:
        """Call on_write once `target` is writable (None: stop asking)."""
        if on_write is None:
            if self.writers.pop(target, None) is not None:
                self._register(target)
            return
        if target not in self.writers:
            self.writers[target] = on_write
            self._register(target)
        self.writers[target] = on_write

    def _register(self, target: Any) -> None:
        flags = (POLLIN if target in self.readers else 0) | (POLLOUT if target in self.writers else 0)
        if flags:
            self.poller.register(target, flags)
            return
        try:
            self.poller.unregister(target)
        except KeyError:
            pass

    def poll(self, timeout_ms: int) -> list[tuple[Any, int]]:
        return self.poller.poll(timeout_ms)

    def dispatch(self, events: list[tuple[Any, int]]) -> None:
        """Call the handler of each ready target (one that went away meanwhile is skipped)."""
        for target, flags in events:
            if flags & POLLOUT:
                handler = self.writers.get(target)
                if handler is not None:
                    handler()
            if flags & (POLLIN | POLLERR):
                handler = self.readers.get(target)
                if handler is not None:
                    handler()

    def flush_later(self, target: Flushable) -> None:
        self.unflushed.add(target)

    def flush(self) -> None:
        """Write what this turn queued on each channel (the rest waits for POLLOUT)."""
        unflushed, self.unflushed = self.unflushed, set()
        for target in unflushed:
            target.flush()
