"""One GPU worker, as the master sees it: start it, hand it pipeline runs, watch it, restore it.

There is one per device (gpus.py owns the list, the queue of runs and where each run goes). The
worker is spawned as a fresh interpreter (gpu_worker.py) and reached over its channel
(transport.py). It holds one run at a time, through the job lifecycle (lifecycle.py); it says
when each starts, so a run's timeout never counts the restore or the clear it waited behind. A
run past its timeout gets the worker's stacks dumped and the worker killed (TIMEOUT); a worker
that dies (WORKER_LOST, or a retry) is respawned after a back-off. Either way the pipelines it had
on its device are loaded again in the background, so the next run there is warm. Nothing of this
touches the other devices' workers: the runs this one held go back to the shared queue.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import os
import signal
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from workerctl import protocol
from workerd import memory
from workerd.config import gpu_worker_settings
from workerd.core import processes
from workerd.core.lifecycle import WHEN_TOLD, Job, Lane, settle, shown_state
from workerd.core.transport import Channel, ChannelError, channel_pair
from workerd.gpu.placement import Slot, WorkerView, slot_name, worker_environment
from workerd.metrics import CACHE_EVENTS
from workerd.pool.backend import FRAME_SLACK, STACK_DUMP_GRACE_S, read_text, remove_quietly
from workerd.pool.generations import BACKOFF_FIRST_S, BACKOFF_MAX_S
from workerd.pool.worker import stack_path

if TYPE_CHECKING:
    from workerd.gpu.backend import GpuWorkers

log = logging.getLogger("workerd.gpu")

# A memory or clear request to a GPU worker is answered without it after this long.
ANSWER_WAIT_S = 5.0
# clear waits for the run in progress, which may be long.
CLEAR_WAIT_S = 120.0

Callback = Callable[[Any], None]


class GpuWorker:
    def __init__(self, owner: GpuWorkers, slot: Slot, counting: bool = False) -> None:
        self.owner = owner
        self.slot = slot
        # Started before the devices are known, to count them (gpus.py): spawned on "auto",
        # with the machine's whole view of CUDA.
        self.counting = counting
        self.pid: int | None = None
        self.channel: Channel | None = None
        # stopped | starting | serving | killing | killed | stopping (serving: idle/busy, see `state`)
        self.phase = "stopped"
        self.device: str | None = None  # as the worker process names it
        self.lane = Lane(1, starts=WHEN_TOLD)
        self.kill_at = math.inf
        self.expired: Job | None = None  # the run it is being killed for: TIMEOUT at the kill
        self.respawn_at = math.inf
        self.failures = 0
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
        self.stopping = False
        self.restart_pending = False
        self.tokens = (b"%d" % n for n in itertools.count(1))
        self.waiting: dict[bytes, tuple[Callback, float]] = {}

    @property
    def index(self) -> int:
        return self.slot.index

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
        return shown_state(self.phase, self.lane)

    @property
    def running(self) -> bool:
        return bool(self.lane.jobs)

    @property
    def alive(self) -> bool:
        return not self.down and self.phase not in ("killing", "killed")

    def view(self) -> WorkerView:
        """What placement knows of it. The pipeline of the run it holds counts as on its device:
        it is, or will be once loaded, so more runs of it wait here rather than load elsewhere."""
        held = frozenset(self.cached).union(job.key for job in self.lane.jobs)
        return WorkerView(
            self.index, self.alive, held, frozenset(self.parked), self.free_bytes, len(self.lane)
        )

    def can_take(self) -> bool:
        return (
            self.phase == "serving" and not self.lane.jobs and not self.restart_pending and not self.retired
        )

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
            "max_message_bytes": self.owner.max_frame(),
            "device_name": self.name if self.placed else None,
            **gpu_worker_settings(self.owner.config, device),
        }
        return settings, env

    def spawn(self) -> None:
        """Start the worker; if the kernel refuses, answer what only it could run, retry later."""
        self.respawn_at = math.inf
        channel, theirs = channel_pair(self.owner.max_frame() + FRAME_SLACK)
        settings, env = self.settings()
        try:
            pid = processes.spawn(
                "workerd.gpu.worker",
                [json.dumps(settings), str(theirs.fileno())],
                [theirs.fileno()],
                {**os.environ, **env} if env else None,
            )
        except OSError as exc:
            channel.close()
            self.spawn_failed(exc)
            return
        finally:
            theirs.close()
        self.pid, self.channel, self.phase, self.refused = pid, channel, "starting", None
        self.owner.reactor.watch(channel.fileno(), self.handle_channel)
        log.info("%s starting (pid %d)", self.what(), pid)

    def spawn_failed(self, exc: OSError) -> None:
        self.failures += 1
        self.down = True
        delay = min(BACKOFF_FIRST_S * 2 ** (self.failures - 1), BACKOFF_MAX_S)
        log.error("cannot start the %s: %s; retrying in %.1f s", self.what(), exc, delay)
        self.refused = f"cannot start the {self.what()}: {exc}; retrying in {delay:.1f} s"
        self.respawn_at = time.monotonic() + delay
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
        if self.pid is None and self.respawn_at == math.inf and not self.stopping and not self.retired:
            self.spawn()

    def retire(self) -> None:
        """Stop it for good: its device is not one the daemon serves."""
        self.retired = True
        self.respawn_at = math.inf
        if self.pid is not None:
            self.stop_process()

    def reaped(self, pid: int, status: int) -> bool:
        """A child of the master exited: is it this worker?"""
        if pid != self.pid:
            return False
        processes.kill_group(pid)  # what a pipeline started
        how = processes.describe_exit(status)
        was = self.phase
        self.close_channel()
        self.pid, self.phase = None, "stopped"
        # A death inside the kill window ends the kill too (settle answers the TIMEOUT): a
        # kill_at left set is a deadline forever past, and the loop spun on it at full CPU.
        self.kill_at, self.expired = math.inf, None
        retry = None if self.stopping else self.owner.retry
        if settle(
            self.owner.ledger,
            self.lane,
            pid,
            f"GPU worker {pid}",
            how,
            self.stack_file(pid),
            retry,
            self.owner.hand_back,
        ):
            self.owner.counters["gpu_timeouts"] += 1
        remove_quietly(stack_path(self.owner.stack_dir, pid))
        self.parked = []  # host memory went with the process
        self.answer_waiting(f"{self.what()} {how}")
        if self.stopping or self.retired:
            return True
        if was == "stopping":  # replaced after a config reload: start the new one now
            self.respawn_at = time.monotonic() if self.owner.enabled else math.inf
            return True
        log.warning("%s %d %s (state %s)", self.what(), pid, how, was)
        if was not in ("killing", "killed"):  # killed for its timeout: counted as gpu_timeouts
            self.owner.counters["gpu_worker_deaths"] += 1
        if self.restoring:
            self.cached = []  # it died restoring: do not try the same thing in a loop
        self.restoring = False
        self.down = True
        self.failures += 1
        delay = min(BACKOFF_FIRST_S * 2 ** (self.failures - 1), BACKOFF_MAX_S)
        self.respawn_at = time.monotonic() + (delay if was == "starting" else 0.0)
        return True

    def stack_file(self, pid: int) -> Callable[[], str]:
        return lambda: read_text(stack_path(self.owner.stack_dir, pid))

    def close_channel(self) -> None:
        if self.channel is not None:
            self.read_channel()  # what it sent before it went
            self.owner.reactor.unwatch(self.channel.fileno())
            self.channel.close()
            self.channel = None

    def answer_waiting(self, why: str) -> None:
        for token, (callback, _) in list(self.waiting.items()):
            del self.waiting[token]
            callback({"error": why})

    # -- channel -------------------------------------------------------------------------------

    def send(self, frames: list[Any]) -> None:
        if self.channel is None:
            return
        self.channel.send(frames)
        self.flush()

    def flush(self) -> None:
        channel = self.channel
        if channel is None:
            return
        try:
            done = channel.flush()
        except OSError:
            done = True  # gone: reaping it settles everything
            channel.out.clear()
        self.owner.reactor.want_write(channel.fileno(), None if done else self.flush)

    def handle_channel(self) -> None:
        self.read_channel()
        self.owner.dispatch()

    def read_channel(self) -> None:
        channel = self.channel
        if channel is None:
            return
        try:
            messages = channel.receive()
        except ChannelError as exc:
            log.error("%s broke its channel (%s): killing it", self.what(), exc)
            messages = None
        if messages is None:
            self.owner.reactor.unwatch(channel.fileno())
            if not channel.closed and self.pid is not None:
                processes.signal_quietly(self.pid, signal.SIGKILL)
            return
        now = time.monotonic()
        for frames in messages:
            self.message(frames, now)

    def message(self, frames: list[Any], now: float) -> None:
        kind = frames[0]
        if kind == b"start":
            self.lane.started(int(frames[1]), now)
        elif kind == b"done":
            job = self.lane.done(int(frames[1]), now)
            if job is not None:
                self.run_done(job, frames[2], frames[3], protocol.unpack(frames[4]), frames[5:])
        elif kind == b"ready":
            self.ready(protocol.unpack(frames[1]))
        elif kind == b"restored":
            restored = protocol.unpack(frames[1])
            self.restoring = False
            self.failures = 0
            self.take_report(restored)
            log.info("%s restored pipelines: %s", self.what(), restored)
        elif kind in (b"memory", b"cleared"):
            if kind == b"cleared":
                self.take_report(protocol.unpack(frames[3]))  # a full clear dropped its pipelines
            waiting = self.waiting.pop(bytes(frames[1]), None)
            if waiting:
                waiting[0](protocol.unpack(frames[2]))

    def ready(self, info: dict[str, Any]) -> None:
        self.device = info["device"]
        self.free_bytes = int(info.get("free_bytes", 0))
        self.down = False
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
            self.send([b"restore", protocol.pack(self.cached)])

    def take_report(self, report: dict[str, Any]) -> None:
        """Its cache's tiers, from a `done` or `restored`: what placement and a restore read."""
        self.cached = list(report.get("cached", []))
        self.parked = list(report.get("parked", []))
        self.free_bytes = int(report.get("free_bytes", 0))

    def run_done(self, job: Job, outcome: bytes, frame: bytes, extra: dict[str, Any], raw: list[Any]) -> None:
        self.runs += 1
        self.take_report(extra)
        if not self.restoring:
            self.failures = 0
        for name, key in CACHE_EVENTS.items():  # this run's cache hits, misses and evictions
            self.owner.counters[key] += int(extra.get(name, 0))
        self.owner.ledger.result(job, outcome, frame, raw)
        if self.stopping:
            self.stop_process()
        self.restart_if_idle()

    # -- runs ----------------------------------------------------------------------------------

    def run(self, job: Job) -> None:
        self.lane.add(job, time.monotonic())
        self.send([b"run", b"%d" % job.id, job.body, *job.raw])

    def cancel(self, job: Job, terminate: bool) -> str:
        """`cancel` for the run it holds: "running" (it may have begun it) unless terminated
        with the worker."""
        if not terminate or self.pid is None or self.phase in ("killing", "killed"):
            return "running"
        job.cancelled = True
        self.owner.ledger.cancel_reply(job, terminated=True)
        processes.signal_quietly(self.pid, signal.SIGKILL)
        self.phase = "killed"
        return "cancelled"

    def next_deadline(self) -> float:
        times = [self.respawn_at, self.kill_at, self.lane.next_deadline()]
        times.extend(deadline for _, deadline in self.waiting.values())
        return min(times)

    def tick(self, now: float) -> None:
        if self.phase == "killing" and now >= self.kill_at:
            self.finish_kill()
        elif self.phase not in ("killing", "killed") and self.lane.next_deadline() <= now:
            self.start_kill(now)
        for token, (callback, deadline) in list(self.waiting.items()):
            if now >= deadline:
                del self.waiting[token]
                callback({"error": f"the {self.what()} did not answer in time", "state": self.state})
        if now >= self.respawn_at and not self.stopping:
            self.spawn()

    def start_kill(self, now: float) -> None:
        """A run went past its timeout: its answer is TIMEOUT from now on; ask for the stacks."""
        self.read_channel()  # a result on its way settles it
        job = self.lane.running
        if job is None or job.deadline > now or self.pid is None:
            return
        job.expired = True
        self.expired = job
        self.phase = "killing"
        self.kill_at = now + STACK_DUMP_GRACE_S
        processes.signal_quietly(self.pid, signal.SIGUSR1)

    def finish_kill(self) -> None:
        """Answer TIMEOUT with the stacks the worker dumped, and kill it; reaping it respawns it."""
        self.kill_at = math.inf
        self.phase = "killed"
        if self.pid is None:
            return
        stack = read_text(stack_path(self.owner.stack_dir, self.pid))
        processes.signal_quietly(self.pid, signal.SIGKILL)
        job, self.expired = self.expired, None
        if job is not None:
            self.owner.counters["gpu_timeouts"] += 1
            self.owner.ledger.timed_out(job, self.pid, stack, f"GPU worker {self.pid}")

    # -- requests to the worker ------------------------------------------------------------------

    def ask(self, op: bytes, args: list[bytes], callback: Callback, wait: float) -> None:
        """Send a memory or clear request; callback gets the answer, or an error dict."""
        if self.phase != "serving" or self.restart_pending or self.channel is None:
            callback(None)
            return
        token = next(self.tokens)
        self.waiting[token] = (callback, time.monotonic() + wait)
        self.send([op, token, *args])

    def memory(self, callback: Callback) -> None:
        self.ask(b"memory", [], callback, ANSWER_WAIT_S)

    def clear(self, level: str, callback: Callback) -> None:
        self.ask(b"clear", [level.encode()], callback, CLEAR_WAIT_S)

    def describe(self) -> list[dict[str, Any]]:
        """Its line in memory_status's `workers`."""
        if self.pid is None:
            return []
        line = {"pid": self.pid, "kind": "gpu", "state": self.state, "tasks_done": self.runs}
        return [line | {"index": self.index, "device": self.name} | memory.process_memory(self.pid)]

    # -- stop ----------------------------------------------------------------------------------

    def begin_stop(self) -> None:
        self.stopping = True
        # No respawn from now on: a back-off left pending would come due and stay due (tick
        # never spawns while stopping), and the loop spun on it for the rest of the stop.
        self.respawn_at = math.inf
        self.answer_waiting("workerd is stopping")
        if self.state in ("idle", "starting") and self.pid is not None:
            self.stop_process()

    def stop_process(self) -> None:
        if self.state == "idle":
            self.send([b"stop"])
        elif self.pid is not None:
            processes.signal_quietly(self.pid, signal.SIGTERM)
        self.phase = "stopping"

    def abort_running(self) -> None:
        for job in list(self.lane.jobs):
            self.owner.ledger.fail(
                job, protocol.SHUTTING_DOWN, f"workerd stopped before {job.name} finished (grace period over)"
            )
        if self.pid is not None:
            processes.signal_quietly(self.pid, signal.SIGKILL)
            self.phase = "stopping"
