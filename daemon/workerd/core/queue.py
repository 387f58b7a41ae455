"""Jobs waiting for a worker, and the one rule for which goes next: by priority, then a fair
share between clients, then age.

Runs in: the master. Every backend's queue is one of these (the CPU pool's, the GPU workers',
the cluster's), so the CPU pool, each pipeline's runs and the cluster's spill share work between
clients by the same rule.

    take() --> the highest level with a job a free worker can take
                 --> in that level, the next client in round-robin order (its weight: jobs per turn)
                       --> that client's job of the highest requested priority, oldest first

Levels. A job's level is its requested `priority` capped by its client's `max_priority`
(`[fairness]`; 0 unless granted), so a client reorders its own work as it likes but passes
other clients only as far as the operator lets it. Levels are strict: a job of a higher level
always goes first.

Between clients, deficit round robin (Shreedhar and Varghese) with a cost of one per job: at its
turn a client may take `weight` jobs, then goes to the back of the ring. A client whose work
runs out leaves the ring and, when it comes back, joins at the back with a full turn: so a
client with one request waits behind at most what is left of the current turn and one turn of
each other client, whatever they have queued (one job each, at weight 1).

Durations are not known in advance, so a turn counts jobs, not seconds: a client of long tasks
gets more of the workers' time than one of short tasks at the same weight.

Within a client: highest requested priority first, then oldest (job ids grow with acceptance,
so a job handed back or retried goes ahead of that client's later ones, with no flag for it).

With one client and no priorities there is one level and one turn, and `take` is a few dict
lookups and a popleft; the pool also skips prefetch's yielding (pool/backend.py) then.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Iterator

from workerd.core.lifecycle import QUEUED, Job, Tenant


def level_of(job: Job) -> int:
    """The level a job waits at: its priority, capped by what its client may ask between clients."""
    return min(job.priority, job.tenant.max_priority)


def passes(job: Job, ahead: Job) -> bool:
    """Does the order of `take` put `job` before `ahead`, another client's job or a lower level's?
    (What prefetch yields to: a job sent ahead to a worker is out of the queue's sight.)"""
    return job.level > ahead.level or (job.level == ahead.level and job.tenant is not ahead.tenant)


class Line:
    """One client's jobs for one key at one level: per requested priority, oldest first.

    Deques, not a heap: within one priority jobs are taken oldest first, so one handed back or
    retried is older than every job still waiting there, and goes in at the front (a heap cost
    a microsecond per job more, measured)."""

    __slots__ = ("by_priority", "top")

    def __init__(self) -> None:
        self.by_priority: dict[int, collections.deque[Job]] = {}
        self.top = 0  # the highest priority present

    def add(self, job: Job) -> None:
        jobs = self.by_priority.get(job.priority)
        if jobs is None:
            self.by_priority[job.priority] = collections.deque((job,))
            self.top = max(self.by_priority)
        elif job.id > jobs[-1].id:
            jobs.append(job)
        elif job.id < jobs[0].id:
            jobs.appendleft(job)
        else:  # handed back between two waiting (several, in another order): rare
            jobs.insert(next(i for i, other in enumerate(jobs) if other.id > job.id), job)

    def rank(self) -> tuple[int, int]:
        return -self.top, self.by_priority[self.top][0].id

    def pop(self) -> Job:
        jobs = self.by_priority[self.top]
        job = jobs.popleft()
        if not jobs:
            del self.by_priority[self.top]
            self.top = max(self.by_priority, default=0)
        return job

    def remove(self, job: Job) -> bool:
        jobs = self.by_priority.get(job.priority)
        if jobs is None or job not in jobs:
            return False
        jobs.remove(job)
        if not jobs:
            del self.by_priority[job.priority]
            self.top = max(self.by_priority, default=0)
        return True

    def __iter__(self) -> Iterator[Job]:
        for jobs in self.by_priority.values():
            yield from jobs


class Turn:
    """One client's jobs at one level, per key (a module, a pipeline), and what is left of its turn."""

    __slots__ = ("by_key", "credit", "tenant")

    def __init__(self, tenant: Tenant) -> None:
        self.tenant = tenant
        self.credit = tenant.weight
        self.by_key: dict[str, Line] = {}

    def take(self, accepts: Callable[[str], bool]) -> Job | None:
        """Its first job (priority, then age) among the keys `accepts` says yes to."""
        by_key = self.by_key
        if len(by_key) == 1:  # the common case: one module, or one pipeline
            key, best = next(iter(by_key.items()))
            if not accepts(key):
                return None
        else:
            candidates = [(line.rank(), line) for key, line in by_key.items() if accepts(key)]
            if not candidates:
                return None
            best = min(candidates, key=first)[1]
        job = best.pop()
        if not best.by_priority:
            del by_key[job.key]
        return job


class Level:
    """The clients with jobs at one level, in round-robin order."""

    __slots__ = ("ring", "turns")

    def __init__(self) -> None:
        self.ring: collections.deque[Turn] = collections.deque()
        self.turns: dict[Tenant, Turn] = {}

    def add(self, job: Job) -> None:
        turn = self.turns.get(job.tenant)
        if turn is None:
            turn = self.turns[job.tenant] = Turn(job.tenant)
            self.ring.append(turn)
        line = turn.by_key.get(job.key)
        if line is None:
            line = turn.by_key[job.key] = Line()
        line.add(job)

    def take(self, accepts: Callable[[str], bool]) -> Job | None:
        """The next job in round-robin order: the first client whose turn it is with a job a
        worker takes. A client passed over (nothing it holds can run there) keeps its place."""
        ring = self.ring
        head = ring[0]
        if head.credit <= 0:
            # Its turn ended with the last job it took. Turned over now, not then: a client
            # that arrived since goes next, rather than behind another turn of a lone flood.
            head.credit = head.tenant.weight
            ring.rotate(-1)
        for position, turn in enumerate(ring):
            job = turn.take(accepts)
            if job is None:
                continue
            turn.credit -= 1
            if not turn.by_key:
                self.leave(position, turn)
            elif turn.credit <= 0 and position:  # served out of turn, and that was all of it
                turn.credit = turn.tenant.weight
                del ring[position]
                ring.append(turn)
            return job
        return None

    def leave(self, position: int, turn: Turn) -> None:
        del self.ring[position]
        del self.turns[turn.tenant]

    def remove(self, job: Job) -> bool:
        turn = self.turns.get(job.tenant)
        line = turn.by_key.get(job.key) if turn is not None else None
        if turn is None or line is None or not line.remove(job):
            return False
        if not line.by_priority:
            del turn.by_key[job.key]
            if not turn.by_key:
                self.leave(self.ring.index(turn), turn)
        return True

    def jobs(self) -> Iterator[Job]:
        for turn in self.ring:
            for line in turn.by_key.values():
                yield from line


class JobQueue:
    """Jobs waiting for a worker: see the module's docstring for the order `take` follows.

    Per key inside, so that a job no free worker can take (its module is new in a reload the
    free workers predate, its pipeline is pinned to a busy device) never blocks a job behind it
    that a free worker can take."""

    def __init__(self) -> None:
        self.levels: dict[int, Level] = {}
        self.order: list[int] = []  # the levels with jobs, highest first
        self.count = 0
        self.keys: dict[str, int] = {}  # jobs waiting per key

    def __len__(self) -> int:
        return self.count

    def push(self, job: Job) -> None:
        job.unstart()
        cap = job.tenant.max_priority
        job.level = level = job.priority if job.priority < cap else cap  # level_of, inlined
        queue = self.levels.get(level)
        if queue is None:
            queue = self.levels[level] = Level()
            self.order.append(level)
            self.order.sort(reverse=True)
        queue.add(job)
        keys = self.keys
        keys[job.key] = keys.get(job.key, 0) + 1
        self.count += 1

    def take(self, accepts: Callable[[str], bool]) -> Job | None:
        """The next job (module docstring) whose key `accepts` says yes to, removed from the queue."""
        for level in self.order:
            queue = self.levels[level]
            job = queue.take(accepts)
            if job is not None:
                self.taken(job, queue)
                return job
        return None

    def taken(self, job: Job, queue: Level) -> None:
        self.count -= 1
        keys, key = self.keys, job.key
        if keys[key] == 1:
            del keys[key]
        else:
            keys[key] -= 1
        if not queue.ring:
            del self.levels[job.level]
            self.order.remove(job.level)

    def remove(self, job: Job) -> bool:
        queue = self.levels.get(job.level)
        if queue is None or job.state is not QUEUED or not queue.remove(job):
            return False
        self.taken(job, queue)
        return True

    def shared(self) -> bool:
        """Do jobs of more than one client, or at more than one level, wait? (Otherwise the
        order of what waits is plain age, and nothing sent ahead need yield to it.)"""
        return len(self.order) > 1 or any(len(queue.ring) > 1 for queue in self.levels.values())

    def jobs(self) -> list[Job]:
        """Every job waiting, oldest first."""
        return sorted((job for queue in self.levels.values() for job in queue.jobs()), key=job_id)

    def remove_where(self, chosen: Callable[[Job], bool]) -> list[Job]:
        """Every waiting job `chosen` says yes to, removed in one pass, oldest first (a remove
        each would scan a heap per job: a departed client with thousands queued stalled the loop)."""
        jobs = self.jobs()
        removed = [job for job in jobs if chosen(job)]
        if not removed:
            return removed
        kept = [job for job in jobs if not chosen(job)]
        self.clear()  # rebuilt: the turns start afresh, a small price for a rare event
        for job in kept:
            self.push(job)
        return removed

    def remove_client(self, client: bytes) -> list[Job]:
        """Every job of `client` (a connection) waiting."""
        return self.remove_where(lambda job: job.client == client)

    def clear(self) -> None:
        self.levels.clear()
        self.order.clear()
        self.keys.clear()
        self.count = 0

    def waiting_keys(self) -> list[str]:
        return list(self.keys)

    def pop_key(self, key: str) -> list[Job]:
        """Every job waiting for `key`, oldest first."""
        if key not in self.keys:
            return []
        return self.remove_where(lambda job: job.key == key)

    def drain(self) -> Iterator[Job]:
        """Every job, oldest first, each removed before it is yielded (what it leads to may
        push jobs back: they come out too)."""
        while self.count:
            jobs = self.jobs()
            self.clear()
            yield from jobs


def job_id(job: Job) -> int:
    return job.id


def first(pair: tuple[tuple[int, int], Line]) -> tuple[int, int]:
    return pair[0]
