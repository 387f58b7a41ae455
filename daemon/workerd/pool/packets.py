"""The zygote's channel: one JSON object per SOCK_SEQPACKET packet, a packet may carry an fd.

Runs in: both ends, the master (pool/zygotes.py) and the zygote (pool/zygote.py), whose
docstring draws the packets.
"""

from __future__ import annotations

import array
import json
import os
import socket
from typing import Any

MAX_PACKET = 1 << 20

Event = tuple[dict[str, Any], int | None]


def send(sock: socket.socket, message: dict[str, Any], fd: int | None = None) -> None:
    data = json.dumps(message).encode()
    if fd is None:
        sock.send(data)
    else:
        socket.send_fds(sock, [data], [fd])


def receive(sock: socket.socket) -> list[Event] | None:
    """The packets waiting now, each with its fd; None at EOF.

    Sends block (packets are small and both sides read promptly); reads never do."""
    events: list[Event] = []
    while True:
        try:
            data, fds = receive_packet(sock)
        except BlockingIOError:
            return events
        except ConnectionResetError:
            data, fds = b"", []
        if not data:
            for fd in fds:
                os.close(fd)
            return events or None
        events.append((json.loads(data), fds[0] if fds else None))


def receive_packet(sock: socket.socket) -> tuple[bytes, list[int]]:
    """One packet and its fds, without waiting (socket.recv_fds drops its flags on 3.11).

    The only place fds are received. MSG_CMSG_CLOEXEC: an fd received without it is
    inheritable, and spawn passes inheritable fds on (spawn closes strays as well)."""
    flags = socket.MSG_DONTWAIT | socket.MSG_CMSG_CLOEXEC
    data, ancillary, _, _ = sock.recvmsg(MAX_PACKET, socket.CMSG_LEN(4), flags)
    fds = array.array("i")
    for level, kind, payload in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
    return data, list(fds)
