"""What a pipeline cache holds of each pipeline, and the pure decisions on it: what leaves the
device to make room, and whether it is parked in host memory or dropped.

Runs in: the GPU worker and the cluster's pipeline hosts (pipelines/cache.py asks; no I/O here).
"""

from __future__ import annotations

import collections
import dataclasses
import time
from collections.abc import Iterable
from types import ModuleType
from typing import Any

DEVICE, HOST = "device", "host"  # the tiers


@dataclasses.dataclass(eq=False)
class Entry:
    name: str
    sha256: str
    module: ModuleType
    obj: Any
    bytes: int  # its footprint: what its load added
    load_s: float
    peak_bytes: int = 0  # what the last run needed beyond `bytes`
    runs: int = 0
    last_used: float = dataclasses.field(default_factory=time.time)
    tier: str = DEVICE
    parkable: bool = False  # tiers.can_move said yes at load
    retained_bytes: int = 0  # what its runs left allocated since the load
    residue_bytes: int = 0  # parked: device memory it still held after the move (CUDA only)
    warned: bool = False  # the retained warning is logged once per load
    wakes: int = 0
    wake_s: float = 0.0  # the last wake's seconds (the move back alone)
    park_s: float = 0.0  # the last park's seconds
    batch_peaks: dict[int, int] = dataclasses.field(default_factory=dict)  # batch size -> its last peak
    batch_sizes: collections.Counter[int] = dataclasses.field(default_factory=collections.Counter)

    def record_peak(self, size: int, peak: int) -> None:
        self.peak_bytes = peak
        self.batch_peaks[size] = peak

    def peak_for(self, size: int) -> int:
        """What a run on `size` inputs is expected to need beyond `bytes`: its last peak at that
        size, else the largest smaller size's scaled up (activations grow about linearly with
        the batch; too high costs an eviction, too low an OOM and a retry at half the size)."""
        if size in self.batch_peaks:
            return self.batch_peaks[size]
        smaller = [known for known in self.batch_peaks if known < size]
        if not smaller:
            return self.peak_bytes
        known = max(smaller)
        return self.batch_peaks[known] * size // known

    @property
    def device_bytes(self) -> int:
        return self.bytes + self.retained_bytes if self.tier == DEVICE else self.residue_bytes

    @property
    def host_bytes(self) -> int:
        return self.bytes if self.tier == HOST else 0

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "sha256": self.sha256,
            "tier": self.tier,
            "bytes": self.bytes,
            "device_bytes": self.device_bytes,
            "host_bytes": self.host_bytes,
            "retained_bytes": self.retained_bytes,
            "peak_bytes": self.peak_bytes,
            "parkable": self.parkable,
            "runs": self.runs,
            "wakes": self.wakes,
            "last_used": self.last_used,
            "load_s": self.load_s,
            "wake_s": self.wake_s,
            "park_s": self.park_s,
            # runs by batch size since the load (one pipeline's histogram; metrics has the daemon's)
            "batch_sizes": {str(size): n for size, n in sorted(self.batch_sizes.items())},
        }


def plan_evictions(entries: Iterable[Entry], in_use: int, needed: int, budget: int, keep: str) -> list[str]:
    """The least recently used pipelines on the device (other than `keep`) that must leave it so
    `needed` more fits.

    Returns as few as possible, oldest first; if even all of them are not enough it returns all
    of them, and the caller tries anyway (the allocator may still find room).
    """
    victims: list[str] = []
    for entry in sorted(entries, key=lambda e: e.last_used):
        if in_use + needed <= budget:
            break
        if entry.name == keep or entry.tier != DEVICE:
            continue
        victims.append(entry.name)
        in_use -= entry.device_bytes
    return victims


def plan_parking(
    victims: Iterable[Entry], parked: Iterable[Entry], host_budget: int
) -> list[tuple[str, str]]:
    """How pipelines leaving the device go, in order: ("park", name) or ("drop", name).

    The host tier is least recently used first as well. To make room for a victim, parked
    pipelines used less recently than it are dropped; a victim that would need more recent ones
    dropped, that cannot be moved, or that is bigger than the whole host budget is dropped itself.
    The most recent victims go first, so none is parked only to be dropped for a newer one.
    """
    steps: list[tuple[str, str]] = []
    host = sorted(parked, key=lambda e: e.last_used)
    used = sum(e.bytes for e in host)
    for victim in sorted(victims, key=lambda e: e.last_used, reverse=True):
        older = sum(e.bytes for e in host if e.last_used < victim.last_used)
        if not victim.parkable or used - older + victim.bytes > host_budget:
            steps.append(("drop", victim.name))
            continue
        while used + victim.bytes > host_budget:
            oldest = host.pop(0)
            steps.append(("drop", oldest.name))
            used -= oldest.bytes
        steps.append(("park", victim.name))
        host = sorted([*host, victim], key=lambda e: e.last_used)
        used += victim.bytes
    return steps
