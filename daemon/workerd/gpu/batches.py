"""Dynamic batching, the master's side: which queued runs a free GPU worker takes together, when
an idle device waits for a fuller batch, and what a batch past a deadline does.

Runs in: the master (pipelines/batching.py runs the batch in the GPU worker).

No timer by default. A free worker takes every queued run of one pipeline, up to its
`[pipelines.NAME] max_batch`, at once: at low load a run waits for nobody, and at high load the
batch fills on its own while the previous one runs. A timer that waits for a full batch (what
TorchServe's max_batch_delay does) adds its delay to every run at low load, for nothing.
`max_wait_ms` > 0 may still wait, only while the device is idle: runs that arrived at an idle
worker wait up to max_wait_ms from the oldest one's arrival for more of their pipeline; runs that
queued behind a busy device are taken at once (they have waited already).

A batch is one run to placement, the budget and the host tier (the worker's view counts it
once), but each of its requests keeps its own life in the worker's Lane: the worker says it
started them all (START with every id), each is answered alone through Ledger.finish, a cancel
reaches one of them, a death settles each (core.lifecycle.settle: each may have run). A batch
past its earliest deadline is one kill window (core/kill.py) for the runs past theirs; the
others are taken out of the lane and queued again at the front, not failed: a job is re-queued
only when another one of its batch is answered TIMEOUT, so the re-queues always make progress;
and a run put back REQUEUES_ALONE times runs alone next, so no run is put back for ever (a
patient run batched again and again with fresh runs that time out).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from workerctl import protocol
from workerd import messages
from workerd.config import PipelineConfig
from workerd.core.lifecycle import RUNNING, Job, Lane
from workerd.core.queue import JobQueue

# A run put back this many times by other runs' timeouts runs alone next: whatever its batch
# partners do, it then gets its own reply (the re-queues of one run are bounded).
REQUEUES_ALONE = 2


def take_batch(queue: JobQueue, first: Job, max_batch: int) -> list[Job]:
    """`first` and the next runs of its pipeline in the queue's order (core/queue.py: level, then
    a fair share between clients, then age), up to `max_batch` in all; a run put back
    REQUEUES_ALONE times goes alone."""
    jobs = [first]
    if first.requeues >= REQUEUES_ALONE:
        return jobs
    while len(jobs) < max_batch:
        job = queue.take(lambda key: key == first.key)
        if job is None:
            break
        if job.requeues >= REQUEUES_ALONE:
            queue.push(job)  # it waits for a batch of its own, next
            break
        jobs.append(job)
    return jobs


def hold_until(
    pipeline: PipelineConfig | None, waiting: int, oldest: float, idle_since: float, now: float
) -> float:
    """Until when a worker idle since `idle_since` waits for a fuller batch of `pipeline`, whose
    `waiting` runs arrived at `oldest` first (0: take what waits now)."""
    if pipeline is None or pipeline.max_wait_ms <= 0 or not waiting or waiting >= pipeline.max_batch:
        return 0.0
    if oldest < idle_since:  # it waited behind a busy device: no timer on top
        return 0.0
    due = oldest + pipeline.max_wait_ms / 1000
    return due if due > now else 0.0


def batch_message(jobs: list[Job], max_batch: int) -> list[Any]:
    """[BATCH, msgpack({"max_batch", "runs": [[job id, raw count], ...]}), body, *raw, ...]
    (pipelines/batching.py). max_batch goes with each batch, not in the worker's settings: a
    reload that changes it restarts no worker (no model is loaded again)."""
    layout = {"max_batch": max_batch, "runs": [[job.id, len(job.raw)] for job in jobs]}
    frames: list[Any] = [messages.BATCH, protocol.pack(layout)]
    for job in jobs:
        frames += [job.body, *job.raw]
    return frames


def withdraw_rest(lane: Lane, late: Sequence[Job], now: float) -> list[Job]:
    """A batch ran past the deadline of `late`: the other runs it was running, taken out of the
    lane to be queued again (their results, if the worker sends them before it is killed, find
    no job in the lane and are dropped). Oldest first."""
    rest = [job for job in lane.jobs if job.state is RUNNING and job not in late]
    for job in rest:
        lane.remove(job, now)
        job.requeues += 1
    return rest
