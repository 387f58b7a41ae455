"""Example CPU tasks, allowed by the embedded default config.

Runs in: a CPU worker (task code).

workerctl run workerd.examples.tasks:echo text=hello
workerctl run workerd.examples.tasks:sleep seconds=2
workerctl run workerd.examples.tasks:count n=5          (a generator: items stream back)
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Iterator
from typing import Any

# Memory held on purpose by `leak`, so recycling by private memory can be seen working.
_LEAKED: list[bytearray] = []


def echo(*args: Any, **kwargs: Any) -> Any:
    """Return what was sent: the only positional argument, else {"args", "kwargs"}."""
    if len(args) == 1 and not kwargs:
        return args[0]
    return {"args": list(args), "kwargs": kwargs}


def sleep(seconds: float = 1.0) -> dict[str, Any]:
    """Sleep, then say which worker slept (two sleeps on two workers overlap)."""
    start = time.time()
    time.sleep(seconds)
    return {"pid": os.getpid(), "start": start, "end": time.time()}


def hash_work(rounds: int = 100_000, data: str = "workerd") -> str:
    """CPU-bound: iterate SHA-256 `rounds` times."""
    digest = data.encode()
    for _ in range(rounds):
        digest = hashlib.sha256(digest).digest()
    return digest.hex()


def word_lengths(text: str = "") -> dict[int, int]:
    """How many words of each length: a result whose map keys are integers."""
    lengths: dict[int, int] = {}
    for word in text.split():
        lengths[len(word)] = lengths.get(len(word), 0) + 1
    return lengths


def count(n: int = 5, delay: float = 0.0) -> Iterator[int]:
    """A generator: yields 1..n, one stream item each."""
    for i in range(1, n + 1):
        if delay:
            time.sleep(delay)
        yield i


def fail(message: str = "this task fails on purpose") -> None:
    raise ValueError(message)


def leak(mb: int = 10) -> dict[str, int]:
    """Keep `mb` MiB more private memory alive in this worker, on purpose."""
    block = bytearray(mb * 1024 * 1024)
    for i in range(0, len(block), 4096):  # touch every page so it is really resident
        block[i] = 1
    _LEAKED.append(block)
    return {"pid": os.getpid(), "leaked_mb": len(_LEAKED) * mb}


def payload(size: int = 1024) -> bytes:
    """Return `size` bytes: large results without a large request."""
    return b"x" * size


def pid() -> int:
    return os.getpid()


def crash() -> None:
    """Kill this worker the hard way, as a segfault in an extension would."""
    os.abort()
