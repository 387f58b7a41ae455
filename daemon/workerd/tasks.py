"""Task names and task runs, inside a worker.

Runs in: a CPU worker (runs tasks) and the master (check_allowed, names only).

A task is "package.module:function" where the module is listed in `[tasks] modules` (exact
match: listing a package does not allow its submodules) and the function is one the module
exports as a task (`task_function`). The master checks what the name alone tells (its syntax,
the module, no `_` prefix) before a request is queued, without importing task code; the worker
checks it all again, and the object itself, because a worker must never import a module or run
an attribute on the say-so of the wire.
"""

from __future__ import annotations

import functools
import importlib
import re
import traceback
from collections.abc import Callable, Collection, Iterator
from types import FunctionType, GeneratorType, ModuleType
from typing import Any

from workerctl import protocol
from workerd import admission, messages

FUNCTION_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# A module may name its tasks itself; then exactly those run (see task_function).
EXPORTS = "__workerd_tasks__"


class TaskLookupError(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def split_name(name: str) -> tuple[str, str]:
    module, sep, function = name.partition(":")
    if not sep or not module or not FUNCTION_NAME.match(function):
        raise TaskLookupError(
            protocol.UNKNOWN_TASK, f"task name must be 'package.module:function', got {name!r}"
        )
    return module, function


def check_allowed(name: str, allowed: Collection[str]) -> tuple[str, str]:
    """The (module, function) of an allowed task name; raises TaskLookupError otherwise."""
    module, function = split_name(name)
    if module not in allowed:
        raise TaskLookupError(protocol.DENIED, f"module {module!r} is not listed in [tasks] modules")
    if function.startswith("_"):
        # Dunders included: module.__setattr__ or __getattribute__ would let a caller change or
        # read the module's state (a global other callers' tasks read) without any task of it.
        raise TaskLookupError(protocol.DENIED, f"{name!r} is private: names starting with '_' never run")
    return module, function


def task_function(module: ModuleType, name: str) -> Callable[..., Any]:
    """The task `name` of `module`, or TaskLookupError (DENIED if it exists but is no task).

    A task is a public Python function (generator functions included) whose `__module__` is the
    module itself: a name the module imports (`from os import system`), a class, a builtin, a
    callable instance or a bound method does not run. A module that lists its tasks in
    `__workerd_tasks__` (a list of names) exports exactly those instead, and may list any
    callable that is not a class (a re-exported function, an lru_cache wrapper, a Cython
    function): the list is then the one place that says what can run. Looked up in the module's
    own namespace, not with getattr, so a module-level __getattr__ cannot make names up.
    """
    namespace = vars(module)
    exports = namespace.get(EXPORTS)
    if exports is not None:
        return exported(module, exports, name)
    value = namespace.get(name)
    if value is None:
        raise TaskLookupError(protocol.UNKNOWN_TASK, f"module {module.__name__!r} has no attribute {name!r}")
    origin = getattr(value, "__module__", None)
    if isinstance(origin, str) and origin != module.__name__:
        raise TaskLookupError(
            protocol.DENIED,
            f"{module.__name__}:{name} is imported from {origin!r}, not defined in "
            f"{module.__name__!r} (list it in {EXPORTS} to export it)",
        )
    if not isinstance(value, FunctionType) or origin != module.__name__:
        raise TaskLookupError(
            protocol.DENIED, f"{module.__name__}:{name} is a {type(value).__name__}, not a function"
        )
    return value


def exported(module: ModuleType, exports: Any, name: str) -> Callable[..., Any]:
    if not isinstance(exports, (list, tuple)) or not all(isinstance(n, str) for n in exports):
        raise TaskLookupError(
            protocol.UNKNOWN_TASK, f"{module.__name__}.{EXPORTS} must be a list of function names"
        )
    if name not in exports:
        raise TaskLookupError(
            protocol.DENIED, f"{module.__name__}:{name} is not listed in {module.__name__}.{EXPORTS}"
        )
    value = vars(module).get(name)
    if not callable(value) or isinstance(value, type):
        raise TaskLookupError(
            protocol.UNKNOWN_TASK, f"{module.__name__}.{EXPORTS} lists {name!r}, which is not a function"
        )
    return value  # type: ignore[no-any-return]


# A worker's modules never change during its life (new code means new workers), so a resolved
# name stays good; only successes are cached, and only names of allowed modules' tasks.
@functools.lru_cache(maxsize=1024)
def resolve(name: str, allowed: frozenset[str]) -> Callable[..., Any]:
    module_name, function_name = check_allowed(name, allowed)
    try:
        # Already imported by the zygote before the fork, so this is a dict lookup.
        module = importlib.import_module(module_name)
    except Exception as exc:
        raise TaskLookupError(
            protocol.UNKNOWN_TASK, f"module {module_name!r} failed to import: {exc!r}"
        ) from None
    return task_function(module, function_name)


def error_details(exc: BaseException) -> dict[str, Any]:
    details: dict[str, Any] = {
        "type": type(exc).__qualname__,
        "message": str(exc),
        "traceback": "".join(traceback.format_exception(exc)),
    }
    args = plain_args(exc)
    if args is not None:
        details["args"] = args
    return details


PLAIN = (type(None), bool, int, float, str, bytes)
MAX_ARGS_BYTES = 64 * 1024


def plain_args(exc: BaseException) -> list[Any] | None:
    """The exception's args if each is a plain value (None, bool, number, str, bytes) and they
    are small: what a client rebuilds `args` from (details.args). None otherwise."""
    args = exc.args
    if not all(type(arg) in PLAIN for arg in args):
        return None
    try:
        size = len(protocol.pack(list(args)))
    except (OverflowError, ValueError, TypeError):  # an int out of msgpack's range, a bad str
        return None
    return list(args) if size <= MAX_ARGS_BYTES else None


ITEM, OK, ERROR = messages.ITEM, messages.OK, messages.ERROR


def bounded(kind: bytes, frame: bytes, request_id: Any, limit: int) -> tuple[bytes, bytes]:
    """The frame itself, or a TASK_ERROR in its place if it exceeds the message size limit."""
    if len(frame) <= limit:
        return kind, frame
    return ERROR, too_large(request_id, len(frame), limit)


def too_large(request_id: Any, size: int, limit: int) -> bytes:
    return protocol.encode_error(
        request_id,
        protocol.TASK_ERROR,
        f"result is {size} bytes, over the {limit} byte message limit",
        {"type": "ResultTooLarge", "bytes": size, "limit": limit},
    )


Frames = list[protocol.Buffer]


def bounded_frames(kind: bytes, frames: Frames, request_id: Any, limit: int) -> tuple[bytes, Frames]:
    """`bounded` for a reply body and its raw frames: their total is what the limit bounds."""
    size = sum(map(protocol.frame_size, frames))
    if size <= limit:
        return kind, frames
    return ERROR, [too_large(request_id, size, limit)]


def decode(body: bytes, raw: list[bytes]) -> tuple[dict[str, Any] | None, bytes]:
    """The request with its raw-frame references resolved and its contents checked, or (None,
    the error reply).

    The master checked the envelope only (admission.check_execute), so a failure here is in the
    arguments (kwargs keys, the shape of a chunk's calls), a bad raw-frame reference, or an array
    where numpy is missing: the client's error, answered BAD_REQUEST, never fatal."""
    try:
        request = protocol.unpack(body, raw)
        admission.check_contents(request)
        return request, b""
    except protocol.ProtocolError as exc:
        code, message = exc.code, exc.message
    except admission.RequestRejected as exc:
        code, message = exc.code, exc.message
    return None, protocol.encode_error(protocol.unpack_envelope(body).get("id"), code, message)


def run(body: dict[str, Any], allowed: frozenset[str], limit: int) -> Iterator[tuple[bytes, Frames]]:
    """Run one execute request; yield (kind, [reply body, *raw frames]), kind one of ITEM, OK, ERROR.

    A generator task yields one stream item per value, then a terminal reply whose result is
    {"items": count}. A chunked request (`calls`) runs each call in order and ends in one reply
    (see run_calls). Every failure becomes a typed error reply: the worker never dies of a task.
    An oversized item ends the stream with that error. With `tuples: true` in the request,
    tuples in results and items travel as ext 3 (protocol.EXT_TUPLE), else as arrays.
    """
    request_id = body.get("id")
    tuples = body.get("tuples") is True
    try:
        function = resolve(body["name"], allowed)
        if "calls" in body:
            result = run_calls(function, body["calls"], body.get("compact") is True)
            frames = protocol.encode_result_frames(request_id, result, tuples)
            yield bounded_frames(OK, frames, request_id, limit)
            return
        value = function(*body.get("args", ()), **body.get("kwargs", {}))
        if isinstance(value, GeneratorType):
            count = 0
            for count, item in enumerate(value, 1):
                kind, frames = bounded_frames(
                    ITEM, protocol.encode_item_frames(request_id, count, item, tuples), request_id, limit
                )
                yield kind, frames
                if kind is ERROR:
                    value.close()
                    return
            value = {"items": count}
        yield bounded_frames(OK, protocol.encode_result_frames(request_id, value, tuples), request_id, limit)
    except TaskLookupError as exc:
        yield ERROR, [protocol.encode_error(request_id, exc.code, exc.message)]
    except Exception as exc:  # the task's own failure, reported, never fatal
        yield ERROR, [task_error(request_id, exc)]


def task_error(request_id: Any, exc: Exception) -> bytes:
    return protocol.encode_error(request_id, *task_failure(exc))


def task_failure(exc: Exception) -> tuple[str, str, dict[str, Any]]:
    """A task's exception as an error reply's (code, message, details)."""
    return protocol.TASK_ERROR, f"{type(exc).__name__}: {exc}", error_details(exc)


def run_calls(function: Callable[..., Any], calls: list[list[Any]], compact: bool) -> dict[str, Any]:
    """Run each [args, kwargs] of a chunk in order; the outcome of every call, in call order.

    A call's failure is its own outcome and the chunk goes on; a generator's items are collected
    into a list (a chunk has one terminal reply and no stream). The timeout and retries of the
    request apply to the chunk as a whole. Results are not promoted to raw frames one by one
    (this loop runs once per call; chunks are for many small calls): numpy arrays and Raw
    values still travel raw.

    compact: {"values": [value or None], "errors": [[index, error], ...]}, the values as they
    are (no map per call to build here, to encode, to decode and to take apart in the client);
    else {"results": [{"ok": true, "result"} | {"ok": false, "error"}]}.
    """
    values: list[Any] = []
    failed: list[list[Any]] = []
    append = values.append
    for args, kwargs in calls:
        try:
            value = function(*args, **kwargs)
            if isinstance(value, GeneratorType):
                value = list(value)
            append(value)
        except Exception as exc:
            failed.append([len(values), call_error(exc)])
            append(None)
    if compact:
        return {"values": values, "errors": failed}
    results: list[dict[str, Any]] = [{"ok": True, "result": value} for value in values]
    for index, error in failed:
        results[index] = {"ok": False, "error": error}
    return {"results": results}


def call_error(exc: Exception) -> dict[str, Any]:
    return {
        "code": protocol.TASK_ERROR,
        "message": f"{type(exc).__name__}: {exc}",
        "details": error_details(exc),
    }
