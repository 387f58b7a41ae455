"""A CPU worker as the pool sees it, and what can be read off a set of them.

Runs in: the master. pool/backend.py does the work; this is the worker's record (its child
handle, its generation and phase) and the pure questions the pool asks of its workers.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable
from typing import Any

from workerd import messages
from workerd.core.child import Child
from workerd.core.fanout import gather
from workerd.core.lifecycle import ASSIGNED, QUEUED, Job, Lane, shown_state
from workerd.core.queue import passes

# A worker whose running job has run this long is sent no job ahead, and the jobs it holds
# ahead go to an idle worker. Prefetch pays for short tasks, where the master's round trip
# between two of them is a good part of their time; well before 50 ms it is not any more.
STEAL_AFTER_S = 0.05
# A clear_memory fan-out waits this long for busy workers before answering without them.
FANOUT_WAIT_S = 10.0


@dataclasses.dataclass(eq=False)
class Worker:
    pid: int
    generation: int
    child: Child
    phase: str = "starting"  # starting | serving | stopping | gone
    tasks_done: int = 0
    # Jobs a drop was sent for whose answer has not come (DROPPED, or DONE if it had started):
    # True once handed back (pool.withdraw), so a late "dropped" leaves a copy sent again alone.
    dropping: dict[int, bool] = dataclasses.field(default_factory=dict)

    @property
    def lane(self) -> Lane:
        return self.child.lane

    @property
    def state(self) -> str:
        return shown_state(self.phase, self.lane, self.child.killing)

    @property
    def live(self) -> bool:
        """Counts toward the pool's size: neither on its way out nor told to leave."""
        return self.phase in ("starting", "serving") and not self.child.killing

    @property
    def serving(self) -> bool:
        """Takes jobs."""
        return self.phase == "serving" and not self.child.killing


def describe(worker: Worker) -> dict[str, Any]:
    """A worker as `status` shows it."""
    return {
        "pid": worker.pid,
        "kind": "cpu",
        "state": worker.state,
        "tasks_done": worker.tasks_done,
        "generation": worker.generation,
        "jobs": len(worker.lane),
    }


def slow(worker: Worker, now: float) -> bool:
    """Has its running job run long enough that jobs sent ahead would wait behind it?"""
    job = worker.lane.running
    return job is not None and now - job.started_at >= STEAL_AFTER_S


def idle_worker(workers: Iterable[Worker]) -> bool:
    return any(w.serving and not w.lane.jobs for w in workers)


def steal_deadline(workers: Iterable[Worker]) -> float:
    """When a worker holding jobs ahead turns slow, if an idle worker could take them."""
    workers = list(workers)
    if not idle_worker(workers):
        return float("inf")
    times = [
        w.lane.jobs[0].started_at + STEAL_AFTER_S
        for w in workers
        if w.serving and len(w.lane) > 1 and w.lane.running is not None
    ]
    return min(times, default=float("inf"))


# -- yielding: what is sent ahead gives way to a job the fair order puts first -------------------
#
# A job sent ahead to a worker (prefetched) is out of the queue's sight: a client that comes
# after a flood would wait behind every job prefetched before it came (4 per worker by default).
# So a new job that the queue's order puts first (core/queue.passes: another client's, or a
# higher level's) takes the place of such jobs, which go back to the queue; it then waits for
# one running job only. With one client and no priorities nothing passes, and nothing yields.


def yielding(
    workers: Iterable[Worker], job: Job, shared: bool, can_run: Callable[[Worker, Job], bool]
) -> tuple[Worker, list[Job]] | None:
    """What gives way to a new job once it is placed, or left queued with `shared` a queue
    that holds several clients' jobs or levels: the worker, and the jobs it holds ahead."""
    if job.state is ASSIGNED:
        return passed_in_its_lane(workers, job)
    if job.state is QUEUED and shared:
        return room_for(workers, job, can_run)
    return None


def passed_in_its_lane(workers: Iterable[Worker], job: Job) -> tuple[Worker, list[Job]] | None:
    """`job` went to the last free place of a worker: the jobs ahead of it there that it passes."""
    worker = next((w for w in workers if w.lane.jobs and w.lane.jobs[-1] is job), None)
    if worker is None or len(worker.lane) <= 2:
        return None
    ahead = [other for other in worker.lane.prefetched() if other is not job and passes(job, other)]
    return (worker, ahead) if ahead else None


def room_for(
    workers: Iterable[Worker], job: Job, can_run: Callable[[Worker, Job], bool]
) -> tuple[Worker, list[Job]] | None:
    """`job` waits in the queue with every place taken: the worker to give back all it holds
    ahead, the one whose running job has run longest (the likeliest to end first); none if its
    client's own jobs are sent ahead already (they keep their place)."""
    held = [(w, w.lane.prefetched()) for w in workers if can_run(w, job)]
    if any(ahead.tenant is job.tenant and ahead.level >= job.level for _, jobs in held for ahead in jobs):
        return None
    yielding = [(w, jobs) for w, jobs in held if jobs and any(passes(job, ahead) for ahead in jobs)]
    return min(yielding, key=lambda entry: running_since(entry[0]), default=None)


def running_since(worker: Worker) -> float:
    """When its running job started (never, with none running)."""
    running = worker.lane.running
    return running.started_at if running is not None else math.inf


def holder(workers: Iterable[Worker], job: Job) -> Worker | None:
    """The worker whose lane holds `job`."""
    return next((w for w in workers if job in w.lane.jobs), None)


def collect_garbage(targets: list[Worker], done: Callable[[dict[str, Any]], None]) -> None:
    """Ask each worker to gc.collect(); `done` gets every answer, a worker still busy at the
    deadline or gone meanwhile named as skipped."""

    def ask(worker: Worker) -> Callable[[Callable[[Any], None]], None]:
        return lambda put: worker.child.ask(messages.GC, [], put, FANOUT_WAIT_S)

    def answer(results: list[Any]) -> None:
        entries: list[dict[str, Any]] = [
            result if "error" not in result else {"pid": worker.pid, "skipped": skipped(result)}
            for worker, result in zip(targets, results, strict=True)
        ]
        freed = sum(max(r["uss_before"] - r["uss_after"], 0) for r in entries if "skipped" not in r)
        done({"workers": entries, "freed_bytes": freed})

    gather([ask(worker) for worker in targets], answer)


def skipped(answer: dict[str, Any]) -> str:
    """Why a worker's gc answer is missing: still busy at the deadline, or gone."""
    return "busy" if answer.get("reason") == "late" else "gone"
