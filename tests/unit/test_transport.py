"""The socketpair channel: framing survives any split of the byte stream, big frames included."""

from __future__ import annotations

import array
import os
import socket
import threading
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from workerd.core.transport import JOIN_MAX, LARGE_FRAME, Channel, ChannelError, channel_pair, header

frames_st = st.lists(
    st.one_of(st.binary(max_size=300), st.integers(LARGE_FRAME - 2, LARGE_FRAME + 3).map(os.urandom)),
    min_size=1,
    max_size=5,
)


@settings(max_examples=200, deadline=None)
@given(st.lists(frames_st, min_size=1, max_size=6), st.integers(1, 70_000))
def test_messages_arrive_whole_however_the_stream_is_cut(messages: list[list[bytes]], step: int) -> None:
    """Bytes fed in pieces of `step` come out as the same messages, in order."""
    ours, theirs = socket.socketpair()
    reader = Channel(ours, max_frame=1 << 20, blocking=False)
    stream = b"".join(header(m) + b"".join(m) for m in messages)
    # At most ~500 pieces: a stream of several large frames cut byte by byte took seconds per
    # example, and cuts at every offset are still tried on the short streams.
    step = max(step, len(stream) // 500)
    received: list[list[bytes]] = []
    theirs.setblocking(False)
    for at in range(0, len(stream), step):
        theirs.sendall(stream[at : at + step])
        while True:
            got = reader.receive()
            assert got is not None
            if not got:
                break
            received.extend([bytes(f) for f in m] for m in got)
    theirs.close()
    while (got := reader.receive()) is not None:
        received.extend([bytes(f) for f in m] for m in got)
    assert received == messages
    reader.close()


def test_master_end_queues_until_the_peer_reads() -> None:
    """A non-blocking sender never blocks: what the kernel does not take waits for flush()."""
    master, worker_sock = channel_pair(max_frame=8 << 20)
    worker = Channel(worker_sock, max_frame=8 << 20, blocking=True)
    payload = os.urandom(4 << 20)
    for n in range(3):
        master.send([b"run", b"%d" % n, memoryview(payload)])
    assert not master.flush()  # 12 MiB do not fit a socket buffer
    got: list[list[bytes]] = []

    def read() -> None:
        while len(got) < 3:
            messages = worker.receive(block=True)
            assert messages is not None
            got.extend([bytes(f) for f in m] for m in messages)

    thread = threading.Thread(target=read)
    thread.start()
    while not master.flush():
        pass
    thread.join(10)
    assert [m[:2] for m in got] == [[b"run", b"0"], [b"run", b"1"], [b"run", b"2"]]
    assert all(m[2] == payload for m in got)
    master.close()
    worker.close()


def test_eof_after_the_last_message() -> None:
    master, worker_sock = channel_pair(max_frame=1024)
    worker = Channel(worker_sock, max_frame=1024, blocking=True)
    worker.send([b"done", b"1"])
    worker.close()
    assert master.receive() == [[b"done", b"1"]]
    assert master.receive() is None
    master.close()


def test_oversized_frame_is_refused() -> None:
    master, worker_sock = channel_pair(max_frame=100)
    worker = Channel(worker_sock, max_frame=1 << 20, blocking=True)
    worker.send([b"x" * 101])
    with pytest.raises(ChannelError):
        master.receive()
    master.close()
    worker.close()


def test_small_messages_go_joined_and_big_frames_by_reference() -> None:
    """Under JOIN_MAX a message is one buffer (any buffer type, a float array's bytes included);
    a frame of a bigger message is queued as a view of the caller's own buffer, not copied."""
    master, worker_sock = channel_pair(max_frame=1 << 20)
    worker = Channel(worker_sock, max_frame=1 << 20, blocking=True)
    floats = array.array("d", [1.5, -2.0])
    master.send([b"run", memoryview(floats), bytearray(b"x")])
    assert len(master.out) == 1
    big = bytearray(JOIN_MAX)
    master.send([b"big", big])
    assert len(master.out) == 4 and master.out[-1].obj is big  # header, b"big", big
    assert master.flush()
    got: list[list[bytes]] = []
    while len(got) < 2:
        messages = worker.receive(block=True)
        assert messages is not None
        got.extend([bytes(f) for f in m] for m in messages)
    assert got == [[b"run", floats.tobytes(), b"x"], [b"big", bytes(big)]]
    master.close()
    worker.close()


def test_a_blocking_end_waits_for_a_whole_message_across_short_reads() -> None:
    """A recv that empties the socket ends the read, but a blocking end that has no whole
    message yet reads on: receive(block=True) never returns empty-handed."""
    ours, theirs = socket.socketpair()
    worker = Channel(ours, max_frame=1024, blocking=True)
    message = header([b"abc", b"defg"]) + b"abcdefg"
    got: list[list[bytes]] = []
    thread = threading.Thread(target=lambda: got.extend(worker.receive(block=True) or []))
    thread.start()
    for byte in message:
        theirs.send(bytes([byte]))
        time.sleep(0.002)
    thread.join(5)
    assert [[bytes(f) for f in m] for m in got] == [[b"abc", b"defg"]]
    worker.close()
    theirs.close()


@pytest.mark.parametrize("count", [0, 4097])
def test_a_header_with_no_frames_or_too_many_is_refused(count: int) -> None:
    ours, theirs = socket.socketpair()
    master = Channel(ours, max_frame=1024, blocking=False)
    theirs.sendall(count.to_bytes(4, "little") + bytes(16))
    with pytest.raises(ChannelError, match=f"a message of {count} frames"):
        master.receive()
    master.close()
    theirs.close()


def test_frames_are_bytes_whether_cut_whole_or_frame_by_frame() -> None:
    """Job ids are looked up in sets and dicts: a frame must be hashable bytes, both when its
    message is cut at once and when it is read across reads (or beside a large frame)."""
    ours, theirs = socket.socketpair()
    master = Channel(ours, max_frame=1 << 20, blocking=False)
    whole = header([b"done", b"7"]) + b"done7"
    split = header([b"done", b"8", b"x" * LARGE_FRAME]) + b"done8" + b"x" * LARGE_FRAME
    theirs.sendall(whole + split[:9])  # the second message's header not all there yet
    got = master.receive()
    assert got is not None and len(got) == 1
    theirs.sendall(split[9:])  # all of it is readable once sendall returns: one receive takes it
    got += master.receive() or []
    assert len(got) == 2
    assert [type(f) for f in got[0]] == [bytes, bytes]
    assert [type(f) for f in got[1][:2]] == [bytes, bytes]
    assert {got[0][1], got[1][1]} == {b"7", b"8"}
    master.close()
    theirs.close()
