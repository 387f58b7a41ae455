"""lifecycle.py on its own: every transition of a Job, every reply the Ledger sends or drops, every
death rule of `settle`, and the bookkeeping of Lane for each way a lane starts jobs.

Pure logic: a real Ledger over the real Metrics, whose reply callable records what would go to
the client; the frames are decoded with workerctl.protocol, as a client would read them.
"""

from __future__ import annotations

import math
import random
import time
from typing import Any

import pytest

from workerctl import protocol
from workerd.core.lifecycle import (
    AFTER_PREVIOUS,
    ANSWERED,
    ASSIGNED,
    QUEUED,
    RUNNING,
    WHEN_ASSIGNED,
    WHEN_TOLD,
    Job,
    Lane,
    Ledger,
    settle,
    shown_state,
)
from workerd.metrics import Metrics


def make_job(
    n: int,
    *,
    key: str = "m",
    pool: str = "cpu",
    timeout_s: float = 10.0,
    retries: int = 0,
    client: bytes = b"client-a",
    request_id: Any = None,
) -> Job:
    """Job number `n`; its request id is `n` too unless given."""
    return Job(
        id=n,
        client=client,
        request_id=n if request_id is None else request_id,
        body=b"",
        raw=[],
        name=f"{key}:task",
        key=key,
        pool=pool,
        timeout_s=timeout_s,
        retries=retries,
        accepted_at=time.monotonic(),
    )


class Sent:
    """The replies a Ledger sent, in order: (client, decoded body, raw frames)."""

    def __init__(self) -> None:
        self.replies: list[tuple[bytes, dict[str, Any], list[Any]]] = []

    def __call__(self, client: bytes, frame: bytes, raw: Any = ()) -> None:
        self.replies.append((client, protocol.decode_reply(frame), list(raw)))

    def __len__(self) -> int:
        return len(self.replies)

    @property
    def bodies(self) -> list[dict[str, Any]]:
        return [body for _, body, _ in self.replies]

    def codes(self) -> list[str]:
        return [body["error"]["code"] if body.get("ok") is False else "ok" for body in self.bodies]

    def error(self, index: int = -1) -> dict[str, Any]:
        body = self.bodies[index]
        assert body["ok"] is False, body
        error: dict[str, Any] = body["error"]
        return error


@pytest.fixture
def sent() -> Sent:
    return Sent()


@pytest.fixture
def metrics() -> Metrics:
    return Metrics()


@pytest.fixture
def ledger(sent: Sent, metrics: Metrics) -> Ledger:
    return Ledger(sent, metrics)


def ok(job: Job, result: Any = "done") -> bytes:
    return protocol.encode_result(job.request_id, result)


def refuse_retry(job: Job) -> None:
    raise AssertionError(f"job {job.id} was retried")


def refuse_hand_back(job: Job) -> None:
    raise AssertionError(f"job {job.id} was handed back")


# -- Job -------------------------------------------------------------------------------------


def test_a_new_job_is_queued_with_no_deadline_and_no_attempt() -> None:
    job = make_job(1)
    assert job.state is QUEUED
    assert (job.deadline, job.attempts, job.items_sent, job.started_at) == (math.inf, 0, 0, 0.0)
    assert not (job.expired or job.cancelled or job.cancel_requested)


def test_start_runs_the_job_with_its_deadline_counted_from_now_and_counts_each_attempt() -> None:
    job = make_job(1, timeout_s=2.5)
    job.start(100.0)
    assert (job.state, job.started_at, job.deadline, job.attempts) == (RUNNING, 100.0, 102.5, 1)
    job.start(200.0)  # a retry on another worker: a fresh deadline, a second attempt
    assert (job.started_at, job.deadline, job.attempts) == (200.0, 202.5, 2)


# -- Ledger: accept and find -----------------------------------------------------------------


def test_find_returns_the_jobs_of_one_client_and_request_id(ledger: Ledger) -> None:
    mine, other_id, other_client = make_job(1), make_job(2), make_job(3, client=b"client-b", request_id=1)
    for job in (mine, other_id, other_client):
        ledger.accept(job)
    assert ledger.find(b"client-a", 1) == [mine]
    assert ledger.find(b"client-b", 1) == [other_client]
    assert ledger.find(b"client-a", 3) == []
    assert ledger.find(b"client-c", 1) == []


def test_find_returns_a_copy(ledger: Ledger) -> None:
    job = make_job(1)
    ledger.accept(job)
    ledger.find(b"client-a", 1).clear()
    assert ledger.find(b"client-a", 1) == [job]


@pytest.mark.parametrize("unhashable", [[1], {"id": 1}, [[1, 2]]])
def test_find_with_an_unhashable_id_finds_nothing(ledger: Ledger, unhashable: Any) -> None:
    ledger.accept(make_job(1))
    assert ledger.find(b"client-a", unhashable) == []


def test_a_reused_request_id_keeps_every_job_until_each_is_answered(ledger: Ledger, sent: Sent) -> None:
    first, second = make_job(1, request_id="same"), make_job(2, request_id="same")
    ledger.accept(first)
    ledger.accept(second)
    assert ledger.find(b"client-a", "same") == [first, second]
    ledger.finish(second, ok(second), "ok")
    assert ledger.find(b"client-a", "same") == [first]
    ledger.finish(first, ok(first), "ok")
    assert ledger.find(b"client-a", "same") == []
    assert ledger.in_flight == {}
    assert len(sent) == 2


# -- Ledger: stream items --------------------------------------------------------------------


def test_an_item_is_forwarded_with_its_raw_frames_while_the_job_runs(ledger: Ledger, sent: Sent) -> None:
    job = make_job(1)
    ledger.accept(job)
    job.start(0.0)
    ledger.item(job, protocol.encode_item(1, 0, "a"), [b"raw"])
    ledger.item(job, protocol.encode_item(1, 1, "b"), [])
    assert job.items_sent == 2
    assert [(client, body["seq"], body["item"], raw) for client, body, raw in sent.replies] == [
        (b"client-a", 0, "a", [b"raw"]),
        (b"client-a", 1, "b", []),
    ]
    assert job.state is RUNNING  # an item is not a terminal reply


@pytest.mark.parametrize("why", ["answered", "expired", "cancelled"])
def test_an_item_is_dropped_once_the_job_has_its_terminal_reply(ledger: Ledger, sent: Sent, why: str) -> None:
    job = make_job(1)
    ledger.accept(job)
    job.start(0.0)
    if why == "answered":
        ledger.finish(job, ok(job), "ok")
    elif why == "expired":
        job.expired = True
    else:
        job.cancelled = True
    before = len(sent)
    ledger.item(job, protocol.encode_item(1, 0, "late"), [])
    assert len(sent) == before
    assert job.items_sent == 0


# -- Ledger: finish, fail, result ------------------------------------------------------------


def test_finish_sends_once_and_drops_every_later_call(ledger: Ledger, sent: Sent, metrics: Metrics) -> None:
    job = make_job(1)
    ledger.accept(job)
    job.start(0.0)
    assert ledger.finish(job, ok(job, 42), "ok", [b"buffer"]) is True
    assert job.state is ANSWERED
    assert ledger.finish(job, ok(job, 43), "ok") is False
    assert ledger.fail(job, protocol.INTERNAL, "late") is False
    assert sent.replies == [(b"client-a", {"v": 1, "id": 1, "ok": True, "result": 42}, [b"buffer"])]
    assert metrics.events["execute_ok"] == 1
    assert metrics.requests == {("execute", "cpu", "ok"): 1}
    assert metrics.latency[("execute", "cpu")].snapshot()["count"] == 1
    assert ledger.in_flight == {}


def test_finishing_a_job_never_accepted_leaves_another_jobs_entry(ledger: Ledger) -> None:
    """Same client, same request id: the one accepted stays findable (for cancel)."""
    accepted, stray = make_job(1, request_id="r"), make_job(2, request_id="r")
    ledger.accept(accepted)
    ledger.finish(stray, ok(stray), "ok")
    assert ledger.find(b"client-a", "r") == [accepted]


@pytest.mark.parametrize(
    ("pool", "counter"), [("cpu", "execute_ok"), ("gpu", "pipeline_ok"), ("cluster", "cluster_ok")]
)
def test_finish_counts_the_outcome_under_its_pools_prefix(
    ledger: Ledger, metrics: Metrics, pool: str, counter: str
) -> None:
    job = make_job(1, pool=pool)
    ledger.accept(job)
    ledger.finish(job, ok(job), "ok")
    assert dict(metrics.events) == {counter: 1}
    assert metrics.requests == {("execute", pool, "ok"): 1}


def test_an_error_outcome_is_counted_by_the_code_in_its_frame(ledger: Ledger, metrics: Metrics) -> None:
    job = make_job(1)
    ledger.accept(job)
    frame = protocol.encode_error(1, protocol.TASK_ERROR, "boom", {"type": "ValueError"})
    ledger.finish(job, frame, "error")
    assert metrics.events["execute_error"] == 1
    assert metrics.requests == {("execute", "cpu", "task_error"): 1}


def test_an_error_frame_without_a_readable_code_is_counted_as_error(ledger: Ledger, metrics: Metrics) -> None:
    job = make_job(1)
    ledger.accept(job)
    ledger.finish(job, protocol.encode_result(1, "not an error at all"), "error")
    assert metrics.requests == {("execute", "cpu", "error"): 1}


def test_fail_sends_a_typed_error_and_counts_it_by_its_code(
    ledger: Ledger, sent: Sent, metrics: Metrics
) -> None:
    job = make_job(1, pool="gpu")
    ledger.accept(job)
    assert ledger.fail(job, protocol.SHUTTING_DOWN, "workerd is stopping") is True
    assert ledger.fail(job, protocol.INTERNAL, "second") is False
    assert sent.error() == {"code": "SHUTTING_DOWN", "message": "workerd is stopping", "details": {}}
    assert sent.bodies[0]["id"] == 1
    assert metrics.events["pipeline_shutting_down"] == 1
    assert metrics.requests == {("execute", "gpu", "shutting_down"): 1}
    job2 = make_job(2)
    ledger.fail(job2, protocol.INTERNAL, "with details", {"why": "test"})
    assert sent.error()["details"] == {"why": "test"}


def test_a_result_is_the_reply_of_a_job_that_neither_expired_nor_was_cancelled(
    ledger: Ledger, sent: Sent, metrics: Metrics
) -> None:
    job = make_job(1)
    ledger.accept(job)
    job.start(0.0)
    ledger.result(job, b"ok", ok(job, [1, 2]), [b"r"])
    assert job.state is ANSWERED
    assert sent.replies == [(b"client-a", {"v": 1, "id": 1, "ok": True, "result": [1, 2]}, [b"r"])]
    assert metrics.events["execute_ok"] == 1
    ledger.result(job, b"ok", ok(job, "again"), [])
    assert len(sent) == 1


def test_an_error_result_is_counted_by_its_code(ledger: Ledger, sent: Sent, metrics: Metrics) -> None:
    job = make_job(1)
    ledger.accept(job)
    job.start(0.0)
    ledger.result(job, b"error", protocol.encode_error(1, protocol.OUT_OF_MEMORY, "too big"), [])
    assert sent.codes() == ["OUT_OF_MEMORY"]
    assert metrics.events["execute_error"] == 1
    assert metrics.requests == {("execute", "cpu", "out_of_memory"): 1}


@pytest.mark.parametrize("why", ["expired", "cancelled"])
def test_a_result_is_dropped_once_the_job_expired_or_was_cancelled(
    ledger: Ledger, sent: Sent, metrics: Metrics, why: str
) -> None:
    job = make_job(1)
    ledger.accept(job)
    job.start(0.0)
    setattr(job, why, True)
    ledger.result(job, b"ok", ok(job), [])
    assert len(sent) == 0
    assert job.state is RUNNING  # its TIMEOUT or CANCELLED is still to be sent, or was already
    assert metrics.requests == {}
    assert ledger.find(b"client-a", 1) == [job]


# -- Ledger: timed_out, lost, cancel_reply ---------------------------------------------------


def test_timed_out_answers_timeout_with_the_pid_and_the_stack(
    ledger: Ledger, sent: Sent, metrics: Metrics
) -> None:
    job = make_job(1, timeout_s=0.5)
    ledger.accept(job)
    job.start(0.0)
    ledger.timed_out(job, 4242, "File x, line 1", "worker 4242")
    assert sent.error() == {
        "code": "TIMEOUT",
        "message": "m:task ran longer than 0.5 s; worker 4242 was killed",
        "details": {"timeout_s": 0.5, "pid": 4242, "traceback": "File x, line 1"},
    }
    assert metrics.events["execute_timeout"] == 1
    assert job.state is ANSWERED


def test_lost_retries_a_job_with_retries_left_and_no_item_sent(
    ledger: Ledger, sent: Sent, metrics: Metrics
) -> None:
    job = make_job(1, retries=2)
    ledger.accept(job)
    job.start(0.0)
    retried: list[Job] = []
    ledger.lost(job, 99, "worker 99", "died (signal 9)", retried.append)
    assert retried == [job]
    assert (job.state, job.retries) == (QUEUED, 1)
    assert metrics.events["retries"] == 1
    assert len(sent) == 0
    assert ledger.find(b"client-a", 1) == [job]  # still in flight, for `cancel`


def test_lost_with_no_retry_left_answers_worker_lost(ledger: Ledger, sent: Sent, metrics: Metrics) -> None:
    job = make_job(1, retries=1)
    ledger.accept(job)
    retried: list[Job] = []
    job.start(0.0)
    ledger.lost(job, 10, "worker 10", "died", retried.append)
    job.start(1.0)  # the retry ran on another worker, which died as well
    ledger.lost(job, 11, "worker 11", "exited with status 1", retried.append)
    assert retried == [job]
    assert sent.error() == {
        "code": "WORKER_LOST",
        "message": "worker 11 exited with status 1 while running m:task",
        "details": {"pid": 11, "attempts": 2},
    }
    assert metrics.events["retries"] == 1
    assert metrics.events["execute_worker_lost"] == 1


def test_lost_after_a_stream_item_is_not_retried(ledger: Ledger, sent: Sent) -> None:
    job = make_job(1, retries=3)
    ledger.accept(job)
    job.start(0.0)
    ledger.item(job, protocol.encode_item(1, 0, "seen"), [])
    ledger.lost(job, 7, "worker 7", "died", refuse_retry)
    assert sent.codes() == ["ok", "WORKER_LOST"]  # the item (not an error), then the terminal reply
    assert "stream" in sent.bodies[0]
    assert job.retries == 3


def test_lost_without_a_retry_callable_answers_worker_lost(ledger: Ledger, sent: Sent) -> None:
    job = make_job(1, retries=3)  # the request asked for retries, but the daemon is stopping
    ledger.accept(job)
    job.start(0.0)
    ledger.lost(job, 7, "the GPU worker", "died", None)
    assert sent.codes() == ["WORKER_LOST"]
    assert sent.error()["details"] == {"pid": 7, "attempts": 1}
    assert job.retries == 3


def test_lost_drops_a_job_already_answered(ledger: Ledger, sent: Sent, metrics: Metrics) -> None:
    job = make_job(1, retries=1)
    ledger.accept(job)
    job.start(0.0)
    ledger.finish(job, ok(job), "ok")
    ledger.lost(job, 7, "worker 7", "died", refuse_retry)
    assert sent.codes() == ["ok"]
    assert metrics.events["retries"] == 0 and job.retries == 1


@pytest.mark.parametrize(
    ("terminated", "message"),
    [
        (False, "cancelled by the client (it had not started)"),
        (True, "cancelled by the client (its worker was killed)"),
    ],
)
def test_cancel_reply_answers_cancelled(
    ledger: Ledger, sent: Sent, metrics: Metrics, terminated: bool, message: str
) -> None:
    job = make_job(1)
    ledger.accept(job)
    ledger.cancel_reply(job, terminated=terminated)
    assert sent.error() == {"code": "CANCELLED", "message": message, "details": {"terminated": terminated}}
    assert metrics.events["execute_cancelled"] == 1
    assert ledger.find(b"client-a", 1) == []


# -- settle: the death rules -----------------------------------------------------------------


def held(lane: Lane, ledger: Ledger, *jobs: Job, now: float = 0.0) -> list[Job]:
    for job in jobs:
        ledger.accept(job)
        lane.add(job, now)
    return list(jobs)


def test_settle_after_previous_loses_the_running_job_and_hands_back_the_rest(
    ledger: Ledger, sent: Sent
) -> None:
    lane = Lane(3, AFTER_PREVIOUS)
    head, second, third = held(lane, ledger, make_job(1), make_job(2), make_job(3))
    handed: list[Job] = []
    settle(ledger, lane, 5, "worker 5", "died", None, handed.append)
    assert sent.codes() == ["WORKER_LOST"] and sent.bodies[0]["id"] == head.request_id
    assert handed == [second, third]
    assert (second.state, third.state) == (ASSIGNED, ASSIGNED)  # untouched: the hand-back requeues
    assert len(lane) == 0


def test_settle_retries_the_running_job_when_told_to(ledger: Ledger, sent: Sent) -> None:
    lane = Lane(2, AFTER_PREVIOUS)
    head, second = held(lane, ledger, make_job(1, retries=1), make_job(2))
    retried: list[Job] = []
    handed: list[Job] = []
    settle(ledger, lane, 5, "worker 5", "died", retried.append, handed.append)
    assert retried == [head] and handed == [second]
    assert len(sent) == 0
    assert second.attempts == 0  # never ran: a hand-back is not a retry


def test_settle_when_told_hands_back_a_head_that_never_said_it_started(ledger: Ledger, sent: Sent) -> None:
    lane = Lane(2, WHEN_TOLD)
    jobs = held(lane, ledger, make_job(1), make_job(2))
    handed: list[Job] = []
    settle(ledger, lane, 5, "the GPU worker", "died", refuse_retry, handed.append)
    assert handed == jobs
    assert len(sent) == 0


def test_settle_when_told_loses_a_head_that_started(ledger: Ledger, sent: Sent) -> None:
    lane = Lane(2, WHEN_TOLD)
    head, second = held(lane, ledger, make_job(1), make_job(2))
    assert lane.started(head.id, 1.0) is head
    handed: list[Job] = []
    settle(ledger, lane, 5, "the GPU worker", "died", None, handed.append)
    assert sent.codes() == ["WORKER_LOST"]
    assert sent.error()["message"] == "the GPU worker died while running m:task"
    assert handed == [second]


def test_settle_when_assigned_loses_every_job_and_hands_back_none(ledger: Ledger, sent: Sent) -> None:
    lane = Lane(3, WHEN_ASSIGNED)
    jobs = held(lane, ledger, make_job(1), make_job(2), make_job(3))
    settle(ledger, lane, 0, "the Ray bridge", "died", None, refuse_hand_back)
    assert sent.codes() == ["WORKER_LOST"] * 3
    assert [body["id"] for body in sent.bodies] == [job.request_id for job in jobs]


def test_settle_leaves_an_expired_head_to_its_kill_window(
    ledger: Ledger, sent: Sent, metrics: Metrics
) -> None:
    """Past its deadline, the head is owed a TIMEOUT by its kill window (core/kill.py), which
    answers it with the stack: settle neither retries it nor calls it lost."""
    lane = Lane(2, AFTER_PREVIOUS)
    head, second = held(lane, ledger, make_job(1, timeout_s=0.5, retries=2), make_job(2))
    head.expired = True  # past its deadline; the worker died inside its kill window
    handed: list[Job] = []
    settle(ledger, lane, 5, "worker 5", "was killed", refuse_retry, handed.append)
    assert len(sent) == 0 and head.state is not ANSWERED
    assert handed == [second]
    assert head.retries == 2 and metrics.events["retries"] == 0  # a timeout is never retried


def test_settle_sends_nothing_for_a_head_already_answered(ledger: Ledger, sent: Sent) -> None:
    lane = Lane(2, AFTER_PREVIOUS)
    head, second = held(lane, ledger, make_job(1, retries=1), make_job(2))
    ledger.finish(head, ok(head), "ok")  # its result is in; its "done" never came
    handed: list[Job] = []
    settle(ledger, lane, 5, "worker 5", "died", refuse_retry, handed.append)
    assert sent.codes() == ["ok"]
    assert handed == [second]


def test_settle_sends_nothing_for_an_expired_head_already_answered(ledger: Ledger, sent: Sent) -> None:
    lane = Lane(1, AFTER_PREVIOUS)
    (head,) = held(lane, ledger, make_job(1))
    head.expired = True
    ledger.timed_out(head, 5, "", "worker 5")
    settle(ledger, lane, 5, "worker 5", "was killed", refuse_retry, refuse_hand_back)
    assert sent.codes() == ["TIMEOUT"]


def test_settle_when_assigned_loses_all_but_the_expired(ledger: Ledger, sent: Sent) -> None:
    lane = Lane(3, WHEN_ASSIGNED)
    fast, slow = held(lane, ledger, make_job(1), make_job(2))
    slow.expired = True
    settle(ledger, lane, 0, "the Ray bridge", "died", None, refuse_hand_back)
    assert sent.codes() == ["WORKER_LOST"]
    assert [body["id"] for body in sent.bodies] == [fast.request_id]


def test_settle_of_an_empty_lane_does_nothing(ledger: Ledger, sent: Sent) -> None:
    for starts in (AFTER_PREVIOUS, WHEN_TOLD, WHEN_ASSIGNED):
        settle(ledger, Lane(1, starts), 5, "w", "died", refuse_retry, refuse_hand_back)
    assert len(sent) == 0


# -- shown_state -----------------------------------------------------------------------------


def test_shown_state_derives_idle_and_busy_from_the_lane() -> None:
    lane = Lane(2)
    assert shown_state("serving", lane) == "idle"
    lane.add(make_job(1), 0.0)
    assert shown_state("serving", lane) == "busy"
    assert shown_state("serving", lane, killing=True) == "killing"
    assert shown_state("stopping", lane, killing=True) == "killing"  # a window a stop cannot close
    assert shown_state("stopping", lane) == "stopping"
    assert shown_state("starting", Lane(1)) == "starting"


# -- Lane: AFTER_PREVIOUS (a CPU worker) -----------------------------------------------------


def test_after_previous_starts_the_first_job_and_holds_the_rest_ahead() -> None:
    lane = Lane(3, AFTER_PREVIOUS)
    first, second = make_job(1, timeout_s=5.0), make_job(2)
    lane.add(first, 10.0)
    lane.add(second, 11.0)
    assert (first.state, first.deadline) == (RUNNING, 15.0)
    assert (second.state, second.deadline) == (ASSIGNED, math.inf)
    assert lane.head is first and lane.running is first
    assert lane.free() == 1 and len(lane) == 2
    assert lane.prefetched() == [second]
    assert lane.find(2) is second and lane.find(3) is None


def test_after_previous_done_starts_the_next_job_now() -> None:
    lane = Lane(3, AFTER_PREVIOUS)
    first, second, third = make_job(1), make_job(2, timeout_s=4.0), make_job(3)
    for job in (first, second, third):
        lane.add(job, 0.0)
    assert lane.done(2, 20.0) is None  # not its first job: ignored
    assert lane.done(1, 20.0) is first
    assert (second.state, second.started_at, second.deadline) == (RUNNING, 20.0, 24.0)
    assert third.state is ASSIGNED
    assert lane.next_deadline() == 24.0
    assert lane.done(1, 21.0) is None  # a second word about it is dropped


def test_after_previous_started_is_not_how_it_learns() -> None:
    lane = Lane(2, AFTER_PREVIOUS)
    first, second = make_job(1), make_job(2)
    lane.add(first, 0.0)
    lane.add(second, 0.0)
    assert lane.started(1, 5.0) is None  # started already, when added
    assert lane.started(2, 5.0) is None  # not its head
    assert first.started_at == 0.0 and second.state is ASSIGNED


def test_after_previous_removing_the_head_starts_the_next_and_removing_another_does_not() -> None:
    lane = Lane(3, AFTER_PREVIOUS)
    first, second, third = make_job(1), make_job(2), make_job(3)
    for job in (first, second, third):
        lane.add(job, 0.0)
    lane.remove(third, 5.0)
    assert list(lane.jobs) == [first, second] and second.state is ASSIGNED
    assert (first.started_at, first.attempts) == (0.0, 1)  # the running job runs on, not started again
    lane.remove(first, 6.0)
    assert list(lane.jobs) == [second]
    assert (second.state, second.started_at) == (RUNNING, 6.0)


def test_after_previous_release_says_only_the_head_may_have_run() -> None:
    lane = Lane(3, AFTER_PREVIOUS)
    jobs = [make_job(n) for n in range(3)]
    for job in jobs:
        lane.add(job, 0.0)
    assert lane.release() == ([jobs[0]], jobs[1:])
    assert len(lane) == 0 and lane.release() == ([], [])


def test_after_previous_next_deadline_is_the_running_jobs_until_it_is_answered(ledger: Ledger) -> None:
    lane = Lane(2, AFTER_PREVIOUS)
    assert lane.next_deadline() == math.inf
    first, second = make_job(1, timeout_s=3.0), make_job(2)
    lane.add(first, 1.0)
    lane.add(second, 1.0)
    assert lane.next_deadline() == 4.0
    ledger.accept(first)
    ledger.finish(first, ok(first), "ok")  # answered; its "done" is still on the way
    assert lane.running is None and lane.next_deadline() == math.inf
    assert lane.prefetched() == [second]


def test_after_previous_prefetched_jobs_are_never_overdue() -> None:
    lane = Lane(3, AFTER_PREVIOUS)
    first, second = make_job(1, timeout_s=1.0), make_job(2, timeout_s=1.0)
    lane.add(first, 0.0)
    lane.add(second, 0.0)
    assert lane.overdue(0.5) == []
    assert second not in lane.overdue(100.0)  # its timeout counts from its start, not from now
    assert second in lane.jobs


# -- Lane: WHEN_TOLD (the GPU worker) --------------------------------------------------------


def test_when_told_starts_a_job_only_when_the_worker_says_so() -> None:
    lane = Lane(2, WHEN_TOLD)
    first, second = make_job(1, timeout_s=2.0), make_job(2)
    lane.add(first, 0.0)
    lane.add(second, 0.0)
    assert first.state is ASSIGNED and lane.running is None
    assert lane.next_deadline() == math.inf
    assert lane.prefetched() == [first, second]
    assert lane.started(3, 1.0) is None  # not one of its jobs
    assert lane.started(1, 1.0) is first
    assert (first.state, first.deadline, first.attempts) == (RUNNING, 3.0, 1)
    assert lane.started(1, 2.0) is None  # said twice: the first one counts
    assert first.deadline == 3.0
    assert lane.next_deadline() == 3.0 and lane.prefetched() == [second]


def test_when_told_done_and_remove_do_not_start_the_next_job() -> None:
    lane = Lane(3, WHEN_TOLD)
    first, second, third = make_job(1), make_job(2), make_job(3)
    for job in (first, second, third):
        lane.add(job, 0.0)
    lane.started(1, 1.0)
    assert lane.done(1, 2.0) is first
    assert second.state is ASSIGNED and lane.running is None
    lane.remove(second, 3.0)
    assert third.state is ASSIGNED and list(lane.jobs) == [third]
    assert lane.started(3, 4.0) is third


def test_when_told_release_depends_on_whether_the_head_started() -> None:
    lane = Lane(2, WHEN_TOLD)
    jobs = [make_job(1), make_job(2)]
    for job in jobs:
        lane.add(job, 0.0)
    assert lane.release() == ([], jobs)
    for job in jobs:
        lane.add(job, 0.0)
    lane.started(1, 0.0)
    assert lane.release() == ([jobs[0]], [jobs[1]])


def test_when_told_a_batch_starts_together_each_with_its_deadline_and_may_have_run() -> None:
    lane = Lane(4, WHEN_TOLD)
    jobs = [make_job(1, timeout_s=5.0), make_job(2, timeout_s=1.0), make_job(3, timeout_s=3.0)]
    for job in [*jobs, make_job(4)]:
        lane.add(job, 0.0)
    for job in jobs:  # the worker said [START, 1, 2, 3]: a batch
        assert lane.started(job.id, 10.0) is job
    assert lane.next_deadline() == 11.0  # the earliest of the batch
    assert lane.done(3, 12.0) is jobs[2]  # answered in any order
    assert lane.next_deadline() == 11.0
    may_have_run, never_ran = lane.release()
    assert may_have_run == jobs[:2] and [job.id for job in never_ran] == [4]


# -- Lane: WHEN_ASSIGNED (the Ray bridge) ----------------------------------------------------


def test_when_assigned_starts_every_job_at_once_with_its_own_deadline() -> None:
    lane = Lane(3, WHEN_ASSIGNED)
    jobs = [make_job(1, timeout_s=5.0), make_job(2, timeout_s=1.0), make_job(3, timeout_s=3.0)]
    for n, job in enumerate(jobs):
        lane.add(job, 100.0 + n)
    assert [job.state for job in jobs] == [RUNNING] * 3
    assert [job.deadline for job in jobs] == [105.0, 102.0, 105.0]
    assert lane.next_deadline() == 102.0
    assert lane.prefetched() == []
    assert lane.started(1, 200.0) is None


def test_when_assigned_done_takes_any_job_in_any_order() -> None:
    lane = Lane(3, WHEN_ASSIGNED)
    jobs = [make_job(n) for n in (1, 2, 3)]
    for job in jobs:
        lane.add(job, 0.0)
    assert lane.done(2, 1.0) is jobs[1]
    assert lane.done(2, 1.0) is None
    assert lane.done(9, 1.0) is None
    lane.remove(jobs[0], 2.0)
    assert list(lane.jobs) == [jobs[2]]
    assert lane.free() == 2


def test_when_assigned_overdue_removes_every_late_job_and_next_deadline_moves_on() -> None:
    lane = Lane(4, WHEN_ASSIGNED)
    jobs = [make_job(1, timeout_s=1.0), make_job(2, timeout_s=5.0), make_job(3, timeout_s=2.0)]
    for job in jobs:
        lane.add(job, 0.0)
    assert lane.overdue(0.5) == []
    assert lane.overdue(2.0) == [jobs[0], jobs[2]]  # a deadline reached is past
    assert list(lane.jobs) == [jobs[1]]
    assert lane.next_deadline() == 5.0
    assert lane.overdue(5.0) == [jobs[1]]
    assert lane.next_deadline() == math.inf


def test_when_assigned_release_says_every_job_may_have_run() -> None:
    lane = Lane(3, WHEN_ASSIGNED)
    jobs = [make_job(n) for n in range(3)]
    for job in jobs:
        lane.add(job, 0.0)
    assert lane.release() == (jobs, [])
    assert len(lane) == 0 and lane.next_deadline() == math.inf


def test_when_assigned_deadlines_match_a_scan_of_every_job_through_any_order_of_events() -> None:
    """The heap (Lane.deadlines) against the definition: after every add, done, remove,
    overdue and release, next_deadline is the least deadline held, overdue removes exactly the
    jobs due, and stale entries are dropped: the heap stays under twice the lane's capacity."""
    rng = random.Random(7)
    lane = Lane(300, WHEN_ASSIGNED)
    now, ids = 0.0, iter(range(1, 1_000_000))
    for _ in range(20_000):
        now += rng.random() / 100
        step = rng.random()
        if (step < 0.5 or not lane.jobs) and lane.free():
            lane.add(make_job(next(ids), timeout_s=rng.choice([0.1, 1.0, 30.0, math.inf])), now)
        elif step < 0.8:
            job = rng.choice(list(lane.jobs))
            assert lane.done(job.id, now) is job
        elif step < 0.9:
            job = rng.choice(list(lane.jobs))
            lane.remove(job, now)
            if rng.random() < 0.5:  # handed back, then held again: a later deadline
                lane.add(job, now + 1.0)
        elif step < 0.999:
            due = {job.id for job in lane.jobs if job.deadline <= now}
            assert {job.id for job in lane.overdue(now)} == due
            assert all(job.deadline > now for job in lane.jobs)
        else:
            jobs = list(lane.jobs)
            assert lane.release() == (jobs, [])
            for job in jobs[: len(jobs) // 2]:  # held again, as a retry is: a new deadline
                lane.add(job, now)
        assert lane.next_deadline() == min((job.deadline for job in lane.jobs), default=math.inf)
        assert len(lane.deadlines) <= 2 * lane.capacity + 65
        assert set(lane.held) == {job.id for job in lane.jobs}


def test_when_assigned_heap_stays_small_while_one_old_job_runs_under_many_quick_ones() -> None:
    """Quick jobs come and go behind one that runs long, each with a later deadline than it:
    the entries they leave never reach the top of the heap, and must still be dropped."""
    lane = Lane(10, WHEN_ASSIGNED)
    lane.add(make_job(0, timeout_s=300.0), 0.0)
    for n in range(1, 10_000):
        lane.add(make_job(n, timeout_s=300.0), n / 1000)
        lane.done(n, n / 1000)
        assert len(lane.deadlines) <= 2 * lane.capacity + 65
    assert lane.next_deadline() == 300.0
