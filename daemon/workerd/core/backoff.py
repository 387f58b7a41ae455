"""One back-off for everything that is retried after a failure: a fork, a spawn, a zygote's
import, the Ray bridge's connection.

Runs in: the master.

The delay doubles from `first_s` with each failure in a row, up to `max_s`, so broken code or a
kernel that keeps refusing never becomes a loop; a success resets it. `due` is when the retry
is owed: the master's loop sleeps until then (next_deadline) and the owner retries in its tick.

Why `cancel` is its own verb: a retry that is due but will never be made (the daemon is
stopping) must stop being due. A deadline left in the past makes the loop poll at 0 ms for the
rest of the stop, which is how the GPU worker's and the bridge's stops spun at full CPU.
"""

from __future__ import annotations

import math

# Restarting a child that died or could not start (a zygote, a worker, a GPU worker): broken
# code or a refusing kernel is retried at 0.1 s, then less and less often, at most every 30 s.
RESTART_FIRST_S = 0.1
RESTART_MAX_S = 30.0


class Backoff:
    def __init__(self, first_s: float, max_s: float) -> None:
        self.first_s = first_s
        self.max_s = max_s
        self.failures = 0  # in a row, since the last success
        self.due = math.inf  # when the pending retry is owed; inf: none is

    @property
    def pending(self) -> bool:
        return self.due != math.inf

    def next(self, now: float) -> float:
        """Count a failure and owe a retry after the delay it earns; returns the delay."""
        self.failures += 1
        delay = min(self.first_s * 2.0 ** (self.failures - 1), self.max_s)
        self.due = now + delay
        return delay

    def now(self, now: float) -> None:
        """Owe a retry at once, counting no failure (a replacement, not a recovery)."""
        self.due = now

    def ready(self, now: float) -> bool:
        """Is the retry due? It is no longer owed once this says so: the caller makes it."""
        if now < self.due:
            return False
        self.due = math.inf
        return True

    def reset(self) -> None:
        """A success: the next failure waits `first_s` again."""
        self.failures = 0

    def cancel(self) -> None:
        """No retry is owed any more (failures still count)."""
        self.due = math.inf
