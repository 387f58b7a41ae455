"""Several GPUs: which devices get a GPU worker, and which worker runs a pipeline.

Runs in: both: the master (the GPU side) and the Ray bridge (its pipeline hosts).

Pure decisions; gpu/backend.py does the I/O, placing each waiting run when a worker is free to take
it. `worker_slots` turns `[gpu] device` and `devices` into one slot per GPU worker process.
`place` picks the worker for a run from what each worker last reported about its cache (the
`cached`, `parked` and `free_bytes` of its `ready`, `done`, `restored` and `cleared` messages) and
from the master's own view of it (alive, the run it holds).

The order of preference is the issue's: a worker that holds the pipeline on its device (a warm
run), then one that holds it in host memory (a wake, a fraction of a load), else the one with
the most free budget (a cold load where it is least likely to push others out). Pins
(`[pipelines.NAME] devices`) restrict the choice. A worker that is dead, restarting or being
killed is passed over while another candidate is alive, so a failure stays on its device; with
no live candidate the run waits for one that is restarting, as it does with a single worker.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection, Mapping, Sequence

from workerd.config import GpuConfig


@dataclasses.dataclass(frozen=True)
class Slot:
    index: int  # the device number that [gpu] devices and pins name
    device: str  # the torch device its worker loads pipelines on


def worker_slots(gpu: GpuConfig, cuda_count: int) -> list[Slot]:
    """One slot per GPU worker. `cuda_count` is what torch.cuda.device_count() says (0 without
    CUDA); only a GPU worker process can say it, since the master never imports torch.

    Without `devices`: one worker on `device`, as before. With `device = "cpu"` (or "auto" and
    no CUDA device), each listed index is a separate worker on the CPU: how the placement and
    failure logic is tested on a machine without GPUs. Raises ValueError for an index the
    machine does not have.
    """
    devices = gpu.devices
    if devices is None:
        return [Slot(0, gpu.device)]
    on_cuda = gpu.device == "cuda" or (gpu.device == "auto" and cuda_count > 0)
    if isinstance(devices, str):  # "all"
        if not on_cuda:
            return [Slot(0, "cpu")]
        if not cuda_count:
            raise ValueError('[gpu] devices = "all" but no CUDA device is visible')
        return [Slot(i, f"cuda:{i}") for i in range(cuda_count)]
    if not on_cuda:
        return [Slot(i, "cpu") for i in devices]
    missing = [i for i in devices if i >= cuda_count]
    if missing:
        raise ValueError(f"[gpu] devices lists cuda:{missing[0]}; {cuda_count} CUDA device(s) are visible")
    return [Slot(i, f"cuda:{i}") for i in devices]


def known_slots(gpu: GpuConfig) -> list[Slot] | None:
    """The slots, when the machine's CUDA devices do not decide them; None when a first worker
    must count the devices (`[gpu] devices` set, on "auto" or "cuda")."""
    if gpu.devices is None or gpu.device == "cpu":
        return worker_slots(gpu, 0)
    return None


def slot_name(slot: Slot) -> str:
    """How status, memory_status and run results name a slot's device: its CUDA device, or for
    the test-only CPU slots "cpu:INDEX" (several CPU workers must not all read "cpu")."""
    return slot.device if slot.device.startswith("cuda") else f"{slot.device}:{slot.index}"


def worker_environment(slot: Slot, environ: Mapping[str, str]) -> tuple[str, dict[str, str]]:
    """The device to give a slot's worker and the environment to add to its own.

    A CUDA worker sees only its own GPU (CUDA_VISIBLE_DEVICES) and loads on "cuda": a pipeline
    that allocates on "cuda" or calls .cuda() then lands on its device, not on GPU 0, and the
    process never makes a CUDA context on the other GPUs. Indices count the GPUs this daemon
    sees, so under an inherited CUDA_VISIBLE_DEVICES index i is that list's i-th entry."""
    if not slot.device.startswith("cuda"):
        return slot.device, {}
    inherited = environ.get("CUDA_VISIBLE_DEVICES")
    visible = [item.strip() for item in inherited.split(",")] if inherited else None
    return "cuda", {"CUDA_VISIBLE_DEVICES": visible[slot.index] if visible else str(slot.index)}


@dataclasses.dataclass(frozen=True)
class WorkerView:
    """What the master knows of one GPU worker when it places a run."""

    index: int  # its Slot's index
    alive: bool = True  # False while dead, waiting to respawn, or being killed for a timeout
    device: frozenset[str] = frozenset()  # pipelines on its device (its last report's "cached")
    host: frozenset[str] = frozenset()  # pipelines parked in its host memory ("parked")
    free_bytes: int = 0  # its device budget left ("free_bytes")
    queued: int = 0  # runs waiting for it, the one it runs included


def place(name: str, workers: Sequence[WorkerView], pins: Collection[int] = ()) -> int | None:
    """The index of the worker that should run pipeline `name`; None if no worker may (its pins
    name no configured device)."""
    candidates = [w for w in workers if not pins or w.index in pins]
    live = [w for w in candidates if w.alive] or candidates

    def rank(worker: WorkerView) -> tuple[int, int, int, int]:
        tier = 0 if name in worker.device else 1 if name in worker.host else 2
        # Holders are told apart by their queues; for a cold load, room comes first.
        room = -worker.free_bytes if tier == 2 else 0
        return (tier, room, worker.queued, worker.index)

    return min(live, key=rank).index if live else None
