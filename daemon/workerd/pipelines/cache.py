"""The pipeline cache of the GPU worker: load, run, park, wake, drop, measure, clear.

Runs in: the GPU worker and the cluster's pipeline hosts.

A pipeline is a module or file with `load(device) -> obj`, `run(obj, **kwargs) -> result` and
optional `unload(obj)`, `to_host(obj)` and `to_device(obj, device)`. A cached pipeline is keyed
by its name and the SHA-256 of its source file, so an edited file is noticed on its next run and
only that pipeline loads again, from whichever tier it was in.

Two tiers. A cached pipeline is on the device, ready to run, or parked in host memory (tiers.py
moves it). Before a load, a wake or a run that would not fit the device budget, the least
recently used other pipelines leave the device: parked when `[gpu] host_memory_budget_mb` is set
and they can be moved, dropped otherwise; past the host budget the least recently used parked
ones are dropped. A run's reply says how it started: "warm", "woken" (moved back from host
memory first) or "cold" (loaded).

Memory is judged on measured figures, not counts: a pipeline's footprint is what its load added;
its peak is what its last run needed on top (CUDA only); what a run leaves allocated once its
reply is out adds to the pipeline's "retained" bytes, the leak watch (warned past
`[gpu] retained_warn_mb`, reloaded past `[pipelines.NAME] max_retained_mb`).

This module runs only inside the GPU worker process; it is the only one that imports torch.
"""

from __future__ import annotations

import gc
import logging
import time
from collections.abc import Callable
from typing import Any

from workerctl import protocol
from workerd import tasks
from workerd.config import PipelineConfig
from workerd.pipelines import tiers
from workerd.pipelines.evictions import DEVICE, HOST, Entry, plan_evictions, plan_parking
from workerd.pipelines.gpumemory import Memory, pick_device
from workerd.pipelines.loading import PipelineError, failure, import_pipeline, missing_module
from workerd.pipelines.sources import SourceError, Sources

log = logging.getLogger("workerd.gpu")

try:
    import torch
except ImportError:  # pipelines that need no torch still run, on the CPU
    torch = None  # type: ignore[assignment]

OOM_ERRORS: tuple[type[BaseException], ...] = (MemoryError,)
if torch is not None:
    OOM_ERRORS += (torch.cuda.OutOfMemoryError,)

MB = 1024 * 1024
WARM, WOKEN, COLD = "warm", "woken", "cold"  # how a run started


# -- the cache -------------------------------------------------------------------------------


class PipelineCache:
    def __init__(
        self,
        configs: dict[str, PipelineConfig],
        device: str,
        budget_mb: float,
        host_budget_mb: float = 0,
        retained_warn_mb: float = 500,
    ) -> None:
        self.configs = configs
        self.device = pick_device(device)
        self.memory = Memory(self.device, budget_mb, host_budget_mb)
        self.retained_warn = int(retained_warn_mb * MB)
        self.entries: dict[str, Entry] = {}
        self.runs = 0
        # What runs found and did, for the daemon's metrics (restores are not counted).
        self.counts = dict.fromkeys(
            ("hits", "misses", "wakes", "parks", "evictions", "leak_reloads", "batch_reruns"), 0
        )
        # Footprint of each pipeline's last load: what to make room for before loading it again.
        self.footprint_history: dict[str, int] = {}
        # The last run's pipeline and probe before it, until settle() measures what it left.
        self.pending: tuple[Entry, int] | None = None
        self.sources = Sources()
        if self.memory.host_budget and not self.memory.cuda:
            log.info("host tier on %s: device and host memory are the same here", self.device)

    def tier(self, name: str) -> list[Entry]:
        """The entries in one tier, least recently used first."""
        entries = list(self.entries.values())  # a copy: snapshot() reads from the other thread
        return sorted((e for e in entries if e.tier == name), key=lambda e: e.last_used)

    def device_held(self) -> int:
        return sum(e.device_bytes for e in list(self.entries.values()))

    def host_held(self) -> int:
        return sum(e.host_bytes for e in list(self.entries.values()))

    # Getting a pipeline onto the device: as it is, woken from host memory, or loaded.

    def prepare(self, name: str) -> tuple[Entry, str]:
        """The entry for `name` on the device, and how it got there: WARM, WOKEN or COLD."""
        config = self.configs.get(name)
        if config is None:
            raise PipelineError(protocol.UNKNOWN_TASK, f"no pipeline named {name!r}")
        try:
            path = self.sources.path(config)
            digest = self.sources.read(path).sha256
        except SourceError as exc:
            raise PipelineError(exc.code, exc.message) from None
        entry = self.entries.get(name)
        if entry is not None and entry.sha256 != digest:
            log.info("pipeline %s changed on disk (sha256 %s): reloading", name, digest[:12])
            self.drop(name)
            entry = None
        if entry is not None and entry.tier == DEVICE:
            return entry, WARM
        if entry is not None and self.wake(entry):
            return entry, WOKEN
        return self.load(config, path, digest), COLD  # not cached, or its wake failed

    def load(self, config: PipelineConfig, path: str, digest: str) -> Entry:
        expected = self.footprint_history.get(config.name, 0)
        self.make_room(expected, keep=config.name)
        started = time.monotonic()
        try:
            module = import_pipeline(config, path)
            self.memory.release()
            before = self.memory.probe()
            obj = self.with_oom_retry(lambda: module.load(self.device), keep=config.name)
        except ModuleNotFoundError as exc:
            if exc.name is None:  # raised by hand, not by an import: an error like any other
                raise
            raise missing_module(config.name, exc.name) from None
        footprint = max(self.memory.probe() - before, 0)
        entry = Entry(config.name, digest, module, obj, footprint, time.monotonic() - started)
        entry.parkable = tiers.can_move(module, obj)
        self.entries[config.name] = entry
        self.footprint_history[config.name] = footprint
        log.info("pipeline %s loaded in %.2f s, %d MiB", config.name, entry.load_s, footprint >> 20)
        self.make_room(0, keep=config.name)  # it may have turned out bigger than expected
        return entry

    def wake(self, entry: Entry) -> bool:
        """Move a parked pipeline back to the device; False if that failed (it is dropped)."""
        self.make_room(entry.bytes, keep=entry.name)
        started = time.monotonic()  # the move alone: what bytes / wake_s compares with a copy rate
        try:
            entry.obj = self.with_oom_retry(
                lambda: tiers.to_device(entry.module, entry.obj, self.device), keep=entry.name
            )
        except Exception as exc:
            self.drop(entry.name)  # half moved as it may be, it is of no use
            if isinstance(exc, PipelineError):
                raise  # out of memory even after the retry
            log.exception(
                "pipeline %s: moving it back to %s failed; loading it again", entry.name, self.device
            )
            return False
        entry.tier, entry.residue_bytes = DEVICE, 0
        entry.wakes += 1
        entry.wake_s = time.monotonic() - started
        self.counts["wakes"] += 1
        log.info("pipeline %s woken from host memory in %.3f s", entry.name, entry.wake_s)
        return True

    def park(self, entry: Entry) -> bool:
        """Move a pipeline to host memory; False if that failed (it is dropped)."""
        started = time.monotonic()
        before = self.memory.probe()
        try:
            entry.obj = tiers.to_host(entry.module, entry.obj, self.memory.pin)
        except Exception:
            log.exception("pipeline %s: moving it to host memory failed; dropping it", entry.name)
            self.drop(entry.name)
            return False
        if self.memory.cuda:  # what a to_host() left on the device still counts there
            freed = before - self.memory.probe()
            entry.residue_bytes = max(entry.device_bytes - freed, 0)
        entry.tier = HOST
        entry.park_s = time.monotonic() - started
        self.counts["parks"] += 1
        log.info(
            "pipeline %s parked in host memory (%d MiB) in %.3f s",
            entry.name,
            entry.bytes >> 20,
            entry.park_s,
        )
        return True

    def drop(self, name: str) -> None:
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
        self.memory.release()

    def make_room(self, needed: int, keep: str) -> None:
        """Make `needed` more bytes fit the device budget by moving other pipelines off it."""
        in_use = self.memory.allocated(self.device_held())
        victims = plan_evictions(self.tier(DEVICE), in_use, needed, self.memory.budget, keep)
        self.send_off([self.entries[name] for name in victims], keep)

    def send_off(self, victims: list[Entry], keep: str) -> None:
        """Park or drop these pipelines, as plan_parking says, to make room for `keep`."""
        if not victims:
            return
        # `keep` may be parked itself, about to wake: its host copy is not to make room with.
        parked = [e for e in self.tier(HOST) if e.name != keep]
        for action, name in plan_parking(victims, parked, self.memory.host_budget):
            log.info(
                "%s pipeline %s to make room for %s",
                "parking" if action == "park" else "dropping",
                name,
                keep,
            )
            if action == "drop":
                self.drop(name)
            if action == "drop" or not self.park(self.entries[name]):
                self.counts["evictions"] += 1
        self.memory.empty_cache()

    # Running.

    def with_oom_retry(self, step: Callable[[], Any], keep: str, tries: int = 2) -> Any:
        """Run `step`; on out-of-memory free the device of other pipelines, retry once. With
        `tries` = 1 nothing is freed: a batch retries at half its size first (batching.py)."""
        for attempt in range(1, tries + 1):
            out_of_memory = False
            try:
                return step()
            except OOM_ERRORS:
                # Leave the except block before freeing: the exception's traceback holds the
                # frames, and their tensors, that we want the allocator to get back.
                out_of_memory = True
            if out_of_memory and attempt == tries:
                break
            self.free_after_oom(keep)
            gc.collect()
            self.memory.empty_cache()
        gc.collect()
        self.memory.empty_cache()
        raise PipelineError(
            protocol.OUT_OF_MEMORY,
            f"pipeline {keep!r} ran out of memory on {self.device}, even after freeing the cache",
            {"device": self.device, "budget_bytes": self.memory.budget},
        )

    def free_after_oom(self, keep: str) -> None:
        """With a host tier, park every other pipeline that can be parked (a wake is cheap, so
        the one retry gets the whole device); else drop only the least recently used one, as
        each drop costs a reload."""
        others = [e for e in self.tier(DEVICE) if e.name != keep]
        victims = [e for e in others if e.parkable] if self.memory.host_budget else []
        victims = victims or others[:1]
        if victims:
            log.warning("out of memory in %s: freeing %s and retrying once", keep, [e.name for e in victims])
        self.send_off(victims, keep)

    def run(self, name: str, args: list[Any], kwargs: dict[str, Any]) -> dict[str, Any]:
        entry, info = self.begin(name)
        started = time.monotonic()
        output = self.measure(entry, 1, lambda: entry.module.run(entry.obj, *args, **kwargs))
        return {"output": output, **self.end(entry, info, 1, started)}

    def begin(self, name: str) -> tuple[Entry, dict[str, Any]]:
        """A run (of one request, or of a batch: batching.py) begins: its pipeline on the device,
        and what its reply says of how it got there."""
        started = time.monotonic()
        entry, start = self.prepare(name)
        if start != WOKEN:  # wakes are counted by wake()
            self.counts["hits" if start == WARM else "misses"] += 1
        start_s = time.monotonic() - started
        return entry, {
            "pipeline": name,
            "sha256": entry.sha256,
            "start": start,
            "start_s": start_s,
            "warm": start == WARM,
            "load_s": start_s if start == COLD else 0.0,
            "device": self.device,
        }

    def measure(self, entry: Entry, size: int, step: Callable[[], Any], tries: int = 2) -> Any:
        """`step`, a call of the pipeline on `size` inputs, with room made for the peak measured
        at that size (evictions.Entry.peak_for), and its own peak recorded (CUDA only)."""
        self.make_room(entry.peak_for(size), keep=entry.name)
        base = 0

        def attempt() -> Any:
            nonlocal base
            base = self.memory.probe()  # again after an OOM retry moved others off the device
            self.pending = (entry, base)  # a run that raises is watched too
            self.memory.reset_peak()
            return step()

        output = self.with_oom_retry(attempt, keep=entry.name, tries=tries)
        if self.memory.cuda:
            torch.cuda.synchronize(self.device)
            entry.record_peak(size, max(self.memory.peak() - base, 0))
        return output

    def end(self, entry: Entry, info: dict[str, Any], size: int, started: float) -> dict[str, Any]:
        """The run begun at `started` is over (a batch of `size` is one run, however many calls
        its splits took): what its reply says of it."""
        entry.batch_sizes[size] += 1
        entry.runs += 1
        entry.last_used = time.time()
        self.runs += 1
        return {**info, "run_s": time.monotonic() - started, "batch": size}

    # The leak watch, between runs.

    def settle(self) -> None:
        """After a run's reply is out (its output freed): what the run left allocated adds to its
        pipeline's retained bytes; warn once past retained_warn_mb, reload past max_retained_mb."""
        pending, self.pending = self.pending, None
        if pending is None:
            return
        entry, base = pending
        if self.entries.get(entry.name) is not entry or entry.tier != DEVICE:
            return
        self.memory.release()
        entry.retained_bytes = max(entry.retained_bytes + self.memory.probe() - base, 0)
        retained_mb = entry.retained_bytes / MB
        if self.retained_warn and entry.retained_bytes > self.retained_warn and not entry.warned:
            entry.warned = True
            log.warning(
                "pipeline %s keeps %.0f MiB allocated beyond its %.0f MiB footprint after %d runs "
                "(a leak? [pipelines.%s] max_retained_mb reloads it past a limit)",
                entry.name, retained_mb, entry.bytes / MB, entry.runs, entry.name,
            )  # fmt: skip
        limit = self.configs[entry.name].max_retained_mb
        if limit and retained_mb > limit:
            log.warning(
                "pipeline %s retains %.0f MiB > max_retained_mb %g: reloading", entry.name, retained_mb, limit
            )
            self.drop(entry.name)
            self.memory.empty_cache()
            self.counts["leak_reloads"] += 1
            try:
                self.prepare(entry.name)
            except Exception:
                log.exception("pipeline %s: reloading it failed; its next run loads it", entry.name)

    # Reporting and clearing.

    def placement_state(self) -> dict[str, Any]:
        """What the master needs to place runs on this worker and to restore it after a crash."""
        return {
            "cached": [e.name for e in self.tier(DEVICE)],
            "parked": [e.name for e in self.tier(HOST)],
            "free_bytes": max(self.memory.budget - self.memory.allocated(self.device_held()), 0),
        }

    def snapshot(self) -> dict[str, Any]:
        entries = list(self.entries.values())  # a copy: the runner thread may change the dict
        return {
            **self.memory.stats(self.device_held(), self.host_held()),
            "runs": self.runs,
            "pipelines": [e.describe() for e in entries],
        }

    def clear(self, level: str) -> dict[str, Any]:
        """`gc`: collect; `cache`: also give the allocators' free blocks back (parked pipelines
        stay parked); `full`: also drop every pipeline, from both tiers."""
        allocated_before = self.memory.allocated(self.device_held())
        reserved_before = self.memory.reserved()
        host_before = self.host_held()
        dropped = []
        if level == "full":
            dropped = list(self.entries)
            for name in dropped:
                self.drop(name)
        freed_objects = gc.collect()
        if level in ("cache", "full"):
            self.memory.empty_cache()
            self.memory.empty_host_cache()
        if level == "full":
            self.memory.reset_peak()
            self.memory.host_peak = 0
        return {
            "device": self.device,
            "level": level,
            "freed_objects": freed_objects,
            "dropped": dropped,
            "allocated_before": allocated_before,
            "allocated_after": self.memory.allocated(self.device_held()),
            "reserved_before": reserved_before,
            "reserved_after": self.memory.reserved(),
            "freed_bytes": max(reserved_before - self.memory.reserved(), 0),
            "host_bytes_before": host_before,
            "host_bytes_after": self.host_held(),
        }


def run_request(
    cache: PipelineCache, body: bytes, raw: list[Any], limit: int, where: dict[str, Any] | None = None
) -> tuple[bytes, list[Any]]:
    """One execute request for a pipeline, on `cache`: (kind, [reply body, *raw frames]), kind
    tasks.OK or tasks.ERROR. Every failure is a typed error reply (used by the GPU worker and by
    the Ray bridge's pipeline hosts). `where` is added to the result (the GPU worker's device)."""
    request, error = tasks.decode(body, raw)
    if request is None:
        return tasks.ERROR, [error]
    try:
        result = cache.run(request["name"], request.get("args", []), request.get("kwargs", {}))
    except Exception as exc:
        return tasks.ERROR, [protocol.encode_error(request.get("id"), *failure(exc))]
    return result_reply(request, {**result, **(where or {})}, limit)


def result_reply(request: dict[str, Any], result: dict[str, Any], limit: int) -> tuple[bytes, list[Any]]:
    """A run's result as its reply: (tasks.OK, frames), bounded by `limit`; or, for a result
    msgpack cannot encode (a tensor, say), that request's TASK_ERROR (pipelines/batching.py
    answers each run of a batch through this too)."""
    request_id = request.get("id")
    try:
        frames = protocol.encode_result_frames(request_id, result, request.get("tuples") is True)
    except Exception as exc:
        return tasks.ERROR, [protocol.encode_error(request_id, *failure(exc))]
    return tasks.bounded_frames(tasks.OK, frames, request_id, limit)
