"""The memory figures of the GPU worker's device: CUDA's caching allocator, or /proc on the CPU.

Runs in: the GPU worker and the cluster's pipeline hosts.

On CUDA every figure comes from torch's allocator. On the CPU there is no allocator to ask:
what a load or a run added is the growth of the process's resident memory (/proc/self/statm,
one short line, cheap enough to read around every run), and what the cache holds is the sum
of its pipelines' measured footprints.

This module runs only inside the GPU worker process, which is the only one that imports torch.
"""

from __future__ import annotations

import os
from typing import Any

from workerd import memory

try:
    import torch
except ImportError:  # pipelines that need no torch still run, on the CPU
    torch = None  # type: ignore[assignment]

PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


def pick_device(setting: str) -> str:
    if setting != "auto":
        return setting
    if torch is not None and torch.cuda.is_available():
        return "cuda"
    return "cpu"


def device_count() -> int:
    """The CUDA devices this process sees (what [gpu] devices = "all" counts)."""
    return int(torch.cuda.device_count()) if torch is not None else 0


def is_cuda(device: str) -> bool:
    return device.startswith("cuda")


def meminfo() -> dict[str, int]:
    values = {}
    with open("/proc/meminfo") as handle:
        for line in handle:
            key, _, rest = line.partition(":")
            values[key] = int(rest.split()[0]) * 1024
    return values


def resident_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * PAGE_SIZE


def warm_up(device: str) -> None:
    """One small tensor operation before anything is measured: torch sets up its allocator and
    thread pools on its first use, and on the CPU that growth of resident memory (several MiB)
    was counted in the footprint of whichever pipeline loaded first."""
    if torch is not None:
        try:
            (torch.ones(4096, device=device) * 2).sum().item()
        except Exception:  # a device torch cannot use: the cache reports it when it loads
            pass


class Memory:
    """The figures memory_status pins for `gpu` (docs/protocol.md §7.3), and the probe the
    cache measures loads and runs with."""

    def __init__(self, device: str, budget_mb: float, host_budget_mb: float) -> None:
        self.device = device
        self.cuda = is_cuda(device)
        total = self.total()
        self.budget = int(budget_mb * 1024 * 1024) if budget_mb else int(total * 0.9)
        self.host_budget = int(host_budget_mb * 1024 * 1024)
        # Pinned (page-locked) host memory makes a wake a DMA copy at full bus speed; it needs a
        # CUDA device, and on the CPU both tiers are the same memory anyway.
        self.pin = self.cuda
        self.host_peak = 0
        warm_up(device)

    def total(self) -> int:
        if self.cuda:
            return int(torch.cuda.mem_get_info(self.device)[1])
        return meminfo()["MemTotal"]

    def allocated(self, held: int) -> int:
        """Bytes in use on the device; `held` is what the cache's bookkeeping says it holds."""
        if self.cuda:
            return int(torch.cuda.memory_allocated(self.device))
        return held

    def reserved(self) -> int:
        if self.cuda:
            return int(torch.cuda.memory_reserved(self.device))
        return memory.uss_bytes(os.getpid())

    def probe(self) -> int:
        """A reading whose growth across a load is the pipeline's footprint, and across a run
        what the run left behind."""
        if self.cuda:
            torch.cuda.synchronize(self.device)
            return int(torch.cuda.memory_allocated(self.device))
        return resident_bytes()

    def release(self) -> None:
        """On the CPU, give the heap's freed memory back to the system before a probe or after
        a drop: glibc keeps freed blocks, so a dropped pipeline would still look resident and a
        later load could reuse its pages and seem to add nothing. (CUDA's figures count live
        tensors only.)"""
        if not self.cuda:
            memory.trim()

    def reset_peak(self) -> None:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)

    def peak(self) -> int:
        if self.cuda:
            return int(torch.cuda.max_memory_allocated(self.device))
        self.host_peak = max(self.host_peak, memory.uss_bytes(os.getpid()))
        return self.host_peak

    def empty_cache(self) -> None:
        if self.cuda:
            torch.cuda.empty_cache()

    def empty_host_cache(self) -> None:
        """Give back the pinned host blocks that woken pipelines left behind. torch keeps them
        for reuse, which is what makes the next park cheap (pinning memory is slow), so only
        clear_memory asks for this, not every eviction."""
        if not self.cuda:
            return
        empty = getattr(getattr(torch, "accelerator", None), "empty_host_cache", None)
        empty = empty or getattr(torch._C, "_host_emptyCache", None)
        if empty is not None:
            empty()

    def pinned_bytes(self) -> int | None:
        """Pinned host memory torch's host allocator holds, in use and cached (None on the CPU).

        It rounds every block up to a power of two, so this can be well above the parked
        pipelines' bytes: it is the figure that says what the host tier really costs."""
        stats = getattr(torch.cuda, "host_memory_stats", None) if self.cuda else None
        if stats is None:
            return None
        return int(stats().get("allocated_bytes.current", 0))

    def stats(self, held: int, host_held: int) -> dict[str, Any]:
        if self.cuda:
            free, total = torch.cuda.mem_get_info(self.device)
        else:
            info = meminfo()
            free, total = info["MemAvailable"], info["MemTotal"]
        return {
            "device": self.device,
            "allocated_bytes": self.allocated(held),
            "reserved_bytes": self.reserved(),
            "peak_allocated_bytes": self.peak(),
            "free_bytes": int(free),
            "total_bytes": int(total),
            "budget_bytes": self.budget,
            "host_bytes": host_held,
            "host_budget_bytes": self.host_budget,
            "pinned_bytes": self.pinned_bytes(),
        }
