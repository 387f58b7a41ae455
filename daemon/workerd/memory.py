"""Per-process memory figures, from psutil's memory_full_info (/proc/PID/smaps_rollup).

Runs in: both: the master reads every process's figures, a worker its own.

RSS counts pages shared with the zygote, so a forked worker that has touched nothing still
"uses" the whole preloaded heap by RSS. USS (pages only this process maps) is what recycling
judges and what copy-on-write costs; PSS splits shared pages fairly between their sharers.

psutil reads smaps_rollup (one read for USS and PSS, far cheaper than walking /proc/PID/smaps)
plus /proc/PID/statm for RSS. Measured against parsing smaps_rollup by hand (2 shared cores,
best of 5-9 x 2,000-3,000 calls): another idle interpreter 63 against 43 us, one with torch
imported (348 mappings: the kernel's walk dominates) 1,126 against 1,081 us, a process's own
USS (what a worker reports after each task when recycling by memory) 81 against 70 us. Against
a request's ~270 us of CPU that does not matter, so there is one implementation of this:
psutil's. Its `shared` is statm's (file-backed pages only), which misses the heap a worker
shares with its zygote; ours is RSS - USS (Shared_Clean + Shared_Dirty).
"""

from __future__ import annotations

import ctypes
import functools
import os
from typing import Any

import psutil

FIGURES = ("rss_bytes", "uss_bytes", "pss_bytes", "shared_bytes")


@functools.lru_cache(maxsize=1)
def this_process(pid: int) -> psutil.Process:
    """Our own psutil handle, made once per pid (a forked child has a new one): a worker asks
    for its USS after every task when recycling by memory."""
    return psutil.Process(pid)


def full_info(pid: int) -> Any:
    """psutil's memory_full_info; raises psutil.Error if the process is gone."""
    process = this_process(pid) if pid == os.getpid() else psutil.Process(pid)
    return process.memory_full_info()


def process_memory(pid: int) -> dict[str, Any]:
    """rss/uss/pss/shared bytes of one process; None figures if it vanished meanwhile."""
    try:
        info = full_info(pid)
    except (psutil.Error, OSError):
        return dict.fromkeys(FIGURES)
    # RSS and USS come from two files read a moment apart: never a negative share.
    return {
        "rss_bytes": info.rss,
        "uss_bytes": info.uss,
        "pss_bytes": info.pss,
        "shared_bytes": max(info.rss - info.uss, 0),
    }


def uss_bytes(pid: int) -> int:
    return int(full_info(pid).uss)


def _malloc_trim() -> Any:
    try:
        return ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):  # pragma: no cover - not glibc
        return None


_MALLOC_TRIM = _malloc_trim()


def trim() -> None:
    """Give the heap's free memory back to the system (glibc's malloc_trim, in every arena).

    glibc keeps what a burst freed (a flood of connections, large messages) inside its arenas,
    so a long-lived process stays at its high-water mark; malloc_trim(0) releases it."""
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)
