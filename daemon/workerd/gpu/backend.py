"""The GPU side of the daemon: one GPU worker per device, one queue of pipeline runs, placement.

Runs in: the master.

`[gpu] devices` names the devices (placement.worker_slots); each gets its own worker process
(handle.py), with its own cache, budget, back-off and kill window. Runs wait in one queue shared by
all of them and are placed when a worker is free to take one, not when they arrive: the run goes
to the worker placement.place picks from what each worker last reported (its pipeline on the
device, then in host memory, else the most free budget; pins respected; dead workers passed
over), and a free worker takes the next run placed on it (core/queue.py's order).

Why placing at dispatch and not at submit: a run placed on arrival is stuck with a picture that
goes stale while it waits. Its worker may die (its runs would have to be moved), a second device
may come up or load its pipeline meanwhile, or a cold run may have picked a busy device because
the idle ones were still starting. Placed when it can start, a run always sees the workers as
they are, and a dead worker's runs go elsewhere without being moved: they were never its. What it
costs is one placement per waiting pipeline each time a worker is free, a few comparisons for a
handful of devices. A run still waits for a busy worker that holds its pipeline rather than load
it cold on an idle one: a load costs tens of seconds, a wait one run (the issue's rule).

Without `[gpu] devices` there is one worker on `[gpu] device`, as before. With it on "auto" or
"cuda", only a GPU worker can count the CUDA devices (the master never imports torch): a first
worker starts alone, with the machine's whole view of CUDA; its `ready` says how many devices
there are, then it is stopped and one worker per device starts. Keeping it as the first device's
worker would save one start, once, but it would go on seeing every GPU (torch.cuda.device_count,
a pipeline that spreads itself over what it sees), which no other device's worker does.
"""

from __future__ import annotations

import functools
import logging
import math
import time
from collections.abc import Callable
from typing import Any

from workerctl import protocol
from workerd.config import Config, gpu_worker_settings
from workerd.core.backend import Services
from workerd.core.fanout import gather
from workerd.core.lifecycle import Job
from workerd.core.queue import JobQueue
from workerd.gpu import batches
from workerd.gpu.handle import Callback, GpuWorker
from workerd.pipelines.placement import Slot, WorkerView, known_slots, place, worker_slots

log = logging.getLogger("workerd.gpu")


class GpuWorkers:
    kind = "gpu"

    def __init__(self, config: Config, services: Services) -> None:
        self.config = config
        self.ledger, self.reactor, self.counters, self.stack_dir = services
        self.queue = JobQueue()
        self.stopping = False
        self.wake_at = math.inf  # when a batch held for max_wait_ms is due
        self.failure: str | None = None  # why no pipeline can run: [gpu] devices does not fit the machine
        # The devices are laid out once: [gpu] devices (and device, with it) change on restart.
        self.layout = (config.gpu.device, config.gpu.devices)
        self._several = config.gpu.devices is not None
        slots = known_slots(config.gpu)
        if slots is None:
            self.workers = [GpuWorker(self, Slot(0, config.gpu.device), counting=True)]
        else:
            self.workers = [GpuWorker(self, slot) for slot in slots]

    @property
    def enabled(self) -> bool:
        return pipelines_enabled(self.config)

    @property
    def counting(self) -> bool:
        return any(worker.counting for worker in self.workers)

    @property
    def several(self) -> bool:
        return self._several

    @property
    def busy(self) -> bool:
        return any(worker.busy for worker in self.workers)

    @property
    def exited(self) -> bool:
        return all(worker.pid is None for worker in self.workers)

    # -- workers -------------------------------------------------------------------------------

    def start(self) -> None:
        for worker in self.workers:
            worker.ensure_started()

    def ready(self, worker: GpuWorker, info: dict[str, Any]) -> None:
        if worker.counting:
            self.lay_out(worker, int(info.get("device_count", 0)))

    def lay_out(self, first: GpuWorker, cuda_count: int) -> None:
        """The first worker counted the CUDA devices: one worker per configured device."""
        first.counting = False
        try:
            slots = worker_slots(self.config.gpu, cuda_count)
        except ValueError as exc:
            self.failure = f"{exc} ([gpu] devices in {self.config.source})"
            log.error("no GPU worker can start: %s", self.failure)
            first.retire()
            for job in self.queue.drain():
                self.ledger.fail(job, protocol.UNKNOWN_TASK, f"pipeline {job.key!r}: {self.failure}")
            return
        first.retire()  # it sees every GPU, and each device's worker must see only its own
        self.workers += [GpuWorker(self, slot) for slot in slots]
        log.info("GPU workers on %s", ", ".join(str(w.name) for w in self.serving()))
        for name, pipeline in self.config.pipelines.items():
            if pipeline.devices and self.placement(name) is None:
                log.warning(
                    "pipeline %s is pinned to devices %s, none of them present", name, list(pipeline.devices)
                )
        self.refuse_unplaceable()
        if not self.stopping:
            self.start()

    def reaped(self, pid: int, status: int) -> bool:
        for worker in self.workers:
            if worker.reaped(pid, status):
                if worker.retired:
                    self.workers.remove(worker)
                return True
        return False

    def reconfigure(self, config: Config) -> None:
        """Take a reloaded config. Workers whose settings changed are replaced once idle, the
        pipelines they held that are still configured restored. Queued runs of a pipeline that is
        gone (or of a GPU side now disabled, or pinned to devices not present) end now."""
        changed = worker_inputs(config) != worker_inputs(self.config)
        if (config.gpu.device, config.gpu.devices) != self.layout and (self.several or config.gpu.devices):
            log.warning("reload: [gpu] devices (and device, with devices) change only on restart")
        self.config = config
        for key in self.queue.waiting_keys():
            if not self.enabled or key not in config.pipelines:
                reason = (
                    "the GPU worker is disabled ([gpu] enabled)"
                    if not self.enabled
                    else "it is no longer configured"
                )
                for job in self.queue.pop_key(key):
                    self.ledger.fail(
                        job, protocol.UNKNOWN_TASK, f"pipeline {key!r}: {reason} (after a reload)"
                    )
        self.refuse_unplaceable()
        for worker in self.workers:
            worker.reconfigure(changed)

    # -- runs ----------------------------------------------------------------------------------

    def submit(self, job: Job) -> None:
        if self.failure is not None:
            self.ledger.fail(job, protocol.UNKNOWN_TASK, f"pipeline {job.key!r}: {self.failure}")
            return
        if not self.counting and self.placement(job.key) is None:
            self.ledger.fail(job, protocol.UNKNOWN_TASK, self.unplaceable(job.key))
            return
        self.queue.push(job)
        self.start()
        self.dispatch()

    def serving(self) -> list[GpuWorker]:
        """The workers of the devices served (not one being stopped for good)."""
        return [worker for worker in self.workers if not worker.retired]

    def placement(self, name: str, views: list[WorkerView] | None = None) -> int | None:
        """The device index that should run `name` now; None if its pins name no device here."""
        if views is None:
            views = [worker.view() for worker in self.serving()]
        return place(name, views, self.pins(name))

    def pins(self, name: str) -> tuple[int, ...]:
        pipeline = self.config.pipelines.get(name)
        return pipeline.devices if pipeline is not None else ()

    def unplaceable(self, name: str) -> str:
        present = [worker.index for worker in self.serving()]
        return (
            f"pipeline {name!r} is pinned to devices {list(self.pins(name))}, "
            f"which are not present (GPU workers on devices {present})"
        )

    def refuse_unplaceable(self) -> None:
        if self.counting:
            return
        for key in self.queue.waiting_keys():
            if self.placement(key) is None:
                for job in self.queue.pop_key(key):
                    self.ledger.fail(job, protocol.UNKNOWN_TASK, self.unplaceable(key))

    def dispatch(self) -> None:
        """Each free worker takes the next run placed on it, with the runs of its pipeline
        that wait behind it up to max_batch (gpu/batches.py). Placed once per waiting pipeline
        and pass (a handful of comparisons per device), again after each run handed over, since
        that changes where the next one goes."""
        self.wake_at = math.inf
        if not self.queue or self.counting:
            return
        now = time.monotonic()
        free = [worker for worker in self.workers if worker.can_take()]
        while free and self.queue:
            views = [worker.view() for worker in self.serving()]
            where = {key: self.placement(key, views) for key in self.queue.waiting_keys()}
            for worker in free:
                placed = [key for key, index in where.items() if index == worker.index]
                mine = {key for key in placed if not self.held(key, worker, now)}
                job = self.queue.take(mine.__contains__) if mine else None
                if job is not None:
                    self.run(worker, job)
                    free.remove(worker)
                    break
            else:
                return

    def run(self, worker: GpuWorker, job: Job) -> None:
        pipeline = self.config.pipelines.get(job.key)
        max_batch = pipeline.max_batch if pipeline is not None else 1
        jobs = batches.take_batch(self.queue, job, max_batch)
        self.ledger.metrics.batched(job.key, len(jobs))
        worker.run(jobs, max_batch)

    def held(self, key: str, worker: GpuWorker, now: float) -> bool:
        """Does idle `worker` wait for a fuller batch of `key` ([pipelines.NAME] max_wait_ms)?"""
        pipeline = self.config.pipelines.get(key)
        if pipeline is None or pipeline.max_wait_ms <= 0:
            return False
        oldest = min(job.accepted_at for job in self.queue.jobs() if job.key == key)
        due = batches.hold_until(pipeline, self.queue.keys[key], oldest, worker.idle_since, now)
        self.wake_at = min(self.wake_at, due or math.inf)
        return due > 0

    def retry(self, job: Job) -> None:
        self.queue.push(job)

    def hand_back(self, job: Job) -> None:
        if job.departed:  # its client has gone: it ends here, with no reply
            self.ledger.cancel_reply(job)
        elif self.stopping:
            self.ledger.shut_out(job)
        else:
            self.queue.push(job)

    def fail_stranded(self) -> None:
        """A worker could not be started: answer the runs that only refused workers could take
        (the kernel may refuse for a long while); the others wait for a worker that runs."""
        for key in self.queue.waiting_keys():
            pins = self.pins(key)
            candidates = [w for w in self.serving() if self.counting or not pins or w.index in pins]
            refused = [w.refused for w in candidates if w.refused]
            if refused and len(refused) == len(candidates):
                for job in self.queue.pop_key(key):
                    self.ledger.fail(job, protocol.INTERNAL, refused[0])

    def cancel(self, job: Job, terminate: bool) -> str:
        """`cancel` for a pipeline run: queued ones surely; a run handed to a worker is "running"
        (the worker may have begun it) unless terminated with its worker."""
        if self.queue.remove(job):
            self.ledger.cancel_reply(job)
            return "cancelled"
        for worker in self.workers:
            if job in worker.lane.jobs:
                return worker.cancel(job, terminate)
        return "unknown"

    def next_deadline(self) -> float:
        return min([self.wake_at, *(worker.next_deadline() for worker in self.workers)])

    def tick(self) -> None:
        now = time.monotonic()
        for worker in list(self.workers):
            worker.tick(now)
        self.dispatch()

    # -- what the commands ask -----------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """`status`'s `gpu` (the first device's worker, as with one device) and `gpus` (each)."""
        per_device = self.waiting_per_device()
        gpus = [
            {
                "index": w.index,
                "device": w.name,
                "state": w.state,
                "pid": w.pid,
                "queue": per_device.get(w.index, 0),
                "batch": len(w.lane),  # the runs it runs together now (0: none)
                "cached": list(w.cached),
                "parked": list(w.parked),
            }
            for w in self.serving()
        ]
        first = gpus[0] if gpus else {"state": "stopped", "pid": None, "device": None, "cached": []}
        gpu = {
            "enabled": self.enabled,
            **{key: first.get(key) for key in ("state", "pid", "device", "cached", "batch")},
            "queue": len(self.queue),
            "error": self.failure,
        }
        return {"gpu": gpu, "gpus": gpus}

    def waiting_per_device(self) -> dict[int, int]:
        """The waiting runs by the device they would go to now."""
        counts: dict[int, int] = {}
        if self.counting:
            return counts
        for key, waiting in self.queue.keys.items():
            index = self.placement(key)
            if index is not None:
                counts[index] = counts.get(index, 0) + waiting
        return counts

    def memory(self, callback: Callback) -> None:
        self.gather(lambda worker, put: worker.memory(put), callback)

    def clear(self, level: str, callback: Callback) -> None:
        self.gather(lambda worker, put: worker.clear(level, put), callback)

    def gather(self, ask: Callable[[GpuWorker, Callback], None], callback: Callback) -> None:
        """Ask every worker; once all have answered (or are not running: None), call back with
        {"gpu": the first one's answer (as with one device), "gpus": one map per device}."""
        workers = self.serving()

        def done(answers: list[Any]) -> None:
            entries = [
                {"index": w.index, "state": w.state, **(a or {})}
                for w, a in zip(workers, answers, strict=True)
            ]
            callback({"gpu": answers[0] if workers else None, "gpus": entries})

        gather([functools.partial(ask, worker) for worker in workers], done)

    def describe(self) -> list[dict[str, Any]]:
        """The workers' lines in memory_status's `workers`."""
        return [line for worker in self.workers for line in worker.describe()]

    # -- stop ----------------------------------------------------------------------------------

    def begin_stop(self) -> None:
        self.stopping = True
        for job in self.queue.drain():
            self.ledger.shut_out(job)
        for worker in self.workers:
            worker.begin_stop()

    def abort_running(self) -> None:
        for worker in self.workers:
            worker.abort_running()


def worker_inputs(config: Config) -> tuple[dict[str, Any], bool]:
    """What a GPU worker is started from: when it changes in a reload, the worker is replaced."""
    return gpu_worker_settings(config), pipelines_enabled(config)


def pipelines_enabled(config: Config) -> bool:
    return config.gpu.enabled != "false" and bool(config.pipelines)
