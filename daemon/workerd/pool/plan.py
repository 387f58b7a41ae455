"""How many CPU workers to fork and which to retire: a pure decision, no processes.

Runs in: the master. pool/backend.py asks, and does the forking and stopping.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol, TypeVar


class Planned(Protocol):
    """What plan_workers needs to know of a worker."""

    @property
    def generation(self) -> int: ...
    @property
    def state(self) -> str: ...
    @property
    def live(self) -> bool: ...


W = TypeVar("W", bound=Planned)


def plan_workers(workers: Iterable[W], target: int, generation: int, pending: int) -> tuple[int, list[W]]:
    """How many workers to fork now and which to retire, given the pool as it stands.

    Outside a reload, fork what is missing and retire the excess (idle ones first). During a
    reload (live workers of an older generation exist), replace them one by one: keep one new
    worker starting at a time and retire one old worker for each new one that is ready, so
    capacity stays at the target and memory holds at most one extra worker, never double.
    """
    live = [w for w in workers if w.live]
    current = [w for w in live if w.generation == generation]
    old = [w for w in live if w.generation != generation]
    starting = pending + sum(1 for w in current if w.state == "starting")
    if old:
        ready = len(current) + pending - starting
        retire = pick_retirees(old, len(old) + ready - target)
        forks = 1 if starting == 0 and len(current) + pending < target else 0
        return forks, retire
    missing = target - len(current) - pending
    return max(missing, 0), pick_retirees(current, -missing)


def pick_retirees(workers: list[W], count: int) -> list[W]:
    if count <= 0:
        return []
    order = {"starting": 0, "idle": 1, "busy": 2}
    return sorted(workers, key=lambda w: order.get(w.state, 3))[:count]
