"""A preload module for bench/cow.py: ~300 MB of small Python objects built at import.

The heap is what a big import graph looks like to the garbage collector: many small, tracked
containers (dicts, tuples, lists) holding small ints and short strings. It grows until this
process's RSS has grown by HEAVY_HEAP_MB (default 300), so the size does not depend on the
Python version's object layout.

Task (list this module in [tasks] modules): heavy_heap:touch_gc.
"""

from __future__ import annotations

import gc
import os
import time
from typing import Any

TARGET_MB = int(os.environ.get("HEAVY_HEAP_MB", "300"))
CHUNK = 20_000
PAGE = os.sysconf("SC_PAGE_SIZE")


def rss_bytes() -> int:
    with open("/proc/self/statm", "rb") as handle:
        return int(handle.read().split()[1]) * PAGE


def build(target_bytes: int) -> list[list[dict[str, Any]]]:
    start_rss = rss_bytes()
    chunks: list[list[dict[str, Any]]] = []
    i = 0
    while rss_bytes() - start_rss < target_bytes:
        chunk = []
        for _ in range(CHUNK):
            chunk.append(
                {
                    "id": i,
                    "name": f"item-{i}",
                    "tags": (i % 7, f"t{i % 1000}", i * 3),
                    "scores": [i % 13, i % 17, i % 19],
                }
            )
            i += 1
        chunks.append(chunk)
    return chunks


_started = time.perf_counter()
_rss_before = rss_bytes()
HEAP = build(TARGET_MB * 1024 * 1024)
RECORDS = sum(len(chunk) for chunk in HEAP)
HEAP_BYTES = rss_bytes() - _rss_before
BUILD_S = time.perf_counter() - _started


def heap_info() -> dict[str, Any]:
    return {"records": RECORDS, "heap_bytes": HEAP_BYTES, "build_s": BUILD_S, "pid": os.getpid()}


def touch_gc() -> dict[str, Any]:
    """A full collection in this worker; how long it took and what it found."""
    start = time.perf_counter()
    collected = gc.collect()
    return {
        "pid": os.getpid(),
        "collected": collected,
        "gc_s": time.perf_counter() - start,
        "frozen_objects": gc.get_freeze_count(),
    }
