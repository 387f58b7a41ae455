"""core/queue.py on its own: which job `take` gives next (levels, the weighted round robin between
clients, priority and age within one), and the queue's bookkeeping.

Pure logic: real Jobs and Tenants, no processes.
"""

from __future__ import annotations

import collections
import time

from workerd.core.lifecycle import ASSIGNED, QUEUED, Job, Tenant
from workerd.core.queue import JobQueue, level_of


def make_job(
    n: int, key: str = "m", tenant: Tenant | None = None, priority: int = 0, client: bytes = b"c"
) -> Job:
    job = Job(
        id=n,
        client=client,
        request_id=n,
        body=b"",
        raw=[],
        name=f"{key}:task",
        key=key,
        pool="cpu",
        timeout_s=10.0,
        retries=0,
        accepted_at=time.monotonic(),
        priority=priority,
    )
    if tenant is not None:
        job.tenant = tenant
    return job


def queue_of(*jobs: Job) -> JobQueue:
    queue = JobQueue()
    for job in jobs:
        queue.push(job)
    return queue


def anything(key: str) -> bool:
    return True


def take_all(queue: JobQueue) -> list[Job]:
    taken = []
    while (job := queue.take(anything)) is not None:
        taken.append(job)
    return taken


# -- one client: plain age, as before fair share --------------------------------------------


def test_take_gives_the_oldest_job_over_every_key() -> None:
    a1, b2, a3, b4 = make_job(1, key="a"), make_job(2, key="b"), make_job(3, key="a"), make_job(4, key="b")
    queue = queue_of(a1, b2, a3, b4)
    assert len(queue) == 4
    assert take_all(queue) == [a1, b2, a3, b4]
    assert len(queue) == 0 and queue.waiting_keys() == [] and not queue.shared()


def test_take_skips_keys_it_is_told_no_to_without_blocking_those_behind() -> None:
    a1, b2, a3 = make_job(1, key="a"), make_job(2, key="b"), make_job(3, key="a")
    queue = queue_of(a1, b2, a3)
    assert queue.take(lambda key: key == "b") is b2
    assert queue.take(lambda key: key == "b") is None
    assert queue.waiting_keys() == ["a"] and len(queue) == 2


def test_a_job_handed_back_goes_ahead_of_later_ones_by_its_age() -> None:
    a1, a2, b0 = make_job(1, key="a"), make_job(2, key="a"), make_job(0, key="b")
    queue = queue_of(a2)
    a1.state = ASSIGNED  # handed back by a worker
    queue.push(a1)
    assert a1.state is QUEUED
    queue.push(b0)  # older than both, another key: still first
    assert take_all(queue) == [b0, a1, a2]


def test_remove_takes_one_job_out_and_says_whether_it_was_there() -> None:
    a1, a2, b3 = make_job(1, key="a"), make_job(2, key="a"), make_job(3, key="b")
    queue = queue_of(a1, a2, b3)
    assert queue.remove(a2) is True
    assert queue.remove(a2) is False
    assert queue.remove(make_job(9, key="nowhere")) is False
    assert queue.remove(make_job(9, key="a")) is False  # its key waits, not this job
    assert queue.remove(b3) is True
    assert queue.waiting_keys() == ["a"] and len(queue) == 1
    assert queue.take(anything) is a1


def test_waiting_keys_pop_key_and_drain() -> None:
    a1, b2, a3, c4 = make_job(1, key="a"), make_job(2, key="b"), make_job(3, key="a"), make_job(4, key="c")
    queue = queue_of(a1, b2, a3, c4)
    assert sorted(queue.waiting_keys()) == ["a", "b", "c"] and queue.keys["a"] == 2
    assert queue.pop_key("a") == [a1, a3]
    assert queue.pop_key("a") == []
    assert len(queue) == 2 and sorted(queue.waiting_keys()) == ["b", "c"]
    assert list(queue.drain()) == [b2, c4]
    assert len(queue) == 0 and queue.waiting_keys() == [] and list(queue.drain()) == []


def test_remove_client_takes_one_connections_jobs_and_keeps_the_rest_in_order() -> None:
    alice, bob = Tenant("alice"), Tenant("bob")
    jobs = [make_job(n, tenant=alice if n % 2 else bob, client=b"x" if n < 4 else b"y") for n in range(8)]
    queue = queue_of(*jobs)
    assert [job.id for job in queue.remove_client(b"x")] == [0, 1, 2, 3]
    assert len(queue) == 4
    assert sorted(job.id for job in take_all(queue)) == [4, 5, 6, 7]


# -- between clients -------------------------------------------------------------------------


def test_a_newcomer_waits_behind_one_turn_of_a_flood_not_all_of_it() -> None:
    flood, trickle = Tenant("flood"), Tenant("trickle")
    queue = queue_of(*(make_job(n, tenant=flood) for n in range(1000)))
    assert queue.take(anything).id == 0
    newcomer = make_job(5000, tenant=trickle)
    queue.push(newcomer)
    assert queue.shared()
    assert queue.take(anything) is newcomer  # the flood's turn (one job: weight 1) had ended
    assert not queue.shared()
    assert [queue.take(anything).id for _ in range(3)] == [1, 2, 3]  # the flood, in order


def test_weights_give_jobs_per_turn() -> None:
    heavy, light = Tenant("heavy", weight=3), Tenant("light")
    queue = queue_of(*(make_job(n, tenant=heavy) for n in range(300)))
    for n in range(300, 600):
        queue.push(make_job(n, tenant=light))
    first = [job.tenant.name for job in (queue.take(anything) for _ in range(200))]
    share = collections.Counter(first)
    assert share == {"heavy": 150, "light": 50}
    assert first[:8] == ["heavy", "heavy", "heavy", "light", "heavy", "heavy", "heavy", "light"]


def test_three_clients_share_equally_whatever_they_queued() -> None:
    tenants = [Tenant(name) for name in "abc"]
    queue = JobQueue()
    n = 0
    for tenant, count in zip(tenants, (1000, 10, 100), strict=True):
        for _ in range(count):
            queue.push(make_job(n, tenant=tenant))
            n += 1
    first = collections.Counter(job.tenant.name for job in (queue.take(anything) for _ in range(30)))
    assert first == {"a": 10, "b": 10, "c": 10}
    later = [queue.take(anything).tenant.name for _ in range(20)]
    assert later == ["a", "c"] * 10  # b has run out and left the ring


def test_a_client_whose_jobs_no_worker_takes_keeps_its_place() -> None:
    a, b = Tenant("a"), Tenant("b")
    queue = queue_of(make_job(1, key="m", tenant=a), make_job(2, key="n", tenant=b))
    queue.push(make_job(3, key="n", tenant=b))
    assert queue.take(lambda key: key == "n").id == 2  # a's jobs are all for "m": b goes
    assert queue.take(anything).id == 1  # a kept its place at the front of the ring
    assert queue.take(anything).id == 3


# -- priorities --------------------------------------------------------------------------------


def test_within_a_client_a_higher_priority_goes_first_even_above_its_cap() -> None:
    a = Tenant("a", max_priority=0)
    low, high = make_job(1, tenant=a, priority=-3), make_job(2, tenant=a, priority=9)
    mid = make_job(3, tenant=a)
    queue = queue_of(low, high, mid)
    assert [level_of(job) for job in (low, high, mid)] == [-3, 0, 0]
    assert take_all(queue) == [high, mid, low]


def test_between_clients_priority_counts_only_up_to_the_cap() -> None:
    capped, granted, other = Tenant("capped"), Tenant("granted", max_priority=5), Tenant("other")
    queue = queue_of(*(make_job(n, tenant=other) for n in range(10)))
    asks_nine = make_job(100, tenant=capped, priority=9)
    granted_nine = make_job(101, tenant=granted, priority=9)
    queue.push(asks_nine)
    queue.push(granted_nine)
    assert queue.take(anything) is granted_nine  # level 5: ahead of everything at 0
    order = [job.id for job in take_all(queue)]
    assert order.index(100) == 1  # capped at 0: one turn of `other` first, not the front


def test_a_negative_priority_yields_to_every_client() -> None:
    polite, other = Tenant("polite"), Tenant("other")
    background = make_job(1, tenant=polite, priority=-1)
    queue = queue_of(background, *(make_job(n, tenant=other) for n in range(2, 6)))
    assert take_all(queue)[-1] is background
