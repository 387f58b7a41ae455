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
from workerd.core.lifecycle import Job, Lane, shown_state

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


def slow(worker: Worker, now: float) -> bool:
    """Has its running job run long enough that jobs sent ahead would wait behind it?"""
    job = worker.lane.running
    return job is not None and now - job.started_at >= STEAL_AFTER_S


def running_since(worker: Worker) -> float:
    """When its running job started (never, with none running)."""
    running = worker.lane.running
    return running.started_at if running is not None else math.inf


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
