"""The pipeline cache of the GPU worker: load, run, measure, evict, clear.

A pipeline is a module or file with `load(device) -> obj`, `run(obj, **kwargs) -> result` and an
optional `unload(obj)`. A cached pipeline is keyed by its name and the SHA-256 of its source
file, so an edited file is noticed on its next run and only that pipeline reloads.

Memory is judged on measured figures, not counts: a pipeline's footprint is what its load added,
and its peak is what its last run needed on top (reset_peak_memory_stats before the run,
max_memory_allocated after). Before a load or a run that would not fit in the budget, the least
recently used other pipelines are evicted. On the CPU there is no allocator to ask: footprints
are the growth of the process's private memory (USS) across the load, and peaks are not known.

This module runs only inside the GPU worker process; it is the only one that imports torch.
"""

from __future__ import annotations

import dataclasses
import gc
import hashlib
import importlib
import importlib.util
import logging
import os
import sys
import time
from collections.abc import Iterable
from types import ModuleType
from typing import Any

from workerctl import protocol

from . import memory
from .config import PipelineConfig

log = logging.getLogger("workerd.gpu")

try:
    import torch
except ImportError:  # pipelines that need no torch still run, on the CPU
    torch = None  # type: ignore[assignment]

OOM_ERRORS: tuple[type[BaseException], ...] = (MemoryError,)
if torch is not None:
    OOM_ERRORS += (torch.cuda.OutOfMemoryError,)


class PipelineError(Exception):
    """A pipeline that cannot be loaded or run; `code` is the protocol error code."""

    def __init__(self, code: str, message: str, details: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.details = details or {}


@dataclasses.dataclass(eq=False)
class Entry:
    name: str
    sha256: str
    module: ModuleType
    obj: Any
    bytes: int
    load_s: float
    peak_bytes: int = 0  # what the last run needed beyond `bytes`
    runs: int = 0
    last_used: float = dataclasses.field(default_factory=time.time)

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "sha256": self.sha256,
            "bytes": self.bytes,
            "peak_bytes": self.peak_bytes,
            "runs": self.runs,
            "last_used": self.last_used,
            "load_s": self.load_s,
        }


def plan_evictions(entries: Iterable[Entry], in_use: int, needed: int, budget: int, keep: str) -> list[str]:
    """The least recently used pipelines (other than `keep`) to drop so `needed` more fits.

    Returns as few as possible, oldest first; if even dropping all of them is not enough it
    returns all of them, and the caller tries anyway (the allocator may still find room).
    """
    victims: list[str] = []
    for entry in sorted(entries, key=lambda e: e.last_used):
        if in_use + needed <= budget:
            break
        if entry.name == keep:
            continue
        victims.append(entry.name)
        in_use -= entry.bytes
    return victims


# -- the pipeline's code ---------------------------------------------------------------------

# What a missing module is installed with, where workerd itself brings it (the gpu extra).
EXTRAS = {"torch": "pip install 'workerd[gpu]'"}


def import_pipeline(config: PipelineConfig, path: str) -> ModuleType:
    """A fresh copy of the pipeline's code (re-executed, so edits take effect), checked for
    its load() and run(). `path` is its source file (for a module, where it was found)."""
    if config.module:
        module = sys.modules.get(config.module)
        module = importlib.reload(module) if module else importlib.import_module(config.module)
    else:
        spec = importlib.util.spec_from_file_location(f"workerd_pipeline_{config.name}", path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    for function in ("load", "run"):
        if not callable(getattr(module, function, None)):
            raise PipelineError(
                protocol.UNKNOWN_TASK, f"pipeline {config.name!r} has no {function}() function"
            )
    return module


def missing_module(name: str, module: str) -> PipelineError:
    """One line for a pipeline that needs a module this environment lacks: a traceback would
    only repeat it, and the fix is an install, not a change of code."""
    fix = EXTRAS.get(module, f"install {module!r} into workerd's environment")
    message = f"pipeline {name!r} needs {module!r}, which is not installed: {fix}"
    return PipelineError(protocol.TASK_ERROR, message, {"type": "ModuleNotFoundError", "message": message})


# -- the device's memory ---------------------------------------------------------------------


def pick_device(setting: str) -> str:
    if setting != "auto":
        return setting
    if torch is not None and torch.cuda.is_available():
        return "cuda"
    return "cpu"


def is_cuda(device: str) -> bool:
    return device.startswith("cuda")


def meminfo() -> dict[str, int]:
    values = {}
    with open("/proc/meminfo") as handle:
        for line in handle:
            key, _, rest = line.partition(":")
            values[key] = int(rest.split()[0]) * 1024
    return values


class Memory:
    """The figures DESIGN.md pins for `gpu`, on CUDA from the caching allocator, on CPU from /proc."""

    def __init__(self, device: str, budget_mb: float) -> None:
        self.device = device
        self.cuda = is_cuda(device)
        total = self.total()
        self.budget = int(budget_mb * 1024 * 1024) if budget_mb else int(total * 0.9)
        self.host_peak = 0

    def total(self) -> int:
        if self.cuda:
            return int(torch.cuda.mem_get_info(self.device)[1])
        return meminfo()["MemTotal"]

    def allocated(self, entries: Iterable[Entry] = ()) -> int:
        if self.cuda:
            return int(torch.cuda.memory_allocated(self.device))
        return sum(e.bytes for e in entries)

    def reserved(self) -> int:
        if self.cuda:
            return int(torch.cuda.memory_reserved(self.device))
        return memory.uss_bytes(os.getpid())

    def footprint_probe(self) -> int:
        """A reading whose growth across a load is the pipeline's footprint."""
        if self.cuda:
            torch.cuda.synchronize(self.device)
            return int(torch.cuda.memory_allocated(self.device))
        return memory.uss_bytes(os.getpid())

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

    def stats(self, entries: list[Entry]) -> dict[str, Any]:
        if self.cuda:
            free, total = torch.cuda.mem_get_info(self.device)
        else:
            info = meminfo()
            free, total = info["MemAvailable"], info["MemTotal"]
        return {
            "device": self.device,
            "allocated_bytes": self.allocated(entries),
            "reserved_bytes": self.reserved(),
            "peak_allocated_bytes": self.peak(),
            "free_bytes": int(free),
            "total_bytes": int(total),
            "budget_bytes": self.budget,
        }


# -- the cache -------------------------------------------------------------------------------


class PipelineCache:
    def __init__(self, configs: dict[str, PipelineConfig], device: str, budget_mb: float) -> None:
        self.configs = configs
        self.device = pick_device(device)
        self.memory = Memory(self.device, budget_mb)
        self.entries: dict[str, Entry] = {}
        self.runs = 0
        # What a run found and did, for the daemon's metrics (restores are not counted).
        self.counts = {"hits": 0, "misses": 0, "evictions": 0}
        # Footprint of each pipeline's last load: what to make room for before loading it again.
        self.footprint_history: dict[str, int] = {}
        self._hashes: dict[str, tuple[tuple[int, int, int], str]] = {}
        self._origins: dict[str, str] = {}

    # Source files and their hashes.

    def source_path(self, config: PipelineConfig) -> str:
        if config.path:
            return config.path
        # find_spec walks sys.path: do it once per module, not on every run.
        if config.module not in self._origins:
            spec = importlib.util.find_spec(config.module)
            if spec is None or not spec.origin or not os.path.isfile(spec.origin):
                raise PipelineError(
                    protocol.UNKNOWN_TASK, f"pipeline {config.name!r}: module {config.module!r} not found"
                )
            self._origins[config.module] = spec.origin
        return self._origins[config.module]

    def sha256(self, path: str) -> str:
        """The file's SHA-256, re-read only when its size, mtime or inode changed."""
        try:
            info = os.stat(path)
        except OSError as exc:
            raise PipelineError(protocol.UNKNOWN_TASK, f"pipeline source {path}: {exc.strerror}") from None
        key = (info.st_mtime_ns, info.st_size, info.st_ino)
        known = self._hashes.get(path)
        if known and known[0] == key:
            return known[1]
        with open(path, "rb") as handle:
            digest = hashlib.sha256(handle.read()).hexdigest()
        self._hashes[path] = (key, digest)
        return digest

    # Loading and evicting.

    def ensure_loaded(self, name: str) -> tuple[Entry, bool]:
        """The cached entry for `name` (warm), or a freshly loaded one (cold)."""
        config = self.configs.get(name)
        if config is None:
            raise PipelineError(protocol.UNKNOWN_TASK, f"no pipeline named {name!r}")
        path = self.source_path(config)
        digest = self.sha256(path)
        entry = self.entries.get(name)
        if entry is not None and entry.sha256 == digest:
            return entry, True
        if entry is not None:
            log.info("pipeline %s changed on disk (sha256 %s): reloading", name, digest[:12])
            self.evict(name)
        return self.load(config, path, digest), False

    def load(self, config: PipelineConfig, path: str, digest: str) -> Entry:
        expected = self.footprint_history.get(config.name, 0)
        self.make_room(expected, keep=config.name)
        started = time.monotonic()
        try:
            module = import_pipeline(config, path)
            before = self.memory.footprint_probe()
            obj = self.with_oom_retry(lambda: module.load(self.device), keep=config.name)
        except ModuleNotFoundError as exc:
            if exc.name is None:  # raised by hand, not by an import: an error like any other
                raise
            raise missing_module(config.name, exc.name) from None
        footprint = max(self.memory.footprint_probe() - before, 0)
        entry = Entry(config.name, digest, module, obj, footprint, time.monotonic() - started)
        self.entries[config.name] = entry
        self.footprint_history[config.name] = footprint
        log.info("pipeline %s loaded in %.2f s, %d MiB", config.name, entry.load_s, footprint >> 20)
        self.make_room(0, keep=config.name)  # it may have turned out bigger than expected
        return entry

    def make_room(self, needed: int, keep: str) -> list[str]:
        entries = list(self.entries.values())
        in_use = self.memory.allocated(entries)
        victims = plan_evictions(entries, in_use, needed, self.memory.budget, keep)
        for victim in victims:
            log.info("evicting pipeline %s to make room for %s", victim, keep)
            self.evict(victim)
            self.counts["evictions"] += 1
        if victims:
            self.memory.empty_cache()
        return victims

    def evict(self, name: str) -> None:
        entry = self.entries.pop(name)
        unload = getattr(entry.module, "unload", None)
        if callable(unload):
            try:
                unload(entry.obj)
            except Exception:
                log.exception("pipeline %s: unload() failed", name)
        entry.obj = None
        del entry
        gc.collect()

    # Running.

    def with_oom_retry(self, step: Any, keep: str) -> Any:
        """Run `step`; on out-of-memory evict the LRU other pipeline, empty the cache, retry once."""
        for attempt in (1, 2):
            out_of_memory = False
            try:
                return step()
            except OOM_ERRORS:
                # Leave the except block before freeing: the exception's traceback holds the
                # frames, and their tensors, that we want the allocator to get back.
                out_of_memory = True
            if out_of_memory and attempt == 2:
                break
            others = sorted((e for e in self.entries.values() if e.name != keep), key=lambda e: e.last_used)
            if others:
                log.warning("out of memory in %s: evicting %s and retrying once", keep, others[0].name)
                self.evict(others[0].name)
                self.counts["evictions"] += 1
            gc.collect()
            self.memory.empty_cache()
        gc.collect()
        self.memory.empty_cache()
        raise PipelineError(
            protocol.OUT_OF_MEMORY,
            f"pipeline {keep!r} ran out of memory on {self.device}, even after freeing the cache",
            {"device": self.device, "budget_bytes": self.memory.budget},
        )

    def run(self, name: str, args: list[Any], kwargs: dict[str, Any]) -> dict[str, Any]:
        started = time.monotonic()
        entry, warm = self.ensure_loaded(name)
        self.counts["hits" if warm else "misses"] += 1
        load_s = 0.0 if warm else time.monotonic() - started
        self.make_room(entry.peak_bytes, keep=name)
        self.memory.reset_peak()
        base = self.memory.allocated(self.entries.values())
        run_started = time.monotonic()
        output = self.with_oom_retry(lambda: entry.module.run(entry.obj, *args, **kwargs), keep=name)
        if self.memory.cuda:
            torch.cuda.synchronize(self.device)
            entry.peak_bytes = max(self.memory.peak() - base, 0)
        run_s = time.monotonic() - run_started
        entry.runs += 1
        entry.last_used = time.time()
        self.runs += 1
        return {
            "output": output,
            "pipeline": name,
            "sha256": entry.sha256,
            "warm": warm,
            "load_s": load_s,
            "run_s": run_s,
            "device": self.device,
        }

    # Reporting and clearing.

    def snapshot(self) -> dict[str, Any]:
        entries = list(self.entries.values())  # a copy: the runner thread may change the dict
        return {
            **self.memory.stats(entries),
            "runs": self.runs,
            "pipelines": [e.describe() for e in entries],
        }

    def clear(self, level: str) -> dict[str, Any]:
        entries = list(self.entries.values())
        allocated_before = self.memory.allocated(entries)
        reserved_before = self.memory.reserved()
        dropped = []
        if level == "full":
            dropped = list(self.entries)
            for name in dropped:
                self.evict(name)
        freed_objects = gc.collect()
        if level in ("cache", "full"):
            self.memory.empty_cache()
        if level == "full":
            self.memory.reset_peak()
            self.memory.host_peak = 0
        return {
            "device": self.device,
            "level": level,
            "freed_objects": freed_objects,
            "dropped": dropped,
            "allocated_before": allocated_before,
            "allocated_after": self.memory.allocated(self.entries.values()),
            "reserved_before": reserved_before,
            "reserved_after": self.memory.reserved(),
            "freed_bytes": max(reserved_before - self.memory.reserved(), 0),
        }
