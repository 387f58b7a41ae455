"""Requests accepted for execution, and the checks that come before acceptance."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from workerctl import protocol

MAX_RETRIES = 10
MAX_RAW_FRAMES = 1024


class RequestRejected(Exception):
    """An execute request that fails its checks; answered at once with `code`."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclasses.dataclass(eq=False)
class Job:
    """One execute request from acceptance to its single terminal reply."""

    id: int
    client: bytes  # the ROUTER routing id of the requester
    request_id: Any
    body: bytes  # the request as the client sent it; the worker decodes it again
    raw: list[bytes]  # raw buffer frames that follow the body, forwarded untouched
    name: str
    timeout_s: float
    retries: int
    accepted_at: float
    started_at: float = 0.0
    deadline: float = math.inf
    module: str = ""  # a CPU task's module; "" for a pipeline
    attempts: int = 0
    items_sent: int = 0
    answered: bool = False


def check_raw_frames(raw: list[bytes], max_bytes: int) -> None:
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
    """Validate execute's fields; returns (name, timeout_s, retries) or raises RequestRejected."""
    name = request.get("name")
    if not isinstance(name, str) or not name:
        raise RequestRejected(protocol.BAD_REQUEST, "'name' must be a non-empty string")
    if not isinstance(request.get("args", []), list):
        raise RequestRejected(protocol.BAD_REQUEST, "'args' must be an array")
    kwargs = request.get("kwargs", {})
    if not isinstance(kwargs, dict) or not all(isinstance(k, str) for k in kwargs):
        raise RequestRejected(protocol.BAD_REQUEST, "'kwargs' must be a map with string keys")
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
