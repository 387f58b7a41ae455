"""Multipart send and receive without pyzmq's per-call overhead, for the client and the daemon.

pyzmq's constants are enums, and send_multipart does enum arithmetic for every frame; a drain
loop of NOBLOCK recvs ends in a raised zmq.Again, which costs more than the message itself.
These few lines are on every message's path, on both sides of the socket.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, cast

import zmq

from .protocol import Buffer

# Plain ints: pyzmq's constants are enums, and enum arithmetic costs microseconds per message.
EVENTS, RCVMORE, POLLIN, SNDMORE = int(zmq.EVENTS), int(zmq.RCVMORE), int(zmq.POLLIN), int(zmq.SNDMORE)


def readable(sock: zmq.Socket[Any]) -> bool:
    """A message waits on `sock`. Cheaper than a NOBLOCK recv that raises zmq.Again."""
    return bool(cast(int, sock.getsockopt(EVENTS)) & POLLIN)


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
