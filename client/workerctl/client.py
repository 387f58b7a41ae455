"""The synchronous client: one DEALER socket, a thin blocking shell over workerctl.core.

Several requests may be in flight on one socket; replies are matched by id (in the core), and a
reply for an id nobody waits for any more (its caller timed out) is dropped. A socket monitor
tells us when the connection drops, so requests in flight fail at once with ConnectionLost
instead of waiting out their timeout; the DEALER reconnects by itself.
"""

from __future__ import annotations

import errno
import os
import socket
import stat
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import zmq

from . import core, errors, paths, protocol
from .core import result_of
from .frames import readable, receive_waiting, send_frames
from .protocol import Buffer

DEFAULT_TIMEOUT = 30.0
DEFAULT_RECONNECT_TIMEOUT = 30.0
# Requests in flight for execute_many/imap_unordered/map: measured (bench/RESULTS.md), 64 is where
# throughput stops growing at chunksize 1 (2 workers, prefetch 4); more only queues in the master.
DEFAULT_WINDOW = 64


def probe_socket(path: str) -> None:
    """Tell apart the reasons a daemon cannot be reached, before ZeroMQ hides them.

    ZeroMQ connects in the background and retries forever, so a missing socket, a stale one left
    by a crashed daemon, and one we may not open all look like a silent timeout. One plain
    connect() tells them apart at the cost of a syscall.

    First of all, the path must be one that only its owners could have put there
    (paths.why_untrusted): a socket another user could swap would receive our arguments and
    send replies we would believe.
    """
    problem = paths.why_untrusted(path)
    if problem is not None:
        raise errors.UntrustedSocket(f"refusing to connect to workerd at {path}: {problem}")
    missing = errors.DaemonUnreachable(
        f"cannot connect to workerd at {path}: no socket there; is it running? (systemctl status workerd)"
    )
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except FileNotFoundError:
        raise missing from None
    except PermissionError:
        raise errors.ConnectionDenied(
            f"permission denied on {path}: join the socket's group (e.g. 'workerd') or ask its owner"
        ) from None
    except ConnectionRefusedError:
        try:
            mode = os.stat(path).st_mode
        except FileNotFoundError:  # gone since the connect: a daemon starting removes a stale one
            raise missing from None
        if not stat.S_ISSOCK(mode):
            raise errors.DaemonUnreachable(
                f"cannot connect to workerd at {path}: that is not a socket (wrong --socket?)"
            ) from None
        raise errors.DaemonUnreachable(
            f"cannot connect to workerd at {path}: stale socket, the daemon is not running "
            "(systemctl status workerd)"
        ) from None
    except OSError as exc:
        if exc.errno == errno.ENAMETOOLONG or "too long" in str(exc):
            raise errors.UsageError(
                f"socket path too long: {path} (Unix sockets allow {paths.MAX_SOCKET_PATH} bytes)"
            ) from None
        raise errors.DaemonUnreachable(f"cannot connect to workerd at {path}: {exc}") from None
    finally:
        probe.close()


class Client:
    """A connection to workerd. Use it as a context manager, or call close().

    Several requests may be in flight on one client (send, then wait_result or replies; map and
    imap_unordered keep a window of them). Not thread-safe: one client per thread.

    `timeout` bounds each wait for a reply (None: wait as long as the daemon takes).
    `max_message_bytes` is the daemon's daemon.max_message_mb in bytes; unset, the client asks
    the daemon (ping) before its first message over 64 KiB, and assumes the 64 MiB default if the
    daemon does not say. `reconnect_timeout` bounds how long a send waits for the connection to
    come back after the daemon went away. Request ids count up from `first_id`: a program that
    hands its ids to another process, for a `cancel` of another connection, starts them at a
    random number so that they meet no other connection's (workerctl run does).
    `die_with_client` asks the daemon to kill this client's running jobs when its connection
    goes, not only its queued ones (the execute field `die_with_client`). `priority` (-9 to 9,
    default 0) goes with every execute: higher runs first among this user's requests, and
    ahead of other users' only as far as the daemon's `[fairness] max_priority` grants.
    """

    def __init__(
        self,
        socket_path: str | None = None,
        timeout: float | None = DEFAULT_TIMEOUT,
        context: zmq.Context[Any] | None = None,
        *,
        max_message_bytes: int | None = None,
        reconnect_timeout: float = DEFAULT_RECONNECT_TIMEOUT,
        first_id: int = 1,
        die_with_client: bool = False,
        priority: int = 0,
    ) -> None:
        self.socket_path = paths.resolve_socket_path(socket_path)
        self.timeout = timeout
        self.reconnect_timeout = reconnect_timeout
        probe_socket(self.socket_path)
        self._core = core.Core(
            max_message_bytes, first_id=first_id, die_with_client=die_with_client, priority=priority
        )
        self._context = context or zmq.Context.instance()
        self._socket = self._context.socket(zmq.DEALER)
        # linger 0: closing the client never blocks on requests the daemon will not read.
        self._socket.setsockopt(zmq.LINGER, 0)
        # Replies are never dropped on our side: what we asked for is what we hold.
        self._socket.setsockopt(zmq.RCVHWM, 0)
        if timeout is not None:  # a daemon that stopped reading must not block a send forever
            self._socket.setsockopt(zmq.SNDTIMEO, max(1, int(timeout * 1000)))
        self._monitor = self._socket.get_monitor_socket(core.MONITOR_EVENTS)
        self._socket.connect(paths.endpoint(self.socket_path))
        self._poller = zmq.Poller()
        self._poller.register(self._socket, zmq.POLLIN)
        self._poller.register(self._monitor, zmq.POLLIN)
        self._closed = False

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self._socket.disable_monitor()
        except zmq.ZMQError:
            pass
        self._monitor.close(linger=0)
        self._socket.close(linger=0)

    @property
    def max_message_bytes(self) -> int | None:
        """The daemon's message size limit, once known."""
        return self._core.max_message_bytes

    # -- the one request path ------------------------------------------------------------------

    def send(self, cmd: str, **fields: Any) -> int:
        """Send a request without waiting; returns its id."""
        return self.send_into(None, cmd, fields)

    def send_into(self, inbox: core.Inbox | None, cmd: str, fields: dict[str, Any]) -> int:
        """send, with the replies delivered to `inbox` (one for many requests, as a map's or
        workerctl.Executor's), or to the request's own one when None."""
        request_id, frames = self._core.encode(cmd, fields)
        self._check_size(frames)
        # Take in the news of a connection lost while nothing was in flight before this request
        # is registered: taken in after, it failed the request with ConnectionLost before it was
        # even sent (the first request after a daemon restart, on a client left idle).
        self._poll_monitor(0)
        self._core.register(request_id, inbox)
        self._transmit(request_id, frames)
        return request_id

    def cancel_nowait(self, ids: Sequence[int], terminate: bool = False) -> None:
        """Ask the daemon to cancel requests of ours that nobody waits for any more, without
        waiting for the answer (it is dropped, as are their CANCELLED replies); nothing is sent
        while the connection is down or the socket would block: those requests are lost anyway."""
        if self._closed or not self._core.connected:
            return
        for fields in core.cancel_requests(ids, terminate):
            _, frames = self._core.encode("cancel", fields)
            try:
                self._socket.send_multipart(frames, flags=zmq.NOBLOCK)
            except zmq.ZMQError:
                return

    def wait_any(self, timeout: float | None, also: Sequence[int] = ()) -> set[int]:
        """Wait until a message or connection event arrives for this client (handed to the
        core, where inboxes get it) or a file descriptor of `also` is readable, at most
        `timeout` s; the readable ones of `also`. For a caller that waits on its own file
        descriptors too, from the one thread that uses this client (workerctl.Executor)."""
        if self._drain():
            return set()
        poller = zmq.Poller()
        poller.register(self._socket, zmq.POLLIN)
        poller.register(self._monitor, zmq.POLLIN)
        for fd in also:
            poller.register(fd, zmq.POLLIN)
        ready = dict(poller.poll(None if timeout is None else max(0, int(timeout * 1000))))
        if self._socket in ready:
            self._drain()
        if self._monitor in ready:
            self._poll_monitor(0)
        return {fd for fd in also if fd in ready}

    def _check_size(self, frames: list[Buffer]) -> None:
        if self._core.needs_limit(frames):
            self._core.learn_limit(self.ping())
        self._core.check_size(frames)

    def _transmit(self, request_id: int, frames: list[Buffer]) -> None:
        self._await_connection()
        try:
            send_frames(self._socket, frames)
        except zmq.Again:
            self._core.forget(request_id)
            raise errors.RequestTimeout(
                f"could not send to workerd within {self.timeout:g} s: it is not reading its socket"
            ) from None
        except BaseException:
            self._core.forget(request_id)
            raise

    def _await_connection(self) -> None:
        """If the daemon went away, wait (bounded) for the DEALER's own reconnect."""
        self._poll_monitor(0)
        if self._core.connected:
            return
        deadline = time.monotonic() + self.reconnect_timeout
        while not self._core.connected:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise errors.DaemonUnreachable(
                    f"connection to workerd at {self.socket_path} lost and not back within "
                    f"{self.reconnect_timeout:g} s; is it running? (systemctl status workerd)"
                )
            self._poll_monitor(max(1, int(remaining * 1000)))

    def _poll_monitor(self, wait_ms: int) -> None:
        if wait_ms and not readable(self._monitor):
            self._monitor.poll(wait_ms, zmq.POLLIN)
        while readable(self._monitor):
            event = core.monitor_event(self._monitor.recv_multipart())
            if event == core.EVENT_DISCONNECTED:
                # Replies that arrived before the connection dropped are delivered, not lost.
                self._drain()
            self._core.monitor(event)

    def _pump(self, deadline: float | None, timeout: float | None) -> None:
        """Receive what has arrived, waiting for something until `deadline`; hand it to the core."""
        if self._drain():
            return
        remaining = None if deadline is None else deadline - time.monotonic()
        if remaining is not None and remaining <= 0:
            raise errors.RequestTimeout(f"no reply from workerd within {timeout:g} s")
        wait_ms = None if remaining is None else max(1, int(remaining * 1000))
        ready = dict(self._poller.poll(wait_ms))
        if self._socket in ready:
            self._drain()
        if self._monitor in ready:
            self._poll_monitor(0)

    def _drain(self, limit: int = 1000) -> bool:
        """Feed up to `limit` waiting messages to the core; True if there was one."""
        return receive_waiting(self._socket, self._core.feed, limit) > 0

    def _next(
        self, inbox: core.Inbox, deadline: float | None, timeout: float | None
    ) -> tuple[int, dict[str, Any]]:
        while not inbox.queue:
            self._pump(deadline, timeout)
        return inbox.queue.popleft()

    def replies(self, request_id: int, timeout: float | None) -> Iterator[dict[str, Any]]:
        """Yield the messages for one request (stream items, then the terminal reply).

        Messages for other requests in flight on this client are kept for their own callers;
        messages for requests nobody waits for any more (they timed out) are dropped.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        inbox = self._core.inbox(request_id)
        try:
            while True:
                _, reply = self._next(inbox, deadline, timeout)
                yield reply
                if protocol.is_terminal(reply):
                    return
        finally:
            # Ended, timed out, or abandoned by the caller: later messages for it are dropped.
            self._core.forget(request_id)

    def wait_result(self, request_id: int, timeout: float | None = None) -> Any:
        """Block until the request sent as `request_id` ends; its result (stream items dropped),
        or its error raised as the typed exception."""
        for reply in self.replies(request_id, self.timeout if timeout is None else timeout):
            if protocol.is_terminal(reply):
                return result_of(reply)
        raise errors.ProtocolMismatch("stream ended without a terminal reply")  # pragma: no cover

    def request(self, cmd: str, timeout: float | None = None, **fields: Any) -> Any:
        """Send one command and return its result, raising the typed error on failure."""
        return self.wait_result(self.send(cmd, **fields), timeout)

    # -- commands ------------------------------------------------------------------------------

    def ping(self) -> dict[str, Any]:
        return self.request("ping")  # type: ignore[no-any-return]

    def status(self) -> dict[str, Any]:
        return self.request("status")  # type: ignore[no-any-return]

    def memory_status(self) -> dict[str, Any]:
        return self.request("memory_status")  # type: ignore[no-any-return]

    def clear_memory(self, level: str = "cache") -> dict[str, Any]:
        return self.request("clear_memory", level=level)  # type: ignore[no-any-return]

    def scale(self, workers: int) -> dict[str, Any]:
        return self.request("scale", workers=workers)  # type: ignore[no-any-return]

    def reload(self) -> dict[str, Any]:
        return self.request("reload")  # type: ignore[no-any-return]

    def cancel(
        self, ids: Iterable[int], terminate: bool = False, *, any_connection: bool = False
    ) -> dict[str, list[int]]:
        """Cancel requests sent earlier on this client, by the ids `send` returned; with
        `any_connection`, also requests of other connections from the same user (uid), as
        `workerctl cancel` does (docs/protocol.md §7.8: [access] execute applies).

        Returns {"cancelled": [...], "running": [...], "unknown": [...]}: a cancelled request
        was queued or prefetched (or running, with `terminate`: its worker is killed and
        replaced) and gets a CANCELLED error of its own, which arrives before this returns; a
        running one goes on and gets its own result; an unknown one was already answered (its
        reply may still be on its way), was never sent, or is another client's. Any number of
        ids: they go at most 10,000 a request."""
        merged: dict[str, list[int]] = {"cancelled": [], "running": [], "unknown": []}
        for fields in core.cancel_requests(list(ids), terminate, any_connection):
            core.merge_cancelled(merged, self.request("cancel", **fields))
        return merged

    def execute(self, name: str, *args: Any, **kwargs: Any) -> Any:
        """Run a task or pipeline; a generator task's items come back as a list."""
        return self.call(name, list(args), kwargs)

    def call(
        self,
        name: str,
        args: Sequence[Any] | None = None,
        kwargs: dict[str, Any] | None = None,
        *,
        timeout_s: float | None = None,
        retries: int = 0,
    ) -> Any:
        """execute with the request options spelled out (they cannot clash with task kwargs)."""
        items: list[Any] = []
        for kind, value in self.events(name, args, kwargs, timeout_s=timeout_s, retries=retries):
            if kind == "item":
                items.append(value)
            elif not items:
                return value
        return items

    def stream(
        self,
        name: str,
        args: Sequence[Any] | None = None,
        kwargs: dict[str, Any] | None = None,
        *,
        timeout_s: float | None = None,
        retries: int = 0,
    ) -> Iterator[Any]:
        """Yield a generator task's items as they arrive."""
        for kind, value in self.events(name, args, kwargs, timeout_s=timeout_s, retries=retries):
            if kind == "item":
                yield value

    def events(
        self,
        name: str,
        args: Sequence[Any] | None = None,
        kwargs: dict[str, Any] | None = None,
        *,
        timeout_s: float | None = None,
        retries: int = 0,
    ) -> Iterator[tuple[str, Any]]:
        """Yield ("item", value) for each stream item, then ("result", value); errors raise.

        Left before its end (the loop broken, a client timeout, Ctrl-C), the request is
        cancelled: one that has streamed items is running, and is terminated (its worker killed
        and replaced: its generator's remaining work is unwanted, and might never end); one
        that has not is cancelled if it is still queued, and left to finish otherwise."""
        request_id = self.send("execute", **core.execute_fields(name, args, kwargs, timeout_s, retries))
        events = core.Events()
        try:
            for reply in self.replies(request_id, core.reply_wait(self.timeout, timeout_s)):
                yield events.event(reply)
        finally:
            if not events.ended:
                self.cancel_nowait([request_id], terminate=events.streamed)

    # -- many calls ----------------------------------------------------------------------------

    def execute_many(
        self,
        name: str,
        calls: Iterable[core.Call],
        *,
        window: int = DEFAULT_WINDOW,
        chunksize: int = 1,
        timeout_s: float | None = None,
        retries: int = 0,
    ) -> Iterator[core.Outcome]:
        """Run `name` once per (args, kwargs) in `calls`; yield an Outcome per call as it completes.

        At most `window` requests are in flight, each carrying `chunksize` calls, and inputs are
        read only as the window frees up: memory stays flat however long `calls` is. A call's
        failure is its outcome (`error` set), never an exception here; a lost connection fails
        the calls in flight with ConnectionLost and the rest go on once the daemon is back.
        `timeout` (the client's) bounds the wait for each next reply.
        """
        for index, ok, value in self._outcomes(name, calls, window, chunksize, timeout_s, retries):
            yield core.Outcome(index, value, None) if ok else core.Outcome(index, None, value)

    def imap_unordered(
        self,
        name: str,
        iterable: Iterable[Any],
        *,
        window: int = DEFAULT_WINDOW,
        chunksize: int = 1,
        timeout_s: float | None = None,
        retries: int = 0,
    ) -> Iterator[Any]:
        """Like multiprocessing.Pool.imap_unordered: each item is the one argument of a call;
        results in completion order; the first failed call raises its typed error."""
        calls = core.single_argument_calls(iterable)
        for _, ok, value in self._outcomes(name, calls, window, chunksize, timeout_s, retries):
            if not ok:
                raise value
            yield value

    def map(
        self,
        name: str,
        iterable: Iterable[Any],
        *,
        window: int = DEFAULT_WINDOW,
        chunksize: int | None = None,
        timeout_s: float | None = None,
        retries: int = 0,
    ) -> list[Any]:
        """Like Pool.map: the results in input order; the first failed call raises.

        chunksize None: chosen as Pool.map does when the input has a length (core.auto_chunksize:
        then timeout_s and retries apply to each chunk), else 1."""
        results: dict[int, Any] = {}
        chunksize = core.auto_chunksize(iterable, window) if chunksize is None else chunksize
        calls = core.single_argument_calls(iterable)
        for index, ok, value in self._outcomes(name, calls, window, chunksize, timeout_s, retries):
            if not ok:
                raise value
            results[index] = value
        return [results[i] for i in range(len(results))]

    def _outcomes(
        self,
        name: str,
        calls: Iterable[core.Call],
        window: int,
        chunksize: int,
        timeout_s: float | None,
        retries: int,
        idle: Callable[[], None] | None = None,
    ) -> Iterator[tuple[int, bool, Any]]:
        """(index, True, result) or (index, False, error) per call; `idle` runs before each wait."""
        batch = core.Batch(
            self._core, name, calls, window=window, chunksize=chunksize, timeout_s=timeout_s, retries=retries
        )
        wait = core.reply_wait(self.timeout, timeout_s)
        try:
            while not batch.done:
                self._poll_monitor(0)  # before next_request registers (see send)
                while (request := batch.next_request()) is not None:
                    request_id, frames = request
                    try:
                        self._check_size(frames)
                    except errors.MessageTooLarge as exc:
                        batch.refused(request_id, exc)
                        continue
                    self._transmit(request_id, frames)
                if batch.waiting:
                    if idle is not None:
                        idle()
                    deadline = None if wait is None else time.monotonic() + wait
                    while not batch.inbox.queue:
                        self._pump(deadline, wait)
                yield from batch.take()
        finally:
            # Left early (a failed call raised, the caller stopped): what is still queued for
            # us at the daemon is cancelled; running calls finish, and their replies are dropped.
            self.cancel_nowait(batch.close())
