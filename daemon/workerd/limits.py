"""How much memory one client can make the master hold for its replies, and cutting it off.

Runs in: the master.

What libzmq 4.3.5 (pyzmq 27) offers, as measured here (docs/protocol.md §9 has the numbers):

- SNDHWM and RCVHWM count whole messages, whatever their size or number of frames. ZMQ_SNDBUF
  and ZMQ_RCVBUF size the kernel's socket buffers, not libzmq's queues. So nothing in libzmq
  bounds in bytes what waits for a client that does not read: 20 replies of 50 MB to such a
  client held 974 MiB in the master.
- A frame sent zero-copy with track=True reports when libzmq has let go of it: written into the
  kernel's socket buffer, or dropped with its connection. That is the one byte-exact view of a
  client's backlog, and it costs nothing for frames of 64 KiB and more (pyzmq sends those
  zero-copy anyway, through the same free callback; tracking one was measured no slower, while
  tracking small frames tripled their cost). So big frames are counted in bytes (Backlog) and
  small ones by SNDHWM, which ROUTER_MANDATORY turns from a silent drop into an error we act on.
- ZMQ_SRCFD on a received frame is the descriptor of the connection it came on (ipc included,
  though the manual says TCP only), and shutdown() on that descriptor makes libzmq drop the
  connection and everything queued for it, at once (measured: 100 MB of queued replies freed
  within 2 ms). That is how one client is cut off (Connections.cut); its DEALER reconnects.
- The ROUTER's socket monitor reports EVENT_DISCONNECTED with the descriptor of the connection
  that went (ipc included), within about 2 ms of its peer process dying by any signal
  (measured: SIGTERM, SIGHUP, SIGKILL of a DEALER's process). With the SRCFD map below that
  names the client that has gone (ClientLimits.read_departures); ZeroMQ heartbeats, the other
  way, would only add traffic and a timeout before the same news.
- Inbound, libzmq can bound nothing that matters: ZMQ_MAXMSGSIZE bounds each frame, and a
  message is delivered only once all its frames are in, so a message of many frames is whole
  in the master's memory before any code of ours sees it (500 frames of 1 MiB: 523 MiB). What
  the master then does with it is bounded elsewhere (jobs.check_raw_frames); docs/protocol.md
  §9 says plainly what remains.
"""

from __future__ import annotations

import collections
import logging
import os
import socket
import struct
from collections.abc import Callable, Sequence
from typing import Any

import zmq

from workerctl.frames import SNDMORE
from workerctl.protocol import frame_size
from workerd.access import PEER_PROPERTY, parse_peer_address

log = logging.getLogger("workerd")

# Replies waiting for one client in libzmq, by count. Past it the client is cut off instead of
# its replies being dropped (a dropped terminal reply is a request that never ends): a client
# whose libzmq reads (workerctl's never stops) keeps this near zero.
CLIENT_SNDHWM = 10_000
# Frames this big are sent zero-copy and tracked: pyzmq's own copy threshold (zmq.COPY_THRESHOLD).
TRACKED_BYTES = 64 * 1024
# Bytes of tracked replies that may wait for all clients together, in units of the message
# limit: enough for many clients fetching big results at once, bounded whatever they do.
BACKLOG_MESSAGES = 16
# Clients cut off or gone lately, whose messages are ignored: libzmq still delivers what a cut
# connection had sent, and answering it would find the queue full again (and, as the client's
# DEALER reconnects on the same fd number, cut its new connection): measured, 499 cuts in a row.
# A departed client's leftovers would start work for nobody. They arrive within moments; the
# routing ids libzmq makes up are never reused.
RECENT_GONE = 4096
NOBLOCK = int(zmq.NOBLOCK)
DISCONNECTED = int(zmq.EVENT_DISCONNECTED)
# A monitor event's first frame: the event (uint16) and its value (uint32, here the fd).
EVENT_FRAME = struct.Struct("=HI")


def made_up(client: bytes) -> bool:
    """Is this a routing id libzmq made up (never reused)? A client's own ZMQ_ROUTING_ID
    cannot start with a zero byte, and comes back when that client reconnects."""
    return client[:1] == b"\x00"


class Connections:
    """Which connection each client (ROUTER routing id) came on, from its messages' metadata."""

    def __init__(self, path: str) -> None:
        self.path = path  # accepted connections report the listening socket's path
        self.clients: dict[bytes, tuple[int, int]] = {}  # routing id -> (fd, peer pid)
        self.owners: dict[int, bytes] = {}  # fd -> routing id

    def note(self, client: bytes, fd: int, frame: zmq.Frame) -> None:
        """Note that `client` (its routing-id frame) came on descriptor `fd`.

        An fd number belongs to one connection at a time, so a new owner of a number replaces
        the old one: the table never holds more entries than descriptors were open at once."""
        try:
            peer = parse_peer_address(str(frame.get(PEER_PROPERTY)))
        except zmq.ZMQError:
            return  # see ClientLimits.seen
        previous = self.owners.pop(fd, None)
        if previous is not None:
            self.clients.pop(previous, None)
        self.owners[fd] = client
        self.clients[client] = (fd, peer.pid if peer else -1)

    def closed(self, fd: int) -> bytes | None:
        """The connection on `fd` has gone: whose it was, if we knew."""
        client = self.owners.pop(fd, None)
        if client is not None and self.clients.get(client, (fd,))[0] == fd:
            self.clients.pop(client, None)
        return client

    def cut(self, client: bytes) -> bool:
        """Shut the client's connection down; libzmq then drops it and what is queued for it.

        The fd may have been closed and reused since the client's last message: it is shut only
        if it is still a connection to our socket from the same process (so the worst a reused
        number can do is cut another connection of that same client process)."""
        entry = self.clients.pop(client, None)
        if entry is None:
            return False
        fd, pid = entry
        try:
            conn = socket.socket(fileno=os.dup(fd))
        except OSError:
            self.owners.pop(fd, None)
            return False
        try:
            if not same_connection(conn, self.path, pid):
                self.owners.pop(fd, None)
                return False
            # Its owner stays noted: the monitor's disconnect then says the client has gone.
            conn.shutdown(socket.SHUT_RDWR)
            return True
        except OSError:
            return False
        finally:
            conn.close()  # our duplicate only: libzmq closes its own descriptor


def same_connection(conn: socket.socket, path: str, pid: int) -> bool:
    if conn.family != socket.AF_UNIX or conn.getsockname() != path:
        return False
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)
    return int.from_bytes(creds[:4], "little", signed=True) == pid


class Backlog:
    """Bytes of tracked reply frames that libzmq still holds, per client."""

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self.total = 0
        self.pending: dict[bytes, collections.deque[tuple[zmq.MessageTracker, int]]] = {}

    def add(self, client: bytes, tracker: zmq.MessageTracker, size: int) -> None:
        if client in self.pending:
            self.prune(client, self.pending[client])
        self.pending.setdefault(client, collections.deque()).append((tracker, size))
        self.total += size

    def prune(self, client: bytes, queue: collections.deque[tuple[zmq.MessageTracker, int]]) -> int:
        """Forget what libzmq has let go of (it goes out in order, so from the left); the rest."""
        while queue and queue[0][0].done:
            self.total -= queue.popleft()[1]
        if not queue:
            del self.pending[client]
        return sum(size for _, size in queue)

    def over(self) -> bytes | None:
        """The client holding the most, if all together hold more than the budget."""
        if self.total <= self.budget:
            return None
        held = {client: self.prune(client, queue) for client, queue in list(self.pending.items())}
        if self.total <= self.budget:
            return None
        return max(held, key=held.__getitem__)

    def drop(self, client: bytes) -> int:
        """Stop counting a client that was cut off (libzmq frees its frames within moments)."""
        size = sum(size for _, size in self.pending.pop(client, ()))
        self.total -= size
        return size


class ClientLimits:
    """The master's replies, sent so that no client can make it hold more than its budget; and
    which clients have gone (their connection closed), told to `on_departed` as soon as known."""

    def __init__(
        self,
        sock: zmq.Socket[Any],
        path: str,
        max_message_bytes: int,
        counters: collections.Counter[str],
        on_departed: Callable[[bytes], None],
    ) -> None:
        self.sock = sock
        self.connections = Connections(path)
        self.backlog = Backlog(BACKLOG_MESSAGES * max_message_bytes)
        self.counters = counters
        self.on_departed = on_departed
        self.gone: dict[bytes, None] = {}  # cut off or departed lately; the oldest go first
        # Watched in the master's reactor (read_departures); read too before a new client is
        # noted, so that an fd's old owner is known gone before its number is given to another.
        self.monitor = sock.get_monitor_socket(zmq.EVENT_DISCONNECTED)

    def close(self) -> None:
        """Before the ROUTER is closed: a monitor left open makes the context's term() hang."""
        self.sock.disable_monitor()
        self.monitor.close(linger=0)

    def seen(self, client: bytes, frame: zmq.Frame) -> bool:
        """Note a message from `client`; False if its connection was cut off or is gone (drop it)."""
        if client in self.gone:
            return False
        try:
            fd = frame.get(zmq.SRCFD)
        except zmq.ZMQError:
            # Seen once in a flood of short-lived connections (EINVAL: the message came without
            # libzmq's metadata). Such a client cannot be cut off (replies past its queue drop),
            # nor be told gone (its work runs on).
            return True
        if self.connections.owners.get(fd) == client:
            return True  # the fast path: one dict lookup per message
        # A connection's DISCONNECTED is queued before libzmq closes its fd, so before the number
        # can come back on a new connection: read now, the fd's old owner is never taken for
        # this client.
        self.read_departures()
        if client in self.gone:
            return False
        self.connections.note(client, fd, frame)
        return True

    def read_departures(self) -> None:
        """Every disconnect the monitor has queued: each known client's departure is told."""
        while True:
            try:
                event = self.monitor.recv(NOBLOCK)
                self.monitor.recv()  # the endpoint: always our socket's
            except zmq.Again:
                return
            kind, fd = EVENT_FRAME.unpack_from(event)
            client = self.connections.closed(fd) if kind == DISCONNECTED else None
            if client is None:
                continue  # a connection that never sent a message, or one we had cut
            if made_up(client):
                self.forget(client)
            self.backlog.drop(client)
            self.on_departed(client)

    def forget(self, client: bytes) -> None:
        self.gone[client] = None
        if len(self.gone) > RECENT_GONE:
            del self.gone[next(iter(self.gone))]

    def send(self, client: bytes, frames: Sequence[Any]) -> None:
        """Send [b"", body, *raw] to `client`; never blocks, never drops a reply silently.

        A client that has gone is skipped (as before). One whose queue is full (CLIENT_SNDHWM),
        or who holds the most when the backlog is over its budget, is cut off: its requests in
        flight end for it with the lost connection, which its client reports at once."""
        if client in self.gone:
            return
        try:
            self.sock.send(client, SNDMORE | NOBLOCK)
        except zmq.Again:
            self.cut(client, "its queue of replies is full")
            return
        except zmq.ZMQError as exc:
            if exc.errno == zmq.EHOSTUNREACH:
                return  # disconnected: nobody to answer
            raise
        last = len(frames) - 1
        if last == 1 and type(frames[1]) is bytes and len(frames[1]) < TRACKED_BYTES:
            self.sock.send(frames[0], SNDMORE)  # [b"", body]: most replies, nothing to track
            self.sock.send(frames[1])
            return
        for index, frame in enumerate(frames):
            flags = SNDMORE if index < last else 0
            size = frame_size(frame)
            if size < TRACKED_BYTES:
                self.sock.send(frame, flags)
                continue
            # A received zmq.Frame is sent as a view, so that this send has a tracker of its own.
            data = frame.buffer if isinstance(frame, zmq.Frame) else frame
            self.backlog.add(client, self.sock.send(data, flags, copy=False, track=True), size)
        holder = self.backlog.over()
        if holder is not None:
            mib = self.backlog.drop(holder) / 2**20
            self.cut(holder, f"{mib:.0f} MiB of replies waited for it, past the backlog limit")

    def cut(self, client: bytes, why: str) -> None:
        self.backlog.drop(client)
        if not self.connections.cut(client):
            return  # its connection is gone already (its number now someone else's)
        self.forget(client)
        self.counters["clients_cut_off"] += 1
        log.warning("cut off a client that does not read its replies: %s", why)
