"""Several GPUs: the slots a config asks for, and where a run goes (pure functions)."""

from __future__ import annotations

import pytest

from workerd.config import GpuConfig
from workerd.pipelines.placement import (
    Slot,
    WorkerView,
    known_slots,
    place,
    slot_name,
    worker_environment,
    worker_slots,
)

GB = 1024**3


def test_without_devices_one_worker_as_before() -> None:
    assert worker_slots(GpuConfig(), cuda_count=4) == [Slot(0, "auto")]
    assert worker_slots(GpuConfig(device="cuda:1"), cuda_count=4) == [Slot(0, "cuda:1")]


def test_all_is_every_visible_cuda_device() -> None:
    assert worker_slots(GpuConfig(devices="all"), cuda_count=2) == [Slot(0, "cuda:0"), Slot(1, "cuda:1")]
    assert worker_slots(GpuConfig(devices="all"), cuda_count=0) == [Slot(0, "cpu")]  # auto: no CUDA
    with pytest.raises(ValueError, match="no CUDA device is visible"):
        worker_slots(GpuConfig(device="cuda", devices="all"), cuda_count=0)


def test_a_list_picks_devices_and_must_exist() -> None:
    assert worker_slots(GpuConfig(devices=(1, 3)), cuda_count=4) == [Slot(1, "cuda:1"), Slot(3, "cuda:3")]
    with pytest.raises(ValueError, match="lists cuda:4; 4 CUDA device"):
        worker_slots(GpuConfig(devices=(0, 4)), cuda_count=4)


def test_on_the_cpu_each_index_is_a_worker() -> None:
    # The way to test several device workers without a GPU: device = "cpu", devices = [0, 1, 2].
    slots = worker_slots(GpuConfig(device="cpu", devices=(0, 1, 2)), cuda_count=0)
    assert slots == [Slot(0, "cpu"), Slot(1, "cpu"), Slot(2, "cpu")]
    assert worker_slots(GpuConfig(devices=(0, 1)), cuda_count=0) == [Slot(0, "cpu"), Slot(1, "cpu")]


def test_a_cuda_worker_sees_only_its_own_gpu() -> None:
    assert worker_environment(Slot(1, "cuda:1"), {}) == ("cuda", {"CUDA_VISIBLE_DEVICES": "1"})
    inherited = {"CUDA_VISIBLE_DEVICES": "4, 6"}  # this daemon sees two GPUs: 4 and 6
    assert worker_environment(Slot(1, "cuda:1"), inherited) == ("cuda", {"CUDA_VISIBLE_DEVICES": "6"})
    assert worker_environment(Slot(2, "cpu"), inherited) == ("cpu", {})


def view(
    index: int, device: str = "", host: str = "", free_gb: int = 10, alive: bool = True, queued: int = 0
) -> WorkerView:
    """A worker's view; `device` and `host` are pipeline names of one letter each ("ab": a and b)."""
    return WorkerView(index, alive, frozenset(device), frozenset(host), free_gb * GB, queued)


def test_device_tier_first_then_host_tier_then_most_free() -> None:
    workers = [view(0, host="a", free_gb=50), view(1, device="a", free_gb=1), view(2, free_gb=80)]
    assert place("a", workers) == 1
    assert place("a", [workers[0], workers[2]]) == 0  # parked there: a wake beats a load
    assert place("b", workers) == 2  # held nowhere: the most free budget


def test_holders_are_told_apart_by_their_queues() -> None:
    workers = [view(0, device="a", queued=3), view(1, device="a", queued=1), view(2, queued=0)]
    assert place("a", workers) == 1
    ties = [view(0, free_gb=5, queued=2), view(1, free_gb=5, queued=0)]
    assert place("b", ties) == 1


def test_pins_restrict_the_choice() -> None:
    workers = [view(0, device="a"), view(1, free_gb=1), view(2, free_gb=90)]
    assert place("a", workers, pins=(1, 2)) == 2
    assert place("a", workers, pins=(1,)) == 1
    assert place("a", workers, pins=(7,)) is None  # no such device


def test_a_dead_worker_is_passed_over_while_another_is_alive() -> None:
    workers = [view(0, device="a", alive=False), view(1, free_gb=1)]
    assert place("a", workers) == 1
    # Pinned to the dead one only: the run waits there for its respawn (and restore).
    assert place("a", workers, pins=(0,)) == 0
    assert place("a", [view(0, alive=False), view(1, alive=False, device="a")]) == 1
    assert place("a", []) is None


def test_slots_known_without_a_worker_only_when_cuda_cannot_change_them() -> None:
    assert known_slots(GpuConfig()) == [Slot(0, "auto")]  # one worker on [gpu] device
    assert known_slots(GpuConfig(device="cpu", devices=(0, 2))) == [Slot(0, "cpu"), Slot(2, "cpu")]
    assert known_slots(GpuConfig(devices="all")) is None  # a worker counts the devices first
    assert known_slots(GpuConfig(device="cuda", devices=(1,))) is None  # ...and checks that 1 exists


def test_each_slot_has_its_own_name() -> None:
    assert [slot_name(Slot(1, "cuda:1")), slot_name(Slot(2, "cpu"))] == ["cuda:1", "cpu:2"]
