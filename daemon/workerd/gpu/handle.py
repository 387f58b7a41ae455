"""One GPU worker, as the master sees it: start it, hand it pipeline runs, watch it, restore it.

Runs in: the master.

There is one per device (gpu/backend.py owns the list, the queue of runs and where each run
goes). The worker is spawned as a fresh interpreter (gpu/worker.py) and reached through a
core.child.Child: its channel, its lane of one run, its kill window, its asks. It says when each
run starts, so a run's timeout never counts the restore or the clear it waited behind. A run past
its timeout gets the worker's stacks dumped and the worker killed (TIMEOUT); a worker that dies
(WORKER_LOST, or a retry) is respawned after a back-off. Either way the pipelines it had on its
device are loaded again in the background, so the next run there is warm. Nothing of this
touches the other devices' workers: the runs this one held go back to the shared queue.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import signal
import time
from collections.abc import Callable
from typing import Any, Protocol

from workerctl import protocol
from workerd import memory, messages
from workerd.config import MAX_BATCH, Config, gpu_worker_settings
from workerd.core.backoff import RESTART_FIRST_S, RESTART_MAX_S, Backoff
from workerd.core.child import Child, frame_limit
from workerd.core.lifecycle import ANSWERED, STOP_MESSAGE, WHEN_TOLD, Job, Lane, Ledger, shown_state
from workerd.core.processes import describe_exit
from workerd.core.reactor import Reactor
from workerd.gpu import batches
from workerd.metrics import CACHE_EVENTS
from workerd.pipelines.placement import Slot, WorkerView, slot_name, worker_environment

log = logging.getLogger("workerd.gpu")

# A memory or clear request to a GPU worker is answered without it after this long.
ANSWER_WAIT_S = 5.0
# clear waits for the run in progress, which may be long.
CLEAR_WAIT_S = 120.0

Callback = Callable[[Any], None]


class Owner(Protocol):
    """What a GPU worker needs of the GPU side (gpu/backend.py), and tells it."""

    config: Config
    ledger: Ledger
    reactor: Reactor
    stack_dir: str
    counters: collections.Counter[str]

    @property
    def several(self) -> bool: ...
    @property
    def enabled(self) -> bool: ...
    def retry(self, job: Job) -> None: ...
    def hand_back(self, job: Job) -> None: ...
    def fail_stranded(self) -> None: ...
    def ready(self, worker: GpuWorker, info: dict[str, Any]) -> None: ...


class GpuWorker:
    def __init__(self, owner: Owner, slot: Slot, counting: bool = False) -> None:
        self.owner = owner
        self.slot = slot
        # Started before the devices are known, to count them (gpu/backend.py): spawned on "auto",
        # with the machine's whole view of CUDA.
        self.counting = counting
        self.child = Child(
            owner.reactor,
            owner.ledger,
            owner.stack_dir,
            "GPU worker",
            Lane(MAX_BATCH, WHEN_TOLD),  # one run, or one batch of runs (gpu/batches.py)
            self.message,
        )
        self.phase = "stopped"  # stopped | starting | serving | stopping (serving: idle/busy, see `state`)
        self.device: str | None = None  # as the worker process names it
        self.respawn = Backoff(RESTART_FIRST_S, RESTART_MAX_S)
        # Died, or could not be started, and not ready since: placement passes it over.
        self.down = False
        self.refused: str | None = None  # why the kernel refused to start it, until it starts
        self.retired = False  # its device is not one of the daemon's: stopped, never respawned
        # Its cache as of its last report: what to restore after a crash, and what placement reads.
        self.cached: list[str] = []
        self.parked: list[str] = []
        self.free_bytes = 0
        self.restoring = False
        self.runs = 0
        self.idle_since = 0.0  # when it last finished a run, or became ready: max_wait_ms counts from then
        self.stopping = False
        self.restart_pending = False

    @property
    def index(self) -> int:
        return self.slot.index

    @property
    def pid(self) -> int | None:
        return self.child.pid

    @property
    def lane(self) -> Lane:
        return self.child.lane

    @property
    def name(self) -> str | None:
        """The device as status and memory_status show it: the slot's with [gpu] devices, else
        what the worker reported (None until it has)."""
        return slot_name(self.slot) if self.placed else self.device

    @property
    def placed(self) -> bool:
        """Whether it runs on its slot's device, by [gpu] devices (not the one worker on [gpu]
        device, nor the counting one)."""
        return self.owner.several and not self.counting and not self.retired

    @property
    def state(self) -> str:
        return shown_state(self.phase, self.lane, self.child.killing)

    @property
    def busy(self) -> bool:
        return bool(self.lane.jobs) or self.child.kill is not None

    @property
    def usable(self) -> bool:
        """May placement send it runs (it is up, or coming up, and not being killed)?"""
        return not self.down and not self.child.killing

    def view(self) -> WorkerView:
        """What placement knows of it. The pipeline of the run it holds counts as on its device:
        it is, or will be once loaded, so more runs of it wait here rather than load elsewhere."""
        held = frozenset(self.cached).union(job.key for job in self.lane.jobs)
        runs = min(len(self.lane), 1)  # a batch is one run
        return WorkerView(self.index, self.usable, held, frozenset(self.parked), self.free_bytes, runs)

    def can_take(self) -> bool:
        return self.state == "idle" and not self.restart_pending and not self.retired

    def what(self) -> str:
        """How logs and errors name it."""
        if not self.owner.several:
            return "GPU worker"
        return f"GPU worker {self.index}" if self.placed else "GPU worker counting the devices"

    # -- process -------------------------------------------------------------------------------

    def settings(self) -> tuple[dict[str, Any], dict[str, str]]:
        """Its settings, and what to add to the master's environment for it."""
        device, env = worker_environment(self.slot, os.environ) if self.placed else (None, {})
        if self.counting:
            device = "auto"  # without CUDA it still starts, and says so with a count of 0
        settings = {
            "master_pid": os.getpid(),
            "log_level": logging.getLogger().getEffectiveLevel(),
            "stack_dir": self.owner.stack_dir,
            "max_message_bytes": self.owner.config.daemon.max_message_bytes,
            "device_name": self.name if self.placed else None,
            **gpu_worker_settings(self.owner.config, device),
        }
        return settings, env

    def spawn(self) -> None:
        """Start the worker; if the kernel refuses, answer what only it could run, retry later."""
        self.respawn.cancel()
        settings, env = self.settings()
        self.child.what = self.what()
        limit = frame_limit(self.owner.config.daemon.max_message_bytes)
        try:
            self.child.spawn(
                "workerd.gpu.worker", [json.dumps(settings)], limit, {**os.environ, **env} if env else None
            )
        except OSError as exc:
            self.spawn_failed(exc)
            return
        self.phase, self.refused = "starting", None
        log.info("%s starting (pid %d)", self.what(), self.pid)

    def spawn_failed(self, exc: OSError) -> None:
        self.down = True
        delay = self.respawn.next(time.monotonic())
        log.error("cannot start the %s: %s; retrying in %.1f s", self.what(), exc, delay)
        self.refused = f"cannot start the {self.what()}: {exc}; retrying in {delay:.1f} s"
        self.owner.fail_stranded()

    def reconfigure(self, changed: bool) -> None:
        """A reload: forget pipelines that are gone; restart once idle if its settings changed."""
        pipelines = self.owner.config.pipelines
        self.cached = [name for name in self.cached if name in pipelines]
        self.parked = [name for name in self.parked if name in pipelines]
        if changed and self.pid is not None:
            self.restart_pending = True
            self.restart_if_idle()

    def restart_if_idle(self) -> None:
        if self.restart_pending and self.state == "idle":
            self.restart_pending = False
            self.stop_process()

    def ensure_started(self) -> None:
        if self.pid is None and not self.respawn.pending and not self.stopping and not self.retired:
            self.spawn()

    def retire(self) -> None:
        """Stop it for good: its device is not one the daemon serves."""
        self.retired = True
        self.respawn.cancel()
        if self.pid is not None:
            self.stop_process()

    def reaped(self, pid: int, status: int) -> bool:
        """A child of the master exited: is it this worker?"""
        if pid != self.pid:
            return False
        how = describe_exit(status)
        was, killed = self.phase, self.child.killing
        self.phase = "stopped"
        retry = None if self.stopping else self.owner.retry
        if self.child.gone(how, retry, self.owner.hand_back):
            self.owner.counters["gpu_timeouts"] += 1
        self.parked = []  # host memory went with the process
        if self.stopping or self.retired:
            return True
        now = time.monotonic()
        if was == "stopping":  # replaced after a config reload: start the new one now
            if self.owner.enabled:
                self.respawn.now(now)
            return True
        log.warning("%s %d %s (state %s)", self.what(), pid, how, "killing" if killed else was)
        if not killed:  # killed for its timeout or a cancel: counted as that
            self.owner.counters["gpu_worker_deaths"] += 1
        if self.restoring:
            self.cached = []  # it died restoring: do not try the same thing in a loop
        self.restoring = False
        self.down = True
        self.respawn.next(now)
        if was != "starting":  # it had served: come back at once; a start that fails backs off
            self.respawn.now(now)
        return True

    # -- channel -------------------------------------------------------------------------------

    def message(self, frames: list[Any], now: float) -> None:
        kind = frames[0]
        if kind == messages.START:
            for job_id in frames[1:]:  # one run, or each of a batch
                self.lane.started(int(job_id), now)
        elif kind == messages.DONE:
            job = self.lane.done(int(frames[1]), now)
            if job is not None:
                self.run_done(job, frames[2], frames[3], protocol.unpack(frames[4]), frames[5:])
        elif kind == messages.READY:
            self.ready(protocol.unpack(frames[1]))
        elif kind == messages.RESTORED:
            restored = protocol.unpack(frames[1])
            self.restoring = False
            self.respawn.reset()
            self.take_report(restored)
            log.info("%s restored pipelines: %s", self.what(), restored)
        elif kind == messages.MEMORY:
            self.child.answered(frames[1], protocol.unpack(frames[2]))
        elif kind == messages.CLEARED:
            self.take_report(protocol.unpack(frames[3]))  # a full clear dropped its pipelines
            self.child.answered(frames[1], protocol.unpack(frames[2]))

    def ready(self, info: dict[str, Any]) -> None:
        self.device = info["device"]
        self.free_bytes = int(info.get("free_bytes", 0))
        self.down = False
        self.idle_since = time.monotonic()
        if self.phase == "starting":
            self.phase = "serving"
        log.info("%s ready on %s (imports took %.2f s)", self.what(), self.device, info["import_s"])
        if self.owner.config.gpu.enabled == "true" and not str(self.device).startswith("cuda"):
            log.warning("[gpu] enabled = true but no CUDA device is usable: pipelines run on %s", self.device)
        self.owner.ready(self, info)  # may retire it: the counting worker, on a device not served
        if self.restart_pending:
            # A reload changed its config while it started: replace it now. Nothing else ever
            # sees it idle (dispatch holds back while a restart is pending), so it waited for good.
            self.restart_if_idle()
            return
        if self.cached and not self.retired:
            self.restoring = True
            self.child.send([messages.RESTORE, protocol.pack(self.cached)])

    def take_report(self, report: dict[str, Any]) -> None:
        """Its cache's tiers, from a `done` or `restored`: what placement and a restore read."""
        self.cached = list(report.get("cached", []))
        self.parked = list(report.get("parked", []))
        self.free_bytes = int(report.get("free_bytes", 0))

    def run_done(self, job: Job, outcome: bytes, frame: bytes, extra: dict[str, Any], raw: list[Any]) -> None:
        self.runs += 1
        self.take_report(extra)
        if not self.restoring:
            self.respawn.reset()
        for name, key in CACHE_EVENTS.items():  # this run's cache hits, misses and evictions
            self.owner.counters[key] += int(extra.get(name, 0))
        self.owner.ledger.result(job, outcome, frame, raw)
        if self.lane.jobs:  # the rest of its batch is still to come
            return
        self.idle_since = time.monotonic()
        if self.stopping:
            self.stop_process()
        self.restart_if_idle()

    # -- runs ----------------------------------------------------------------------------------

    def run(self, jobs: list[Job], max_batch: int) -> None:
        """Hand it a run, or a batch of runs of one pipeline (with max_batch > 1 its runs go to
        run_batch(), however many there are)."""
        now = time.monotonic()
        for job in jobs:
            self.lane.add(job, now)
        if max_batch > 1:
            self.child.send(batches.batch_message(jobs, max_batch))
        else:
            (job,) = jobs
            self.child.send([messages.RUN, b"%d" % job.id, job.body, *job.raw])

    def cancel(self, job: Job, terminate: bool) -> str:
        """`cancel` for a run it holds: "running" (it may have begun it) unless terminated;
        "unknown" past its deadline (its kill window answers TIMEOUT). Terminated, the run is
        answered CANCELLED now; its worker is killed once no run of its batch is left to answer
        (the others' results are worth more than the time the cancelled one still takes)."""
        if job.expired:
            return "unknown"
        if not terminate or self.pid is None:
            return "running"
        job.cancelled = True
        kill = all(other is job or other.state is ANSWERED for other in self.lane.jobs)
        self.owner.ledger.cancel_reply(job, terminated=kill)
        if kill:
            self.child.kill_now()
        return "cancelled"

    def next_deadline(self) -> float:
        return min(self.respawn.due, self.child.next_deadline())

    def tick(self, now: float) -> None:
        if self.child.tick(now):
            self.owner.counters["gpu_timeouts"] += 1
        late = self.child.overdue(now)
        if late:
            self.child.open_kill(late, now)
            rest = batches.withdraw_rest(self.lane, late, now)
            self.owner.counters["batch_requeued"] += len(rest)
            for job in reversed(rest):  # each to the front: in their order
                self.owner.hand_back(job)
        if not self.stopping and self.respawn.ready(now):
            self.spawn()

    # -- requests to the worker ------------------------------------------------------------------

    def ask(self, op: bytes, args: list[bytes], callback: Callback, wait: float) -> None:
        """Send a memory or clear request; callback gets the answer, an error map, or None
        when the worker is not serving."""
        if self.phase != "serving" or self.restart_pending or self.child.channel is None:
            callback(None)
            return
        self.child.ask(op, args, callback, wait)

    def memory(self, callback: Callback) -> None:
        self.ask(messages.MEMORY, [], callback, ANSWER_WAIT_S)

    def clear(self, level: str, callback: Callback) -> None:
        self.ask(messages.CLEAR, [level.encode()], callback, CLEAR_WAIT_S)

    def describe(self) -> list[dict[str, Any]]:
        """Its line in memory_status's `workers`."""
        if self.pid is None:
            return []
        line = {"pid": self.pid, "kind": "gpu", "state": self.state, "tasks_done": self.runs}
        return [line | {"index": self.index, "device": self.name} | memory.process_memory(self.pid)]

    # -- stop ----------------------------------------------------------------------------------

    def begin_stop(self) -> None:
        self.stopping = True
        self.respawn.cancel()
        self.child.drop_asks(STOP_MESSAGE)
        if self.state in ("idle", "starting") and self.pid is not None:
            self.stop_process()

    def stop_process(self) -> None:
        if self.state == "idle":
            self.child.send([messages.STOP])
        else:
            self.child.signal(signal.SIGTERM)
        self.phase = "stopping"

    def abort_running(self) -> None:
        if self.pid is not None:
            self.child.abort()
            self.phase = "stopping"
