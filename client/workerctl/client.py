"""The synchronous client: one DEALER socket, requests matched to replies by id.

Several requests may be in flight on one socket; replies are matched by id, and a reply for an
id nobody waits for any more (its caller timed out) is dropped.
"""

from __future__ import annotations

import collections
import errno
import itertools
import socket
import time
from collections.abc import Iterator
from typing import Any

import zmq

from . import errors, paths, protocol

DEFAULT_TIMEOUT = 30.0


def probe_socket(path: str) -> None:
    """Tell apart the reasons a daemon cannot be reached, before ZeroMQ hides them.

    ZeroMQ connects in the background and retries forever, so a missing socket, a stale one left
    by a crashed daemon, and one we may not open all look like a silent timeout. One plain
    connect() tells them apart at the cost of a syscall.
    """
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except FileNotFoundError:
        raise errors.DaemonUnreachable(
            f"cannot connect to workerd at {path}: no socket there; is it running? (systemctl status workerd)"
        ) from None
    except PermissionError:
        raise errors.ConnectionDenied(
            f"permission denied on {path}: join the socket's group (e.g. 'workerd') or ask its owner"
        ) from None
    except ConnectionRefusedError:
        raise errors.DaemonUnreachable(
            f"cannot connect to workerd at {path}: stale socket, the daemon is not running "
            "(systemctl status workerd)"
        ) from None
    except OSError as exc:
        if exc.errno == errno.ENAMETOOLONG or "too long" in str(exc):
            raise errors.WorkerdError(f"socket path too long: {path}") from None
        raise errors.DaemonUnreachable(f"cannot connect to workerd at {path}: {exc}") from None
    finally:
        probe.close()


def result_of(reply: dict[str, Any]) -> Any:
    """The result of a terminal reply, or its error raised as the typed exception."""
    if reply.get("ok") is True:
        return reply["result"]
    raise errors.error_from_reply(reply["error"])


class Client:
    """A connection to workerd. Use it as a context manager, or call close()."""

    def __init__(
        self,
        socket_path: str | None = None,
        timeout: float | None = DEFAULT_TIMEOUT,
        context: zmq.Context[Any] | None = None,
    ) -> None:
        self.socket_path = paths.resolve_socket_path(socket_path)
        self.timeout = timeout
        probe_socket(self.socket_path)
        self._context = context or zmq.Context.instance()
        self._socket = self._context.socket(zmq.DEALER)
        # linger 0: closing the client never blocks on requests the daemon will not read.
        self._socket.setsockopt(zmq.LINGER, 0)
        self._socket.connect(paths.endpoint(self.socket_path))
        self._ids = itertools.count(1)
        # Messages that arrived for one request while the caller waited on another.
        self._mailbox: dict[int, collections.deque[dict[str, Any]]] = {}

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        self._socket.close(linger=0)

    # -- the one request path ------------------------------------------------------------------

    def send(self, cmd: str, **fields: Any) -> int:
        """Send a request without waiting; returns its id."""
        request_id = next(self._ids)
        self._socket.send_multipart([b"", protocol.encode_request(request_id, cmd, **fields)])
        self._mailbox[request_id] = collections.deque()
        return request_id

    def replies(self, request_id: int, timeout: float | None) -> Iterator[dict[str, Any]]:
        """Yield the messages for one request (stream items, then the terminal reply).

        Messages for other requests in flight on this client are kept for their own callers;
        messages for requests nobody waits for any more (they timed out) are dropped.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        mailbox = self._mailbox.setdefault(request_id, collections.deque())
        try:
            while True:
                reply = mailbox.popleft() if mailbox else self._receive(request_id, deadline, timeout)
                if reply is None:
                    continue
                yield reply
                if protocol.is_terminal(reply):
                    return
        finally:
            # Ended, timed out, or abandoned by the caller: later messages for it are dropped.
            self._mailbox.pop(request_id, None)

    def _receive(
        self, request_id: int, deadline: float | None, timeout: float | None
    ) -> dict[str, Any] | None:
        """One message for `request_id`, or None if what arrived was for another request."""
        remaining = None if deadline is None else deadline - time.monotonic()
        if remaining is not None and remaining <= 0:
            raise errors.RequestTimeout(f"no reply from workerd within {timeout:g} s")
        wait_ms = None if remaining is None else max(1, int(remaining * 1000))
        if not self._socket.poll(wait_ms, zmq.POLLIN):
            return None
        reply = self._decode(self._socket.recv_multipart())
        owner = reply.get("id")
        if owner == request_id or owner is None:  # an id-less error answers the request at hand
            return reply
        if owner in self._mailbox:
            self._mailbox[owner].append(reply)
        return None

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

    @staticmethod
    def _decode(frames: list[bytes]) -> dict[str, Any]:
        if len(frames) < 2 or frames[0] != b"":
            raise errors.ProtocolMismatch("reply without the empty delimiter frame")
        try:
            return protocol.decode_reply(frames[1])
        except protocol.ProtocolError as exc:
            raise errors.ProtocolMismatch(exc.message) from None

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

    def execute(self, name: str, *args: Any, **kwargs: Any) -> Any:
        """Run a task or pipeline; a generator task's items come back as a list."""
        return self.call(name, list(args), kwargs)

    def call(
        self,
        name: str,
        args: list[Any] | None = None,
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
        args: list[Any] | None = None,
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
        args: list[Any] | None = None,
        kwargs: dict[str, Any] | None = None,
        *,
        timeout_s: float | None = None,
        retries: int = 0,
    ) -> Iterator[tuple[str, Any]]:
        """Yield ("item", value) for each stream item, then ("result", value); errors raise."""
        for reply in self._execute(name, args, kwargs, timeout_s, retries):
            if protocol.is_terminal(reply):
                yield "result", result_of(reply)
            else:
                yield "item", reply["item"]

    def _execute(
        self,
        name: str,
        args: list[Any] | None,
        kwargs: dict[str, Any] | None,
        timeout_s: float | None,
        retries: int,
    ) -> Iterator[dict[str, Any]]:
        fields: dict[str, Any] = {"name": name, "args": args or [], "kwargs": kwargs or {}}
        if timeout_s is not None:
            fields["timeout_s"] = timeout_s
        if retries:
            fields["retries"] = retries
        request_id = self.send("execute", **fields)
        # The daemon enforces timeout_s and always answers; give it a moment beyond that.
        wait = self.timeout
        if timeout_s is not None and wait is not None:
            wait = max(wait, timeout_s + 5.0)
        yield from self.replies(request_id, wait)
