"""The reply backlog's bookkeeping (limits.Backlog), with trackers whose state the test sets."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from workerd.limits import Backlog


@dataclass
class Tracker:
    done: bool = False


def add(backlog: Backlog, client: bytes, size: int) -> Tracker:
    tracker = Tracker()
    backlog.add(client, tracker, size)  # type: ignore[arg-type]
    return tracker


def test_under_the_budget_nobody_is_named() -> None:
    backlog = Backlog(100)
    add(backlog, b"a", 60)
    add(backlog, b"b", 40)
    assert backlog.over() is None and backlog.total == 100


def test_over_the_budget_the_largest_holder_is_named_once_released_frames_are_forgotten() -> None:
    backlog = Backlog(100)
    sent: list[Any] = [add(backlog, b"a", 50), add(backlog, b"a", 30), add(backlog, b"b", 40)]
    assert backlog.over() == b"a"
    sent[0].done = sent[1].done = True  # libzmq let go of a's frames: nobody is over now
    assert backlog.over() is None
    assert backlog.total == 40 and b"a" not in backlog.pending


def test_frames_are_forgotten_in_order_and_a_cut_client_is_dropped() -> None:
    backlog = Backlog(1000)
    first, second = add(backlog, b"a", 10), add(backlog, b"a", 20)
    second.done = True  # not first out: still counted until the one before it is
    add(backlog, b"a", 5)
    assert backlog.total == 35
    first.done = True
    add(backlog, b"a", 1)
    assert backlog.total == 6
    assert backlog.drop(b"a") == 6 and backlog.total == 0 and not backlog.pending
