"""Per-process memory figures from /proc/PID/smaps_rollup.

RSS counts pages shared with the zygote, so a forked worker that has touched nothing still
"uses" the whole preloaded heap by RSS. USS (pages only this process maps) is what recycling
judges and what copy-on-write costs; PSS splits shared pages fairly between their sharers.
smaps_rollup gives all of them in one read, far cheaper than walking /proc/PID/smaps.
"""

from __future__ import annotations

import ctypes
from typing import Any

FIELDS = ("Rss", "Pss", "Shared_Clean", "Shared_Dirty", "Private_Clean", "Private_Dirty")


def read_rollup(pid: int) -> dict[str, int]:
    """The smaps_rollup fields we use, in bytes; raises OSError if the process is gone."""
    values = dict.fromkeys(FIELDS, 0)
    with open(f"/proc/{pid}/smaps_rollup", "rb") as handle:
        for line in handle:
            key, _, rest = line.partition(b":")
            name = key.decode()
            if name in values:
                values[name] = int(rest.split()[0]) * 1024
    return values


def process_memory(pid: int) -> dict[str, Any]:
    """rss/uss/pss/shared bytes of one process; None figures if it vanished meanwhile."""
    try:
        rollup = read_rollup(pid)
    except (OSError, ValueError, IndexError):
        return dict.fromkeys(("rss_bytes", "uss_bytes", "pss_bytes", "shared_bytes"))
    return {
        "rss_bytes": rollup["Rss"],
        "uss_bytes": rollup["Private_Clean"] + rollup["Private_Dirty"],
        "pss_bytes": rollup["Pss"],
        "shared_bytes": rollup["Shared_Clean"] + rollup["Shared_Dirty"],
    }


def uss_bytes(pid: int) -> int:
    rollup = read_rollup(pid)
    return rollup["Private_Clean"] + rollup["Private_Dirty"]


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
