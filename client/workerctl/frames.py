"""Multipart send and receive without pyzmq's per-call overhead, for the client and the daemon.

pyzmq's constants are enums, and send_multipart does enum arithmetic for every frame; so does
getsockopt, for its option. A drain recvs NOBLOCK until zmq.Again and reads Frame.more: one
exception at the end of a burst costs less than a getsockopt per message and per frame.
These few lines are on every message's path, on both sides of the socket.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, cast

import zmq

from .protocol import Buffer

# Plain ints: pyzmq's constants are enums, and enum arithmetic costs microseconds per message.
EVENTS, POLLIN, SNDMORE = int(zmq.EVENTS), int(zmq.POLLIN), int(zmq.SNDMORE)
NOBLOCK = int(zmq.NOBLOCK)


def readable(sock: zmq.Socket[Any]) -> bool:
    """A message waits on `sock`. Cheaper than a NOBLOCK recv that raises zmq.Again."""
    return bool(cast(int, sock.getsockopt(EVENTS)) & POLLIN)


def receive_waiting(sock: zmq.Socket[Any], feed: Callable[[list[Buffer]], Any], limit: int) -> int:
    """Hand up to `limit` messages that wait on `sock` to `feed`, without waiting; how many.

    The first two frames (the reply's envelope and body) are copied; raw frames after them are
    taken without a copy (an array is then a view of the message). NOBLOCK recvs until zmq.Again:
    the one exception at the end of a drain costs less than asking `readable` before each of
    the many replies that arrive together."""
    count = 0
    recv = sock.recv
    while count < limit:
        try:
            frame = recv(NOBLOCK, copy=False)
        except zmq.Again:
            break
        frames: list[Buffer] = [frame.bytes]
        while frame.more:  # Frame.more, not getsockopt(RCVMORE): pyzmq makes an enum of each option
            frame = recv(copy=False)
            frames.append(frame.bytes if len(frames) < 2 else frame.buffer)
        feed(frames)
        count += 1
    return count


def send_frames(
    sock: zmq.Socket[Any], frames: Sequence[Buffer | zmq.Frame], copy: bool | None = None
) -> None:
    """send_multipart without its per-frame enum arithmetic.

    A zmq.Frame (what the daemon received from a client) is sent as is, without a copy.

    By default, raw frames (messages of more than two frames on the client: numpy arrays, large
    bytes) leave zero-copy: zmq holds a reference to each buffer until it is sent, so do not
    modify an array you just sent. Small frames are cheaper copied."""
    last = len(frames) - 1
    if copy is None:
        copy = last == 1
    for index, frame in enumerate(frames):
        sock.send(frame, SNDMORE if index < last else 0, copy=copy)
