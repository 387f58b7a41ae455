"""One job lifecycle for every kind of worker: queued -> assigned -> running -> answered.

    accepted --> QUEUED --dispatch--> ASSIGNED --starts--> RUNNING --result--> ANSWERED
                   ^                     |                    |
                   +----- handed back ---+    (never ran)     +-- deadline: expired, TIMEOUT once
                   +----- retried ---------- worker lost -----+       its worker is gone
                                                              +-- lost: WORKER_LOST

A job is ASSIGNED when a worker holds it without having started it (prefetched): if that worker
goes, the job goes to another one, and it is never a retry, since it never ran. Its timeout
counts from its start, not its assignment.

Two rules make "exactly one terminal reply per accepted request" hold by construction instead of
by care in every backend:

  * `Ledger.finish` is the only place a terminal reply is sent, and it sends at most once per
    job: a late result, a second death, a stop racing a timeout all find the job ANSWERED and
    are dropped there.
    A job whose client has gone (`departed`) ends there too, with no reply sent.
  * `Lane` is the only record of which jobs a worker holds, and of which of them may have run.
    A worker runs its jobs in the order it was sent them and reads everything the master sent
    before it starts the next one; so of the jobs a lost worker held, only the first one not
    finished may have run, and the others go back to the queue untouched.

A GPU worker running a batch (gpu/batches.py) says it started all of its jobs at once: each
of them may have run, each has its own deadline, and they may finish in any order.

The Ray bridge (cluster/) is the exception to run order: it runs every job it holds
at once (a WHEN_ASSIGNED lane), so each job starts when assigned, has its own deadline, and if
the bridge is lost every job it held may have run.

Backends (pool/ for CPU workers, gpu/ for GPU workers, cluster/ for the Ray bridge) decide
what a worker is and how a job is sent and answered; they queue, assign, finish and settle jobs
only through this module, and reach their processes through core/child.py.

Runs in: the master.
"""

from __future__ import annotations

import collections
import dataclasses
import heapq
import logging
import math
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import zmq

from workerctl import protocol
from workerd.metrics import Metrics, error_outcome

log = logging.getLogger("workerd.jobs")

QUEUED, ASSIGNED, RUNNING, ANSWERED = "queued", "assigned", "running", "answered"
# The outcome of a job ended because its client went (no reply): in `status`, execute_departed.
DEPARTED = "departed"

# What a stop answers, in one wording: a job that had not started, and one the grace period cut.
STOP_MESSAGE = "workerd is stopping"


def cut_short_message(name: str) -> str:
    return f"workerd stopped before {name} finished (grace period over)"


# The prefix of each pool's outcome counters in `status` (execute_ok, pipeline_timeout, ...).
COUNTER_PREFIX = {"cpu": "execute_", "gpu": "pipeline_", "cluster": "cluster_"}


class Reply(Protocol):
    """Sends one reply body (and its raw frames) to a client."""

    def __call__(self, client: bytes, frame: bytes, raw: Sequence[Any] = ()) -> None: ...


@dataclasses.dataclass(eq=False, slots=True)
class Tenant:
    """A client as fair share counts it (clients.py says who a connection's client is): its
    weight and priority cap from `[fairness]`, and its work in flight, kept by the Ledger."""

    name: str
    weight: int = 1  # jobs per turn of the round robin (core/queue.py)
    max_priority: int = 0  # the highest level its jobs wait at between clients
    in_flight: int = 0  # accepted, not yet answered
    running: int = 0
    completed: int = 0

    @property
    def waiting(self) -> int:
        """Accepted and not running: queued, or sent ahead to a worker (what max_queue_per_client bounds)."""
        return self.in_flight - self.running


# The tenant of a job made without one (tests, tools): every such job shares it.
UNNAMED = Tenant("")


@dataclasses.dataclass(eq=False, slots=True)
class Job:
    """One execute request from acceptance to its single terminal reply."""

    id: int
    client: bytes  # the ROUTER routing id of the requester
    request_id: Any
    body: bytes  # the request as the client sent it; the worker decodes it
    raw: list[zmq.Frame]  # raw buffer frames that follow the body, forwarded without a copy
    name: str
    key: str  # what a worker needs to run it: a CPU task's module, or a pipeline's name
    pool: str  # "cpu" | "gpu" | "cluster": for the metrics
    timeout_s: float
    retries: int
    accepted_at: float
    state: str = QUEUED
    started_at: float = 0.0
    deadline: float = math.inf
    attempts: int = 0
    items_sent: int = 0
    requeues: int = 0  # times another run's timeout put it back from a batch (gpu/batches.py)
    expired: bool = False  # ran past its deadline: answered TIMEOUT, whatever comes later
    cancelled: bool = False  # terminated by `cancel`: answered CANCELLED, its worker killed
    cancel_requested: bool = False  # `cancel` asked while it was prefetched: CANCELLED if handed back
    die_with_client: bool = False  # the request asked: killed if its client goes while it runs
    departed: bool = False  # its client has gone: it ends with no reply (nobody would read it)
    outcome: str = ""  # once answered: "ok", "error" or an error code in lower case ("cancelled")
    # The routing-id zmq.Frame it came with: its connection's credentials, read only by a
    # `cancel` from another connection (any_connection), which must come from the same uid.
    origin: Any = None
    # Called at its first start, once (the request asked for a start notice: Ledger.started).
    on_start: Callable[[Job], None] | None = None
    tenant: Tenant = UNNAMED  # whose share it counts against (core/queue.py)
    priority: int = 0  # as requested (execute's `priority`): orders its client's own jobs
    level: int = 0  # its priority as capped between clients, set when it is queued

    def start(self, now: float) -> None:
        if self.state is not RUNNING:
            self.tenant.running += 1
        self.state = RUNNING
        self.started_at = now
        self.deadline = now + self.timeout_s
        self.attempts += 1
        if self.on_start is not None:
            notify, self.on_start = self.on_start, None
            notify(self)

    def unstart(self) -> None:
        """Back to waiting: a retry, or a batch's run queued again (gpu/batches.py)."""
        if self.state is RUNNING:
            self.tenant.running -= 1
        self.state = QUEUED


class Ledger:
    """The jobs in flight, and the one place their terminal replies are sent."""

    def __init__(self, reply: Reply, metrics: Metrics) -> None:
        self.reply = reply
        self.metrics = metrics
        self.counters = metrics.events
        # client -> request id -> its jobs in flight: for `cancel` (a client may reuse an id),
        # and for a client that goes (all of its jobs at once). Two lookups per job, as the one
        # of a (client, id) tuple key cost: a departure needs no second index kept per job.
        self.in_flight: dict[bytes, dict[Any, list[Job]]] = {}

    def accept(self, job: Job) -> None:
        ids = self.in_flight.get(job.client)
        if ids is None:
            ids = self.in_flight[job.client] = {}
        ids.setdefault(job.request_id, []).append(job)
        job.tenant.in_flight += 1

    def find(self, client: bytes, request_id: Any) -> list[Job]:
        try:
            return list(self.in_flight.get(client, {}).get(request_id, ()))
        except TypeError:  # an unhashable id (a list): never one of ours
            return []

    def of_client(self, client: bytes) -> list[Job]:
        """Every job of `client` in flight, oldest first."""
        jobs = [job for same_id in self.in_flight.get(client, {}).values() for job in same_id]
        return sorted(jobs, key=lambda job: job.id)

    def find_any(self, request_ids: Sequence[Any], admit: Callable[[Job], bool]) -> dict[Any, list[Job]]:
        """The jobs in flight with one of `request_ids` on any connection, those `admit` takes,
        by request id: one pass over what is in flight, for a cancel from another connection."""
        wanted = {i for i in request_ids if isinstance(i, int | str) and not isinstance(i, bool)}
        found: dict[Any, list[Job]] = {}
        if not wanted:
            return found
        for ids in self.in_flight.values():
            for request_id, jobs in ids.items():
                if request_id in wanted and not isinstance(request_id, bool):
                    found.setdefault(request_id, []).extend(job for job in jobs if admit(job))
        return found

    def started(self, job: Job) -> None:
        """The start notice of a job whose request asked for one (`notify_start`): sent when it
        first starts, before its stream items and its terminal reply (docs/protocol.md §6.1)."""
        self.reply(job.client, protocol.encode_started(job.request_id))

    def item(self, job: Job, frame: bytes, raw: Sequence[Any]) -> None:
        """A stream item: forwarded while the job has no terminal reply."""
        if job.state is not ANSWERED and not job.expired and not job.cancelled and not job.departed:
            job.items_sent += 1
            self.reply(job.client, frame, raw)

    def finish(self, job: Job, frame: bytes, outcome: str, raw: Sequence[Any] = ()) -> bool:
        """Send the job's terminal reply: the first call does, every later one is dropped. A job
        whose client has gone ends here too, but sends nothing (`departed`)."""
        if job.state is ANSWERED:
            return False
        if job.state is RUNNING:
            job.tenant.running -= 1
        job.state = ANSWERED
        job.outcome = outcome
        ids = self.in_flight.get(job.client, {})
        jobs = ids.get(job.request_id)
        if jobs is not None and job in jobs:  # a job never accepted must not drop another's entry
            job.tenant.in_flight -= 1
            job.tenant.completed += 1
            if len(jobs) > 1:
                jobs.remove(job)
            elif len(ids) > 1:
                del ids[job.request_id]
            else:
                del self.in_flight[job.client]
        self.counters[COUNTER_PREFIX[job.pool] + outcome] += 1
        code = error_outcome(frame) if outcome == "error" else outcome
        self.metrics.answered("execute", code, job.accepted_at, job.pool)
        if not job.departed:
            self.reply(job.client, frame, raw)
        return True

    def fail(self, job: Job, code: str, message: str, details: dict[str, Any] | None = None) -> bool:
        return self.finish(job, protocol.encode_error(job.request_id, code, message, details), code.lower())

    def result(self, job: Job, outcome: bytes, frame: bytes, raw: Sequence[Any]) -> None:
        """What the worker answered: the reply, unless the job expired or was cancelled meanwhile
        (then TIMEOUT or CANCELLED is decided already and is sent once its worker is gone)."""
        if not job.expired and not job.cancelled:
            self.finish(job, frame, outcome.decode(), raw)

    def timed_out(self, job: Job, pid: int | None, stack: str, what: str) -> bool:
        return self.fail(
            job,
            protocol.TIMEOUT,
            f"{job.name} ran longer than {job.timeout_s:g} s; {what} was killed",
            {"timeout_s": job.timeout_s, "pid": pid, "traceback": stack},
        )

    def lost(self, job: Job, pid: int, what: str, how: str, retry: Callable[[Job], None] | None) -> None:
        """The worker running `job` died. Retried if the request asked for retries (and no
        stream item reached the caller, who would see it twice) and `retry` is given (not while
        stopping); WORKER_LOST otherwise."""
        if job.state is ANSWERED:
            return
        if retry is not None and job.retries > 0 and not job.items_sent and not job.departed:
            job.retries -= 1
            self.counters["retries"] += 1
            log.info("job %d: %s %s; retrying (%d retries left)", job.id, what, how, job.retries)
            job.unstart()
            retry(job)
            return
        self.fail(
            job,
            protocol.WORKER_LOST,
            f"{what} {how} while running {job.name}",
            {"pid": pid, "attempts": job.attempts},
        )

    def shut_out(self, job: Job) -> bool:
        """A stop reached the job before it started."""
        return self.fail(job, protocol.SHUTTING_DOWN, STOP_MESSAGE)

    def cut_short(self, job: Job) -> bool:
        """The stop's grace period ended while the job ran."""
        return self.fail(job, protocol.SHUTTING_DOWN, cut_short_message(job.name))

    def cancel_reply(self, job: Job, terminated: bool = False) -> None:
        """CANCELLED: asked by the client; or, with no reply, the client has gone (`departed`)."""
        if job.departed:
            if self.finish(job, b"", DEPARTED):
                self.counters["departed_killed" if terminated else "departed_dropped"] += 1
            return
        if terminated:
            how = "its worker was killed"
        elif job.state is RUNNING:  # one run of a batch (gpu/handle.py): the others run on
            how = "its batch runs on; its output is dropped"
        else:
            how = "it had not started"
        self.fail(job, protocol.CANCELLED, f"cancelled by the client ({how})", {"terminated": terminated})


def settle(
    ledger: Ledger,
    lane: Lane,
    pid: int,
    what: str,
    how: str,
    retry: Callable[[Job], None] | None,
    hand_back: Callable[[Job], None],
) -> None:
    """A worker is gone: answer or requeue every job it held.

    Of its jobs only the first one it had not finished may have run (every one, in a
    WHEN_ASSIGNED lane): that one is retried or WORKER_LOST, unless it is answered already or
    past its deadline (its kill window, core/kill.py, answers it TIMEOUT); the others never
    started and go back (`hand_back`) as if never dispatched."""
    may_have_run, never_ran = lane.release()
    for ran in may_have_run:
        if not ran.expired:
            ledger.lost(ran, pid, what, how, retry)
    for job in never_ran:
        hand_back(job)


def shown_state(phase: str, lane: Lane, killing: bool = False) -> str:
    """What `status` shows of a worker process in `phase` holding `lane`: idle and busy are
    derived from the jobs it holds, never kept in step by hand; `killing` (a kill window open,
    or SIGKILL sent) shows whatever the phase."""
    if killing:
        return "killing"
    if phase == "serving":
        return "busy" if lane.jobs else "idle"
    return phase


# How a lane learns that its next job has started.
AFTER_PREVIOUS = "after_previous"  # a CPU worker: when the one before it is done
WHEN_TOLD = "when_told"  # the GPU worker: it says so (restores and clears run between jobs)
# The Ray bridge: at once, each job on its own (Ray runs them side by side, finishing in any
# order). Ray does not say when a task leaves its own queue, so a job's timeout counts from here.
WHEN_ASSIGNED = "when_assigned"


class Lane:
    """The jobs one worker holds, in the order it runs them: the first may be running, the
    others were sent ahead (prefetched) and have not started.

    A CPU or GPU worker holds a few; the Ray bridge thousands (32 per CPU of its cluster), and
    the master asks every turn when the next of their deadlines is. So jobs are found by id
    in a dict, and a WHEN_ASSIGNED lane keeps its deadlines in a heap: what the master does
    each turn or each result never walks its jobs in Python."""

    def __init__(self, capacity: int, starts: str = AFTER_PREVIOUS) -> None:
        self.jobs: collections.deque[Job] = collections.deque()  # in run order; read-only outside
        self.held: dict[int, Job] = {}  # the same jobs, by id
        # WHEN_ASSIGNED only: (deadline, id) of each job held, and of some that left or were
        # held again since (stale: `live` tells them apart), pruned from the top as read.
        self.deadlines: list[tuple[float, int]] = []
        self.capacity = capacity
        self.starts = starts

    def __len__(self) -> int:
        return len(self.jobs)

    @property
    def head(self) -> Job | None:
        return self.jobs[0] if self.jobs else None

    @property
    def running(self) -> Job | None:
        head = self.head
        return head if head is not None and head.state is RUNNING else None

    def free(self) -> int:
        return self.capacity - len(self.jobs)

    def add(self, job: Job, now: float) -> None:
        job.state = ASSIGNED
        self.jobs.append(job)
        self.held[job.id] = job
        if self.starts == WHEN_ASSIGNED:
            job.start(now)
            self.push_deadline(job)
        elif len(self.jobs) == 1 and self.starts == AFTER_PREVIOUS:
            job.start(now)

    def find(self, job_id: int) -> Job | None:
        return self.held.get(job_id)

    def started(self, job_id: int, now: float) -> Job | None:
        """The worker said it started `job_id` (WHEN_TOLD lanes): its first job, or any job of
        the batch it starts at once (gpu/batches.py)."""
        job = self.find(job_id) if self.starts == WHEN_TOLD else self.head
        if job is None or job.id != job_id or job.state is not ASSIGNED:
            return None
        job.start(now)
        return job

    def done(self, job_id: int, now: float) -> Job | None:
        """The worker finished `job_id`, which must be its first job (any of them, in a
        WHEN_ASSIGNED lane, or in a WHEN_TOLD lane running a batch); the next one starts now."""
        job = self.find(job_id) if self.starts != AFTER_PREVIOUS else self.head
        if job is None or job.id != job_id:
            return None
        self.remove(job, now)
        return job

    def remove(self, job: Job, now: float) -> None:
        """A job the worker finished or dropped (never started): if it was first, the next one
        starts."""
        was_head = job is self.head
        if was_head:
            self.jobs.popleft()
        else:
            self.jobs.remove(job)
        del self.held[job.id]
        if was_head and self.jobs and self.starts == AFTER_PREVIOUS:
            self.jobs[0].start(now)

    def prefetched(self) -> list[Job]:
        return [job for job in self.jobs if job.state is ASSIGNED and job is not self.running]

    def release(self) -> tuple[list[Job], list[Job]]:
        """The worker is gone: (the jobs that may have run, the jobs that never started)."""
        jobs = list(self.jobs)
        self.jobs.clear()
        self.held.clear()
        self.deadlines.clear()
        if not jobs or self.starts == WHEN_ASSIGNED:
            return jobs, []  # all of them started, side by side
        if self.starts == WHEN_TOLD:  # what it said it started: its first job, or a whole batch
            told = [job for job in jobs if job.state is not ASSIGNED]
            return told, [job for job in jobs if job.state is ASSIGNED]
        return jobs[:1], jobs[1:]

    def next_deadline(self) -> float:
        """When the running job's timeout ends (never, once it is answered); in a WHEN_ASSIGNED
        lane, or of a batch running, the first of their deadlines."""
        if self.starts == WHEN_ASSIGNED:
            self.prune()
            return self.deadlines[0][0] if self.deadlines else math.inf
        return min((job.deadline for job in self.jobs if job.state is RUNNING), default=math.inf)

    def overdue(self, now: float) -> list[Job]:
        """The jobs of a WHEN_ASSIGNED lane past their deadline, removed from it: the backend
        answers them TIMEOUT and has the worker cancel them (the worker itself lives on)."""
        if self.starts != WHEN_ASSIGNED:  # a few jobs: look at each
            late = [job for job in self.jobs if job.deadline <= now]
        else:
            late = []
            while self.next_deadline() <= now:
                late.append(self.held[heapq.heappop(self.deadlines)[1]])
        for job in late:
            self.remove(job, now)
        return late

    # -- the deadline heap (WHEN_ASSIGNED) -----------------------------------------------------

    def push_deadline(self, job: Job) -> None:
        heapq.heappush(self.deadlines, (job.deadline, job.id))
        if len(self.deadlines) > 2 * len(self.held) + 64:  # mostly stale: start it again
            self.deadlines = [(held.deadline, held.id) for held in self.held.values()]
            heapq.heapify(self.deadlines)

    def live(self, entry: tuple[float, int]) -> bool:
        """Whether a heap entry is a job still held, with the deadline it has now."""
        job = self.held.get(entry[1])
        return job is not None and job.deadline == entry[0]

    def prune(self) -> None:
        while self.deadlines and not self.live(self.deadlines[0]):
            heapq.heappop(self.deadlines)
