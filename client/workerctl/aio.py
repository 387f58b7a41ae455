"""The asyncio client: one zmq.asyncio DEALER socket, a thin shell over workerctl.core.

One background task reads the socket and its monitor and hands every message to the core, which
delivers it to the inbox waiting for it; a waiting coroutine sleeps on its inbox's event. Any
number of coroutines may use one AsyncClient at once. Imported lazily (`workerctl.AsyncClient`)
so that the synchronous client and `workerctl` never import asyncio.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterable, Sequence
from typing import Any

import zmq
import zmq.asyncio

from . import core, errors, paths, protocol
from .client import DEFAULT_RECONNECT_TIMEOUT, DEFAULT_TIMEOUT, DEFAULT_WINDOW, probe_socket
from .core import result_of
from .frames import readable, receive_waiting
from .protocol import Buffer


class AsyncClient:
    """A connection to workerd for asyncio code: `async with AsyncClient() as client: ...`.

    The same methods as Client, as coroutines (and async iterators for stream, events,
    imap_unordered and execute_many); the same arguments, errors and timeouts.
    """

    def __init__(
        self,
        socket_path: str | None = None,
        timeout: float | None = DEFAULT_TIMEOUT,
        context: zmq.asyncio.Context | None = None,
        *,
        max_message_bytes: int | None = None,
        reconnect_timeout: float = DEFAULT_RECONNECT_TIMEOUT,
        priority: int = 0,
    ) -> None:
        self.socket_path = paths.resolve_socket_path(socket_path)
        self.timeout = timeout
        self.reconnect_timeout = reconnect_timeout
        probe_socket(self.socket_path)
        self._core = core.Core(max_message_bytes, priority=priority)
        self._context = context or zmq.asyncio.Context.instance()
        self._socket = self._context.socket(zmq.DEALER)
        self._socket.setsockopt(zmq.LINGER, 0)
        self._socket.setsockopt(zmq.RCVHWM, 0)
        self._monitor = self._socket.get_monitor_socket(core.MONITOR_EVENTS)
        self._socket.connect(paths.endpoint(self.socket_path))
        # Non-blocking reads through a synchronous view of the same sockets: the reader task
        # drains everything available per wake-up without a future per message.
        self._sync: zmq.Socket[Any] = zmq.Socket.shadow(self._socket.underlying)
        self._sync_monitor: zmq.Socket[Any] = zmq.Socket.shadow(self._monitor.underlying)
        self._reader: asyncio.Task[None] | None = None
        self._connected: asyncio.Event | None = None
        self._closed = False

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._reader is not None:
            self._reader.cancel()
            try:
                await self._reader
            except asyncio.CancelledError:
                pass
        try:
            self._socket.disable_monitor()
        except zmq.ZMQError:
            pass
        self._monitor.close(linger=0)
        self._socket.close(linger=0)

    @property
    def max_message_bytes(self) -> int | None:
        return self._core.max_message_bytes

    # -- the reader task -----------------------------------------------------------------------

    def _start(self) -> None:
        if self._closed:
            raise errors.WorkerdError("the client is closed")
        if self._reader is None:
            self._connected = asyncio.Event()
            self._connected.set()
            self._reader = asyncio.get_running_loop().create_task(self._read())

    async def _read(self) -> None:
        poller = zmq.asyncio.Poller()
        poller.register(self._socket, zmq.POLLIN)
        poller.register(self._monitor, zmq.POLLIN)
        assert self._connected is not None
        while True:
            try:
                await poller.poll()
                self._drain()
                while readable(self._sync_monitor):
                    event = core.monitor_event(self._sync_monitor.recv_multipart())
                    if event == core.EVENT_DISCONNECTED:
                        # Replies that arrived before the connection dropped are delivered.
                        self._drain()
                    self._core.monitor(event)
                    if self._core.connected:
                        self._connected.set()
                    else:
                        self._connected.clear()
            except errors.WorkerdError as exc:
                # A reply we cannot read: nothing in flight can be trusted to be answered.
                self._core.fail_all(exc.code, exc.message)
            except zmq.ZMQError:  # the sockets were closed under us
                self._core.fail_all(errors.ConnectionLost.code, "the client was closed")
                return

    def _drain(self) -> None:
        while receive_waiting(self._sync, self._core.feed, 1000) == 1000:
            pass  # more may wait: a burst of over 1000 replies

    # -- the one request path ------------------------------------------------------------------

    @staticmethod
    def _watch(inbox: core.Inbox) -> asyncio.Event:
        """The event set whenever the core delivers to `inbox`."""
        if inbox.event is None:
            inbox.event = asyncio.Event()
            inbox.wake = inbox.event.set
        return inbox.event  # type: ignore[no-any-return]

    async def send(self, cmd: str, **fields: Any) -> int:
        """Send a request without waiting for its reply; returns its id."""
        self._start()
        request_id, frames = self._core.encode(cmd, fields)
        await self._check_size(frames)
        self._core.register(request_id)
        await self._transmit(request_id, frames)
        return request_id

    async def _check_size(self, frames: list[Buffer]) -> None:
        if self._core.needs_limit(frames):
            self._core.learn_limit(await self.ping())
        self._core.check_size(frames)

    async def _transmit(self, request_id: int, frames: list[Buffer]) -> None:
        try:
            await self._await_connection()
            # zmq.asyncio sends at once when it can (no loop turn) and then re-checks the socket
            # for the reader task: a send through the synchronous view would not, and could
            # swallow the edge that wakes the reader.
            await self._socket.send_multipart(frames, copy=len(frames) == 2)
        except BaseException:
            self._core.forget(request_id)
            raise

    async def _await_connection(self) -> None:
        assert self._connected is not None
        if self._connected.is_set():
            return
        try:
            async with asyncio.timeout(self.reconnect_timeout):
                await self._connected.wait()
        except TimeoutError:
            raise errors.DaemonUnreachable(
                f"connection to workerd at {self.socket_path} lost and not back within "
                f"{self.reconnect_timeout:g} s; is it running? (systemctl status workerd)"
            ) from None

    async def _wait(self, inbox: core.Inbox, deadline: float | None, timeout: float | None) -> None:
        """Until `inbox` has mail; RequestTimeout at `deadline`."""
        event = self._watch(inbox)
        while not inbox.queue:
            event.clear()
            remaining = None if deadline is None else deadline - time.monotonic()
            try:
                if remaining is not None and remaining <= 0:
                    raise TimeoutError
                async with asyncio.timeout(remaining):
                    await event.wait()
            except TimeoutError:
                raise errors.RequestTimeout(f"no reply from workerd within {timeout:g} s") from None

    async def _next(
        self, inbox: core.Inbox, deadline: float | None, timeout: float | None
    ) -> tuple[int, dict[str, Any]]:
        await self._wait(inbox, deadline, timeout)
        return inbox.queue.popleft()

    async def replies(self, request_id: int, timeout: float | None) -> AsyncIterator[dict[str, Any]]:
        """Yield the messages for one request (stream items, then the terminal reply)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        inbox = self._core.inbox(request_id)
        try:
            while True:
                _, reply = await self._next(inbox, deadline, timeout)
                yield reply
                if protocol.is_terminal(reply):
                    return
        finally:
            self._core.forget(request_id)

    async def wait_result(self, request_id: int, timeout: float | None = None) -> Any:
        async for reply in self.replies(request_id, self.timeout if timeout is None else timeout):
            if protocol.is_terminal(reply):
                return result_of(reply)
        raise errors.ProtocolMismatch("stream ended without a terminal reply")  # pragma: no cover

    async def request(self, cmd: str, timeout: float | None = None, **fields: Any) -> Any:
        return await self.wait_result(await self.send(cmd, **fields), timeout)

    # -- commands ------------------------------------------------------------------------------

    async def ping(self) -> dict[str, Any]:
        return await self.request("ping")  # type: ignore[no-any-return]

    async def status(self) -> dict[str, Any]:
        return await self.request("status")  # type: ignore[no-any-return]

    async def memory_status(self) -> dict[str, Any]:
        return await self.request("memory_status")  # type: ignore[no-any-return]

    async def clear_memory(self, level: str = "cache") -> dict[str, Any]:
        return await self.request("clear_memory", level=level)  # type: ignore[no-any-return]

    async def scale(self, workers: int) -> dict[str, Any]:
        return await self.request("scale", workers=workers)  # type: ignore[no-any-return]

    async def reload(self) -> dict[str, Any]:
        return await self.request("reload")  # type: ignore[no-any-return]

    async def cancel(self, ids: Iterable[int], terminate: bool = False) -> dict[str, list[int]]:
        """Cancel requests sent earlier on this client; see Client.cancel."""
        merged: dict[str, list[int]] = {"cancelled": [], "running": [], "unknown": []}
        for fields in core.cancel_requests(list(ids), terminate):
            core.merge_cancelled(merged, await self.request("cancel", **fields))
        return merged

    def cancel_nowait(self, ids: Sequence[int], terminate: bool = False) -> None:
        """Cancel without waiting for the answer; see Client.cancel_nowait. Not a coroutine, so
        an async generator's cleanup can call it however it is finalized."""
        if self._closed or self._reader is None or not self._core.connected:
            return
        try:
            asyncio.get_running_loop()
        except RuntimeError:  # finalized after its loop ended: nobody could send it now
            return
        for fields in core.cancel_requests(ids, terminate):
            _, frames = self._core.encode("cancel", fields)
            try:
                # zmq.asyncio sends at once when it can, and the reader task still sees the
                # socket's next edge (see _transmit); the future is not awaited, its reply dropped.
                sent = self._socket.send_multipart(frames, flags=zmq.NOBLOCK)
            except zmq.ZMQError:
                return
            # A full socket fails the future: retrieve its exception, so nobody logs it.
            asyncio.ensure_future(sent).add_done_callback(lambda future: future.exception())

    async def execute(self, name: str, *args: Any, **kwargs: Any) -> Any:
        return await self.call(name, list(args), kwargs)

    async def call(
        self,
        name: str,
        args: Sequence[Any] | None = None,
        kwargs: dict[str, Any] | None = None,
        *,
        timeout_s: float | None = None,
        retries: int = 0,
    ) -> Any:
        items: list[Any] = []
        async for kind, value in self.events(name, args, kwargs, timeout_s=timeout_s, retries=retries):
            if kind == "item":
                items.append(value)
            elif not items:
                return value
        return items

    async def stream(
        self,
        name: str,
        args: Sequence[Any] | None = None,
        kwargs: dict[str, Any] | None = None,
        *,
        timeout_s: float | None = None,
        retries: int = 0,
    ) -> AsyncIterator[Any]:
        async for kind, value in self.events(name, args, kwargs, timeout_s=timeout_s, retries=retries):
            if kind == "item":
                yield value

    async def events(
        self,
        name: str,
        args: Sequence[Any] | None = None,
        kwargs: dict[str, Any] | None = None,
        *,
        timeout_s: float | None = None,
        retries: int = 0,
    ) -> AsyncIterator[tuple[str, Any]]:
        fields = core.execute_fields(name, args, kwargs, timeout_s, retries)
        request_id = await self.send("execute", **fields)
        events = core.Events()
        try:
            async for reply in self.replies(request_id, core.reply_wait(self.timeout, timeout_s)):
                yield events.event(reply)
        finally:
            if not events.ended:  # left early: cancelled as Client.events says
                self.cancel_nowait([request_id], terminate=events.streamed)

    # -- many calls ----------------------------------------------------------------------------

    async def execute_many(
        self,
        name: str,
        calls: Iterable[core.Call],
        *,
        window: int = DEFAULT_WINDOW,
        chunksize: int = 1,
        timeout_s: float | None = None,
        retries: int = 0,
    ) -> AsyncIterator[core.Outcome]:
        async for index, ok, value in self._outcomes(name, calls, window, chunksize, timeout_s, retries):
            yield core.Outcome(index, value, None) if ok else core.Outcome(index, None, value)

    async def imap_unordered(
        self,
        name: str,
        iterable: Iterable[Any],
        *,
        window: int = DEFAULT_WINDOW,
        chunksize: int = 1,
        timeout_s: float | None = None,
        retries: int = 0,
    ) -> AsyncIterator[Any]:
        calls = core.single_argument_calls(iterable)
        async for _, ok, value in self._outcomes(name, calls, window, chunksize, timeout_s, retries):
            if not ok:
                raise value
            yield value

    async def map(
        self,
        name: str,
        iterable: Iterable[Any],
        *,
        window: int = DEFAULT_WINDOW,
        chunksize: int | None = None,
        timeout_s: float | None = None,
        retries: int = 0,
    ) -> list[Any]:
        results: dict[int, Any] = {}
        chunksize = core.auto_chunksize(iterable, window) if chunksize is None else chunksize
        calls = core.single_argument_calls(iterable)
        async for index, ok, value in self._outcomes(name, calls, window, chunksize, timeout_s, retries):
            if not ok:
                raise value
            results[index] = value
        return [results[i] for i in range(len(results))]

    async def _outcomes(
        self,
        name: str,
        calls: Iterable[core.Call],
        window: int,
        chunksize: int,
        timeout_s: float | None,
        retries: int,
    ) -> AsyncIterator[tuple[int, bool, Any]]:
        self._start()
        batch = core.Batch(
            self._core, name, calls, window=window, chunksize=chunksize, timeout_s=timeout_s, retries=retries
        )
        wait = core.reply_wait(self.timeout, timeout_s)
        try:
            while not batch.done:
                while (request := batch.next_request()) is not None:
                    request_id, frames = request
                    try:
                        await self._check_size(frames)
                    except errors.MessageTooLarge as exc:
                        batch.refused(request_id, exc)
                        continue
                    await self._transmit(request_id, frames)
                if batch.waiting:
                    deadline = None if wait is None else time.monotonic() + wait
                    await self._wait(batch.inbox, deadline, wait)
                for outcome in batch.take():
                    yield outcome
        finally:
            self.cancel_nowait(batch.close())  # left early: see Client._outcomes
