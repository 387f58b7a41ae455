"""What the reliability suite shares: its scale, a client that counts every reply, a thread that
kills processes at random (Chaos), process figures.

The suite runs short by default (CI) and long with WORKERD_STRESS=1; `scaled(short, long)` picks
the count. Every test reports what it did through `report()`, and the suite's conftest prints the
reports at the end of the run (with or without -s).

`Counter` replies are counted at the wire, on a plain DEALER, not through workerctl.Client: the
client drops a reply for a request nobody waits for any more, which would hide the very bug
these tests look for (a second terminal reply for one request).
"""

from __future__ import annotations

import collections
import os
import random
import signal
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

import msgpack
import psutil
import zmq

from workerctl import Client, protocol

STRESS = os.environ.get("WORKERD_STRESS", "") not in ("", "0")
REPORTS: list[tuple[str, dict[str, Any]]] = []

# After the last expected reply, how long to keep listening for a reply that should not come.
SETTLE_S = 0.5
# A driver gives up when no reply has come for this long.
STALL_S = 30.0


def scaled(short: int, long: int) -> int:
    """`long` under WORKERD_STRESS=1, else `short`."""
    return long if STRESS else short


def report(test: str, **counts: Any) -> None:
    """Record a test's counts: printed at once (with -s) and in the suite's summary."""
    REPORTS.append((test, counts))
    print(f"\n[reliability] {test}: " + ", ".join(f"{k}={v}" for k, v in counts.items()), flush=True)


def request(request_id: Any, cmd: str, **fields: Any) -> list[bytes]:
    """The frames a DEALER sends for one request."""
    return [b"", protocol.encode_request(request_id, cmd, **fields)]


class Tally:
    """What came back: terminal replies per request id, error codes, stream items."""

    def __init__(self) -> None:
        self.terminal: collections.Counter[Any] = collections.Counter()
        self.codes: collections.Counter[str] = collections.Counter()
        self.results: dict[Any, Any] = {}
        self.items = 0
        self.undecodable = 0

    @property
    def replies(self) -> int:
        return sum(self.terminal.values())

    def duplicates(self) -> dict[Any, int]:
        return {key: n for key, n in self.terminal.items() if n > 1}

    def take(self, frames: list[bytes]) -> Any:
        """Count one message; returns the id of a terminal reply, or None for a stream item."""
        try:
            body = msgpack.unpackb(frames[1], raw=False, strict_map_key=False)
        except Exception:
            self.undecodable += 1
            return None
        if "stream" in body:
            self.items += 1
            return None
        key = body.get("id")
        self.terminal[key] += 1
        if body.get("ok"):
            self.codes["OK"] += 1
            self.results[key] = body.get("result")
        else:
            code = body["error"]["code"]
            self.codes[code] += 1
            self.results[key] = body["error"]
        return key


class Counter:
    """A DEALER on the control socket that counts every reply it gets, duplicates included."""

    def __init__(self, path: str, context: zmq.Context[Any] | None = None) -> None:
        self.context = context or zmq.Context.instance()
        self.sock = self.context.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.RCVHWM, 0)
        self.sock.setsockopt(zmq.SNDTIMEO, 30_000)
        self.sock.connect(f"ipc://{path}")
        self.tally = Tally()
        self.sent = 0

    def close(self) -> None:
        self.sock.close(linger=0)

    def __enter__(self) -> Counter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def send(self, frames: list[bytes]) -> None:
        self.sock.send_multipart(frames)
        self.sent += 1

    def receive(self, timeout_s: float) -> list[Any]:
        """Take what arrives within `timeout_s` (at least one message if any comes); the ids of
        the terminal replies among them."""
        done = []
        if self.sock.poll(max(0, int(timeout_s * 1000))):
            while self.sock.poll(0):
                key = self.tally.take(self.sock.recv_multipart())
                if key is not None:
                    done.append(key)
        return done

    def wait_replies(self, count: int, timeout_s: float) -> bool:
        """Receive until `count` terminal replies have come in all (True), or `timeout_s` passes."""
        deadline = time.monotonic() + timeout_s
        while self.tally.replies < count and time.monotonic() < deadline:
            self.receive(0.1)
        return self.tally.replies >= count

    def settle(self, quiet_s: float = SETTLE_S) -> None:
        """Listen until nothing has come for `quiet_s`: late or duplicate replies are counted."""
        while self.receive(quiet_s):
            pass

    def drive(
        self,
        requests: Iterable[tuple[Any, list[bytes]]],
        window: int,
        timeout_s: float,
        alive: Callable[[], bool] = lambda: True,
    ) -> set[Any]:
        """Send (id, frames) requests with at most `window` in flight until each has its terminal
        reply; then settle. Gives up when `timeout_s` passes, when nothing has come for STALL_S,
        or when `alive()` turns false. Returns the ids still unanswered (lost)."""
        pending: set[Any] = set()
        source = iter(requests)
        exhausted = False
        watch = Watch(timeout_s, alive)
        while (pending or not exhausted) and watch.going(self.tally.replies):
            while not exhausted and len(pending) < window:
                item = next(source, None)
                if item is None:
                    exhausted = True
                    break
                key, frames = item
                pending.add(key)
                self.send(frames)
            for key in self.receive(0.2):
                pending.discard(key)
        self.settle()
        return pending

    def drive_by_count(
        self,
        messages: Iterable[list[bytes]],
        window: int,
        timeout_s: float,
        alive: Callable[[], bool] = lambda: True,
    ) -> int:
        """Send messages with at most `window` of them unanswered, for messages whose reply ids
        are not known in advance (the daemon answers what it could read); then settle. Returns
        how many got no reply."""
        source = iter(messages)
        exhausted = False
        watch = Watch(timeout_s, alive)

        def answered() -> int:
            return self.tally.replies + self.tally.undecodable

        while (self.sent > answered() or not exhausted) and watch.going(answered()):
            while not exhausted and self.sent - answered() < window:
                frames = next(source, None)
                if frames is None:
                    exhausted = True
                    break
                self.send(frames)
            self.receive(0.2)
        self.settle()
        return self.sent - answered()


class Watch:
    """When a driver gives up: past its deadline, after STALL_S without progress, or when the
    daemon is gone (so a dead daemon fails a test at once instead of at its timeout)."""

    def __init__(self, timeout_s: float, alive: Callable[[], bool]) -> None:
        self.deadline = time.monotonic() + timeout_s
        self.alive = alive
        self.progress = -1
        self.stall_at = 0.0

    def going(self, progress: int) -> bool:
        now = time.monotonic()
        if progress != self.progress:
            self.progress, self.stall_at = progress, now + STALL_S
        return now < self.deadline and now < self.stall_at and self.alive()


class Chaos:
    """A thread that SIGKILLs a busy worker at random intervals until stopped.

    `victims()` names the candidates; at least `min_gap_s` passes between two kills, far longer
    than one small task takes, so a request re-run after a kill finishes before the next one."""

    def __init__(
        self, victims: Callable[[Client], list[int]], socket: str, gap_s: tuple[float, float]
    ) -> None:
        self.victims = victims
        self.socket = socket
        self.gap_s = gap_s
        self.killed: list[int] = []
        self.stopped = threading.Event()
        self.error: BaseException | None = None
        self.rng = random.Random(int(os.environ.get("WORKERD_CHAOS_SEED", random.randrange(2**32))))
        self.thread = threading.Thread(target=self.run, daemon=True)

    def __enter__(self) -> Chaos:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopped.set()
        self.thread.join(30)
        if self.error is not None:
            raise self.error

    def run(self) -> None:
        try:
            with Client(self.socket, timeout=30) as client:
                while not self.stopped.wait(self.rng.uniform(*self.gap_s)):
                    candidates = self.victims(client)
                    if not candidates:
                        continue
                    pid = self.rng.choice(candidates)
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        continue
                    self.killed.append(pid)
        except BaseException as exc:  # reported by __exit__, in the test's thread
            self.error = exc


# -- processes -----------------------------------------------------------------------------------


def rss(pid: int) -> int:
    return int(psutil.Process(pid).memory_info().rss)


def fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def workers_of(status: dict[str, Any]) -> list[int]:
    return [w["pid"] for w in status["pool"]["workers"] if w["state"] in ("idle", "busy")]


def mib(n: float) -> str:
    return f"{n / 2**20:.1f}MiB"
