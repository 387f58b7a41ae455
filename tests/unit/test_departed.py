"""A departed client's jobs in lifecycle.py: found at once, ended once with no reply, never
retried; and the routing ids limits.py may ignore for good. Pure logic, as test_lifecycle.py."""

from __future__ import annotations

import pytest

from tests.unit.test_lifecycle import Sent, make_job, ok
from workerctl import core, protocol
from workerd.core.lifecycle import ANSWERED, Ledger
from workerd.core.queue import JobQueue
from workerd.limits import made_up
from workerd.metrics import Metrics


@pytest.fixture
def sent() -> Sent:
    return Sent()


@pytest.fixture
def ledger(sent: Sent) -> Ledger:
    return Ledger(sent, Metrics())


def test_of_client_finds_every_job_of_one_client_oldest_first(ledger: Ledger) -> None:
    mine = [make_job(3), make_job(1, request_id="same"), make_job(2, request_id="same")]
    theirs = make_job(4, client=b"client-b", request_id=3)
    for job in [*mine, theirs]:
        ledger.accept(job)
    assert [job.id for job in ledger.of_client(b"client-a")] == [1, 2, 3]
    assert ledger.of_client(b"client-b") == [theirs]
    assert ledger.of_client(b"nobody") == []
    assert ledger.find(b"client-b", 3) == [theirs]  # the same id, another client's


def test_a_departed_jobs_end_sends_nothing_and_is_counted_once(ledger: Ledger, sent: Sent) -> None:
    dropped, killed, ran_on = make_job(1), make_job(2), make_job(3)
    for job in (dropped, killed, ran_on):
        ledger.accept(job)
        job.departed = True
    ledger.cancel_reply(dropped)
    ledger.cancel_reply(killed, terminated=True)
    ledger.cancel_reply(killed, terminated=True)  # a second end is dropped, not counted
    assert ledger.finish(ran_on, ok(ran_on), "ok") is True  # a running job that went on
    assert sent.replies == []
    assert all(job.state is ANSWERED for job in (dropped, killed, ran_on))
    events = ledger.metrics.events
    assert (events["departed_dropped"], events["departed_killed"]) == (1, 1)
    assert (events["execute_departed"], events["execute_ok"]) == (2, 1)
    assert ledger.in_flight == {}


def test_a_departed_job_is_not_retried_and_its_items_go_nowhere(ledger: Ledger, sent: Sent) -> None:
    job = make_job(1, retries=3)
    ledger.accept(job)
    job.start(0.0)
    job.departed = True
    ledger.item(job, protocol.encode_item(1, 0, "x"), [])
    ledger.lost(job, 123, "worker 123", "died", lambda job: pytest.fail("retried"))
    assert job.state is ANSWERED and job.outcome == "worker_lost" and job.retries == 3
    assert sent.replies == []


def test_remove_client_takes_one_clients_jobs_from_every_key() -> None:
    queue = JobQueue()
    jobs = [
        make_job(n, key=key, client=client)
        for n, (key, client) in enumerate([("m", b"a"), ("m", b"b"), ("n", b"a"), ("n", b"a"), ("o", b"b")])
    ]
    for job in jobs:
        queue.push(job)
    assert sorted(job.id for job in queue.remove_client(b"a")) == [0, 2, 3]
    assert len(queue) == 2 and queue.waiting_keys() == ["m", "o"]
    assert queue.remove_client(b"a") == []
    assert [queue.take(lambda key: True), queue.take(lambda key: True)] == [jobs[1], jobs[4]]


@pytest.mark.parametrize(("client", "expected"), [(b"\x00k\x8bEg", True), (b"svc-1", False), (b"", False)])
def test_only_routing_ids_libzmq_made_up_are_ignored_for_good(client: bytes, expected: bool) -> None:
    assert made_up(client) is expected


def test_the_client_sends_die_with_client_only_when_asked() -> None:
    assert "die_with_client" not in core.execute_fields("m:f", [1], {})
    assert core.execute_fields("m:f", [1], {}, die_with_client=True)["die_with_client"] is True
    assert core.chunk_fields("m:f", [([1], {})], None, 0, die_with_client=True)["die_with_client"] is True
