"""Failure injection for the seams tests: make the next spawns or forks fail with an errno.

`WORKERD_FAULTS="spawn=EAGAIN:2,fork=ENOMEM:1"` makes the next two spawns of a fresh interpreter
(the zygote, the GPU worker) and the next fork of a worker fail as if the kernel had refused
them. Each process reads it once, at import, and counts on its own: the master spawns, the
zygote forks, so one setting can fail either or both.

Why in the product and not in a mock: the tests must exercise the real daemon's handling of a
refused fork (answers, state, back-off), and neither RLIMIT_NPROC (ignored for root) nor a
seccomp filter is available to a test everywhere. Unset, it costs one dict lookup per spawn.
"""

from __future__ import annotations

import errno
import os

POINTS = ("spawn", "fork")


def parse(text: str) -> dict[str, list[int]]:
    """{"spawn": [errno, errno], ...} from "spawn=EAGAIN:2,fork=ENOMEM"."""
    faults: dict[str, list[int]] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        point, _, spec = part.partition("=")
        name, _, count = spec.partition(":")
        code = getattr(errno, name, None)
        if point not in POINTS or not isinstance(code, int):
            raise ValueError(f"WORKERD_FAULTS: cannot read {part!r} (expected e.g. spawn=EAGAIN:2)")
        faults.setdefault(point, []).extend([code] * int(count or 1))
    return faults


_pending = parse(os.environ.get("WORKERD_FAULTS", ""))


def check(point: str) -> None:
    """Raise the next injected failure for `point`, if one is left."""
    codes = _pending.get(point)
    if codes:
        code = codes.pop(0)
        raise OSError(code, f"{os.strerror(code)} (injected by WORKERD_FAULTS)")
