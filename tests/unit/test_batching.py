"""Batching's parts without a daemon: the split rule, the hold of max_wait_ms, the peak per batch
size, the check for run_batch, and an out-of-memory in a batch on a real PipelineCache."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from tests.unit.test_queue import make_job
from workerd.config import PipelineConfig
from workerd.core.lifecycle import WHEN_TOLD, Lane, Tenant
from workerd.core.queue import JobQueue
from workerd.gpu import batches
from workerd.gpu.batches import REQUEUES_ALONE, hold_until, take_batch
from workerd.pipelines.batching import WrongCount, run_batch, run_split
from workerd.pipelines.cache import PipelineCache
from workerd.pipelines.evictions import Entry
from workerd.pipelines.loading import PipelineError, import_pipeline


def doubling(bad: set[int], calls: list[list[int]]) -> Any:
    def call(chunk: list[int]) -> list[int]:
        calls.append(chunk)
        if bad & set(chunk):
            raise ValueError(f"bad {sorted(bad & set(chunk))}")
        return [2 * n for n in chunk]

    return call


def test_one_bad_input_fails_alone_in_log2_halvings() -> None:
    calls: list[list[int]] = []
    outcomes, reruns = run_split(doubling({5}, calls), list(range(8)))
    assert [value for ok, value in outcomes if ok] == [0, 2, 4, 6, 8, 12, 14]
    ok, (code, message, details) = outcomes[5]
    assert not ok and (code, message, details["type"]) == ("TASK_ERROR", "ValueError: bad [5]", "ValueError")
    assert calls[:3] == [list(range(8)), [0, 1, 2, 3], [4, 5, 6, 7]]  # the first half first
    assert reruns == len(calls) - 1 == 6  # 2 * log2(8)


def test_every_input_failing_is_bounded_by_2n_minus_1_calls() -> None:
    calls: list[list[int]] = []
    outcomes, reruns = run_split(doubling(set(range(5)), calls), list(range(5)))
    assert [ok for ok, _ in outcomes] == [False] * 5
    assert len(calls) == 2 * 5 - 1 and reruns == 8


def test_a_wrong_count_fails_its_call_and_is_not_split() -> None:
    calls: list[list[int]] = []

    def call(chunk: list[int]) -> list[int]:
        calls.append(chunk)
        raise WrongCount("TASK_ERROR", "returned 1 outputs for 3 inputs")

    outcomes, reruns = run_split(call, [1, 2, 3])
    assert [value[1] for _, value in outcomes] == ["returned 1 outputs for 3 inputs"] * 3
    assert calls == [[1, 2, 3]] and reruns == 0


def test_max_wait_holds_only_runs_that_came_to_an_idle_device() -> None:
    waits = PipelineConfig("p", path="/p.py", max_batch=4, max_wait_ms=100)
    assert hold_until(waits, 2, 10.0, idle_since=5.0, now=10.05) == pytest.approx(10.1)
    assert hold_until(waits, 2, 10.0, idle_since=5.0, now=10.2) == 0.0  # its wait is over
    assert hold_until(waits, 2, 10.0, idle_since=10.01, now=10.05) == 0.0  # it queued behind a run
    assert hold_until(waits, 4, 10.0, idle_since=5.0, now=10.05) == 0.0  # full already
    assert hold_until(waits, 0, 10.0, idle_since=5.0, now=10.05) == 0.0  # nothing waits
    no_timer = PipelineConfig("p", path="/p.py", max_batch=4)
    assert hold_until(no_timer, 2, 10.0, idle_since=5.0, now=10.05) == 0.0


def test_the_peak_of_a_size_not_run_yet_is_scaled_from_the_largest_smaller_one() -> None:
    entry = Entry("p", "sha", None, None, 100, 0.0)  # type: ignore[arg-type]
    assert entry.peak_for(8) == 0
    entry.record_peak(1, 10)
    entry.record_peak(4, 40)
    assert (entry.peak_for(4), entry.peak_for(8), entry.peak_for(2), entry.peak_bytes) == (40, 80, 20, 40)


BATCHED = """
calls = []

def load(device):
    return device

def run(obj, n=0):
    return n

def run_batch(obj, inputs):
    calls.append(len(inputs))
    if len(inputs) > 2:
        raise MemoryError()  # what an OOM is on the CPU
    return [given["n"] * 10 for given in inputs]
"""


def test_an_oom_in_a_batch_retries_at_half_its_size_before_evicting(tmp_path: Path) -> None:
    (tmp_path / "wide.py").write_text(BATCHED)
    (tmp_path / "other.py").write_text("def load(device):\n    return 1\n\ndef run(obj):\n    return 1\n")
    configs = {
        "wide": PipelineConfig("wide", path=str(tmp_path / "wide.py"), max_batch=8),
        "other": PipelineConfig("other", path=str(tmp_path / "other.py")),
    }
    cache = PipelineCache(configs, "cpu", 1000)
    cache.run("other", [], {})
    time.sleep(0.002)
    outcomes, info = run_batch(cache, "wide", [{"n": n} for n in range(8)], 8)
    assert [value for _, value in outcomes] == [n * 10 for n in range(8)]
    assert cache.entries["wide"].module.calls == [8, 4, 2, 2, 4, 2, 2]
    assert (info["batch"], info["reruns"], cache.counts["batch_reruns"]) == (8, 6, 6)
    assert "other" in cache.entries and cache.counts["evictions"] == 0  # halving was enough


def test_max_batch_without_run_batch_is_an_error_naming_the_pipeline(tmp_path: Path) -> None:
    path = tmp_path / "plain.py"
    path.write_text("def load(device):\n    return 1\n\ndef run(obj):\n    return 1\n")
    import_pipeline(PipelineConfig("plain", path=str(path)), str(path))  # max_batch 1: fine
    with pytest.raises(PipelineError, match=r"pipeline 'plain' has max_batch = 8 but no run_batch\("):
        import_pipeline(PipelineConfig("plain", path=str(path), max_batch=8), str(path))


def test_a_batch_takes_its_runs_in_the_queues_fair_order() -> None:
    """A batch fills by core/queue.py's rule: a flood's runs do not crowd out another client's
    run of the same pipeline, and another pipeline's run stays queued."""
    flood, trickle = Tenant("flood"), Tenant("trickle")
    queue = JobQueue()
    for n in range(1, 6):
        queue.push(make_job(n, key="p", tenant=flood))
    queue.push(make_job(6, key="other", tenant=trickle))
    queue.push(make_job(7, key="p", tenant=trickle))
    first = queue.take(lambda key: key == "p")
    assert first is not None
    batch = take_batch(queue, first, 4)
    assert [job.id for job in batch] == [1, 7, 2, 3]
    assert queue.keys == {"p": 2, "other": 1}


def test_a_run_put_back_twice_by_others_timeouts_runs_alone() -> None:
    """withdraw_rest counts each put-back; at REQUEUES_ALONE a run goes in a batch of its own,
    first or met on the way (then the batch ends before it, and it waits at the front)."""
    lane = Lane(8, WHEN_TOLD)
    late, patient = make_job(1, key="p"), make_job(2, key="p")
    for job in (late, patient):
        lane.add(job, 0.0)
        lane.started(job.id, 0.0)
    for _ in range(REQUEUES_ALONE):
        assert batches.withdraw_rest(lane, [late], 1.0) == [patient]
        lane.add(patient, 1.0)
        lane.started(patient.id, 1.0)
    assert patient.requeues == REQUEUES_ALONE and late.requeues == 0
    queue = JobQueue()
    for job in (make_job(3, key="p"), make_job(5, key="p")):
        queue.push(job)
    queue.push(patient)
    first = queue.take(lambda key: True)
    assert first is patient and take_batch(queue, first, 8) == [patient]
    queue.push(patient)
    fresh = make_job(0, key="p")
    queue.push(fresh)
    first = queue.take(lambda key: True)
    assert first is fresh and take_batch(queue, first, 8) == [fresh]  # the patient one is next
    assert queue.take(lambda key: True) is patient
