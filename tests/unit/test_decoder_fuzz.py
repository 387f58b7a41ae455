"""Fuzz targets for the decoders every message goes through (hypothesis).

Whatever the bytes: `protocol.decode_request`, `protocol.unpack` (with raw frames),
`protocol.decode_reply`, the worker's `tasks.decode` and the master's `admission.check_execute` raise
only their own typed error (ProtocolError / RequestRejected), never anything else, never hang,
and what they accept satisfies the invariants their callers rely on. Inputs are random bytes,
mutated valid messages (the fuzzer's best way into the decoder's depths), random msgpack
structures with extension types, and raw-frame references that point anywhere.

WORKERD_STRESS=1 multiplies the examples by 20 (the reliability suite's long version).
"""

from __future__ import annotations

import math
import os
from typing import Any

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from workerctl import Raw, protocol
from workerd import admission, tasks

SCALE = 20 if os.environ.get("WORKERD_STRESS", "") not in ("", "0") else 1
FUZZ = settings(
    max_examples=200 * SCALE, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=False
)

scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=20)
    | st.binary(max_size=20)
)
ext_codes = st.integers(0, 127)
references = st.one_of(
    st.builds(
        lambda i: msgpack.ExtType(protocol.EXT_RAW, msgpack.packb(i)),
        st.integers(-3, 5) | st.text(max_size=3),
    ),
    st.builds(
        lambda spec: msgpack.ExtType(protocol.EXT_NDARRAY, msgpack.packb(spec)),
        st.fixed_dictionaries(
            {},
            optional={
                "dtype": st.sampled_from(["<f8", "<i4", "u1", "O", "V0", "V3", "(2,)i4", "M8[s]", "nope", ""])
                | st.integers(-(2**63), 2**63 - 1),
                "shape": st.lists(st.integers(-2, 2**40), max_size=3) | st.integers(-5, 5) | st.none(),
                "frame": st.integers(-1, 4) | st.text(max_size=2),
            },
        )
        | scalars,
    ),
    st.builds(msgpack.ExtType, ext_codes, st.binary(max_size=12)),
)
values = st.recursive(
    scalars | references,
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(
            st.text(max_size=6) | st.sampled_from(["v", "id", "cmd", "args", "kwargs"]), children, max_size=4
        )
    ),
    max_leaves=12,
)
fields = st.sampled_from(
    ["v", "id", "cmd", "name", "args", "kwargs", "calls", "timeout_s", "retries", "level", "workers", "x"]
)
requests = st.dictionaries(fields, values, max_size=8).map(
    lambda body: {"v": 1, "id": 1, "cmd": "execute", "name": "m:f", **body}
)
frames = st.lists(st.binary(max_size=64), max_size=4)


def pack(value: Any) -> bytes:
    return msgpack.packb(value, use_bin_type=True)  # type: ignore[no-any-return]


VALID = [
    protocol.encode_request(7, "ping"),
    protocol.encode_request(
        "id", "execute", name="pkg.mod:fn", args=[1, "a", b"b", [None]], kwargs={"k": 1.5}
    ),
    protocol.encode_request(8, "execute", name="pkg.mod:fn", calls=[[[1], {}], [[], {"a": True}]], retries=2),
    protocol.encode_request(9, "clear_memory", level="full"),
    pack({"v": 1, "id": 3, "cmd": "execute", "name": "m:f", "args": [msgpack.ExtType(1, pack(0))]}),
]


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    """A valid message with a few bytes flipped, replaced, inserted, dropped, or cut short."""
    data = bytearray(draw(st.sampled_from(VALID)))
    for _ in range(draw(st.integers(1, 4))):
        if not data:
            break
        at = draw(st.integers(0, len(data) - 1))
        op = draw(st.integers(0, 4))
        if op == 0:
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif op == 1:
            data[at] = draw(st.integers(0, 255))
        elif op == 2:
            data[at:at] = draw(st.binary(min_size=1, max_size=8))
        elif op == 3:
            del data[at : at + draw(st.integers(1, 8))]
        else:
            del data[at:]
    return bytes(data)


def check_request(data: bytes) -> dict[str, Any] | None:
    """decode_request's contract: a typed ProtocolError, or a body with a valid envelope."""
    try:
        body = protocol.decode_request(data)
    except protocol.ProtocolError as exc:
        assert exc.code in (protocol.BAD_REQUEST, protocol.UNSUPPORTED_VERSION)
        assert exc.request_id is None or protocol.is_valid_id(exc.request_id)
        return None
    assert body["v"] == 1 and isinstance(body["cmd"], str) and protocol.is_valid_id(body["id"])
    return body


@FUZZ
@given(st.binary(max_size=2048))
def test_decode_request_of_random_bytes(data: bytes) -> None:
    check_request(data)


@FUZZ
@given(mutated())
def test_decode_request_of_mutated_messages(data: bytes) -> None:
    check_request(data)


# Maps whose keys may be anything msgpack can pack: the keys docs/protocol.md §3 refuses.
hostile_keys = (
    st.text(max_size=4) | st.binary(max_size=4) | st.integers(-3, 3) | st.none() | st.booleans() | st.floats()
)
hostile_values = st.recursive(
    scalars,
    lambda children: st.lists(children, max_size=3) | st.dictionaries(hostile_keys, children, max_size=3),
)
hostile_requests = st.dictionaries(fields | hostile_keys, hostile_values, max_size=6).map(
    lambda body: {**body, "v": 1, "id": 1, "cmd": "ping"}
)


def strictly_valid(data: bytes) -> bool:
    try:
        msgpack.unpackb(data, raw=False, strict_map_key=True)
    except Exception:
        return False
    return True


@FUZZ
@given(mutated() | hostile_requests.map(pack))
def test_what_a_strict_full_decode_refuses_is_a_bad_request_from_master_or_worker(data: bytes) -> None:
    """§3 for the whole body: whatever msgpack's strict decoder refuses (a key that is not a
    string, bad UTF-8, anywhere) is a BAD_REQUEST: from the master, or, inside an execute's
    args, kwargs or calls, from its worker, with the request's id."""
    if strictly_valid(data):
        check_request(data)
        return
    try:
        body = protocol.decode_request(data)
    except protocol.ProtocolError as exc:
        # A version we do not speak is refused as such before the rest is read (§4): what
        # follows it may mean something else in that version.
        assert exc.code in (protocol.BAD_REQUEST, protocol.UNSUPPORTED_VERSION)
        assert exc.request_id is None or protocol.is_valid_id(exc.request_id)
        return
    assert body["cmd"] == "execute"
    request, error = tasks.decode(data, [])
    reply = protocol.decode_reply(error)
    assert request is None and reply["error"]["code"] == protocol.BAD_REQUEST and reply["id"] == body["id"]


@FUZZ
@given(hostile_requests)
def test_a_sound_map_that_breaks_section_3_is_refused_with_its_id(body: dict[Any, Any]) -> None:
    data = pack(body)
    if strictly_valid(data):
        return
    with pytest.raises(protocol.ProtocolError) as info:
        protocol.decode_request(data)
    assert (info.value.code, info.value.request_id) == (protocol.BAD_REQUEST, 1)


@FUZZ
@given(requests)
def test_execute_checks_reject_only_with_their_typed_error(body: dict[str, Any]) -> None:
    """What the master checks before a request reaches a worker: typed refusal or a sound job."""
    decoded = check_request(pack(body))
    if decoded is None:
        return
    try:
        name, timeout_s, retries = admission.check_execute(decoded, 300.0)
    except admission.RequestRejected as exc:
        assert exc.code == protocol.BAD_REQUEST
        return
    assert isinstance(name, str) and name
    assert math.isfinite(timeout_s) and timeout_s > 0
    assert 0 <= retries <= admission.MAX_RETRIES


@FUZZ
@given(requests, frames)
def test_worker_decode_never_raises(body: dict[str, Any], raw: list[bytes]) -> None:
    """The worker decodes the body again with its raw frames: a reply, never an exception."""
    data = pack(body)
    if check_request(data) is None:
        return
    request, error = tasks.decode(data, raw)
    if request is None:
        reply = protocol.decode_reply(error)
        assert reply["ok"] is False and reply["error"]["code"] == protocol.BAD_REQUEST
        assert reply["id"] == body["id"]


@FUZZ
@given(values, frames)
def test_unpack_with_raw_frames(value: Any, raw: list[bytes]) -> None:
    try:
        data = pack(value)
    except (ValueError, TypeError):  # nested past msgpack's own limit
        return
    try:
        protocol.unpack(data, raw)
    except protocol.ProtocolError as exc:
        assert exc.code == protocol.BAD_REQUEST


@FUZZ
@given(st.binary(max_size=1024) | mutated(), frames)
def test_decode_reply_of_anything(data: bytes, raw: list[bytes]) -> None:
    check_reply(data, raw)


@FUZZ
@given(
    st.dictionaries(st.sampled_from(["v", "id", "ok", "result", "error", "stream", "seq", "item"]), values)
)
def test_decode_reply_of_arbitrary_maps(body: dict[str, Any]) -> None:
    try:
        data = pack(body)
    except (ValueError, TypeError):
        return
    check_reply(data, [])


def check_reply(data: bytes, raw: list[bytes]) -> None:
    """decode_reply's contract: a ProtocolError, or a reply the client can act on."""
    try:
        reply = protocol.decode_reply(data, raw)
    except protocol.ProtocolError as exc:
        assert exc.code == protocol.INTERNAL
        return
    assert reply["v"] == protocol.VERSION
    if not protocol.is_terminal(reply):
        assert isinstance(reply["seq"], int)
    elif reply["ok"] is True:
        assert "result" in reply
    else:
        error = reply["error"]
        assert isinstance(error["code"], str) and isinstance(error["message"], str)
        assert isinstance(error["details"], dict)


@FUZZ
@given(
    st.lists(st.binary(max_size=200_000), max_size=3),
    st.lists(st.sampled_from(["<f8", "<i4", "u1", "<c16", "bool"]), max_size=3),
)
def test_raw_frames_round_trip(blobs: list[bytes], dtypes: list[str]) -> None:
    arrays = [np.arange(7).astype(dtype) for dtype in dtypes]
    request = protocol.encode_request_frames(
        1, "execute", {"name": "m:f", "args": [*map(Raw, blobs), *arrays]}
    )
    body = check_request(bytes(request[0]))
    assert body is not None
    decoded = protocol.unpack(bytes(request[0]), [bytes(frame) for frame in request[1:]])
    assert decoded["args"][: len(blobs)] == blobs
    for got, want in zip(decoded["args"][len(blobs) :], arrays, strict=True):
        assert got.dtype == want.dtype and np.array_equal(got, want)


def test_hostile_shapes_are_refused_quickly() -> None:
    """The classic hostile inputs, each decoded in bounded time and memory."""
    nested = b"\x91" * 1_000_000 + b"\xc0"
    for data in (
        nested,
        b"\xdd\xff\xff\xff\xff" + b"\xc0" * 8,  # array32 declaring 4 billion entries
        b"\xdf\xff\xff\xff\xff",  # map32 likewise
        b"\xc6\xff\xff\xff\xff",  # bin32 declaring 4 GiB
        b"\xc9\xff\xff\xff\xff\x01",  # ext32 likewise
    ):
        assert check_request(data) is None
        check_reply(data, [])
