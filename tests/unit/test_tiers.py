"""The pipeline cache's host tier, in this process, with real pipelines and real budgets.

Each pipeline holds real torch tensors (16 MiB unless said), loaded from a file under tmp_path;
footprints are measured as in the GPU worker: this process's resident growth across each load
on the CPU, the allocator's figure on CUDA. The `hooks` pipelines copy their tensors on every
move and log it (tests/tier_pipelines.py), so the tests see what moved, in which order, and that
the data survived the round trip. Every test runs on the CPU, and again on CUDA (marked `gpu`)
where there is a device: there the moves cross the bus.
"""

from __future__ import annotations

import gc
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests import tier_pipelines
from tests.tier_pipelines import MB, events, moves
from workerd import memory
from workerd.config import PipelineConfig
from workerd.pipelines.cache import PipelineCache
from workerd.pipelines.loading import PipelineError

torch = pytest.importorskip("torch")


CUDA = torch.cuda.is_available()


@pytest.fixture(
    params=[
        "cpu",
        pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not CUDA, reason="no CUDA")]),
    ]
)
def device(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(autouse=True)
def collected() -> Iterator[None]:
    """Free what earlier tests left (their caches' tensors) before this one measures loads."""
    gc.collect()
    memory.trim()
    yield


def make_cache(
    directory: Path,
    device: str,
    names: dict[str, str],
    budget_mb: float = 40,
    host_mb: float = 40,
    warn_mb: float = 500,
    max_retained_mb: float = 0,
    **options: Any,
) -> PipelineCache:
    """A cache on `device` over pipelines `names` ({name: kind}), each written under `directory`."""
    configs = {}
    for name, kind in names.items():
        path = tier_pipelines.write(directory, name, kind, **options)
        configs[name] = PipelineConfig(name=name, path=str(path), max_retained_mb=max_retained_mb)
    return PipelineCache(configs, device, budget_mb, host_mb, warn_mb)


def run(cache: PipelineCache, name: str, **kwargs: Any) -> dict[str, Any]:
    """One run as the GPU worker's runner does it: the run, then the leak watch."""
    result = cache.run(name, [], kwargs)
    cache.settle()
    time.sleep(0.002)  # distinct last_used times, whatever the clock's resolution
    return result


def tiers(cache: PipelineCache) -> dict[str, str]:
    return {p["name"]: p["tier"] for p in cache.snapshot()["pipelines"]}


def test_eviction_parks_the_least_recently_used_and_wake_brings_it_back(tmp_path: Path, device: str) -> None:
    cache = make_cache(tmp_path, device, {"a": "hooks", "b": "hooks", "c": "hooks"})
    run(cache, "a")
    run(cache, "b")
    run(cache, "a")  # b is now the least recently used
    loaded_b = next(m for m in moves(tmp_path) if m["pipeline"] == "b")
    assert run(cache, "c")["start"] == "cold"
    assert tiers(cache) == {"a": "device", "b": "host", "c": "device"}
    parked = next(m for m in moves(tmp_path) if m["event"] == "to_host")
    assert parked["pipeline"] == "b" and parked["ptr"] != loaded_b["ptr"]  # a real copy

    stats = cache.snapshot()
    b = next(p for p in stats["pipelines"] if p["name"] == "b")
    assert b["host_bytes"] == b["bytes"] >= 14 * MB and b["device_bytes"] == 0
    assert stats["host_bytes"] == b["bytes"] and stats["host_budget_bytes"] == 40 * MB

    woken = run(cache, "b")
    assert (woken["start"], woken["warm"], woken["load_s"]) == ("woken", False, 0.0)
    assert woken["start_s"] > 0 and woken["output"] == {"version": 1, "sum": 8.0}  # the data survived
    # Waking b made room first: a, now the least recently used on the device, was parked.
    assert events(tmp_path)[-2:] == [("a", "to_host"), ("b", "to_device")]
    assert tiers(cache) == {"a": "host", "b": "device", "c": "device"}
    assert run(cache, "b")["start"] == "warm"
    assert cache.counts == {
        "hits": 2, "misses": 3, "wakes": 1, "parks": 2, "evictions": 0, "leak_reloads": 0,
        "batch_reruns": 0,
    }  # fmt: skip


def test_past_the_host_budget_the_least_recently_used_parked_one_is_dropped(
    tmp_path: Path, device: str
) -> None:
    # The device holds two 16 MiB pipelines, host memory one.
    cache = make_cache(tmp_path, device, dict.fromkeys("abcd", "hooks"), host_mb=20)
    for name in "abc":
        run(cache, name)
    assert tiers(cache) == {"a": "host", "b": "device", "c": "device"}
    run(cache, "d")  # b must leave the device; a, parked and older, makes room for it
    assert tiers(cache) == {"b": "host", "c": "device", "d": "device"}
    assert ("a", "unload") in events(tmp_path)
    assert cache.counts["evictions"] == 1 and cache.counts["parks"] == 2
    assert run(cache, "a")["start"] == "cold"


def test_pipelines_that_cannot_move_are_dropped_as_before(tmp_path: Path, device: str) -> None:
    cache = make_cache(tmp_path, device, dict.fromkeys("abc", "plain"))
    for name in "abc":
        run(cache, name)
    assert tiers(cache) == {"b": "device", "c": "device"}
    assert not any(p["parkable"] for p in cache.snapshot()["pipelines"])
    assert ("a", "unload") in events(tmp_path) and cache.counts["evictions"] == 1


def test_without_a_host_budget_nothing_is_parked(tmp_path: Path, device: str) -> None:
    cache = make_cache(tmp_path, device, dict.fromkeys("abc", "hooks"), host_mb=0)
    for name in "abc":
        run(cache, name)
    assert tiers(cache) == {"b": "device", "c": "device"}
    assert "to_host" not in {event for _, event in events(tmp_path)}


def test_a_torch_module_is_parked_tensor_by_tensor(tmp_path: Path, device: str) -> None:
    cache = make_cache(tmp_path, device, dict.fromkeys("abc", "module"))
    for name in "abc":
        run(cache, name)
    assert tiers(cache) == {"a": "host", "b": "device", "c": "device"}
    # On a CPU device its tensors are already in host memory: parking moves no bytes, it only
    # moves the pipeline from the device budget to the host budget. On CUDA they are copied,
    # into pinned memory.
    parked = cache.entries["a"].obj
    assert isinstance(parked, torch.nn.Module) and parked.weight.device.type == "cpu"
    assert parked.weight.is_pinned() == (device == "cuda")
    woken = run(cache, "a")
    assert woken["start"] == "woken" and woken["output"]["sum"] == 0.5 * 1024 * 4096
    assert woken["output"]["device"].startswith(device)


def test_an_edited_file_drops_the_pipeline_from_either_tier(tmp_path: Path, device: str) -> None:
    cache = make_cache(tmp_path, device, dict.fromkeys("abc", "hooks"))
    for name in "abc":
        run(cache, name)
    assert tiers(cache)["a"] == "host"
    tier_pipelines.write(tmp_path, "a", version=2)
    tier_pipelines.write(tmp_path, "c", version=2)
    edited_host = run(cache, "a")
    assert edited_host["start"] == "cold" and edited_host["output"]["version"] == 2
    edited_device = run(cache, "c")
    assert edited_device["start"] == "cold" and edited_device["output"]["version"] == 2
    assert ("a", "to_device") not in events(tmp_path)  # never woken: dropped and loaded again
    assert events(tmp_path).count(("a", "unload")) == 1 and ("c", "unload") in events(tmp_path)


@pytest.mark.parametrize(("level", "left"), [("gc", 3), ("cache", 3), ("full", 0)])
def test_clear_levels(tmp_path: Path, device: str, level: str, left: int) -> None:
    cache = make_cache(tmp_path, device, dict.fromkeys("abc", "hooks"))
    for name in "abc":
        run(cache, name)
    host_before = cache.host_held()
    cleared = cache.clear(level)
    assert len(cache.entries) == left
    assert cleared["host_bytes_before"] == host_before > 0
    if level == "full":
        assert sorted(cleared["dropped"]) == ["a", "b", "c"] and cleared["host_bytes_after"] == 0
        assert cleared["allocated_after"] == 0
    else:  # host copies are kept
        assert cleared["dropped"] == [] and tiers(cache)["a"] == "host"
        assert cleared["host_bytes_after"] == host_before


def test_out_of_memory_parks_every_other_pipeline_then_retries(tmp_path: Path, device: str) -> None:
    cache = make_cache(tmp_path, device, dict.fromkeys("abc", "hooks"), budget_mb=60, host_mb=60)
    for name in "abc":
        run(cache, name)
    assert set(tiers(cache).values()) == {"device"}
    result = run(cache, "c", oom=1)
    assert result["output"]["sum"] == 8.0
    assert tiers(cache) == {"a": "host", "b": "host", "c": "device"}  # parked, not dropped
    assert cache.counts["evictions"] == 0 and cache.counts["parks"] == 2
    assert run(cache, "a")["start"] == "woken"


def test_out_of_memory_without_a_host_tier_drops_only_the_oldest(tmp_path: Path, device: str) -> None:
    cache = make_cache(tmp_path, device, dict.fromkeys("abc", "hooks"), budget_mb=60, host_mb=0)
    for name in "abc":
        run(cache, name)
    run(cache, "c", oom=1)
    assert tiers(cache) == {"b": "device", "c": "device"}


def test_out_of_memory_twice_is_reported(tmp_path: Path, device: str) -> None:
    cache = make_cache(tmp_path, device, dict.fromkeys("ab", "plain"))
    run(cache, "a")
    run(cache, "b")
    with pytest.raises(PipelineError) as info:
        cache.run("b", [], {"oom": 2})  # both attempts
    assert info.value.code == "OUT_OF_MEMORY" and list(cache.entries) == ["b"]
    assert run(cache, "b")["start"] == "warm"


def test_a_failing_to_host_drops_and_a_failing_to_device_reloads(tmp_path: Path, device: str) -> None:
    cache = make_cache(tmp_path, device, {"a": "hooks", "b": "hooks", "c": "hooks"})
    tier_pipelines.write(tmp_path, "a", fail="to_host")
    tier_pipelines.write(tmp_path, "b", fail="to_device")
    for name in "abc":
        run(cache, name)  # a cannot be parked: dropped
    assert tiers(cache) == {"b": "device", "c": "device"} and cache.counts["evictions"] == 1
    run(cache, "a")  # b is parked (its to_host works) ...
    assert tiers(cache)["b"] == "host"
    again = run(cache, "b")  # ... but cannot come back: loaded again instead
    assert again["start"] == "cold" and again["output"]["sum"] == 8.0


def test_retained_growth_warns_once_then_reloads_past_its_limit(
    tmp_path: Path, device: str, caplog: pytest.LogCaptureFixture
) -> None:
    cache = make_cache(tmp_path, device, {"leaky": "hooks"}, budget_mb=400, warn_mb=10, max_retained_mb=20)
    run(cache, "leaky")
    with caplog.at_level(logging.WARNING, logger="workerd.gpu"):
        run(cache, "leaky", leak_mb=6)
        retained = cache.entries["leaky"].retained_bytes
        assert 5 * MB < retained < 8 * MB
        run(cache, "leaky", leak_mb=6)  # past 10 MiB: warned
        run(cache, "leaky", leak_mb=6)  # past 20 MiB... not yet: about 18
        assert cache.counts["leak_reloads"] == 0
        run(cache, "leaky", leak_mb=6)  # about 24: reloaded, between runs
    warnings = [r.getMessage() for r in caplog.records if "beyond its" in r.getMessage()]
    assert len(warnings) == 1 and "leaky" in warnings[0]
    assert cache.counts["leak_reloads"] == 1
    fresh = cache.entries["leaky"]
    assert (fresh.runs, fresh.retained_bytes) == (0, 0)
    assert events(tmp_path).count(("leaky", "load")) == 2
    assert run(cache, "leaky")["start"] == "warm"  # the reload made the next run warm


def test_a_pipeline_that_keeps_nothing_retains_nothing(tmp_path: Path, device: str) -> None:
    cache = make_cache(tmp_path, device, {"a": "hooks"}, budget_mb=400)
    for _ in range(10):
        run(cache, "a")
    described = cache.snapshot()["pipelines"][0]
    assert described["retained_bytes"] < 2 * MB


def test_placement_state_lists_both_tiers(tmp_path: Path, device: str) -> None:
    cache = make_cache(tmp_path, device, dict.fromkeys("abc", "hooks"))
    for name in "abc":
        run(cache, name)
    state = cache.placement_state()
    assert state["cached"] == ["b", "c"] and state["parked"] == ["a"]  # least recently used first
    assert 0 <= state["free_bytes"] < 40 * MB - 2 * 14 * MB
