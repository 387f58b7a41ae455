"""The one back-off (core/backoff.py): doubling from first to max, reset, cancel, due once; and
the one fan-out (core/fanout.py)."""

from __future__ import annotations

import math
from collections.abc import Callable

from workerd.core.backoff import Backoff


def test_delays_double_up_to_the_cap_and_reset() -> None:
    backoff = Backoff(0.1, 0.5)
    assert [backoff.next(100.0) for _ in range(5)] == [0.1, 0.2, 0.4, 0.5, 0.5]
    assert backoff.due == 100.5
    backoff.reset()
    assert backoff.next(0.0) == 0.1


def test_a_due_retry_is_owed_once() -> None:
    backoff = Backoff(1.0, 10.0)
    assert not backoff.pending and not backoff.ready(1e9)
    backoff.next(10.0)
    assert backoff.pending
    assert not backoff.ready(10.5)
    assert backoff.ready(11.0)
    assert not backoff.pending and backoff.due == math.inf


def test_cancel_leaves_no_deadline_behind() -> None:
    """A stop cancels a pending retry: a due one left behind made the loop poll at 0 ms."""
    backoff = Backoff(1.0, 10.0)
    backoff.next(10.0)
    backoff.cancel()
    assert backoff.due == math.inf and not backoff.ready(1e9)
    assert backoff.next(0.0) == 2.0  # failures still count


def test_now_owes_a_retry_without_counting_a_failure() -> None:
    backoff = Backoff(1.0, 10.0)
    backoff.now(5.0)
    assert backoff.ready(5.0)
    assert backoff.next(0.0) == 1.0


def test_a_fan_out_answers_once_every_slot_is_filled() -> None:
    from workerd.core.fanout import gather

    got: list[list[object]] = []
    puts: list[Callable[[object], None]] = []
    gather([puts.append, puts.append], got.append)
    puts[1]("second")
    assert got == []
    puts[0]("first")
    puts[0]("late")  # a second answer in a slot is dropped
    assert got == [["first", "second"]]
    gather([], got.append)  # nobody to ask: answered at once
    assert got[-1] == []
