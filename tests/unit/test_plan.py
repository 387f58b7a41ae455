"""The pool's pure decisions: how many workers to fork and which to retire, and when."""

from __future__ import annotations

import dataclasses
import math
import time

from workerd import config
from workerd.core.backend import Services
from workerd.core.lifecycle import Ledger
from workerd.core.reactor import Reactor
from workerd.metrics import Metrics
from workerd.pool.backend import Pool
from workerd.pool.plan import plan_workers


@dataclasses.dataclass(eq=False)
class Worker:
    """What plan_workers reads of a worker (pool.Planned)."""

    pid: int
    generation: int
    state: str
    retiring: bool = False

    @property
    def live(self) -> bool:
        return self.state in ("starting", "idle", "busy") and not self.retiring


def workers(*specs: tuple[int, str]) -> list[Worker]:
    return [Worker(pid=100 + i, generation=gen, state=state) for i, (gen, state) in enumerate(specs)]


def test_fills_an_empty_pool_in_one_batch() -> None:
    assert plan_workers([], 4, 1, pending=0) == (4, [])


def test_counts_forks_in_flight() -> None:
    assert plan_workers(workers((1, "idle")), 4, 1, pending=3) == (0, [])


def test_scale_down_retires_idle_before_busy() -> None:
    pool = workers((1, "busy"), (1, "idle"), (1, "busy"))
    forks, retire = plan_workers(pool, 2, 1, pending=0)
    assert forks == 0 and [w.state for w in retire] == ["idle"]


def test_reload_forks_one_new_worker_at_a_time() -> None:
    pool = workers((1, "idle"), (1, "idle"))
    assert plan_workers(pool, 2, 2, pending=0) == (1, [])
    assert plan_workers(pool, 2, 2, pending=1) == (0, [])
    pool += workers((2, "starting"))
    assert plan_workers(pool, 2, 2, pending=0) == (0, [])


def test_reload_retires_one_old_worker_per_ready_new_one() -> None:
    pool = workers((1, "busy"), (1, "idle"), (2, "idle"))
    forks, retire = plan_workers(pool, 2, 2, pending=0)
    assert [(w.generation, w.state) for w in retire] == [(1, "idle")]
    assert forks == 1  # and the next replacement starts at once: at most one extra process


def test_reload_finishes_when_old_workers_are_gone() -> None:
    pool = workers((1, "busy"), (2, "idle"))
    pool[0].retiring = True  # it stops after its task
    assert plan_workers(pool, 2, 2, pending=0) == (1, [])


def test_workers_marked_to_retire_do_not_count() -> None:
    pool = workers((1, "busy"), (1, "idle"))
    pool[0].retiring = True
    assert plan_workers(pool, 2, 1, pending=0) == (1, [])


def test_a_fork_back_off_stays_due_once_it_has_passed() -> None:
    """Regression: the loop's deadline dropped a back-off the moment it passed, so when the
    loop woke just before it (zmq_poll may return a little early) and next looked just after,
    nothing forked again, ever (seen as a pool left empty after two refused forks)."""
    metrics = Metrics()
    pool = Pool(
        config.load(None),
        Services(Ledger(lambda *a: None, metrics), Reactor(), metrics.events, "/nonexistent"),
    )
    assert pool.next_deadline() == math.inf
    pool.forks.due = time.monotonic() - 0.001
    assert pool.next_deadline() <= time.monotonic()
    pool.tick()  # no zygote yet: nothing forks, but the back-off is over
    assert pool.next_deadline() == math.inf
