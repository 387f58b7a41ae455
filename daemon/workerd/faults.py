"""Failure injection for the seams tests: make chosen spawns or forks fail with an errno.

Runs in: both: the master's spawns and the zygote's forks.

`WORKERD_FAULTS="spawn=EAGAIN:2,fork=ENOMEM:1"` makes the next two spawns of a fresh interpreter
(the zygote, the GPU worker) and the next fork of a worker fail as if the kernel had refused
them. `spawn=EAGAIN:1@2` lets the first two spawns succeed and fails the third: the master
spawns its first zygote at boot, so a test that means a later spawn (the GPU worker, a reload's
zygote) skips the ones before it. Each process reads it once, at import, and counts on its own:
the master spawns, the zygote forks, so one setting can fail either or both.

Why in the product and not in a mock: the tests must exercise the real daemon's handling of a
refused fork (answers, state, back-off), and neither RLIMIT_NPROC (ignored for root) nor a
seccomp filter is available to a test everywhere. Unset, it costs one dict lookup per spawn.
"""

from __future__ import annotations

import errno
import os
import re

POINTS = ("spawn", "fork")
PASS = 0  # a planned success: one of the spawns or forks skipped before the failures


SPEC = re.compile(r"(?P<point>\w+)=(?P<name>E[A-Z0-9]+)(?::(?P<count>\d+))?(?:@(?P<after>\d+))?")


def parse(text: str) -> dict[str, list[int]]:
    """{"spawn": [PASS, errno, errno], ...} from "spawn=EAGAIN:2@1,fork=ENOMEM"."""
    faults: dict[str, list[int]] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        match = SPEC.fullmatch(part)
        code = getattr(errno, match["name"], None) if match else None
        if match is None or match["point"] not in POINTS or not isinstance(code, int):
            raise ValueError(f"WORKERD_FAULTS: cannot read {part!r} (expected e.g. spawn=EAGAIN:2@1)")
        passes, failures = int(match["after"] or 0), int(match["count"] or 1)
        faults.setdefault(match["point"], []).extend([PASS] * passes + [code] * failures)
    return faults


_pending = parse(os.environ.get("WORKERD_FAULTS", ""))


def check(point: str) -> None:
    """Raise the next injected failure for `point`, if one is left."""
    codes = _pending.get(point)
    if codes:
        code = codes.pop(0)
        if code != PASS:
            raise OSError(code, f"{os.strerror(code)} (injected by WORKERD_FAULTS)")
