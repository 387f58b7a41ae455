"""Wire protocol v1: pure encode/decode functions shared by the client and the daemon.

Every message on the control socket is a ZeroMQ multipart message::

    client DEALER                    daemon ROUTER sees
    +------------------+             +------------------+
    | b""              |  delimiter  | <routing id>     |  added by ROUTER
    +------------------+             +------------------+
    | msgpack(body)    |  one map    | b""              |
    +------------------+             +------------------+
    | raw frame 0 ...  |  optional   | msgpack(body)    |
    +------------------+             +------------------+

Request  body: {"v": 1, "id": <int|str>, "cmd": <str>, ...command fields}
Reply    body: {"v": 1, "id": <same>, "ok": true, "result": ...}
Error    body: {"v": 1, "id": <same|null>, "ok": false,
                "error": {"code": <str>, "message": <str>, "details": {...}}}
Stream   body: {"v": 1, "id": <same>, "stream": "item", "seq": <int>, "item": ...}
               (zero or more, before the terminal reply or error of the same id)

Nothing here touches a socket: the functions take and return bytes and dicts, so the daemon, the
sync client and the async client all use the one implementation. docs/protocol.md is the full
specification.
"""

from __future__ import annotations

from typing import Any

import msgpack

VERSION = 1
SUPPORTED_VERSIONS = (1,)

# Error codes (docs/protocol.md lists what each means and which details it carries).
BAD_REQUEST = "BAD_REQUEST"
UNSUPPORTED_VERSION = "UNSUPPORTED_VERSION"
UNKNOWN_COMMAND = "UNKNOWN_COMMAND"
UNKNOWN_TASK = "UNKNOWN_TASK"
DENIED = "DENIED"
BUSY = "BUSY"
TIMEOUT = "TIMEOUT"
WORKER_LOST = "WORKER_LOST"
TASK_ERROR = "TASK_ERROR"
OUT_OF_MEMORY = "OUT_OF_MEMORY"
SHUTTING_DOWN = "SHUTTING_DOWN"
INTERNAL = "INTERNAL"
ERROR_CODES = (
    BAD_REQUEST,
    UNSUPPORTED_VERSION,
    UNKNOWN_COMMAND,
    UNKNOWN_TASK,
    DENIED,
    BUSY,
    TIMEOUT,
    WORKER_LOST,
    TASK_ERROR,
    OUT_OF_MEMORY,
    SHUTTING_DOWN,
    INTERNAL,
)

# A request id is echoed back verbatim; bound it so a client cannot make us echo megabytes.
MAX_ID_LENGTH = 256


class ProtocolError(Exception):
    """A message that does not follow the protocol.

    `code` is the error code to answer with; `request_id` is the id when it could be read, so the
    error reply can still be matched by the client.
    """

    def __init__(self, code: str, message: str, request_id: int | str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.request_id = request_id


def pack(obj: Any) -> bytes:
    """Serialise one body. `use_bin_type` keeps bytes and str apart on the wire."""
    return msgpack.packb(obj, use_bin_type=True)  # type: ignore[no-any-return]


def unpack(data: bytes) -> Any:
    """Deserialise one body without trusting it.

    msgpack bounds every declared length by the size of the buffer itself, so a tiny message
    cannot make us allocate gigabytes; map keys must be str or bytes so a hostile key cannot be
    an unhashable or surprising type. Any failure is a BAD_REQUEST, never a crash.
    """
    try:
        return msgpack.unpackb(data, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises ValueError, TypeError, StackError, ExtraData...
        raise ProtocolError(BAD_REQUEST, f"body is not valid msgpack: {exc}") from None


def is_valid_id(value: object) -> bool:
    # bool is an int subclass; True as an id is almost certainly a client bug.
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return True
    return isinstance(value, str) and len(value) <= MAX_ID_LENGTH


def encode_request(request_id: int | str, cmd: str, **fields: Any) -> bytes:
    return pack({"v": VERSION, "id": request_id, "cmd": cmd, **fields})


def decode_request(data: bytes) -> dict[str, Any]:
    """Decode and check the envelope of a request; command fields are checked by its handler."""
    body = unpack(data)
    if not isinstance(body, dict):
        raise ProtocolError(BAD_REQUEST, f"request must be a map, got {type(body).__name__}")
    request_id = body.get("id")
    if not is_valid_id(request_id):
        raise ProtocolError(
            BAD_REQUEST, f"'id' must be an integer or a string of at most {MAX_ID_LENGTH} characters"
        )
    version = body.get("v")
    if isinstance(version, bool) or not isinstance(version, int):
        raise ProtocolError(BAD_REQUEST, "'v' must be an integer", request_id)
    if version not in SUPPORTED_VERSIONS:
        raise ProtocolError(
            UNSUPPORTED_VERSION,
            f"protocol version {version} is not supported (supported: {list(SUPPORTED_VERSIONS)})",
            request_id,
        )
    if not isinstance(body.get("cmd"), str):
        raise ProtocolError(BAD_REQUEST, "'cmd' must be a string", request_id)
    return body


def encode_result(request_id: int | str | None, result: Any) -> bytes:
    return pack({"v": VERSION, "id": request_id, "ok": True, "result": result})


def encode_error(
    request_id: int | str | None,
    code: str,
    message: str,
    details: dict[str, Any] | None = None,
) -> bytes:
    error = {"code": code, "message": message, "details": details or {}}
    return pack({"v": VERSION, "id": request_id, "ok": False, "error": error})


def encode_item(request_id: int | str | None, seq: int, item: Any) -> bytes:
    return pack({"v": VERSION, "id": request_id, "stream": "item", "seq": seq, "item": item})


def decode_reply(data: bytes) -> dict[str, Any]:
    """Decode a reply, error or stream item, checking the fields a client relies on."""
    try:
        body = unpack(data)
    except ProtocolError as exc:
        raise ProtocolError(INTERNAL, f"reply is not valid msgpack: {exc.message}") from None
    if not isinstance(body, dict) or body.get("v") != VERSION:
        raise ProtocolError(INTERNAL, f"reply is not a protocol v{VERSION} message")
    if "stream" in body:
        if not isinstance(body.get("seq"), int):
            raise ProtocolError(INTERNAL, "stream item without an integer 'seq'")
        return body
    ok = body.get("ok")
    if ok is True:
        if "result" not in body:
            raise ProtocolError(INTERNAL, "reply with ok=true has no 'result'")
        return body
    error = body.get("error")
    if (
        ok is not False
        or not isinstance(error, dict)
        or not isinstance(error.get("code"), str)
        or not isinstance(error.get("message"), str)
    ):
        raise ProtocolError(INTERNAL, "reply is neither a result nor a well-formed error")
    if not isinstance(error.get("details"), dict):
        error["details"] = {}
    return body


def is_terminal(reply: dict[str, Any]) -> bool:
    """True for the one reply that ends a request; False for a stream item."""
    return "stream" not in reply
