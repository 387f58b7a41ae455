"""The clients' sans-IO core, raw frames and batch bookkeeping, without a socket."""

from __future__ import annotations

import argparse
import json
import pickle
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest

from workerctl import batch, cli, core, errors, jsonout, protocol

TASK = "m:f"


def reply_frames(request_id: Any, result: Any) -> list[protocol.Buffer]:
    return [b"", *protocol.encode_result_frames(request_id, result)]


def error_frames(request_id: Any, code: str, message: str = "m") -> list[protocol.Buffer]:
    return [b"", protocol.encode_error(request_id, code, message)]


def decode(frames: list[protocol.Buffer]) -> dict[str, Any]:
    assert frames[0] == b""
    return protocol.unpack(bytes(frames[1]), frames[2:])  # type: ignore[no-any-return]


# -- requests and replies ----------------------------------------------------------------------


def test_requests_get_increasing_ids_and_the_delimiter() -> None:
    c = core.Core()
    first, frames = c.encode("ping", {})
    second, _ = c.encode("ping", {})
    assert second == first + 1
    assert decode(frames) == {"v": 1, "id": first, "cmd": "ping"}


def test_die_with_client_goes_on_every_execute_and_nothing_else() -> None:
    """workerctl run's Client asks the daemon to kill its running jobs when it goes; its ids
    start where it says (a random number, so `workerctl cancel` names no other connection's)."""
    c = core.Core(first_id=7_000_000_001, die_with_client=True)
    request_id, frames = c.encode("execute", core.execute_fields(TASK, [1], {}))
    body = decode(frames)
    assert request_id == body["id"] == 7_000_000_001 and body["die_with_client"] is True
    assert "die_with_client" not in decode(c.encode("ping", {})[1])
    chunk = decode(c.encode("execute", core.chunk_fields(TASK, [([1], {})], None, 0))[1])
    assert chunk["die_with_client"] is True
    assert "die_with_client" not in decode(core.Core().encode("execute", {"name": TASK})[1])


def test_cancel_any_connection_is_sent_only_when_asked() -> None:
    assert list(core.cancel_requests([1], True)) == [{"ids": [1], "terminate": True}]
    assert list(core.cancel_requests(["a"], False, any_connection=True)) == [
        {"ids": ["a"], "terminate": False, "any_connection": True}
    ]


def test_replies_reach_their_own_inbox_and_unknown_ids_are_dropped() -> None:
    c = core.Core()
    a, _ = c.encode("ping", {})
    b, _ = c.encode("ping", {})
    inbox_a, inbox_b = c.register(a), c.register(b)
    c.feed(reply_frames(b, "for b"))
    c.feed(reply_frames(999, "nobody"))
    c.feed(reply_frames(a, "for a"))
    assert [r["result"] for _, r in inbox_a.queue] == ["for a"]
    assert [r["result"] for _, r in inbox_b.queue] == ["for b"]
    assert c.in_flight() == 0
    assert c.inbox(a) is inbox_a  # still readable after its terminal reply, until forgotten
    c.forget(a)
    assert not c.inbox(a).queue


def test_stream_items_precede_the_terminal_reply() -> None:
    c = core.Core()
    request_id, _ = c.encode("execute", {})
    inbox = c.register(request_id)
    for seq in (1, 2):
        c.feed([b"", *protocol.encode_item_frames(request_id, seq, seq * 10)])
    assert c.in_flight() == 1
    c.feed(reply_frames(request_id, {"items": 2}))
    kinds = ["item" if "stream" in r else "result" for _, r in inbox.queue]
    assert kinds == ["item", "item", "result"] and c.in_flight() == 0


def test_an_id_less_error_answers_the_oldest_request() -> None:
    c = core.Core()
    old, _ = c.encode("ping", {})
    new, _ = c.encode("ping", {})
    inbox_old, inbox_new = c.register(old), c.register(new)
    c.feed(error_frames(None, protocol.BAD_REQUEST))
    assert len(inbox_old.queue) == 1 and not inbox_new.queue


def test_garbled_replies_are_protocol_mismatches() -> None:
    c = core.Core()
    with pytest.raises(errors.ProtocolMismatch):
        c.feed([b"x", b"y"])
    with pytest.raises(errors.ProtocolMismatch):
        c.feed([b"", b"\xc1"])


@pytest.mark.parametrize("code", [*protocol.ERROR_CODES, "CONNECTION_LOST"])
def test_every_error_code_raises_its_typed_exception(code: str) -> None:
    c = core.Core()
    request_id, _ = c.encode("ping", {})
    inbox = c.register(request_id)
    c.feed(error_frames(request_id, code, "why"))
    _, reply = inbox.queue.popleft()
    with pytest.raises(errors.WorkerdError) as info:
        core.result_of(reply)
    assert info.value.code == code and type(info.value) is not errors.WorkerdError


def test_a_lost_connection_fails_every_request_in_flight_once() -> None:
    c = core.Core()
    woken: list[str] = []
    ids = [c.encode("ping", {})[0] for _ in range(3)]
    shared = core.Inbox()
    shared.wake = lambda: woken.append("shared")
    c.register(ids[0])
    c.register(ids[1], shared)
    c.register(ids[2], shared)
    c.monitor(core.EVENT_DISCONNECTED)
    assert not c.connected and c.in_flight() == 0
    assert woken == ["shared"]  # one wake per inbox, not per request
    for request_id in ids:
        inbox = shared if request_id != ids[0] else c.inbox(ids[0])
        replies = [r for i, r in inbox.queue if i == request_id]
        with pytest.raises(errors.ConnectionLost, match="connection to workerd lost"):
            core.result_of(replies[0])
    c.monitor(core.EVENT_CONNECTED)
    assert c.connected


def test_monitor_events_are_parsed_without_zmq_utils() -> None:
    frame = struct.pack("=Hi", core.EVENT_DISCONNECTED, 7)
    assert core.monitor_event([frame, b"ipc://x"]) == core.EVENT_DISCONNECTED
    assert core.monitor_event([b"short"]) == 0


def test_size_limit_is_learnt_lazily_and_enforced() -> None:
    c = core.Core()
    small = [b"", b"x" * 100]
    big = [b"", b"x" * 100, b"y" * (core.LIMIT_PROBE_BYTES + 1)]
    assert not c.needs_limit(small) and c.needs_limit(big)
    c.learn_limit({"pid": 1})  # a daemon that does not say: the config default
    assert c.max_message_bytes == core.DEFAULT_MAX_MESSAGE_BYTES
    c.learn_limit({"max_message_bytes": 1000})
    with pytest.raises(errors.MessageTooLarge, match="over the daemon's 1000 byte message limit") as info:
        c.check_size(big)
    assert isinstance(info.value, errors.BadRequest) and info.value.exit_code == errors.EXIT_USAGE
    c.check_size(small)


def test_unencodable_arguments_are_bad_requests() -> None:
    with pytest.raises(errors.BadRequest, match="cannot encode"):
        core.Core().encode("execute", core.execute_fields(TASK, [object()], None))


# -- raw frames --------------------------------------------------------------------------------


def test_large_top_level_bytes_and_raw_wrappers_travel_as_frames() -> None:
    big = b"b" * protocol.RAW_THRESHOLD
    fields = core.execute_fields(TASK, [big, b"small"], {"k": big, "nested": [protocol.Raw(b"r")]})
    _, frames = core.Core().encode("execute", fields)
    assert len(frames) == 5  # delimiter, body, big (args), big (kwargs), the Raw
    assert len(frames[1]) < 200  # the body holds references, not the bytes
    body = decode(frames)
    assert body["args"] == [big, b"small"] and body["kwargs"] == {"k": big, "nested": [b"r"]}


def test_nested_large_bytes_stay_in_the_body() -> None:
    big = b"b" * protocol.RAW_THRESHOLD
    _, frames = core.Core().encode("execute", core.execute_fields(TASK, [[big]], None))
    assert len(frames) == 2


@pytest.mark.parametrize(
    "array",
    [
        np.arange(12, dtype="<f8").reshape(3, 4),
        np.arange(10, dtype=">i4"),
        np.zeros((0, 3), dtype="u1"),
        np.arange(12).reshape(3, 4).T,  # not contiguous: copied once to send
        np.array(["a", "bc"]),
        np.array(5.5),
    ],
)
def test_numpy_arrays_round_trip_through_a_raw_frame(array: Any) -> None:
    frames = protocol.pack_frames({"x": array, "n": np.int64(3)})
    assert len(frames) == 2
    value = protocol.unpack(bytes(frames[0]), [bytes(f) for f in frames[1:]])
    assert value["n"] == 3 and type(value["n"]) is int
    out = value["x"]
    assert out.dtype == array.dtype and out.shape == array.shape and (out == array).all()


def test_object_arrays_are_refused() -> None:
    with pytest.raises(TypeError, match="Python objects"):
        protocol.pack_frames(np.array([object()]))


def ndarray_ref(dtype: str, shape: list[int], frame: int) -> bytes:
    data = msgpack.packb({"dtype": dtype, "shape": shape, "frame": frame})
    return msgpack.packb({"x": msgpack.ExtType(protocol.EXT_NDARRAY, data)})  # type: ignore[no-any-return]


@pytest.mark.parametrize(
    ("body", "raw", "fragment"),
    [
        (msgpack.packb(msgpack.ExtType(protocol.EXT_RAW, msgpack.packb(1))), [b"x"], "raw frame 1"),
        (msgpack.packb(msgpack.ExtType(protocol.EXT_RAW, msgpack.packb("a"))), [b"x"], "raw frame 'a'"),
        (ndarray_ref("<f8", [3], 0), [b"x" * 8], "needs 24 bytes"),
        (ndarray_ref("O", [1], 0), [b"x" * 8], "Python objects"),
        (ndarray_ref("nonsense", [1], 0), [b"x"], "unknown ndarray dtype"),
        (ndarray_ref("<f8", [-1], 0), [b"x"], "non-negative"),
        (msgpack.packb(msgpack.ExtType(protocol.EXT_NDARRAY, msgpack.packb([1]))), [b"x"], "must be a map"),
    ],
)
def test_hostile_raw_frame_references_are_bad_requests(body: bytes, raw: list[bytes], fragment: str) -> None:
    with pytest.raises(protocol.ProtocolError, match=fragment) as info:
        protocol.unpack(body, raw)
    assert info.value.code == protocol.BAD_REQUEST


def test_without_frames_references_stay_ext_types() -> None:
    # The master checks envelopes only: it never resolves (or trusts) references.
    body = protocol.pack_frames({"x": protocol.Raw(b"abc")})[0]
    assert isinstance(protocol.unpack(bytes(body))["x"], msgpack.ExtType)


# -- many calls ----------------------------------------------------------------------------------


def calls(n: int) -> list[core.Call]:
    return [((i,), {}) for i in range(n)]


def answer(
    c: core.Core, request_id: int, frames: list[protocol.Buffer], fail: frozenset[int] = frozenset()
) -> None:
    """Play the daemon for one request: echo each call's first argument."""
    body = decode(frames)
    if "calls" in body:
        results = [
            {"ok": False, "error": {"code": "TASK_ERROR", "message": "no", "details": {}}}
            if args[0] in fail
            else {"ok": True, "result": args[0]}
            for args, _ in body["calls"]
        ]
        c.feed(reply_frames(request_id, {"results": results}))
    else:
        c.feed(reply_frames(request_id, body["args"][0]))


def drain(b: core.Batch) -> list[tuple[int, list[protocol.Buffer]]]:
    sent = []
    while (request := b.next_request()) is not None:
        sent.append(request)
    return sent


def test_batch_keeps_at_most_window_requests_in_flight_and_reads_input_lazily() -> None:
    c = core.Core()
    pulled: list[int] = []

    def source() -> Any:
        for i in range(100):
            pulled.append(i)
            yield (i,), {}

    b = core.Batch(c, TASK, source(), window=3, chunksize=4)
    sent = drain(b)
    assert len(sent) == 3 and len(pulled) == 12 and c.in_flight() == 3
    answer(c, *sent[1])
    assert sorted(i for i, _, _ in b.take()) == [4, 5, 6, 7]
    assert len(drain(b)) == 1 and len(pulled) == 16


def test_batch_outcomes_cover_every_call_once_with_their_errors() -> None:
    c = core.Core()
    b = core.Batch(c, TASK, calls(25), window=2, chunksize=10)
    seen: dict[int, tuple[bool, Any]] = {}
    while not b.done:
        for request in drain(b):
            answer(c, *request, fail={3, 17})
        for index, ok, value in b.take():
            assert index not in seen
            seen[index] = (ok, value)
    assert sorted(seen) == list(range(25))
    assert {i for i, (ok, _) in seen.items() if not ok} == {3, 17}
    assert isinstance(seen[3][1], errors.TaskError) and seen[4] == (True, 4)


def test_a_chunk_level_error_fails_each_of_its_calls() -> None:
    c = core.Core()
    b = core.Batch(c, TASK, calls(5), window=1, chunksize=5)
    ((request_id, _),) = drain(b)
    c.feed(error_frames(request_id, protocol.WORKER_LOST))
    outcomes = b.take()
    assert [i for i, _, _ in outcomes] == [0, 1, 2, 3, 4]
    assert all(not ok and isinstance(v, errors.WorkerLost) for _, ok, v in outcomes)


def test_chunksize_one_sends_plain_executes_and_collects_streams() -> None:
    c = core.Core()
    b = core.Batch(c, TASK, calls(1), window=4, chunksize=1)
    ((request_id, frames),) = drain(b)
    assert decode(frames)["args"] == [0] and "calls" not in decode(frames)
    c.feed([b"", *protocol.encode_item_frames(request_id, 1, "a")])
    c.feed([b"", *protocol.encode_item_frames(request_id, 2, "b")])
    c.feed(reply_frames(request_id, {"items": 2}))
    assert b.take() == [(0, True, ["a", "b"])] and b.done


def test_chunks_send_args_and_kwargs_pairs() -> None:
    c = core.Core()
    b = core.Batch(c, TASK, [((1, 2), {"k": 3}), ((), {})], window=1, chunksize=2, timeout_s=5, retries=1)
    ((_, frames),) = drain(b)
    body = decode(frames)
    assert body["calls"] == [[[1, 2], {"k": 3}], [[], {}]]
    assert body["timeout_s"] == 5 and body["retries"] == 1


def test_a_short_results_list_is_a_protocol_mismatch_for_the_chunk() -> None:
    c = core.Core()
    b = core.Batch(c, TASK, calls(3), window=1, chunksize=3)
    ((request_id, _),) = drain(b)
    c.feed(reply_frames(request_id, {"results": [{"ok": True, "result": 1}]}))
    assert all(isinstance(v, errors.ProtocolMismatch) for _, _, v in b.take())


def test_refused_and_closed_batches_forget_their_requests() -> None:
    c = core.Core()
    b = core.Batch(c, TASK, calls(4), window=2, chunksize=2)
    (first, _), (second, _) = drain(b)
    b.refused(first, errors.MessageTooLarge("too big"))
    assert [(i, ok) for i, ok, _ in b.take()] == [(0, False), (1, False)]
    b.close()
    assert c.in_flight() == 0 and b.done
    c.feed(reply_frames(second, {"results": []}))  # late: dropped, no error


def test_batch_arguments_are_checked() -> None:
    with pytest.raises(ValueError, match="window"):
        core.Batch(core.Core(), TASK, [], window=0, chunksize=1)
    with pytest.raises(ValueError, match="chunksize"):
        core.Batch(core.Core(), TASK, [], window=1, chunksize=core.MAX_CHUNK + 1)


# -- workerctl run --batch bookkeeping -----------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "call", "problem"),
    [
        ('{"a": 1}\n', ((), {"a": 1}), None),
        ("[1, 2]\n", ([1, 2], {}), None),
        ("3\n", None, "input line 9 is a number: it must be a JSON object"),
        ("null\n", None, "input line 9 is null: it must be"),
        (
            "{nope\n",
            None,
            "input line 9 is not valid JSON: Expecting property name enclosed in double quotes at column 2",
        ),
    ],
)
def test_input_lines(text: str, call: Any, problem: str | None) -> None:
    _, parsed, why = batch.parse_input(text, 9)
    assert parsed == call
    assert (why is None) if problem is None else (why is not None and why.startswith(problem))


def test_records_are_json_with_line_input_and_result_or_error() -> None:
    ok = json.loads(jsonout.dumps(batch.record(3, {"a": 1}, True, b"\x00\xff")))
    assert ok == {"line": 3, "input": {"a": 1}, "result": {"base64": "AP8="}}
    failed = json.loads(jsonout.dumps(batch.record(4, [1], False, errors.TaskError("boom", {"type": "E"}))))
    assert failed["error"] == {"code": "TASK_ERROR", "message": "boom", "details": {"type": "E"}}
    assert json.loads(jsonout.dumps(np.arange(3))) == [0, 1, 2]


def test_json_output_has_no_nan_or_infinity_however_deep() -> None:
    def strict(text: str) -> Any:
        return json.loads(text, parse_constant=lambda name: pytest.fail(f"{name} is not JSON"))

    nan, inf = float("nan"), float("inf")
    value = {
        "a": nan,
        "b": [1.5, inf, {"c": -inf, "d": (nan,)}],
        "e": np.array([1.0, np.nan]),
        "f": np.float64(inf),
    }
    assert strict(jsonout.dumps(value)) == {
        "a": None,
        "b": [1.5, None, {"c": None, "d": [None]}],
        "e": [1.0, None],
        "f": None,
    }
    assert strict(jsonout.dumps({"ok": 1.5}, indent=2)) == {"ok": 1.5}


def test_every_workerctl_argument_has_help() -> None:
    def actions(parser: argparse.ArgumentParser) -> Iterator[tuple[str, argparse.Action]]:
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    yield from ((f"{name} {label}", a) for label, a in actions(sub))
            elif not isinstance(action, argparse._HelpAction):
                yield action.dest, action

    found = list(actions(cli.build_parser()))
    assert len(found) > 15 and [label for label, action in found if not action.help] == []


def test_task_errors_are_their_builtin_type_with_the_remote_traceback_as_cause() -> None:
    def task_error(kind: str, traceback: str = "") -> errors.WorkerdError:
        details = {"type": kind, "message": "m", "traceback": traceback}
        return errors.error_from_reply({"code": "TASK_ERROR", "message": f"{kind}: m", "details": details})

    exc = task_error("ValueError", "Traceback (most recent call last):\n  ...\nValueError: m\n")
    assert isinstance(exc, errors.TaskError) and isinstance(exc, ValueError) and str(exc) == "m"
    assert isinstance(exc.__cause__, errors.RemoteTraceback) and str(exc.__cause__).endswith(
        "ValueError: m\n"
    )
    assert isinstance(task_error("KeyError"), KeyError) and str(task_error("KeyError")) == "m"
    assert isinstance(task_error("FileNotFoundError"), OSError)
    unicode = task_error("UnicodeDecodeError")  # takes five arguments: its nearest base that takes one
    assert isinstance(unicode, UnicodeError) and not isinstance(unicode, UnicodeDecodeError)
    for other in ("MyAppError", "SystemExit", "print", "ResultTooLarge"):
        assert type(task_error(other)) is errors.TaskError
    assert task_error("ZeroDivisionError").__cause__ is None  # no traceback given: no cause
    assert type(pickle.loads(pickle.dumps(exc))) is type(exc)


def test_cancel_requests_are_at_most_the_limit_and_results_merge() -> None:
    ids = list(range(protocol.MAX_CANCEL_IDS + 5))
    requests = list(core.cancel_requests(ids, terminate=True))
    assert [len(r["ids"]) for r in requests] == [protocol.MAX_CANCEL_IDS, 5] and requests[0][
        "terminate"
    ] is True
    assert list(core.cancel_requests([], terminate=False)) == []
    merged: dict[str, list[int]] = {"cancelled": [1], "running": [], "unknown": []}
    core.merge_cancelled(merged, {"cancelled": [2], "running": [3], "unknown": []})
    assert merged == {"cancelled": [1, 2], "running": [3], "unknown": []}
    with pytest.raises(errors.ProtocolMismatch):
        core.merge_cancelled(merged, {"cancelled": [2]})


def test_resume_reads_done_lines_and_cuts_a_partial_last_line(tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    out.write_text('{"line": 1, "result": 1}\n{"line": 3, "error": {}}\ngarbage\n{"line": 7, "res')
    done = batch.read_done(str(out))
    assert 1 in done and 3 in done and 7 not in done and len(done) == 2
    assert out.read_text().endswith("garbage\n")
    assert len(batch.read_done(str(tmp_path / "absent.jsonl"))) == 0


def test_line_set_is_a_set_of_positive_ints() -> None:
    lines = batch.LineSet()
    for n in (1, 8, 9, 1_000_000, 8):
        lines.add(n)
    assert len(lines) == 4 and 1_000_000 in lines and 2 not in lines and 10**9 not in lines


def test_progress_line() -> None:
    progress = batch.Progress(total=100, done=40, failed=2, lost=1, skipped=10)
    text = progress.line()
    assert "40 done, 2 failed, 1 lost" in text and "ETA" in text and "%" in text
    assert "ETA" not in batch.Progress(done=1).line()


def test_compact_chunk_replies_become_outcomes_in_call_order() -> None:
    from workerctl.core import Batch

    error = {"code": "TASK_ERROR", "message": "ValueError: no", "details": {"type": "ValueError"}}
    out = Batch.chunk_outcomes(10, 3, {"values": [1, None, None], "errors": [[1, error]]})
    assert [(index, ok) for index, ok, _ in out] == [(10, True), (11, False), (12, True)]
    assert out[0][2] == 1 and out[2][2] is None
    assert isinstance(out[1][2], errors.TaskError) and isinstance(out[1][2], ValueError)


def test_auto_chunksize_follows_pool_map_for_sized_inputs_only() -> None:
    assert core.auto_chunksize(range(10_000), 64) == 40  # ceil(10000 / 256)
    assert core.auto_chunksize(range(10), 64) == 1
    assert core.auto_chunksize(range(10**8), 64) == core.AUTO_CHUNK_MAX
    assert core.auto_chunksize(iter(range(10_000)), 64) == 1
