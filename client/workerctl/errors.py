"""Typed exceptions: one class per protocol error code, plus the client-side failures.

`exit_code` on each class is what `workerctl` exits with, so the CLI and library agree on what
a failure means (docs/operations.md §11 lists the numbers).
"""

from __future__ import annotations

import builtins
import functools
from typing import Any

from . import protocol

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 69
EXIT_CANTCREAT = 73  # sysexits.h EX_CANTCREAT: an output file cannot be created
EXIT_TIMEOUT = 75
EXIT_PROTOCOL = 76
EXIT_DENIED = 77


class WorkerdError(Exception):
    """Base of every error the client raises."""

    code = protocol.INTERNAL
    exit_code = EXIT_FAILED

    def __init__(self, message: str, details: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.details = details or {}


# Client-side failures: the daemon never sent these codes.
class DaemonUnreachable(WorkerdError):
    code = "UNREACHABLE"
    exit_code = EXIT_UNREACHABLE


class ConnectionLost(DaemonUnreachable):
    """The connection dropped while the request was in flight: its reply will never come.

    The request may or may not have run. The client reconnects by itself; send again."""

    code = "CONNECTION_LOST"


class ConnectionDenied(WorkerdError):
    code = "PERMISSION_DENIED"
    exit_code = EXIT_DENIED


class UntrustedSocket(ConnectionDenied):
    """The socket path passes through a directory someone else could change: not used."""

    code = "UNTRUSTED_SOCKET"


class UsageError(WorkerdError):
    """The command line or the arguments cannot work (e.g. a socket path too long)."""

    code = "USAGE"
    exit_code = EXIT_USAGE


class OutputUnwritable(WorkerdError):
    """An output file (`run --batch --output`) cannot be created or opened for appending."""

    code = "CANNOT_CREATE"
    exit_code = EXIT_CANTCREAT


class RequestTimeout(WorkerdError):
    """No terminal reply within the client's timeout."""

    code = "CLIENT_TIMEOUT"
    exit_code = EXIT_TIMEOUT


class ProtocolMismatch(WorkerdError):
    code = "PROTOCOL_MISMATCH"
    exit_code = EXIT_PROTOCOL


# Errors the daemon reports, by protocol code.
class BadRequest(WorkerdError):
    code = protocol.BAD_REQUEST
    exit_code = EXIT_USAGE


class MessageTooLarge(BadRequest):
    """Refused before sending: over the daemon's daemon.max_message_mb (it would drop it)."""


class UnsupportedVersion(WorkerdError):
    code = protocol.UNSUPPORTED_VERSION
    exit_code = EXIT_PROTOCOL


class UnknownCommand(WorkerdError):
    code = protocol.UNKNOWN_COMMAND
    exit_code = EXIT_PROTOCOL


class UnknownTask(WorkerdError):
    code = protocol.UNKNOWN_TASK


class Denied(WorkerdError):
    code = protocol.DENIED
    exit_code = EXIT_DENIED


class Busy(WorkerdError):
    code = protocol.BUSY


class TaskTimeout(WorkerdError):
    code = protocol.TIMEOUT
    exit_code = EXIT_TIMEOUT


class WorkerLost(WorkerdError):
    code = protocol.WORKER_LOST


class TaskError(WorkerdError):
    """The task raised (or its result could not be sent). Like the task's own exception:
    `str(e)` and `e.args` are the original's (when its arguments were plain values: else its
    str alone); `type` names its class, `traceback` is the worker's, and both show in repr.
    `message` is the protocol's one line, "ExcType: text"."""

    code = protocol.TASK_ERROR

    def __init__(self, message: str, details: dict[str, Any] | None = None) -> None:
        super().__init__(message, details)
        original = self.details.get("message")
        args = self.details.get("args")
        if isinstance(args, list):
            self.args = tuple(args)
        elif isinstance(original, str):
            self.args = (original,)

    @property
    def type(self) -> str | None:
        """The class name of the exception the task raised (details.type)."""
        name = self.details.get("type")
        return name if isinstance(name, str) else None

    @property
    def traceback(self) -> str:
        """The task's traceback as the worker formatted it ("" if none came)."""
        text = self.details.get("traceback")
        return text if isinstance(text, str) else ""

    def __str__(self) -> str:
        original = self.details.get("message")
        return original if isinstance(original, str) else self.message

    def __repr__(self) -> str:
        args = "".join(f"{arg!r}, " for arg in self.args)
        return f"{type(self).__name__}({args}type={self.type!r}, traceback={self.traceback!r})"

    def __reduce__(self) -> tuple[Any, ...]:  # TaskError[T] is made at run time: rebuild by code
        return error_from_reply, ({"code": self.code, "message": self.message, "details": self.details},)


class OutOfMemory(WorkerdError):
    code = protocol.OUT_OF_MEMORY


class ShuttingDown(WorkerdError):
    code = protocol.SHUTTING_DOWN


class InternalError(WorkerdError):
    code = protocol.INTERNAL


class Cancelled(WorkerdError):
    """The request was cancelled (a `cancel` of this connection) before it ran, or was running
    and its worker was killed for it (`terminate`)."""

    code = protocol.CANCELLED


class RemoteTraceback(Exception):
    """The task's traceback, as the worker formatted it: the `__cause__` of its TaskError, so an
    uncaught one prints where the task failed (concurrent.futures.ProcessPoolExecutor's way)."""

    def __init__(self, traceback: str) -> None:
        super().__init__(traceback)
        self.traceback = traceback

    def __str__(self) -> str:
        return self.traceback


class BuiltinTaskError(TaskError):
    """Base of the TaskError classes that are also the task's built-in exception type, e.g.
    `TaskError[ValueError]`: a ValueError in the task is `except ValueError` in the caller."""

    __str__ = TaskError.__str__  # not the built-in's (OSError's reads errno and strerror)


@functools.cache
def task_error_class(type_name: str) -> type[TaskError]:
    """TaskError, or a class deriving from it and from the built-in exception named `type_name`
    (the nearest base of it that accepts a message, for the few that do not)."""
    builtin = getattr(builtins, type_name, None)
    if not (isinstance(builtin, type) and issubclass(builtin, Exception)):
        return TaskError
    for base in builtin.__mro__:
        if base is Exception:
            break
        cls = type(f"TaskError[{base.__name__}]", (BuiltinTaskError, base), {"__module__": __name__})
        try:
            cls("probe", {})
        except TypeError:  # UnicodeDecodeError and kin take five arguments
            continue
        return cls
    return TaskError


_BY_CODE: dict[str, type[WorkerdError]] = {
    cls.code: cls
    for cls in (
        BadRequest,
        UnsupportedVersion,
        UnknownCommand,
        UnknownTask,
        Denied,
        Busy,
        TaskTimeout,
        WorkerLost,
        TaskError,
        OutOfMemory,
        ShuttingDown,
        InternalError,
        Cancelled,
    )
}
# Made on the client side and delivered like a daemon's error, so one path handles both.
_BY_CODE[ConnectionLost.code] = ConnectionLost
_BY_CODE[ProtocolMismatch.code] = ProtocolMismatch


def error_from_reply(error: dict[str, Any]) -> WorkerdError:
    """The exception for an error body; an unknown code (a newer daemon) stays a WorkerdError.

    A TASK_ERROR whose task raised a built-in exception is also an instance of that type, with
    the worker's traceback as its cause."""
    code = str(error.get("code", protocol.INTERNAL))
    details = error.get("details") or {}
    cls = _BY_CODE.get(code)
    if cls is TaskError and isinstance(details.get("type"), str):
        cls = task_error_class(details["type"])
    exc = (cls or WorkerdError)(str(error.get("message", "")), details)
    if cls is None:
        exc.code = code
    traceback = details.get("traceback")
    if isinstance(exc, TaskError) and isinstance(traceback, str) and traceback:
        exc.__cause__ = RemoteTraceback(traceback)
    return exc
