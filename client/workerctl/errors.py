"""Typed exceptions: one class per protocol error code, plus the client-side failures.

`exit_code` on each class is what `workerctl` exits with, so the CLI and library agree on what
a failure means (DESIGN.md pins the numbers).
"""

from __future__ import annotations

from typing import Any

from . import protocol

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 69
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
    code = protocol.TASK_ERROR


class OutOfMemory(WorkerdError):
    code = protocol.OUT_OF_MEMORY


class ShuttingDown(WorkerdError):
    code = protocol.SHUTTING_DOWN


class InternalError(WorkerdError):
    code = protocol.INTERNAL


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
    )
}
# Made on the client side and delivered like a daemon's error, so one path handles both.
_BY_CODE[ConnectionLost.code] = ConnectionLost
_BY_CODE[ProtocolMismatch.code] = ProtocolMismatch


def error_from_reply(error: dict[str, Any]) -> WorkerdError:
    """The exception for an error body; an unknown code (a newer daemon) stays a WorkerdError."""
    code = str(error.get("code", protocol.INTERNAL))
    cls = _BY_CODE.get(code)
    exc = (cls or WorkerdError)(str(error.get("message", "")), error.get("details") or {})
    if cls is None:
        exc.code = code
    return exc
