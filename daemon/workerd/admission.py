"""The checks an execute request passes before it is accepted as a job (lifecycle.Job).

Runs in: both: the master checks the envelope; a CPU worker the contents (tasks.py).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from workerctl import protocol

if TYPE_CHECKING:
    import zmq

# The bounds a client checks too live in workerctl.protocol: one number for both sides.
MAX_RETRIES, MAX_CALLS, MAX_CANCEL_IDS = protocol.MAX_RETRIES, protocol.MAX_CALLS, protocol.MAX_CANCEL_IDS
MAX_RAW_FRAMES = 1024
PRIORITY_MIN, PRIORITY_MAX = protocol.PRIORITY_MIN, protocol.PRIORITY_MAX


class RequestRejected(Exception):
    """An execute request that fails its checks; answered at once with `code`."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def check_raw_frames(raw: list[zmq.Frame], max_bytes: int) -> None:
    """Bound the raw frames of a request: their count, and their total size with the body.

    libzmq's ZMQ_MAXMSGSIZE bounds each frame; this bounds the whole message."""
    if len(raw) > MAX_RAW_FRAMES:
        raise RequestRejected(protocol.BAD_REQUEST, f"at most {MAX_RAW_FRAMES} raw frames per request")
    total = sum(len(frame) for frame in raw)
    if total > max_bytes:
        raise RequestRejected(
            protocol.BAD_REQUEST, f"raw frames total {total} bytes, over the {max_bytes} byte message limit"
        )


def check_execute(request: dict[str, Any], default_timeout: float) -> tuple[str, float, int]:
    """Validate execute's envelope; returns (name, timeout_s, retries) or raises RequestRejected.

    The master sees args, kwargs and calls as protocol.Bulk (their kind and count, undecoded):
    their contents are checked by the worker that decodes them (check_contents)."""
    name = request.get("name")
    if not isinstance(name, str) or not name:
        raise RequestRejected(protocol.BAD_REQUEST, "'name' must be a non-empty string")
    if "calls" in request:
        check_calls(request, name)
    else:
        check_arguments(request.get("args", EMPTY_ARRAY), request.get("kwargs", EMPTY_MAP), "")
    timeout = request.get("timeout_s", default_timeout)
    if timeout is None:
        timeout = default_timeout
    if isinstance(timeout, bool) or not isinstance(timeout, int | float) or not timeout > 0:
        raise RequestRejected(protocol.BAD_REQUEST, "'timeout_s' must be a positive number")
    if not math.isfinite(timeout):
        raise RequestRejected(protocol.BAD_REQUEST, "'timeout_s' must be finite")
    retries = request.get("retries", 0)
    if isinstance(retries, bool) or not isinstance(retries, int) or not 0 <= retries <= MAX_RETRIES:
        raise RequestRejected(protocol.BAD_REQUEST, f"'retries' must be an integer from 0 to {MAX_RETRIES}")
    return name, float(timeout), retries


def check_die_with_client(request: dict[str, Any]) -> bool:
    """execute's `die_with_client` (docs/protocol.md, execute): true asks that the job be killed
    if its client's connection goes while it runs (what has not started is dropped anyway)."""
    value = request.get("die_with_client", False)
    if value is not True and value is not False:
        raise RequestRejected(protocol.BAD_REQUEST, "'die_with_client' must be true or false")
    return value


def check_priority(request: dict[str, Any]) -> int:
    """execute's `priority` (docs/protocol.md, execute): orders the client's own jobs; between
    clients it counts up to the client's [fairness] max_priority (core/queue.py)."""
    value = request.get("priority", 0)
    if isinstance(value, bool) or not isinstance(value, int) or not PRIORITY_MIN <= value <= PRIORITY_MAX:
        raise RequestRejected(
            protocol.BAD_REQUEST, f"'priority' must be an integer from {PRIORITY_MIN} to {PRIORITY_MAX}"
        )
    return value


EMPTY_ARRAY, EMPTY_MAP = protocol.Bulk("array", 0), protocol.Bulk("map", 0)


def kind(value: Any) -> str:
    if isinstance(value, protocol.Bulk):
        return value.kind
    return "array" if isinstance(value, list) else "map" if isinstance(value, dict) else "other"


def check_arguments(args: Any, kwargs: Any, where: str) -> None:
    """args an array and kwargs a map: decoded values (in a worker) or Bulk (in the master),
    whose map keys a worker checks once it has decoded them."""
    if type(args) is list and type(kwargs) is dict and all(type(key) is str for key in kwargs):
        return  # decoded, and good: exact types (msgpack makes a list of an array, a dict of a map)
    if kind(args) != "array":
        raise RequestRejected(protocol.BAD_REQUEST, f"'args'{where} must be an array")
    if kind(kwargs) != "map" or (isinstance(kwargs, dict) and not all(isinstance(k, str) for k in kwargs)):
        raise RequestRejected(protocol.BAD_REQUEST, f"'kwargs'{where} must be a map with string keys")


def check_calls(request: dict[str, Any], name: str) -> None:
    """A chunked execute: `calls` = [[args, kwargs], ...] in place of args and kwargs."""
    if "args" in request or "kwargs" in request:
        raise RequestRejected(
            protocol.BAD_REQUEST, "'calls' replaces 'args' and 'kwargs': send one or the other"
        )
    if ":" not in name:
        raise RequestRejected(
            protocol.BAD_REQUEST, "'calls' is for CPU tasks (module:function), not pipelines"
        )
    calls = request["calls"]
    count = calls.count if isinstance(calls, protocol.Bulk) else len(calls) if isinstance(calls, list) else 0
    if kind(calls) != "array" or not 1 <= count <= MAX_CALLS:
        raise RequestRejected(protocol.BAD_REQUEST, f"'calls' must be an array of 1 to {MAX_CALLS} calls")


def check_contents(request: dict[str, Any]) -> None:
    """In a worker, on the decoded request: what the master could not see without decoding."""
    if "calls" not in request:
        check_arguments(request.get("args", []), request.get("kwargs", {}), "")
        return
    check_calls(request, str(request.get("name", "")))
    # Every call of a chunk: keep the loop tight (exact type checks, no call per entry); msgpack
    # decodes arrays as list and maps as dict, nothing else.
    for index, call in enumerate(request["calls"]):
        if (
            type(call) is not list
            or len(call) != 2
            or type(call[0]) is not list
            or type(call[1]) is not dict
            or (call[1] and not all(type(key) is str for key in call[1]))
        ):
            raise RequestRejected(
                protocol.BAD_REQUEST,
                f"'calls'[{index}] must be [args, kwargs]: an array and a map with string keys",
            )
