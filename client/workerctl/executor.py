"""workerctl.Executor: a concurrent.futures.Executor whose calls run in workerd's warm workers.

    from workerctl import Executor     # was: from concurrent.futures import ProcessPoolExecutor as Executor

    with Executor() as pool:           # the same submit, map, shutdown
        squares = list(pool.map(myapp.tasks.square, range(1000), chunksize=50))

A call is named, never pickled: `submit(fn, ...)` takes a "module:function" name, or a function
defined at the top level of a module the daemon can import (`fn.__module__`:`fn.__qualname__`);
the module must be listed in the daemon's `[tasks] modules`. Arguments and results are msgpack.

One thread per executor, started with it, owns its one Client: it sends the calls (at most
`max_workers` at the daemon at once, the rest wait here), reads the replies and completes the
futures. Other threads talk to it through a command queue and a pipe that wakes it:

    submit / Future.cancel / shutdown  --(commands, wake pipe)-->  I/O thread  <--zmq-->  workerd
    Future.result() <------------------ set_result / set_exception ----------'

What "started" means here (running() and cancel()): a call not yet sent is pending and is
cancelled here. A call sent to the daemon may be queued there, prefetched by a worker, or running:
every call asks for the daemon's start notice (execute's `notify_start`, docs/protocol.md §6.1),
and running() is True from that notice on; cancel() of a running call returns False. Before it,
cancel() asks the daemon (`cancel`): True if the call was still queued or prefetched (it never
runs), False if it had just started (running() is True from then on) or already finished.
ProcessPoolExecutor calls a call running a little earlier, as soon as it is handed to its call
queue, before any worker has it. A future cancelled while pending is reported done at once to
concurrent.futures.wait() and as_completed() (set_running_or_notify_cancel, as theirs are).

Results are as ProcessPoolExecutor's where msgpack allows: every call asks for tuples
(execute's `tuples`), so a tuple, nested or not, comes back a tuple (and goes as one in the
arguments), not a list. A task's exception is raised as errors.TaskError, also an instance of
the task's built-in type (ValueError...), with the original's str() and args.

Done callbacks run in the I/O thread: they may submit and cancel, but must not wait for another
future of the same executor (nothing would complete it). Work still pending at interpreter exit
is finished first, as concurrent.futures does.
"""

from __future__ import annotations

import collections
import concurrent.futures
import importlib
import itertools
import os
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from . import core, errors, protocol
from .client import DEFAULT_RECONNECT_TIMEOUT, DEFAULT_WINDOW, Client

Outcome = tuple[int, bool, Any]  # (index in its chunk, ok, result or exception)

_engines: weakref.WeakSet[_Engine] = weakref.WeakSet()
_interpreter_exiting = False


def task_name(fn: Callable[..., Any] | str) -> str:
    """The name the daemon runs `fn` by; ValueError at once for a function it cannot name."""
    if isinstance(fn, str):
        return fn
    if not callable(fn):
        raise TypeError(f"submit() takes a 'module:function' name or a function, not {type(fn).__name__}")
    module, qualname = getattr(fn, "__module__", None), getattr(fn, "__qualname__", None)
    if not isinstance(module, str) or not isinstance(qualname, str):
        raise ValueError(f"{fn!r} has no module and name: pass a 'module:function' name")
    if module == "__main__":
        raise ValueError(
            f"{qualname} is defined in __main__, which workerd's workers cannot import: move it into a "
            "module listed in the daemon's [tasks] modules"
        )
    if "." in qualname or "<" in qualname:
        raise ValueError(
            f"{module}.{qualname} is not a module-level function: workerd runs functions by "
            "'module:function' name only"
        )
    try:
        found = getattr(importlib.import_module(module), qualname, None)
    except ImportError:
        found = None
    if found is not fn:
        raise ValueError(f"{module}:{qualname} does not name {fn!r} (not importable by that name)")
    return f"{module}:{qualname}"


class TaskFuture(concurrent.futures.Future[Any]):
    """A Future whose cancel() reaches the daemon (see the module's docstring)."""

    def __init__(self, engine: _Engine, fields: dict[str, Any], size: int) -> None:
        super().__init__()
        self._engine = engine
        # Dropped once the call ends (Engine.finish), so that no cycle keeps a finished future.
        self._call: _Call | None = _Call(self, fields, size)

    def cancel(self) -> bool:
        return self._engine.cancel(self)


class _Call:
    """One request of the executor: a call, or a chunk of map's calls."""

    __slots__ = ("fields", "future", "items", "request_id", "seq", "size")

    def __init__(self, future: TaskFuture, fields: dict[str, Any], size: int) -> None:
        self.future = future
        self.fields = fields
        self.size = size  # calls in it: 0 for a plain execute, else a chunk's length
        self.seq = 0
        self.request_id: int | None = None
        self.items: list[Any] | None = None  # a generator's items so far


class _Box:
    """Where the I/O thread leaves the answer to a cancel asked from another thread."""

    __slots__ = ("answer", "done")

    def __init__(self) -> None:
        self.done = threading.Event()
        self.answer = False


class _Engine:
    """The I/O thread's side: everything here but post() and cancel() runs in that thread."""

    def __init__(self, client: Client, window: int) -> None:
        self.client = client
        self.window = window
        self.lock = threading.Lock()
        self.commands: collections.deque[tuple[Any, ...]] = collections.deque()
        self.closing = False  # no new calls; the thread ends once the ones it has are done
        self.wake_read, self.wake_write = os.pipe()
        os.set_blocking(self.wake_read, False)
        os.set_blocking(self.wake_write, False)
        self.inbox = core.Inbox()
        self.waiting: dict[int, _Call] = {}  # by seq, in submission order: not sent yet
        self.flying: dict[int, _Call] = {}  # by request id: at the daemon
        self.seqs = itertools.count()
        self.thread = threading.Thread(target=self.run, name="workerctl.Executor", daemon=False)

    # -- other threads -------------------------------------------------------------------------

    def post(self, *command: Any, closing: bool = False) -> None:
        with self.lock:
            if self.closing and command[0] == "submit":
                if _interpreter_exiting:
                    raise RuntimeError("cannot schedule new futures after interpreter shutdown")
                raise RuntimeError("cannot schedule new futures after shutdown")
            self.closing = self.closing or closing
            self.commands.append(command)
            # Under the lock: the thread closes this end under it, and the number could be
            # another file's by the time we wrote.
            try:
                os.write(self.wake_write, b"\0")
            except OSError:  # full: a wake-up is pending anyway; closed (-1): the thread is gone
                pass

    def cancel(self, future: TaskFuture) -> bool:
        call = future._call
        if call is None or future.done() or not self.thread.is_alive():
            return future.cancelled()
        if threading.current_thread() is self.thread:  # a done callback of another future
            return self.cancel_now(call)
        box = _Box()
        self.post("cancel", call, box)
        while not box.done.wait(0.5):
            if not self.thread.is_alive():
                return future.cancelled()
        return box.answer

    # -- the I/O thread ------------------------------------------------------------------------

    def run(self) -> None:
        try:
            while True:
                self.take_commands()
                self.deliver()  # first: the replies read while waiting free the window
                self.send_waiting()
                if self.closing and not (self.waiting or self.flying or self.commands):
                    return
                if self.wake_read in self.client.wait_any(None, (self.wake_read,)):
                    drain(self.wake_read)
        except BaseException as exc:  # a bug, or the client broken: no future may hang on it
            self.fail_everything(exc)
            raise
        finally:
            self.client.close()
            os.close(self.wake_read)
            with self.lock:
                self.closing = True
                os.close(self.wake_write)
                self.wake_write = -1

    def take_commands(self) -> None:
        while True:
            with self.lock:
                if not self.commands:
                    return
                command = self.commands.popleft()
            if command[0] == "submit":
                call = command[1]
                call.seq = next(self.seqs)
                self.waiting[call.seq] = call
                # Sent as it comes, as far as the window allows: a shutdown or cancel later in
                # this batch finds it at the daemon, as a pool's finds a call in its call queue.
                self.send_waiting()
            elif command[0] == "cancel":
                _, call, box = command
                box.answer = self.cancel_now(call)
                box.done.set()
            elif command[0] == "shutdown" and command[1]:
                self.cancel_pending()

    def send_waiting(self) -> None:
        while self.waiting and len(self.flying) < self.window:
            call = self.waiting.pop(next(iter(self.waiting)))
            try:
                call.request_id = self.client.send_into(self.inbox, "execute", call.fields)
            except errors.WorkerdError as exc:  # not encodable, too large, the daemon gone
                self.finish(call, exc)
                continue
            self.flying[call.request_id] = call

    def deliver(self) -> None:
        queue = self.inbox.queue
        while queue:
            request_id, reply = queue.popleft()
            call = self.flying.get(request_id)
            if call is None:  # cancelled meanwhile
                continue
            if not protocol.is_terminal(reply):
                if not call.future.running():  # the start notice (or a stream's first item)
                    call.future.set_running_or_notify_cancel()
                if reply["stream"] == "item":
                    if call.items is None:
                        call.items = []
                    call.items.append(reply.get("item"))
                continue
            del self.flying[request_id]
            self.complete(call, reply)

    def complete(self, call: _Call, reply: dict[str, Any]) -> None:
        if reply.get("ok") is not True:
            self.finish(call, errors.error_from_reply(reply["error"]))
        elif call.size:
            self.finish(call, result=core.Batch.chunk_outcomes(0, call.size, reply["result"]))
        else:
            self.finish(call, result=reply["result"] if call.items is None else call.items)

    @staticmethod
    def finish(call: _Call, exc: BaseException | None = None, result: Any = None) -> None:
        """End a call's future (running its callbacks, here) and drop their link."""
        future = call.future
        future._call = None
        if exc is None:
            future.set_result(result)
        elif not (isinstance(exc, errors.Cancelled) and _Engine.drop(call)):
            future.set_exception(exc)

    @staticmethod
    def drop(call: _Call) -> bool:
        """Cancel a call's future here, its waiters told at once (wait(), as_completed());
        False if it has started."""
        future = call.future
        future._call = None
        if future.cancelled():
            return True
        if not concurrent.futures.Future.cancel(future):
            return False
        future.set_running_or_notify_cancel()  # CANCELLED_AND_NOTIFIED: what wait() waits for
        return True

    def cancel_now(self, call: _Call) -> bool:
        future = call.future
        if future.done() or future.running():
            return future.cancelled()
        if call.request_id is None:  # not sent yet: ours to cancel
            self.waiting.pop(call.seq, None)
            return self.drop(call)
        return self.cancel_at_daemon([call])[0]

    def cancel_at_daemon(self, calls: list[_Call]) -> list[bool]:
        ids = [call.request_id for call in calls if call.request_id is not None]
        try:
            result = self.client.cancel(ids)
        except errors.WorkerdError:  # a daemon without `cancel`, or the connection gone
            return [False] * len(calls)
        cancelled, running = set(result["cancelled"]), set(result["running"])
        answers = []
        for call in calls:
            if call.request_id in cancelled:
                self.flying.pop(call.request_id, None)  # its CANCELLED reply is dropped
                answers.append(self.drop(call))
            else:
                if call.request_id in running and not call.future.running():
                    call.future.set_running_or_notify_cancel()
                answers.append(False)
        return answers

    def cancel_pending(self) -> None:
        """shutdown(cancel_futures=True): every call that has not started."""
        for call in self.waiting.values():
            self.drop(call)
        self.waiting.clear()
        sent = [call for call in self.flying.values() if not call.future.running()]
        if sent:
            self.cancel_at_daemon(sent)

    def fail_everything(self, exc: BaseException) -> None:
        failure = errors.WorkerdError(f"the executor's I/O thread failed: {type(exc).__name__}: {exc}")
        for call in [*self.waiting.values(), *self.flying.values()]:
            if not call.future.done():
                self.finish(call, failure)
        self.waiting.clear()
        self.flying.clear()


class Executor(concurrent.futures.Executor):
    """concurrent.futures.Executor over one workerd connection (see the module's docstring).

    `max_workers`: how many calls this executor has at the daemon at once (default 32; the
    daemon's own pool size is its config's); the rest wait here, cancellable. `timeout_s` and
    `retries` apply to every call (execute's fields); `reconnect_timeout` and
    `max_message_bytes` are Client's."""

    def __init__(
        self,
        socket_path: str | None = None,
        *,
        max_workers: int | None = None,
        timeout_s: float | None = None,
        retries: int = 0,
        reconnect_timeout: float = DEFAULT_RECONNECT_TIMEOUT,
        max_message_bytes: int | None = None,
    ) -> None:
        if socket_path is not None and not isinstance(socket_path, str):
            raise TypeError("socket_path must be a path; pass max_workers=N by keyword")
        if max_workers is not None and max_workers <= 0:
            raise ValueError("max_workers must be greater than 0")
        self._timeout_s, self._retries = timeout_s, retries
        # Replies wait as long as the daemon takes: it bounds each run by its timeout, and a
        # lost connection fails what is in flight at once. Its calls die with it, running ones
        # too (die_with_client), as a ProcessPoolExecutor's workers do with their parent.
        client = Client(
            socket_path,
            timeout=None,
            reconnect_timeout=reconnect_timeout,
            max_message_bytes=max_message_bytes,
            die_with_client=True,
        )
        self._engine = _Engine(client, max_workers or DEFAULT_WINDOW)
        _engines.add(self._engine)
        self._engine.thread.start()
        # Dropped without shutdown(): the thread finishes what it has, then ends.
        weakref.finalize(self, _shutdown_nowait, self._engine)

    def submit(self, fn: Callable[..., Any] | str, /, *args: Any, **kwargs: Any) -> TaskFuture:
        return self._submit(
            core.execute_fields(task_name(fn), args, kwargs, self._timeout_s, self._retries), 0
        )

    def _submit(self, fields: dict[str, Any], size: int) -> TaskFuture:
        if "args" in fields:
            fields["args"] = list(fields["args"])  # with `tuples`, a tuple would travel as one
        fields.update(CALL_OPTIONS)
        future = TaskFuture(self._engine, fields, size)
        self._engine.post("submit", future._call)
        return future

    def map(
        self,
        fn: Callable[..., Any] | str,
        *iterables: Iterable[Any],
        timeout: float | None = None,
        chunksize: int = 1,
        buffersize: int | None = None,
    ) -> Iterator[Any]:
        """Executor.map: results in input order, each call's exception raised when its result
        is reached, TimeoutError past `timeout` s after this call. `chunksize` calls go in one
        request (a chunked execute). The inputs are read at once and every call submitted, as
        concurrent.futures does; with `buffersize` (Python 3.14's), only that many chunks are
        submitted ahead of the results taken, the inputs read as they go."""
        if chunksize < 1:
            raise ValueError("chunksize must be >= 1.")
        if buffersize is not None and buffersize < 1:
            raise ValueError("buffersize must be None or > 0.")
        name = task_name(fn)
        deadline = None if timeout is None else time.monotonic() + timeout
        chunks = chunked(zip(*iterables, strict=False), chunksize)
        ahead = chunks if buffersize is None else itertools.islice(chunks, buffersize)
        futures = collections.deque(self._submit_chunk(name, chunk, chunksize) for chunk in ahead)
        more = None if buffersize is None else chunks
        return self._results(futures, more, name, chunksize, deadline)

    def _submit_chunk(self, name: str, chunk: list[tuple[Any, ...]], chunksize: int) -> TaskFuture:
        if chunksize == 1:
            return self._submit(core.execute_fields(name, chunk[0], None, self._timeout_s, self._retries), 0)
        fields = core.chunk_fields(name, (), self._timeout_s, self._retries)
        fields["calls"] = [[list(args), {}] for args in chunk]  # arrays, not tuples (see _submit)
        return self._submit(fields, len(chunk))

    def _results(
        self,
        futures: collections.deque[TaskFuture],
        more: Iterator[list[tuple[Any, ...]]] | None,
        name: str,
        chunksize: int,
        deadline: float | None,
    ) -> Iterator[Any]:
        # Nothing is held once it is yielded (concurrent.futures' own care): each future leaves
        # the deque as it is reached and is never a local, and a chunk's outcomes leave their list.
        try:
            while futures:
                if more is not None:  # buffersize: one more chunk for the one taken now
                    futures.extend(self._submit_chunk(name, c, chunksize) for c in itertools.islice(more, 1))
                if chunksize == 1:
                    yield result_or_cancel(futures.popleft(), deadline)
                    continue
                outcomes = result_or_cancel(futures.popleft(), deadline)
                outcomes.reverse()
                while outcomes:
                    yield value_of(outcomes.pop())
        finally:
            for future in futures:
                future.cancel()

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        engine = self._engine
        if engine.thread.is_alive():
            try:
                engine.post("shutdown", cancel_futures, closing=True)
            except OSError:  # the thread is ending on its own
                pass
        if wait and threading.current_thread() is not engine.thread:
            engine.thread.join()


# Asked of the daemon by every call: its start notice, and tuples kept (docs/protocol.md §3, §6.1).
CALL_OPTIONS = {"notify_start": True, "tuples": True}


def chunked(calls: Iterator[tuple[Any, ...]], size: int) -> Iterator[list[tuple[Any, ...]]]:
    while chunk := list(itertools.islice(calls, size)):
        yield chunk


def result_or_cancel(future: TaskFuture, deadline: float | None) -> Any:
    try:
        return future.result(None if deadline is None else deadline - time.monotonic())
    finally:
        future.cancel()  # timed out: not wanted any more; finished: a no-op


def value_of(outcome: Outcome) -> Any:
    _, ok, value = outcome
    if not ok:
        raise value
    return value


def drain(fd: int) -> None:
    """Empty a non-blocking pipe."""
    try:
        while os.read(fd, 4096):
            pass
    except BlockingIOError:
        pass


def _shutdown_nowait(engine: _Engine) -> None:
    if engine.thread.is_alive():
        try:
            engine.post("shutdown", False, closing=True)
        except OSError:
            pass


def _python_exit() -> None:
    """At interpreter exit, before non-daemon threads are joined: every executor finishes what it
    has and stops (concurrent.futures does the same for its pools)."""
    global _interpreter_exiting
    _interpreter_exiting = True
    for engine in list(_engines):
        _shutdown_nowait(engine)


# threading._register_atexit runs before the interpreter joins non-daemon threads, which atexit
# does not (concurrent.futures.thread uses it for the same reason).
getattr(threading, "_register_atexit", lambda hook: None)(_python_exit)
