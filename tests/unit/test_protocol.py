"""The pure encode/decode functions, including property-based tests of hostile input."""

from __future__ import annotations

from unittest import mock

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from workerctl import errors, protocol

json_like = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=False)
    | st.text()
    | st.binary(),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=20,
)


def test_request_round_trip() -> None:
    body = protocol.decode_request(protocol.encode_request(7, "ping", extra={"a": 1}))
    assert body == {"v": 1, "id": 7, "cmd": "ping", "extra": {"a": 1}}


@pytest.mark.parametrize(
    ("body", "code", "has_id"),
    [
        ([1, 2], protocol.BAD_REQUEST, False),
        ({"v": 1, "cmd": "ping"}, protocol.BAD_REQUEST, False),
        ({"v": 1, "id": True, "cmd": "ping"}, protocol.BAD_REQUEST, False),
        ({"v": 1, "id": "x" * 300, "cmd": "ping"}, protocol.BAD_REQUEST, False),
        ({"v": 2, "id": 1, "cmd": "ping"}, protocol.UNSUPPORTED_VERSION, True),
        ({"v": "1", "id": 1, "cmd": "ping"}, protocol.BAD_REQUEST, True),
        ({"v": 1, "id": 1, "cmd": 5}, protocol.BAD_REQUEST, True),
        ({"v": 1, "id": 1}, protocol.BAD_REQUEST, True),
    ],
)
def test_bad_envelopes_are_typed(body: object, code: str, has_id: bool) -> None:
    with pytest.raises(protocol.ProtocolError) as info:
        protocol.decode_request(msgpack.packb(body))
    assert info.value.code == code
    assert (info.value.request_id is not None) == has_id


def test_not_msgpack_is_bad_request() -> None:
    with pytest.raises(protocol.ProtocolError) as info:
        protocol.decode_request(b"\xc1")  # 0xc1 is never used in msgpack
    assert info.value.code == protocol.BAD_REQUEST


def test_non_string_map_keys_are_refused() -> None:
    with pytest.raises(protocol.ProtocolError):
        protocol.decode_request(msgpack.packb({1: 2}))


def test_deep_nesting_is_refused_not_a_crash() -> None:
    data = b"\x91" * 100_000 + b"\xc0"  # 100k nested one-element arrays
    with pytest.raises(protocol.ProtocolError):
        protocol.decode_request(data)


def test_huge_declared_length_does_not_allocate() -> None:
    data = b"\xdb\xff\xff\xff\xff"  # str32 declaring 4 GiB, with no bytes behind it
    with pytest.raises(protocol.ProtocolError):
        protocol.decode_request(data)


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=256))
def test_decode_request_never_raises_anything_but_protocol_error(data: bytes) -> None:
    try:
        body = protocol.decode_request(data)
    except protocol.ProtocolError as exc:
        assert exc.code in protocol.ERROR_CODES
    else:
        assert body["v"] == 1 and isinstance(body["cmd"], str)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(["v", "id", "cmd", "x"]), json_like, max_size=4))
def test_decode_request_of_arbitrary_maps(body: dict[str, object]) -> None:
    try:
        decoded = protocol.decode_request(msgpack.packb(body, use_bin_type=True))
    except protocol.ProtocolError as exc:
        assert exc.code in (protocol.BAD_REQUEST, protocol.UNSUPPORTED_VERSION)
    else:
        assert decoded == body


@given(json_like)
def test_result_round_trip(value: object) -> None:
    reply = protocol.decode_reply(protocol.encode_result("abc", value))
    assert reply["ok"] is True and reply["id"] == "abc" and reply["result"] == value


def test_error_reply_maps_to_typed_exception() -> None:
    reply = protocol.decode_reply(protocol.encode_error(3, protocol.BUSY, "full", {"depth": 9}))
    exc = errors.error_from_reply(reply["error"])
    assert isinstance(exc, errors.Busy)
    assert exc.details == {"depth": 9}


def test_unknown_error_code_stays_generic() -> None:
    exc = errors.error_from_reply({"code": "FROM_THE_FUTURE", "message": "m", "details": {}})
    assert type(exc) is errors.WorkerdError and exc.code == "FROM_THE_FUTURE"


def test_every_error_code_has_a_class() -> None:
    for code in protocol.ERROR_CODES:
        exc = errors.error_from_reply({"code": code, "message": "", "details": {}})
        assert exc.code == code and type(exc) is not errors.WorkerdError


def test_stream_items_are_not_terminal() -> None:
    item = protocol.decode_reply(protocol.encode_item(1, 1, "x"))
    assert not protocol.is_terminal(item)
    assert protocol.is_terminal(protocol.decode_reply(protocol.encode_result(1, None)))


@pytest.mark.parametrize(
    "body", [{"v": 1, "id": 1, "ok": True}, {"v": 1, "ok": False, "error": "x"}, [1], {"v": 9}]
)
def test_malformed_replies_are_reported(body: object) -> None:
    with pytest.raises(protocol.ProtocolError):
        protocol.decode_reply(msgpack.packb(body))


values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.text(max_size=20)
    | st.binary(max_size=20),
    lambda inner: st.lists(inner, max_size=20) | st.dictionaries(st.text(max_size=5), inner, max_size=20),
    max_leaves=60,
)


@settings(max_examples=100, deadline=None)  # each is up to 8 deep values: 300 took 10 s
@given(st.dictionaries(st.sampled_from(["v", "id", "cmd", "name", "args", "kwargs", "calls", "x"]), values))
def test_the_envelope_is_the_body_with_its_bulky_fields_counted_not_decoded(body: dict[str, object]) -> None:
    decoded = protocol.unpack_envelope(msgpack.packb(body, use_bin_type=True))
    assert decoded.keys() == body.keys()
    for key, value in body.items():
        if key not in protocol.BULKY_FIELDS:
            assert decoded[key] == value
            continue
        bulk = decoded[key]
        assert isinstance(bulk, protocol.Bulk)
        if isinstance(value, list | dict):
            assert (bulk.kind, bulk.count) == ("array" if isinstance(value, list) else "map", len(value))
        else:
            assert bulk.kind == "other"


def test_a_broken_bulky_field_is_a_bad_request_though_it_is_not_decoded() -> None:
    data = msgpack.packb({"v": 1, "id": 1, "cmd": "execute", "args": [1, 2, 3]})
    with pytest.raises(protocol.ProtocolError) as info:
        protocol.decode_request(data[:-1])  # the args array ends early
    assert info.value.code == protocol.BAD_REQUEST


# -- §3 holds for the whole body: keys and UTF-8 (issue 18, 3i) -------------------------------------

NOT_UTF8 = b"\xa2\xff\xfe"  # a str of two bytes that are not UTF-8


def with_entry(body: dict[str, object], key: bytes, value: bytes) -> bytes:
    """`body` packed with one more entry, key and value given as msgpack bytes (fixmap only)."""
    data = msgpack.packb(body, use_bin_type=True)
    assert 0x80 <= data[0] < 0x8F
    return bytes([data[0] + 1]) + data[1:] + key + value


@pytest.mark.parametrize("key", [1, -1, None, 1.5, True, False], ids=repr)
def test_an_envelope_key_that_is_not_a_string_is_refused_with_the_id(key: object) -> None:
    data = with_entry({"v": 1, "id": 5, "cmd": "ping"}, msgpack.packb(key), msgpack.packb(0))
    with pytest.raises(
        protocol.ProtocolError, match=r"^body is not valid msgpack: .* is not allowed for map key"
    ) as info:
        protocol.decode_request(data)
    assert (info.value.code, info.value.request_id) == (protocol.BAD_REQUEST, 5)


BAD_CONTENTS = {
    "int key in kwargs": ("kwargs", msgpack.packb({1: "a"})),
    "nil key deep in args": ("args", msgpack.packb([[{None: 1}]])),
    "bool key in a call's kwargs": ("calls", msgpack.packb([[[], {True: 1}]])),
    "str in args not UTF-8": ("args", b"\x91" + NOT_UTF8),
    "kwargs key not UTF-8": ("kwargs", b"\x81" + NOT_UTF8 + b"\x01"),
    "str in calls not UTF-8": ("calls", b"\x91\x92\x91" + NOT_UTF8 + b"\x80"),
}


def bad_body(cmd: str, field: str) -> bytes:
    key, value = BAD_CONTENTS[field]
    body = {"v": 1, "id": 5, "cmd": cmd, "name": "workerd.examples.tasks:echo", "workers": 2}
    return with_entry(body, msgpack.packb(key), value)


@pytest.mark.parametrize("cmd", ["ping", "status", "scale", "reload?"])
@pytest.mark.parametrize("field", list(BAD_CONTENTS))
def test_bad_keys_or_utf8_in_args_kwargs_calls_are_refused_with_the_id(cmd: str, field: str) -> None:
    with pytest.raises(protocol.ProtocolError, match=r"^body is not valid msgpack: ") as info:
        protocol.decode_request(bad_body(cmd, field))
    assert (info.value.code, info.value.request_id) == (protocol.BAD_REQUEST, 5)


@pytest.mark.parametrize("field", list(BAD_CONTENTS))
def test_an_executes_args_kwargs_calls_are_left_to_its_worker(field: str) -> None:
    """The fast path: the master does not decode them (its worker answers, with the id)."""
    body = protocol.decode_request(bad_body("execute", field))
    assert isinstance(body[BAD_CONTENTS[field][0]], protocol.Bulk)


def test_an_envelope_value_that_is_not_utf8_is_refused_with_the_id() -> None:
    data = with_entry({"v": 1, "id": "x", "cmd": "execute"}, msgpack.packb("name"), NOT_UTF8)
    with pytest.raises(protocol.ProtocolError, match=r"^body is not valid msgpack: 'utf-8'") as info:
        protocol.decode_request(data)
    assert (info.value.code, info.value.request_id) == (protocol.BAD_REQUEST, "x")


@pytest.mark.parametrize(
    "data",
    [
        msgpack.packb({"v": 1, "id": 5, "cmd": "ping", "args": [1, 2]})[:-1],  # ends early
        msgpack.packb({"v": 1, "id": 5, "cmd": "ping"}) + b"\x00",  # trailing bytes
        with_entry({"v": 1, "id": 5, "cmd": "ping"}, msgpack.packb("args"), b"\x91" * 2000 + b"\xc0"),
        with_entry({"v": 1, "cmd": "ping", 1: 2}, msgpack.packb("id"), NOT_UTF8),  # the id itself
        with_entry({"v": 1, "id": True, "cmd": "ping"}, msgpack.packb(1), b"\x00"),  # no valid id
    ],
    ids=["truncated", "trailing", "too deep", "id not UTF-8", "id a bool"],
)
def test_a_body_whose_id_cannot_be_read_is_refused_with_id_null(data: bytes) -> None:
    with pytest.raises(protocol.ProtocolError) as info:
        protocol.decode_request(data)
    assert (info.value.code, info.value.request_id) == (protocol.BAD_REQUEST, None)


def test_bulky_fields_come_back_counted_and_bin_keys_pass() -> None:
    body = {"v": 1, "id": 5, "cmd": "ping", "args": [1, "é"], "kwargs": {b"k": 1}, "calls": 3}
    big = {**body, "pad": "x" * protocol.WHOLE_DECODE_MAX}  # a small body is decoded whole
    decoded = protocol.decode_request(msgpack.packb(big, use_bin_type=True))
    assert repr(decoded["args"]) == "Bulk('array', 2)"
    assert repr(decoded["kwargs"]) == "Bulk('map', 1)"  # §3 admits bin keys; kwargs' are the worker's
    assert repr(decoded["calls"]) == "Bulk('other', 0)"
    assert protocol.decode_request(msgpack.packb(body, use_bin_type=True)) == body


@settings(max_examples=100, deadline=None)  # each is up to 8 deep values: 300 took 10 s
@given(st.dictionaries(st.sampled_from(["name", "args", "kwargs", "calls", "x", "id", "cmd"]), values))
def test_a_small_body_decoded_whole_reads_as_its_envelope_does(body: dict[str, object]) -> None:
    """decode_request's two paths agree: the same refusal, or the same fields, a bulky one
    decoded (a small body, decoded whole) where the envelope path counts it. (A drawn id or cmd
    replaces the valid one: mostly a refusal.)"""
    data = msgpack.packb({"v": 1, "id": 5, "cmd": "execute", **body}, use_bin_type=True)
    whole = decoded_or_refused(data)
    with mock.patch.object(protocol, "WHOLE_DECODE_MAX", -1):
        envelope = decoded_or_refused(data)
    if not isinstance(envelope, dict) or not isinstance(whole, dict):
        assert whole == envelope
        return
    assert whole.keys() == envelope.keys()
    for key, value in whole.items():
        counted = envelope[key]
        if isinstance(counted, protocol.Bulk) and not isinstance(value, protocol.Bulk):
            kind = "array" if isinstance(value, list) else "map" if isinstance(value, dict) else "other"
            assert (kind, len(value) if kind != "other" else 0) == (counted.kind, counted.count)
        else:
            assert value == counted or repr(value) == repr(counted)


def decoded_or_refused(data: bytes) -> object:
    try:
        return protocol.decode_request(data)
    except protocol.ProtocolError as exc:
        return (exc.code, exc.message, exc.request_id)


# -- tuples (ext 3, opt-in) and start notices ---------------------------------------------------


def test_tuples_travel_as_ext_3_only_when_asked() -> None:
    import collections
    import enum

    class Level(enum.IntEnum):
        HIGH = 2

    point = collections.namedtuple("point", "x y")
    value = {"t": (1, (2, (3,)), [4, (5,)]), "e": (), "p": point(1, 2), "n": Level.HIGH, "l": [1]}
    asked = protocol.decode_reply(protocol.encode_result_frames(7, value, tuples=True)[0])["result"]
    assert asked == {"t": (1, (2, (3,)), [4, (5,)]), "e": (), "p": (1, 2), "n": 2, "l": [1]}
    assert type(asked["p"]) is tuple and type(asked["n"]) is int and type(asked["l"]) is list
    plain = protocol.decode_reply(protocol.encode_result_frames(7, value)[0])["result"]
    assert plain["t"] == [1, [2, [3]], [4, [5]]] and plain["e"] == []
    request = protocol.encode_request_frames(1, "execute", {"name": "m:f", "args": [(1, 2)], "tuples": True})
    assert protocol.unpack(request[0], [])["args"] == [(1, 2)]
    unasked = protocol.encode_request_frames(1, "x", {"args": [(1, 2)]})
    assert protocol.unpack(unasked[0], [])["args"] == [[1, 2]]


def test_tuples_nest_32_deep_and_no_deeper() -> None:
    deep: tuple[object, ...] = ()
    for _ in range(40):
        deep = (deep,)
    decoded = protocol.decode_reply(protocol.encode_result_frames(1, deep, tuples=True)[0])["result"]
    depth = 0
    while decoded:
        assert type(decoded) is (tuple if depth < protocol.MAX_TUPLE_DEPTH else list)
        decoded, depth = decoded[0], depth + 1
    hostile = msgpack.ExtType(protocol.EXT_TUPLE, msgpack.packb([]))
    for _ in range(5000):  # would overflow the C stack if each level were decoded
        hostile = msgpack.ExtType(protocol.EXT_TUPLE, msgpack.packb([hostile]))
    with pytest.raises(protocol.ProtocolError, match="nested deeper than 32"):
        protocol.unpack(msgpack.packb([hostile]), [])
    with pytest.raises(protocol.ProtocolError, match="must hold an array"):
        protocol.unpack(msgpack.packb([msgpack.ExtType(protocol.EXT_TUPLE, msgpack.packb(1))]), [])


def test_a_start_notice_is_not_terminal() -> None:
    notice = protocol.decode_reply(protocol.encode_started(5))
    assert notice == {"v": 1, "id": 5, "stream": "started", "seq": 0}
    assert not protocol.is_terminal(notice)


def test_a_task_error_keeps_the_original_str_and_args() -> None:
    import pickle

    from workerd import tasks

    for original in (ValueError("boom"), ValueError("a", 1), KeyError("k"), FileNotFoundError(2, "gone")):
        try:
            raise original
        except Exception as exc:
            error = protocol.decode_reply(tasks.task_error(1, exc))["error"]
        rebuilt = errors.error_from_reply(error)
        assert isinstance(rebuilt, type(original)) and isinstance(rebuilt, errors.TaskError)
        assert (str(rebuilt), rebuilt.args) == (str(original), original.args)
        assert rebuilt.type == type(original).__name__ and "Traceback" in rebuilt.traceback
        assert rebuilt.message == f"{type(original).__name__}: {original}"
        assert type(original).__name__ in repr(rebuilt) and "traceback=" in repr(rebuilt)
        copy = pickle.loads(pickle.dumps(rebuilt))
        assert (type(copy), str(copy), copy.args) == (type(rebuilt), str(rebuilt), rebuilt.args)
    body = protocol.decode_reply(tasks.task_error(1, ValueError(object())))
    unplain = errors.error_from_reply(body["error"])
    assert unplain.args == (str(unplain),)  # not plain values: its str alone
