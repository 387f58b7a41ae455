"""One child process as the master sees it: its channel, its jobs, its kill window, its asks.

Runs in: the master.

Every backend's worker is one of these plus what is its own: a CPU worker (pool/) adds its
generation and recycling, a GPU worker (gpu/) its device and pipeline cache, the Ray bridge
(cluster/) its connection to the head. What they share is written here once, so that a fix made
for one holds for all:

  * the channel (transport.py): spawned with the child, or received from the zygote that forked
    it; watched in the reactor; messages queued by `send` go out at the end of the loop's turn
    (Reactor.flush), the rest on POLLOUT; a child that breaks the framing is killed. What a
    read frees is filled by the owner's dispatch, once a turn (master.poll_once), not per read;
  * the jobs it holds (lifecycle.Lane), settled once when it is gone (lifecycle.settle), after
    its last messages have been read: a result written just before an exit is a result, not a
    death;
  * the kill window (kill.py): a job past its deadline is answered TIMEOUT exactly once,
    whatever the child does meanwhile;
  * asks (memory, clear, gc): each with a token and a deadline, answered by the child, by the
    deadline, or when the child goes, never left waiting.

Why composition and not a base class: each backend's worker has its own phases and its own
reading of the same messages; a base class would have them call up and down through overrides.
The child reports each message to its owner (`on_message`) and says nothing else on its own.
"""

from __future__ import annotations

import itertools
import logging
import math
import signal
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from workerd.core import processes
from workerd.core.kill import KillWindow
from workerd.core.lifecycle import RUNNING, Job, Lane, Ledger, settle
from workerd.core.reactor import Reactor
from workerd.core.stacks import remove_stack
from workerd.core.transport import Channel, ChannelError, channel_pair

log = logging.getLogger("workerd")

# A child's frames carry a reply of at most max_message_bytes, plus a few small frames around it.
FRAME_SLACK = 64 * 1024

Callback = Callable[[Any], None]
OnMessage = Callable[[list[Any], float], None]


def frame_limit(max_message_bytes: int) -> int:
    """The largest frame a child may send or be sent, for a message size limit."""
    return max_message_bytes + FRAME_SLACK


class Child:
    def __init__(
        self,
        reactor: Reactor,
        ledger: Ledger,
        stack_dir: str,
        what: str,
        lane: Lane,
        on_message: OnMessage,
    ) -> None:
        self.reactor = reactor
        self.ledger = ledger
        self.stack_dir = stack_dir
        self.what = what  # how logs and errors name it: "worker 812", "GPU worker", "the Ray bridge"
        self.lane = lane
        self.on_message = on_message
        self.pid: int | None = None  # None once reaped: a reaped pid may be reused, never signal it
        self.channel: Channel | None = None
        self.kill: KillWindow | None = None
        self.killed = False  # SIGKILL sent (a timeout, a terminating cancel): its exit is ours
        self.asks: dict[bytes, tuple[Callback, float]] = {}
        self.tokens = (b"%d" % n for n in itertools.count(1))

    # -- process and channel -------------------------------------------------------------------

    def spawn(
        self, module: str, args: Sequence[str], limit: int, env: Mapping[str, str] | None = None
    ) -> None:
        """Start `python -m module *args FD`, FD its end of a new channel. Raises OSError when
        the kernel refuses (the caller backs off)."""
        channel, theirs = channel_pair(limit)
        try:
            pid = processes.spawn(module, [*args, str(theirs.fileno())], [theirs.fileno()], env)
        except OSError:
            channel.close()
            raise
        finally:
            theirs.close()
        self.attach(pid, channel)

    def attach(self, pid: int, channel: Channel) -> None:
        self.pid, self.channel, self.killed = pid, channel, False
        self.reactor.watch(channel.fileno(), self.read)

    @property
    def killing(self) -> bool:
        """A kill window is open, or SIGKILL was sent: it takes no job, and its exit is ours."""
        return self.kill is not None or self.killed

    def signal(self, signum: int) -> None:
        if self.pid is not None:
            processes.signal_quietly(self.pid, signum)

    def kill_now(self) -> None:
        self.signal(signal.SIGKILL)
        self.killed = True

    def send(self, frames: list[Any]) -> None:
        """Queue a message; it is written at the end of this turn of the loop."""
        if self.channel is not None and not self.channel.closed:
            self.channel.send(frames)
            self.reactor.flush_later(self)

    def flush(self) -> bool:
        """Write what is queued now; True when nothing waits (or the child is gone)."""
        channel = self.channel
        if channel is None or channel.closed:
            return True
        try:
            done = channel.flush()
        except OSError:
            done = True  # it is gone: its exit settles its jobs
            channel.out.clear()
        self.reactor.want_write(channel.fileno(), None if done else self.flush)
        return done

    def read(self) -> None:
        """Act on everything the child has sent. At EOF stop watching (its exit is reported
        apart, and settles its jobs); a child that broke its channel is alive and not to be
        trusted: it is killed."""
        channel = self.channel
        if channel is None or channel.closed:
            return
        try:
            messages = channel.receive()
        except ChannelError as exc:
            log.error("%s broke its channel (%s): killing it", self.what, exc)
            messages = None
        if messages is None:
            self.reactor.unwatch(channel.fileno())
            self.reactor.want_write(channel.fileno(), None)
            if not channel.closed:
                self.kill_now()
            return
        now = time.monotonic()
        for frames in messages:
            self.on_message(frames, now)

    def close(self) -> None:
        """Read what it sent before it went, then close the channel."""
        channel = self.channel
        if channel is None:
            return
        self.read()
        if channel.sock.fileno() >= 0:
            self.reactor.unwatch(channel.fileno())
            self.reactor.want_write(channel.fileno(), None)
        self.reactor.unflushed.discard(self)
        channel.close()
        self.channel = None

    # -- its end ---------------------------------------------------------------------------------

    def gone(self, how: str, retry: Callable[[Job], None] | None, hand_back: Callable[[Job], None]) -> bool:
        """The child has exited (reaped, or reported by its zygote): read its last messages,
        answer a job in its kill window TIMEOUT, settle the rest, answer what was asked of it.
        Returns True if it died in a kill window (its TIMEOUT answered here)."""
        pid = self.pid
        if pid is not None:
            processes.kill_group(pid)  # what it started (a spawned child leads its own group)
        self.close()
        self.pid = None
        timed_out = self.close_kill(alive=False)
        if pid is not None:
            settle(self.ledger, self.lane, pid, self.what, how, retry, hand_back)
            remove_stack(self.stack_dir, pid)
        self.drop_asks(f"{self.what} {how}")
        return timed_out

    def abort(self) -> None:
        """The stop's grace period is over: a job in its kill window gets its TIMEOUT now, the
        jobs still held are cut short, and the child is killed."""
        self.close_kill(alive=True)
        for job in list(self.lane.jobs):
            self.ledger.cut_short(job)
        self.kill_now()

    # -- deadlines -------------------------------------------------------------------------------

    def overdue(self, now: float) -> list[Job]:
        """The running jobs past their deadline (one, or several of a batch), if no kill window
        is open yet. A result on its way settles them first: what has arrived is read."""
        if self.kill is not None or self.killed or self.lane.next_deadline() > now:
            return []
        self.read()
        if self.kill is not None:
            return []
        return [job for job in self.lane.jobs if job.state is RUNNING and job.deadline <= now]

    def open_kill(self, jobs: Sequence[Job], now: float) -> None:
        """`jobs` ran past their deadline: their answer is TIMEOUT from now on (kill.py)."""
        if self.pid is not None:
            self.kill = KillWindow(jobs, self.pid, self.what, now)

    def close_kill(self, alive: bool) -> bool:
        """End the kill window, if one is open: SIGKILL (while `alive`) and the TIMEOUT."""
        window, self.kill = self.kill, None
        if window is None:
            return False
        if alive:
            self.killed = True
        return window.close(self.ledger, self.stack_dir, alive and self.pid is not None)

    def tick(self, now: float) -> bool:
        """Close a kill window whose grace is over, answer asks past their deadline. True if a
        TIMEOUT was answered."""
        self.expire_asks(now)
        if self.kill is not None and now >= self.kill.kill_at:
            return self.close_kill(alive=True)
        return False

    def next_deadline(self) -> float:
        times = [deadline for _, deadline in self.asks.values()]
        if self.kill is not None:
            times.append(self.kill.kill_at)
        elif not self.killed:  # once killed, its exit settles the lane: nothing is due before
            times.append(self.lane.next_deadline())
        return min(times, default=math.inf)

    # -- asks ------------------------------------------------------------------------------------

    def ask(self, op: bytes, args: list[bytes], callback: Callback, wait: float) -> None:
        """Send [op, token, *args]; `callback` gets the child's answer (see `answered`), or an
        {"error": …, "reason": "late" | "gone"} map once `wait` seconds pass or the child goes."""
        token = next(self.tokens)
        self.asks[token] = (callback, time.monotonic() + wait)
        self.send([op, token, *args])

    def answered(self, token: Any, value: Any) -> None:
        ask = self.asks.pop(bytes(token), None)
        if ask is not None:
            ask[0](value)

    def expire_asks(self, now: float) -> None:
        for token, (callback, deadline) in list(self.asks.items()):
            if now >= deadline:
                del self.asks[token]
                callback({"error": f"{self.what} did not answer in time", "reason": "late"})

    def drop_asks(self, why: str) -> None:
        asks, self.asks = self.asks, {}
        for callback, _ in asks.values():
            callback({"error": why, "reason": "gone"})
