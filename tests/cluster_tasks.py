"""Tasks for the cluster tests: they say where they ran, and can lose their Ray worker once."""

from __future__ import annotations

import os
import time
from typing import Any

from workerd.examples.tasks import echo as imported_echo  # noqa: F401 (a name merely imported)


def where(seconds: float = 0.0, started: str = "", gate: str = "") -> dict[str, Any]:
    """Sleep, then say which process ran it and whose child that is (a Ray worker's parent is
    its node's raylet, so `parent` tells the nodes apart on one machine). With `started`, a
    directory: first leave a file there named for the raylet, to say this node runs one now.
    With `gate`, a path: then wait until that file exists (2 minutes at most, should a test
    fail before it opens it), so the job runs for as long as the test needs and no longer."""
    if started:
        with open(os.path.join(started, str(os.getppid())), "w"):
            pass
    time.sleep(seconds)
    deadline = time.monotonic() + 120
    while gate and not os.path.exists(gate) and time.monotonic() < deadline:
        time.sleep(0.01)
    return {"pid": os.getpid(), "parent": os.getppid()}


def crash_once(marker: str) -> str:
    """End this process the hard way the first time (as a node loss would), succeed the next."""
    if not os.path.exists(marker):
        with open(marker, "w"):
            pass
        os._exit(1)
    return "second attempt"


def _private() -> str:
    return "never runs"


def span(seconds: float) -> dict[str, float]:
    """Sleep, and say when it started and ended (CLOCK_MONOTONIC: one clock for the machine)."""
    start = time.monotonic()
    time.sleep(seconds)
    return {"start": start, "end": time.monotonic()}
