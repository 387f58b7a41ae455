"""The kill window: timeout -> stack dump -> SIGKILL -> exactly one TIMEOUT.

Runs in: the master.

When a job runs past its deadline, its child (a CPU or GPU worker) is sent SIGUSR1, which dumps
its stacks (stacks.py), and is killed STACK_DUMP_GRACE_S later. The job's answer is TIMEOUT from
the moment the window opens, whatever the child does meanwhile:

    deadline --open--> window --grace over--> SIGKILL, TIMEOUT (with the stack)
                         |
                         +-- the child finishes the job: its result is dropped (Job.expired)
                         +-- it recycles, or is told to stop: the window stays open
                         +-- it dies, or its zygote does: TIMEOUT at once (with what it dumped)
                         +-- the stop's grace period ends: TIMEOUT at once, then SIGKILL

Why an object of its own and not a phase of the worker: as a phase ("killing") it was one
value among others that a recycle or a stop overwrote with theirs, and with it went the job
owed a TIMEOUT: the request never got a reply. The window holds the job itself, not its place
in the worker's lane, since a result arriving in the window takes it out of the lane.
"""

from __future__ import annotations

import signal
from collections.abc import Sequence

from workerd.core import processes
from workerd.core.lifecycle import Job, Ledger
from workerd.core.stacks import read_stack

# How long a timed-out child gets to write its stack dump before SIGKILL.
STACK_DUMP_GRACE_S = 0.2


class KillWindow:
    """One window per child killed: for the job past its deadline, or for each job of a batch
    that is (gpu/batches.py), since one kill ends them together."""

    def __init__(self, jobs: Sequence[Job], pid: int, what: str, now: float) -> None:
        self.jobs = list(jobs)
        self.pid = pid
        self.what = what
        self.kill_at = now + STACK_DUMP_GRACE_S
        for job in self.jobs:
            job.expired = True
        processes.signal_quietly(pid, signal.SIGUSR1)

    def close(self, ledger: Ledger, stack_dir: str, alive: bool) -> bool:
        """Kill the child (if it is still `alive`: a reaped pid may be reused) and answer its
        jobs TIMEOUT with the stack it dumped. True if this sent a TIMEOUT (not sent before)."""
        stack = read_stack(stack_dir, self.pid)
        if alive:
            processes.signal_quietly(self.pid, signal.SIGKILL)
        answered = [ledger.timed_out(job, self.pid, stack, self.what) for job in self.jobs]
        return any(answered)
