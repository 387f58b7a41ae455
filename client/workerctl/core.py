"""The sans-IO core of the clients: request ids, encoding, mailboxes, typed errors, chunks.

`Client` (blocking zmq) and `AsyncClient` (zmq.asyncio) are thin shells over this module: they
move frames between their socket and a `Core`, and they wait. Everything that decides — what a
request looks like on the wire, which reply belongs to whom, what an error body becomes, how a
map is cut into chunks and its replies turned back into per-call outcomes, what a lost
connection does to the requests in flight — lives here once, and is tested without a socket.

Replies are delivered to an `Inbox`: a single request has one of its own; a map has one for all
its requests, so its shell waits on one thing however wide the window. A reply for a request
nobody waits for any more (it timed out, or its caller stopped iterating) is dropped.
"""

from __future__ import annotations

import collections
import itertools
import struct
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

from . import errors, protocol
from .protocol import Buffer

# A message bigger than this makes a client that does not know the daemon's limit ask for it
# before sending (once); smaller ones go without asking.
LIMIT_PROBE_BYTES = protocol.RAW_THRESHOLD
# What a daemon's limit is when it does not say (its config default, daemon.max_message_mb).
DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024
# The daemon's bound on calls per chunked execute (workerd.jobs.MAX_CALLS).
MAX_CHUNK = protocol.MAX_CALLS

# Socket monitor events the shells watch (zmq.EVENT_*; numbers fixed by libzmq's ABI).
EVENT_CONNECTED = 0x0001
EVENT_DISCONNECTED = 0x0200
MONITOR_EVENTS = EVENT_CONNECTED | EVENT_DISCONNECTED

LOST_MESSAGE = (
    "connection to workerd lost while the request was in flight (daemon restarted or stopped; "
    "a message over its max_message_mb also ends the connection); it may or may not have run"
)


def monitor_event(frames: Sequence[bytes]) -> int:
    """The event number of a ZeroMQ socket-monitor message (16-bit id, 32-bit value; endpoint).

    Parsed here rather than with zmq.utils.monitor, which imports asyncio: `workerctl ping`
    should not pay for that."""
    if len(frames) != 2 or len(frames[0]) != 6:
        return 0
    event: int = struct.unpack("=Hi", frames[0])[0]
    return event


def result_of(reply: dict[str, Any]) -> Any:
    """The result of a terminal reply, or its error raised as the typed exception."""
    if reply.get("ok") is True:
        return reply["result"]
    raise errors.error_from_reply(reply["error"])


def error_reply(request_id: Any, code: str, message: str) -> dict[str, Any]:
    """A terminal error made on this side, delivered like one from the daemon."""
    error = {"code": code, "message": message, "details": {}}
    return {"v": protocol.VERSION, "id": request_id, "ok": False, "error": error}


def message_size(frames: Sequence[Buffer]) -> int:
    return sum(map(protocol.frame_size, frames))


def promote_all(values: Sequence[Any]) -> Sequence[Any]:
    """`protocol.promote` over positional arguments, copying the list only when one changes."""
    for value in values:
        if protocol.promote(value) is not value:
            return [protocol.promote(v) for v in values]
    return values


def promote_values(kwargs: dict[str, Any]) -> dict[str, Any]:
    for value in kwargs.values():
        if protocol.promote(value) is not value:
            return {k: protocol.promote(v) for k, v in kwargs.items()}
    return kwargs


def execute_fields(
    name: str,
    args: Sequence[Any] | None,
    kwargs: dict[str, Any] | None,
    timeout_s: float | None = None,
    retries: int = 0,
    die_with_client: bool = False,
) -> dict[str, Any]:
    """The fields of one plain execute request (`die_with_client`: docs/protocol.md, execute)."""
    fields: dict[str, Any] = {
        "name": name,
        "args": promote_all(args) if args else [],
        "kwargs": promote_values(kwargs) if kwargs else {},
    }
    return with_options(fields, timeout_s, retries, die_with_client)


def chunk_fields(
    name: str, calls: Sequence[Call], timeout_s: float | None, retries: int, die_with_client: bool = False
) -> dict[str, Any]:
    """The fields of one chunked execute: `calls` = [[args, kwargs], ...] run in order.

    The (args, kwargs) pairs go as they are (msgpack writes tuples as arrays): no Python work
    per call. Large bytes inside a chunk are not made raw frames (chunks are for many small
    calls); a Raw wrapper or a numpy array still travels raw."""
    fields = {"name": name, "calls": calls, "compact": True}
    return with_options(fields, timeout_s, retries, die_with_client)


def with_options(
    fields: dict[str, Any], timeout_s: float | None, retries: int, die_with_client: bool = False
) -> dict[str, Any]:
    if timeout_s is not None:
        fields["timeout_s"] = timeout_s
    if retries:
        fields["retries"] = retries
    if die_with_client:  # sent only when asked: an older daemon ignores it either way
        fields["die_with_client"] = True
    return fields


class Events:
    """One execute's replies as events, remembering how far it got: ("item", value) per stream
    item, then ("result", value) (an error raises). Left before its end, a shell cancels it,
    with `terminate` when it has streamed (see Client.events)."""

    __slots__ = ("ended", "streamed")

    def __init__(self) -> None:
        self.ended = self.streamed = False

    def event(self, reply: dict[str, Any]) -> tuple[str, Any]:
        if protocol.is_terminal(reply):
            self.ended = True
            return "result", result_of(reply)
        self.streamed = True
        return "item", reply["item"]


def cancel_requests(
    ids: Sequence[Any], terminate: bool, any_connection: bool = False
) -> Iterator[dict[str, Any]]:
    """The fields of the cancel requests for `ids`, at most MAX_CANCEL_IDS each; with
    `any_connection`, ids of this peer's other connections too (docs/protocol.md §7.8)."""
    step = protocol.MAX_CANCEL_IDS
    for start in range(0, len(ids), step):
        fields: dict[str, Any] = {"ids": list(ids[start : start + step]), "terminate": terminate}
        if any_connection:
            fields["any_connection"] = True
        yield fields


def merge_cancelled(merged: dict[str, list[Any]], result: Any) -> None:
    """Add one cancel result to `merged`, checking its shape."""
    if not isinstance(result, dict) or not all(isinstance(result.get(key), list) for key in merged):
        raise errors.ProtocolMismatch("a cancel result must map cancelled, running and unknown to lists")
    for key, ids in merged.items():
        ids.extend(result[key])


def reply_wait(client_timeout: float | None, timeout_s: float | None) -> float | None:
    """How long to wait for an execute's reply: the daemon enforces timeout_s and then always
    answers, so give it a moment beyond that."""
    if timeout_s is not None and client_timeout is not None:
        return max(client_timeout, timeout_s + 5.0)
    return client_timeout


class Inbox:
    """The replies one consumer waits for, in arrival order, as (request id, reply) pairs.

    `wake` (set by an async shell, with `event` for its own use) is called after each delivery."""

    __slots__ = ("event", "queue", "wake")

    def __init__(self) -> None:
        self.queue: collections.deque[tuple[int, dict[str, Any]]] = collections.deque()
        self.wake: Callable[[], None] | None = None
        self.event: Any = None


class Core:
    """Request ids, encoding, and the delivery of replies to inboxes. No I/O."""

    def __init__(
        self,
        max_message_bytes: int | None = None,
        *,
        first_id: int = 1,
        die_with_client: bool = False,
        priority: int = 0,
    ) -> None:
        self._ids = itertools.count(first_id)
        # Fields every execute carries: `die_with_client` asks the daemon to kill this client's
        # running jobs too when its connection goes (docs/protocol.md §7.5); `priority` orders
        # them among this user's others (§7.6). A daemon that predates them ignores the fields,
        # as it ignores every unknown one.
        self.execute_extra: dict[str, Any] = {"die_with_client": True} if die_with_client else {}
        if isinstance(priority, bool) or not isinstance(priority, int):
            raise TypeError("priority must be an integer")
        if not protocol.PRIORITY_MIN <= priority <= protocol.PRIORITY_MAX:
            raise ValueError(f"priority must be from {protocol.PRIORITY_MIN} to {protocol.PRIORITY_MAX}")
        if priority:
            self.execute_extra["priority"] = priority
        self._pending: dict[int, Inbox] = {}  # request id -> where its replies go, in send order
        # The inboxes of single requests, kept after their terminal reply until it is read.
        self._own: dict[int, Inbox] = {}
        self.max_message_bytes = max_message_bytes
        self.connected = True

    # -- requests ------------------------------------------------------------------------------

    def encode(self, cmd: str, fields: dict[str, Any]) -> tuple[int, list[Buffer]]:
        """A new id and the frames of its request: [b"", body, *raw frames]."""
        request_id = next(self._ids)
        if self.execute_extra and cmd == "execute":
            fields = {**fields, **self.execute_extra}
        try:
            frames = protocol.encode_request_frames(request_id, cmd, fields)
        except (TypeError, ValueError, OverflowError) as exc:  # a value msgpack cannot carry
            raise errors.BadRequest(f"cannot encode the request: {exc}") from None
        return request_id, [b"", *frames]

    def needs_limit(self, frames: Sequence[Buffer]) -> bool:
        """True when the daemon's size limit should be learnt before sending these frames."""
        return self.max_message_bytes is None and message_size(frames) > LIMIT_PROBE_BYTES

    def learn_limit(self, ping: dict[str, Any]) -> None:
        limit = ping.get("max_message_bytes")
        if isinstance(limit, int) and not isinstance(limit, bool) and limit > 0:
            self.max_message_bytes = limit
        else:  # a daemon that does not say: its config default
            self.max_message_bytes = DEFAULT_MAX_MESSAGE_BYTES

    def check_size(self, frames: Sequence[Buffer]) -> None:
        """Refuse before sending what the daemon would drop (ZMQ_MAXMSGSIZE disconnects us)."""
        limit = self.max_message_bytes
        if limit is None:
            return
        size = message_size(frames)
        if size > limit:
            raise errors.MessageTooLarge(
                f"request is {size} bytes, over the daemon's {limit} byte message limit "
                "(daemon.max_message_mb): send less per request",
                {"bytes": size, "limit": limit},
            )

    def register(self, request_id: int, inbox: Inbox | None = None) -> Inbox:
        """Expect replies for `request_id`, delivered to `inbox` (its own one by default, which
        `inbox(request_id)` finds until `forget`)."""
        if inbox is None:
            inbox = self._own[request_id] = Inbox()
        self._pending[request_id] = inbox
        return inbox

    def inbox(self, request_id: int) -> Inbox:
        """The inbox of a request sent on its own; a fresh, never-filled one for an unknown id."""
        return self._own.get(request_id) or Inbox()

    def forget(self, request_id: int) -> None:
        """Nobody waits for this request any more: drop whatever still comes for it."""
        self._pending.pop(request_id, None)
        self._own.pop(request_id, None)

    def in_flight(self) -> int:
        return len(self._pending)

    # -- replies -------------------------------------------------------------------------------

    def feed(self, frames: Sequence[Buffer]) -> None:
        """Decode one message from the socket and deliver it to the inbox waiting for it."""
        if len(frames) < 2 or frames[0] != b"":
            raise errors.ProtocolMismatch("reply without the empty delimiter frame")
        try:
            reply = protocol.decode_reply(bytes(frames[1]), frames[2:])
        except protocol.ProtocolError as exc:
            raise errors.ProtocolMismatch(exc.message) from None
        owner = reply.get("id")
        if owner is None:
            # An error the daemon could not tie to an id (our envelope was unreadable): it can
            # only answer the oldest request still waiting.
            owner = next(iter(self._pending), None)
            if owner is None:
                return
            reply["id"] = owner
        inbox = self._pending.get(owner) if isinstance(owner, int) else None
        if inbox is None:
            return  # for a request nobody waits for any more
        if protocol.is_terminal(reply):
            del self._pending[owner]
        inbox.queue.append((owner, reply))
        if inbox.wake is not None:
            inbox.wake()

    def fail_all(self, code: str, message: str) -> None:
        """End every request in flight with an error made here (their replies will not come)."""
        pending, self._pending = self._pending, {}
        woken: set[int] = set()
        for request_id, inbox in pending.items():
            inbox.queue.append((request_id, error_reply(request_id, code, message)))
            if inbox.wake is not None and id(inbox) not in woken:
                woken.add(id(inbox))
                inbox.wake()

    def monitor(self, event: int) -> None:
        """A socket-monitor event: a lost connection fails what was in flight; DEALER reconnects
        by itself, and requests sent after that are answered by the daemon that is back."""
        if event == EVENT_DISCONNECTED:
            self.connected = False
            self.fail_all(errors.ConnectionLost.code, LOST_MESSAGE)
        elif event == EVENT_CONNECTED:
            self.connected = True


# -- many calls: map, imap_unordered, execute_many ------------------------------------------------


class Outcome:
    """One call of execute_many: its index in the input, and its result or its error.

    A plain class, not a dataclass: importing dataclasses (and with it inspect) would cost
    `workerctl ping` about 15 ms."""

    __slots__ = ("error", "index", "result")

    def __init__(self, index: int, result: Any = None, error: errors.WorkerdError | None = None) -> None:
        self.index = index
        self.result = result
        self.error = error

    @property
    def ok(self) -> bool:
        return self.error is None

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Outcome):
            return NotImplemented
        return (self.index, self.result, self.error) == (other.index, other.result, other.error)

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"Outcome(index={self.index!r}, result={self.result!r}, error={self.error!r})"


Call = tuple[Sequence[Any], dict[str, Any]]


# Chunks per request slot of the window that auto_chunksize aims for: like Pool.map's 4 chunks per
# worker, enough chunks that the last ones do not leave most workers idle.
AUTO_CHUNKS_PER_SLOT = 4
AUTO_CHUNK_MAX = 1000


def auto_chunksize(iterable: Iterable[Any], window: int) -> int:
    """Pool.map's rule with the window in place of the worker count: the input's length over
    4 x window, at least 1 (1 when the input has no length: an iterator is not read ahead),
    at most AUTO_CHUNK_MAX (bigger chunks gain nothing measurable and hold results longer)."""
    try:
        length = len(iterable)  # type: ignore[arg-type]
    except TypeError:
        return 1
    return max(1, min(AUTO_CHUNK_MAX, -(-length // (AUTO_CHUNKS_PER_SLOT * window))))


def single_argument_calls(items: Iterable[Any]) -> Iterator[Call]:
    """imap_unordered's items: each is the one positional argument of its call (as Pool's)."""
    empty: dict[str, Any] = {}
    for item in items:
        yield (item,), empty


class Batch:
    """The bookkeeping of many calls sent as requests of `chunksize` calls, `window` at a time.

    The shell loops: send `fill()`'s requests, wait until `inbox` has mail, `take()` the
    outcomes; until `done`. Inputs are pulled from `calls` only as the window frees up, so
    memory stays bounded however long the input. chunksize 1 sends plain execute requests (a
    generator task then streams; its items are collected); larger chunks send `calls`.
    """

    def __init__(
        self,
        core: Core,
        name: str,
        calls: Iterable[Call],
        *,
        window: int,
        chunksize: int,
        timeout_s: float | None = None,
        retries: int = 0,
    ) -> None:
        if window < 1:
            raise ValueError("window must be at least 1")
        if not 1 <= chunksize <= MAX_CHUNK:
            raise ValueError(f"chunksize must be from 1 to {MAX_CHUNK}")
        self.core = core
        self.name = name
        self.calls = iter(calls)
        self.window = window
        self.chunksize = chunksize
        self.timeout_s = timeout_s
        self.retries = retries
        self.inbox = Inbox()
        self.flying: dict[int, tuple[int, int]] = {}  # request id -> (first index, call count)
        self.items: dict[int, list[Any]] = {}  # a streaming call's items so far
        self.ready: list[tuple[int, bool, Any]] = []  # outcomes decided without a reply
        self.next_index = 0
        self.exhausted = False

    @property
    def done(self) -> bool:
        return self.exhausted and not self.flying and not self.ready and not self.inbox.queue

    @property
    def waiting(self) -> bool:
        """True when nothing can be taken until another reply arrives."""
        return not self.ready and not self.inbox.queue and bool(self.flying)

    def next_request(self) -> tuple[int, list[Buffer]] | None:
        """The next request to send, encoded and registered, or None when the window is full or
        the input is out. If the shell cannot send it (too large), it calls `refused`."""
        while len(self.flying) < self.window and not self.exhausted:
            chunk = list(itertools.islice(self.calls, self.chunksize))
            if not chunk:
                self.exhausted = True
                return None
            first = self.next_index
            self.next_index += len(chunk)
            try:
                if self.chunksize == 1:
                    args, kwargs = chunk[0]
                    fields = execute_fields(self.name, args, kwargs, self.timeout_s, self.retries)
                else:
                    fields = chunk_fields(self.name, chunk, self.timeout_s, self.retries)
                request_id, frames = self.core.encode("execute", fields)
            except errors.WorkerdError as exc:
                self.fail_chunk(first, len(chunk), exc)
                continue
            self.flying[request_id] = (first, len(chunk))
            # Registered before it is sent: an async shell may receive its reply mid-send.
            self.core.register(request_id, self.inbox)
            return request_id, frames
        return None

    def refused(self, request_id: int, exc: errors.WorkerdError) -> None:
        """The request could not be sent (too large): its calls fail, the batch goes on."""
        self.core.forget(request_id)
        first, count = self.flying.pop(request_id)
        self.fail_chunk(first, count, exc)

    def fail_chunk(self, first: int, count: int, exc: errors.WorkerdError) -> None:
        self.ready.extend((index, False, exc) for index in range(first, first + count))

    def take(self) -> list[tuple[int, bool, Any]]:
        """Outcomes decided since the last call: (index, True, result) or (index, False, error)."""
        out, self.ready = self.ready, []
        queue = self.inbox.queue
        while queue:
            request_id, reply = queue.popleft()
            if "stream" in reply:  # a generator task at chunksize 1: collect its items
                self.items.setdefault(request_id, []).append(reply.get("item"))
                continue
            first, count = self.flying.pop(request_id)
            items = self.items.pop(request_id, None)
            if reply.get("ok") is not True:
                exc = errors.error_from_reply(reply["error"])
                out.extend((index, False, exc) for index in range(first, first + count))
            elif self.chunksize == 1:
                out.append((first, True, reply["result"] if items is None else items))
            else:
                out.extend(self.chunk_outcomes(first, count, reply["result"]))
        return out

    @staticmethod
    def chunk_outcomes(first: int, count: int, result: Any) -> list[tuple[int, bool, Any]]:
        values = result.get("values") if isinstance(result, dict) else None
        if isinstance(values, list) and len(values) == count:
            return Batch.compact_outcomes(first, values, result.get("errors"))
        results = result.get("results") if isinstance(result, dict) else None
        if not isinstance(results, list) or len(results) != count:
            exc = errors.ProtocolMismatch(f"a chunk of {count} calls came back without {count} results")
            return [(index, False, exc) for index in range(first, first + count)]
        try:
            # The common case, all calls ok, in one comprehension: this runs once per call.
            if all(entry["ok"] is True for entry in results):
                return [(index, True, entry["result"]) for index, entry in enumerate(results, first)]
        except (TypeError, KeyError):
            pass
        out: list[tuple[int, bool, Any]] = []
        for index, entry in enumerate(results, first):
            if isinstance(entry, dict) and entry.get("ok") is True:
                out.append((index, True, entry.get("result")))
            else:
                error = entry.get("error") if isinstance(entry, dict) else None
                out.append((index, False, errors.error_from_reply(error if isinstance(error, dict) else {})))
        return out

    @staticmethod
    def compact_outcomes(first: int, values: list[Any], failed: Any) -> list[tuple[int, bool, Any]]:
        """The outcomes of a compact chunk reply (`compact: true`): values in call order, and
        the sparse [index, error] list of the calls that failed."""
        # zip, not a comprehension: this runs once per call, and in C it costs a third.
        out = list(zip(range(first, first + len(values)), itertools.repeat(True), values, strict=False))
        for entry in failed if isinstance(failed, list) else ():
            if (
                isinstance(entry, list)
                and len(entry) == 2
                and type(entry[0]) is int
                and 0 <= entry[0] < len(out)
            ):
                error = entry[1] if isinstance(entry[1], dict) else {}
                out[entry[0]] = (first + entry[0], False, errors.error_from_reply(error))
        return out

    def close(self) -> list[int]:
        """Stop: replies still to come for this batch are dropped. The ids still in flight."""
        left = list(self.flying)
        for request_id in left:
            self.core.forget(request_id)
        self.flying.clear()
        self.exhausted = True
        return left
