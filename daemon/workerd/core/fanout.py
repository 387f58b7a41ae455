"""A fan-out: one question to several children, one answer once each has answered.

Runs in: the master. clear_memory and memory_status ask every worker; each child answers its
ask itself, by its deadline, or when it goes (core.child.Child.ask), so a fan-out never waits
for a child that is no longer there, and one with nobody to ask answers at once.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

Put = Callable[[Any], None]
Ask = Callable[[Put], None]


def gather(asks: list[Ask], done: Callable[[list[Any]], None]) -> None:
    """Call each ask with a slot to put its answer in; `done` gets the answers, in order, once
    every slot is filled (at once, with nobody to ask). A second answer in a slot is dropped."""
    answers: dict[int, Any] = {}
    if not asks:
        done([])
        return

    def slot(i: int) -> Put:
        def put(value: Any) -> None:
            if i in answers:
                return
            answers[i] = value
            if len(answers) == len(asks):
                done([answers[n] for n in range(len(asks))])

        return put

    for i, ask in enumerate(asks):
        ask(slot(i))
