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
Started  body: {"v": 1, "id": <same>, "stream": "started", "seq": 0}
               (once, before everything else of that id, only if the execute asked: notify_start)

Raw frames: a body may refer to the frames that follow it through two msgpack extension types,
so large buffers travel as frames of their own instead of being copied into the body:

    ext 1  RAW       data = msgpack(uint i)                        -> bytes of raw frame i
    ext 2  NDARRAY   data = msgpack({"dtype": str, "shape": [int], "frame": i})
                                                                   -> numpy array over frame i
    ext 3  TUPLE     data = msgpack(array of the tuple's items)    -> tuple (results, only when
                                                                      the execute asked: tuples)

i counts from 0 = the first frame after the body. What goes raw (`raw_frames_rule`): numpy arrays
and `Raw(buffer)` wherever they sit, and bytes of at least RAW_THRESHOLD at the top level (each
positional argument, each keyword value, each result or stream item).

Nothing here touches a socket: the functions take and return bytes and dicts, so the daemon, the
sync client and the async client all use the one implementation. docs/protocol.md is the full
specification.
"""

from __future__ import annotations

import gc
import struct
import sys
from collections.abc import Sequence
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
CANCELLED = "CANCELLED"
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
    CANCELLED,
)

# A frame: bytes, or any C-contiguous buffer (a memoryview of a numpy array is sent zero-copy).
Buffer = bytes | bytearray | memoryview

# A request id is echoed back verbatim; bound it so a client cannot make us echo megabytes.
MAX_ID_LENGTH = 256
# Bounds the daemon checks, here so that a client can check them before sending: execute's
# `retries` (workerd.jobs.MAX_RETRIES), scale's `workers` (workerd.pool.backend.MAX_WORKERS), the ids
# of one cancel.
MAX_RETRIES = 10
MAX_WORKERS = 1024
MAX_CANCEL_IDS = 10_000
# Calls in one chunked execute: enough to amortise the per-message cost many times over, few
# enough that one chunk's results stay well inside the message size limit for small values.
MAX_CALLS = 10_000
# execute's `priority`: higher first within a client; between clients up to its [fairness] max_priority.
PRIORITY_MIN, PRIORITY_MAX = -9, 9


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


def unpack(data: bytes, raw: Sequence[Buffer] | None = None, strict: bool = True) -> Any:
    """Deserialise one body without trusting it.

    msgpack bounds every declared length by the size of the buffer itself, so a tiny message
    cannot make us allocate gigabytes; map keys must be str or bytes so a hostile key cannot be
    an unhashable or surprising type. Any failure is a BAD_REQUEST, never a crash.

    With `raw` (the frames after the body), references to raw frames are resolved; without it
    they stay msgpack.ExtType values (the master checks envelopes and never needs them).
    `strict=False` admits other hashable map keys (a task may return {1: "a"}): for replies,
    which come from the daemon, never for requests.
    """
    # A big body becomes many objects at once (a chunk reply of 10,000 values): the collector,
    # run again and again while they are made, runs its older generations too, which walk the
    # caller's whole heap. Paused, it runs once afterwards. Measured with a live heap: 10,000
    # small maps decoded in 2.7 ms paused, 3.8-5 ms median and 62 ms at worst running. Below
    # GC_PAUSE_BYTES (a few hundred objects) there is nothing to gain.
    pause = len(data) >= GC_PAUSE_BYTES and gc.isenabled()
    if pause:
        gc.disable()
    try:
        if raw is None:
            return msgpack.unpackb(data, raw=False, strict_map_key=strict)
        return msgpack.unpackb(data, raw=False, strict_map_key=strict, ext_hook=FrameReader(raw, strict))
    except ProtocolError:
        raise
    except Exception as exc:  # msgpack raises ValueError, TypeError, StackError, ExtraData...
        raise ProtocolError(BAD_REQUEST, f"body is not valid msgpack: {exc}") from None
    finally:
        if pause:
            gc.enable()


GC_PAUSE_BYTES = 4 * 1024


# -- raw frames ------------------------------------------------------------------------------------

EXT_RAW = 1
EXT_NDARRAY = 2
# Opt-in (execute's `tuples`): a tuple, nested ones included, wherever it sits in a result or a
# stream item. A client that never asks never sees it.
EXT_TUPLE = 3
# Each level of tuples is a msgpack decoder of its own, on the C stack (~40 KiB each: measured,
# 200 levels overflowed an 8 MiB stack). Deeper tuples are written as arrays; deeper ext 3 is refused.
MAX_TUPLE_DEPTH = 32
# bytes at least this long at the top level of a message go raw: below it, a frame of its own
# costs more than the copy into the body saves.
RAW_THRESHOLD = 64 * 1024
_BYTES_TYPES = (bytes, bytearray, memoryview)


class Raw:
    """Send `buffer` (anything with the buffer protocol) as a raw frame, wherever it sits.

    It arrives as bytes. Without the wrapper only bytes of at least RAW_THRESHOLD at the top level
    of a message go raw; numpy arrays always do.
    """

    __slots__ = ("buffer",)

    def __init__(self, buffer: Any) -> None:
        self.buffer = buffer

    def __repr__(self) -> str:
        return f"Raw(<{frame_size(as_frame(self.buffer))} bytes>)"


def frame_size(frame: Buffer) -> int:
    return frame.nbytes if isinstance(frame, memoryview) else len(frame)


def as_frame(buffer: Any) -> Buffer:
    if isinstance(buffer, bytes | bytearray):
        return buffer
    view = memoryview(buffer)
    if not view.c_contiguous:
        raise TypeError("a raw frame must be a C-contiguous buffer")
    return view.cast("B") if view.format != "B" or view.ndim != 1 else view


def promote(value: Any) -> Any:
    """The raw-frames rule at the top level: large bytes become Raw, anything else is unchanged."""
    if isinstance(value, _BYTES_TYPES) and frame_size(value) >= RAW_THRESHOLD:
        return Raw(value)
    return value


class FrameWriter:
    """Collects the raw frames of one message while it is packed (msgpack's `default` hook).

    With `tuples`, the message is packed with msgpack's strict_types, so tuples reach this hook
    (they become ext 3) and so do subclasses of the other types, written as their base type."""

    __slots__ = ("depth", "frames", "tuples")

    def __init__(self, tuples: bool = False) -> None:
        self.frames: list[Buffer] = []
        self.tuples = tuples
        self.depth = 0

    def add(self, frame: Buffer) -> bytes:
        self.frames.append(frame)
        return pack(len(self.frames) - 1)

    def __call__(self, obj: Any) -> Any:
        if isinstance(obj, Raw):
            return msgpack.ExtType(EXT_RAW, self.add(as_frame(obj.buffer)))
        # Never import numpy here: if the caller holds an array, numpy is already imported.
        numpy = sys.modules.get("numpy")
        if numpy is not None:
            if isinstance(obj, numpy.ndarray):
                return msgpack.ExtType(EXT_NDARRAY, self.add_array(numpy, obj))
            if isinstance(obj, numpy.generic):
                return obj.item()
        if self.tuples:
            if isinstance(obj, tuple):  # named tuples too: their items, as a tuple
                if self.depth >= MAX_TUPLE_DEPTH:
                    return list(obj)
                self.depth += 1
                try:
                    items = msgpack.packb(list(obj), use_bin_type=True, default=self, strict_types=True)
                finally:
                    self.depth -= 1
                return msgpack.ExtType(EXT_TUPLE, items)
            for base in _STRICT_BASES:
                if isinstance(obj, base) and type(obj) is not base:  # an IntEnum, an OrderedDict
                    return base(obj)
        if isinstance(obj, int):  # msgpack hands over the ints it cannot hold
            raise OverflowError(f"integer {obj} is outside msgpack's range (-2**63 .. 2**64-1)")
        raise TypeError(f"cannot serialize {type(obj).__name__!s} (msgpack types, Raw and numpy arrays only)")

    def add_array(self, numpy: Any, array: Any) -> bytes:
        if array.dtype.hasobject:
            raise TypeError("numpy arrays of Python objects cannot be sent (dtype has objects)")
        # ascontiguousarray copies only when it must (a non-contiguous view, Fortran order).
        flat = numpy.ascontiguousarray(array).reshape(-1).view(numpy.uint8)
        index = len(self.frames)
        self.frames.append(memoryview(flat))
        return pack({"dtype": array.dtype.str, "shape": list(array.shape), "frame": index})


# What strict_types hands the hook in place of the types msgpack writes itself (bool is exact).
_STRICT_BASES: tuple[type[Any], ...] = (int, float, str, bytes, bytearray, list, dict)


def pack_frames(obj: Any, tuples: bool = False) -> list[Buffer]:
    """[body, *raw frames] for one message, by the raw-frames rule; with `tuples`, tuples as ext 3."""
    writer = FrameWriter(tuples)
    body = msgpack.packb(obj, use_bin_type=True, default=writer, strict_types=tuples)
    return [body, *writer.frames]


class FrameReader:
    """Resolves raw-frame references while one body is unpacked (msgpack's `ext_hook`)."""

    __slots__ = ("depth", "frames", "strict")

    def __init__(self, frames: Sequence[Buffer], strict: bool = True) -> None:
        self.frames = frames
        self.strict = strict  # the map-key rule of the message, for a tuple's items too
        self.depth = 0

    def frame(self, index: Any) -> Buffer:
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < len(self.frames):
            raise ProtocolError(
                BAD_REQUEST, f"reference to raw frame {index!r}, but the message has {len(self.frames)}"
            )
        return self.frames[index]

    def __call__(self, code: int, data: bytes) -> Any:
        if code == EXT_RAW:
            frame = self.frame(msgpack.unpackb(data))
            return frame if isinstance(frame, bytes) else bytes(frame)
        if code == EXT_NDARRAY:
            return self.array(msgpack.unpackb(data, raw=False))
        if code == EXT_TUPLE:
            if self.depth >= MAX_TUPLE_DEPTH:
                raise ProtocolError(BAD_REQUEST, f"tuples (ext 3) nested deeper than {MAX_TUPLE_DEPTH}")
            self.depth += 1
            try:
                items = msgpack.unpackb(data, raw=False, strict_map_key=self.strict, ext_hook=self)
            finally:
                self.depth -= 1
            if not isinstance(items, list):
                raise ProtocolError(BAD_REQUEST, "a tuple (ext 3) must hold an array")
            return tuple(items)
        return msgpack.ExtType(code, data)

    def array(self, spec: Any) -> Any:
        if not isinstance(spec, dict) or not isinstance(spec.get("dtype"), str):
            raise ProtocolError(BAD_REQUEST, "ndarray reference must be a map with 'dtype', 'shape', 'frame'")
        shape = spec.get("shape")
        if not isinstance(shape, list) or not all(
            isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape
        ):
            raise ProtocolError(BAD_REQUEST, "ndarray 'shape' must be a list of non-negative integers")
        frame = self.frame(spec.get("frame"))
        try:
            import numpy  # only a message that holds an array needs it
        except ImportError:
            raise ProtocolError(
                BAD_REQUEST, "the message holds a numpy array, but numpy is not installed here"
            ) from None
        try:
            dtype = numpy.dtype(spec["dtype"])
        except Exception:
            raise ProtocolError(BAD_REQUEST, f"unknown ndarray dtype {spec['dtype']!r}") from None
        if dtype.hasobject:
            raise ProtocolError(BAD_REQUEST, "ndarray dtype must not hold Python objects")
        count = 1
        for n in shape:
            count *= n
        if count * dtype.itemsize != frame_size(frame):
            raise ProtocolError(
                BAD_REQUEST,
                f"ndarray of shape {shape} and dtype {dtype.str} needs {count * dtype.itemsize} bytes, "
                f"raw frame has {frame_size(frame)}",
            )
        # Zero-copy: the array is a read-only view of the frame.
        return numpy.frombuffer(frame, dtype=dtype).reshape(shape)


def is_valid_id(value: object) -> bool:
    # bool is an int subclass; True as an id is almost certainly a client bug.
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return True
    return isinstance(value, str) and len(value) <= MAX_ID_LENGTH


def encode_request(request_id: int | str, cmd: str, **fields: Any) -> bytes:
    return pack({"v": VERSION, "id": request_id, "cmd": cmd, **fields})


# The fields of an execute that the daemon's master forwards to a worker without decoding them.
BULKY_FIELDS = frozenset(("args", "kwargs", "calls"))
# The first byte of a msgpack array or map, and how its length follows.
_ARRAY_HEADERS = {0xDC: ">H", 0xDD: ">I"}
_MAP_HEADERS = {0xDE: ">H", 0xDF: ">I"}
# The key "id" as msgpack can write it (str 8, 16, 32 included), compared as bytes by readable_id.
_ID_KEYS = frozenset((b"\xa2id", b"\xd9\x02id", b"\xda\x00\x02id", b"\xdb\x00\x00\x00\x02id"))


class Bulk:
    """A field left undecoded by unpack_envelope: its msgpack kind, its number of items, and
    where its bytes lie in the body (`span`, for check_bulky)."""

    __slots__ = ("count", "kind", "span")

    def __init__(self, kind: str, count: int, span: tuple[int, int] = (0, 0)) -> None:
        self.kind = kind  # "array" | "map" | "other"
        self.count = count
        self.span = span

    def __repr__(self) -> str:
        return f"Bulk({self.kind!r}, {self.count})"


def bulk_at(data: bytes, at: int, end: int) -> Bulk:
    """The kind and item count of the msgpack value in data[at:end]."""
    first = data[at]
    if 0x90 <= first <= 0x9F:
        return Bulk("array", first & 0x0F, (at, end))
    if 0x80 <= first <= 0x8F:
        return Bulk("map", first & 0x0F, (at, end))
    for kind, headers in (("array", _ARRAY_HEADERS), ("map", _MAP_HEADERS)):
        if first in headers:
            (count,) = struct.unpack_from(headers[first], data, at + 1)
            return Bulk(kind, count, (at, end))
    return Bulk("other", 0, (at, end))


def is_map(data: bytes) -> bool:
    return bool(data) and (0x80 <= data[0] <= 0x8F or data[0] in _MAP_HEADERS)


def unpack_envelope(data: bytes) -> dict[str, Any]:
    """The request as a map, its BULKY_FIELDS skipped over (checked as msgpack, not decoded).

    The master reads a request's envelope (id, cmd, name, timeout_s...) and forwards the body,
    which its worker decodes: decoding the calls of a chunk in the master as well cost it ten
    times what reading the envelope does (53 against 6 µs for 100 calls), on its one thread.
    Everything else is checked as §3 says: the top-level keys here, the envelope's values by
    msgpack as they are decoded."""
    if not is_map(data):
        value = unpack(data)  # not a map: say what it is (or that it is not msgpack)
        raise ProtocolError(BAD_REQUEST, f"request must be a map, got {type(value).__name__}")
    unpacker = msgpack.Unpacker(raw=False, strict_map_key=True, max_buffer_size=len(data))
    unpacker.feed(data)
    body: dict[Any, Any] = {}  # bin keys stay bytes: b"v" is not the field "v"
    try:
        for _ in range(unpacker.read_map_header()):
            key = unpacker.unpack()  # a value to the Unpacker: strict_map_key does not apply
            if not isinstance(key, str | bytes):
                raise ValueError(f"{type(key).__name__} is not allowed for map key")
            if key in BULKY_FIELDS:
                at = unpacker.tell()
                unpacker.skip()
                body[key] = bulk_at(data, at, unpacker.tell())
            else:
                body[key] = unpacker.unpack()
        if unpacker.tell() != len(data):
            raise ValueError("extra bytes after the request's map")
    except Exception as exc:  # msgpack raises ValueError, TypeError, StackError, OutOfData...
        raise ProtocolError(BAD_REQUEST, f"body is not valid msgpack: {exc}") from None
    return body


def check_bulky(data: bytes, body: dict[str, Any]) -> None:
    """§3 (str or bin map keys, valid UTF-8) inside the fields unpack_envelope skipped.

    For every command but execute, whose worker decodes them and answers a violation with the
    request's id. Checking them in the master costs what decoding them does: msgpack's C decoder
    is the cheapest check there is (a walk in Python that builds no values measured 6 to 10 times
    slower, bench/envelope.py), and a chunk's calls are what the master must not decode."""
    for key in BULKY_FIELDS.intersection(body):
        at, end = body[key].span
        unpack(data[at:end])


# At most this size a body is decoded whole: cheaper than reading its envelope around the bulky
# fields (an Unpacker and a call per key). bench/envelope.py: 1.0 against 3.2 µs at 98 bytes (one
# dict), 2.2 against 2.8 at 196, dearer at 618 (7.0 against 4.7). Decoded with strict keys, a
# body that decodes breaks §3 nowhere; one that does not takes the envelope path and its errors.
WHOLE_DECODE_MAX = 256


def decode_small(data: bytes) -> dict[Any, Any] | None:
    """A small body decoded whole when it is a sound map; None otherwise, and then
    unpack_envelope says what is wrong, as it does for a large body."""
    if len(data) > WHOLE_DECODE_MAX:
        return None
    try:
        body = msgpack.unpackb(data, raw=False, strict_map_key=True)
    except Exception:  # msgpack raises ValueError, TypeError, ExtraData...
        return None
    return body if type(body) is dict else None


def readable_id(data: bytes) -> int | str | None:
    """The id of a request whose map is sound msgpack, though a key or a string in it breaks §3;
    None when there is none to read: not a map, a broken structure, no valid id.

    Only the id is decoded; skip() checks the structure without looking at keys or UTF-8."""
    if not is_map(data):
        return None
    unpacker = msgpack.Unpacker(max_buffer_size=len(data))
    unpacker.feed(data)
    found = None
    try:
        for _ in range(unpacker.read_map_header()):
            at = unpacker.tell()
            unpacker.skip()
            is_id = data[at : unpacker.tell()] in _ID_KEYS
            at = unpacker.tell()
            unpacker.skip()
            if is_id:
                found = unpack(data[at : unpacker.tell()])
        if unpacker.tell() != len(data):
            return None
    except Exception:  # a structure skip() cannot follow, or an id that does not decode
        return None
    return found if is_valid_id(found) else None


def decode_request(data: bytes) -> dict[str, Any]:
    """Decode and check the envelope of a request; command fields are checked by its handler.

    args, kwargs and calls come back as Bulk (see unpack_envelope), or decoded in a body of at
    most WHOLE_DECODE_MAX bytes. A body that breaks §3 is answered with its id when readable_id
    can read one, so that a client with many requests in flight can tell which one it was."""
    body = decode_small(data)
    if body is None:
        try:
            body = unpack_envelope(data)
            if body.get("cmd") != "execute":
                check_bulky(data, body)
        except ProtocolError as exc:
            exc.request_id = readable_id(data)
            raise
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


def encode_started(request_id: int | str | None) -> bytes:
    """The start notice an execute with `notify_start` gets when its job starts (seq 0: before
    any item). Non-terminal, like a stream item."""
    return pack({"v": VERSION, "id": request_id, "stream": "started", "seq": 0})


def encode_request_frames(request_id: int | str, cmd: str, fields: dict[str, Any]) -> list[Buffer]:
    """[body, *raw frames] of a request; the caller applies `promote` to top-level values. An
    execute that asks for `tuples` sends its tuples as ext 3 too (its args must be a list)."""
    return pack_frames({"v": VERSION, "id": request_id, "cmd": cmd, **fields}, fields.get("tuples") is True)


def encode_result_frames(request_id: int | str | None, result: Any, tuples: bool = False) -> list[Buffer]:
    return pack_frames({"v": VERSION, "id": request_id, "ok": True, "result": promote(result)}, tuples)


def encode_item_frames(
    request_id: int | str | None, seq: int, item: Any, tuples: bool = False
) -> list[Buffer]:
    body = {"v": VERSION, "id": request_id, "stream": "item", "seq": seq, "item": promote(item)}
    return pack_frames(body, tuples)


def decode_reply(data: bytes, raw: Sequence[Buffer] = ()) -> dict[str, Any]:
    """Decode a reply, error or stream item, checking the fields a client relies on.

    `raw` are the frames after the body: references to them become bytes and numpy arrays.
    """
    try:
        body = unpack(data, raw, strict=False)
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
    """True for the one reply that ends a request; False for a stream item or a start notice."""
    return "stream" not in reply
