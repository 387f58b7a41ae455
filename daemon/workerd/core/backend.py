"""What the master asks of every backend: the CPU pool, the GPU workers, the Ray bridge.

Runs in: the master. It holds its backends in a list and goes through them alike each turn
of its loop (master.py): when each is due next, tick, dispatch, a reaped child, the stop. A
backend is what differs between them: what its child process is, and how a job is sent to it
and answered; the mechanics around that are the shared layer beside this module (child.py,
kill.py, backoff.py, fanout.py, lifecycle.py).
"""

from __future__ import annotations

import collections
from typing import NamedTuple, Protocol

from workerd.core.lifecycle import Job, Ledger
from workerd.core.queue import JobQueue
from workerd.core.reactor import Reactor


class Services(NamedTuple):
    """What the master lends every backend: the one ledger and reactor, the event counters,
    and its private directory (stack dumps, a private Ray head's files)."""

    ledger: Ledger
    reactor: Reactor
    counters: collections.Counter[str]
    private_dir: str


class Backend(Protocol):
    @property
    def kind(self) -> str:
        """Job.pool of its jobs: "cpu" | "gpu" | "cluster"."""
        ...

    @property
    def busy(self) -> bool:
        """Does a job of it still run (a stop waits for these)?"""
        ...

    @property
    def exited(self) -> bool:
        """Is every child process of it gone?"""
        ...

    @property
    def queue(self) -> JobQueue:
        """Its jobs waiting for a child (a departed client's leave it at once, handlers.depart)."""
        ...

    def submit(self, job: Job) -> None: ...
    def cancel(self, job: Job, terminate: bool) -> str: ...
    def dispatch(self) -> None: ...
    def next_deadline(self) -> float: ...
    def tick(self) -> None: ...
    def reaped(self, pid: int, status: int) -> bool:
        """A child of the master exited: was it one of ours? (Then it is settled.)"""
        ...

    def begin_stop(self) -> None:
        """No new work: what waits is answered SHUTTING_DOWN, retries are cancelled, what runs
        goes on until the grace period ends."""
        ...

    def abort_running(self) -> None:
        """The grace period is over: what still runs is answered and killed."""
        ...


def fate_once_answered(job: Job) -> str:
    """What `cancel` reports of a job answered while it acted (by what a worker's channel
    brought): "cancelled" if that answer was CANCELLED, else "unknown" (not in flight)."""
    return "cancelled" if job.outcome == "cancelled" else "unknown"
