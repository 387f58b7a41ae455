"""The channel between the master and one worker: a Unix socketpair carrying multipart messages.

Runs in: both ends of every channel: the master (non-blocking) and each child.

One message on the stream, all integers unsigned 32-bit little-endian:

    +----------+---------+-----+-----------+---------+-----+-------------+
    | n frames | len 0   | ... | len n-1   | frame 0 | ... | frame n-1   |
    +----------+---------+-----+-----------+---------+-----+-------------+

Why not the ZeroMQ ROUTER the workers used before: measured on 2 cores (bench/transport.py), a
round trip over a socketpair costs a fraction of one over ipc ROUTER/DEALER, whose every message
crosses libzmq's I/O thread twice on each side and costs a Python call per frame. A socketpair
also needs no context in the worker (a forked worker must never inherit one), lets the master's
poller watch each worker's fd directly, and gives EOF when the worker is gone.

The master's end is non-blocking: `send` only queues, `flush` writes what the kernel takes (one
sendmsg for everything queued), and the rest waits for POLLOUT. A worker's end blocks: it has
nothing else to do. A small message is joined into one buffer when it is queued (one copy of a
few hundred bytes costs less than the memoryview and iovec entry per frame); one of JOIN_MAX
bytes or more goes by reference, its frames never copied.

Reading takes whatever has arrived in one recv and splits it into messages. A message whose
frames are all small and all there (every job and every reply of a normal run) is cut in one
pass; a frame of LARGE_FRAME bytes or more is read straight into a buffer of its own instead of
being copied out of the receive buffer. A recv that returned less than it had room for emptied
the socket: no second recv is made just to be told EAGAIN.
"""

from __future__ import annotations

import collections
import itertools
import select
import socket
import struct
from collections.abc import Sequence
from typing import Any

Buffer = bytes | bytearray | memoryview
Message = list[Buffer]

U32 = struct.Struct("<I")
RECV_SIZE = 256 * 1024
LARGE_FRAME = 64 * 1024
JOIN_MAX = 16 * 1024  # a message under this many bytes is sent as one joined buffer
# sendmsg takes at most IOV_MAX (1024 on Linux) buffers per call.
MAX_IOV = 1000
MAX_FRAMES = 4096
MAX_READS = 64


class ChannelError(Exception):
    """The peer broke the framing (or a size limit): the channel cannot be trusted any more."""


def channel_pair(max_frame: int) -> tuple[Channel, socket.socket]:
    """A master-side Channel and the worker's raw socket (to hand to the worker process)."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    return Channel(ours, max_frame, blocking=False), theirs


# What one recv did (Channel._read).
EOF_, NOTHING, FILLED, DRAINED = None, 0, 1, 2

# The header's Struct per frame count: "<{n + 1}I", compiled once.
HEADERS: dict[int, struct.Struct] = {}


def header_struct(count: int) -> struct.Struct:
    layout = HEADERS.get(count)
    if layout is None:
        layout = HEADERS[count] = struct.Struct(f"<{count + 1}I")
    return layout


def sizes_of(frames: Sequence[Any]) -> list[int]:
    return [f.nbytes if type(f) is memoryview else len(f) for f in frames]


def pack_header(sizes: list[int]) -> bytes:
    return header_struct(len(sizes)).pack(len(sizes), *sizes)


def header(frames: Sequence[Any]) -> bytes:
    return pack_header(sizes_of(frames))


class Channel:
    def __init__(self, sock: socket.socket, max_frame: int, blocking: bool) -> None:
        self.sock = sock
        sock.setblocking(blocking)
        self.blocking = blocking
        self.max_frame = max_frame
        self.out: collections.deque[memoryview] = collections.deque()
        self.closed = False
        self._buf = bytearray(RECV_SIZE)
        self._view = memoryview(self._buf)
        self._start = 0  # unread data is _buf[_start:_end]
        self._end = 0
        self._sizes: list[int] | None = None  # the frame sizes of the message being read
        self._frames: Message = []  # its frames read so far
        self._large: memoryview | None = None  # a large frame being filled in place
        self._large_at = 0
        # A blocking end asks whether anything came before it reads without waiting: poll(0)
        # costs 0.5 µs, a recv that ends in EAGAIN 2.2 µs (its exception), and a worker asks
        # before each prefetched job, where nothing has come most of the time.
        self._poll = select.poll() if blocking else None
        if self._poll is not None:
            self._poll.register(sock, select.POLLIN)

    def fileno(self) -> int:
        return self.sock.fileno()

    # -- sending -------------------------------------------------------------------------------

    def send(self, frames: Sequence[Any]) -> None:
        """Queue one message; a blocking channel writes it at once."""
        sizes = sizes_of(frames)
        head = pack_header(sizes)
        if sum(sizes) < JOIN_MAX:
            joined = b"".join((head, *frames))
            if self.blocking and not self.out:
                self.sock.sendall(joined)  # a worker's reply: one syscall, nothing queued
                return
            self.out.append(memoryview(joined))
        else:
            self.out.append(memoryview(head))
            for frame in frames:
                view = frame if isinstance(frame, memoryview) else memoryview(frame)
                if view.nbytes:
                    self.out.append(view if view.format == "B" and view.ndim == 1 else view.cast("B"))
        if self.blocking:
            self.flush()

    @property
    def pending(self) -> bool:
        return bool(self.out)

    def flush(self) -> bool:
        """Write what the kernel takes now (everything, when blocking); True when nothing waits.

        Raises OSError (EPIPE, ECONNRESET) when the peer is gone."""
        out = self.out
        while out:
            batch = list(itertools.islice(out, MAX_IOV))
            try:
                sent = self.sock.sendmsg(batch)
            except BlockingIOError:
                return False
            except InterruptedError:  # pragma: no cover - PEP 475 retries, a signal mid-write
                continue
            while sent:
                head = out[0]
                if sent >= head.nbytes:
                    sent -= head.nbytes
                    out.popleft()
                else:
                    out[0] = head[sent:]
                    sent = 0
        return True

    # -- receiving -----------------------------------------------------------------------------

    def receive(self, block: bool = False) -> list[Message] | None:
        """The complete messages available now, or None at EOF with nothing left to read.

        With block=True (a worker's end) waits until at least one message has arrived. Reads at
        most MAX_READS times, so a peer that writes without pause cannot hold the caller here."""
        messages: list[Message] = []
        self._parse(messages)  # what an earlier read left complete
        for _ in range(MAX_READS):
            got = self._read(wait=block and not messages)
            if got is EOF_:
                return messages or None
            if got == NOTHING:
                break
            self._parse(messages)
            if got == DRAINED and (messages or not block):
                break
        return messages

    def _read(self, wait: bool) -> int | None:
        """One recv: FILLED (it filled its room: more may wait), DRAINED (it took less, so the
        socket is empty now), NOTHING (EAGAIN), or EOF_."""
        if self._large is not None:
            target = self._large[self._large_at :]
        else:
            self._make_room()
            target = self._view[self._end :]
        if not wait and self._poll is not None and not self._poll.poll(0):
            return NOTHING
        try:
            count = self.sock.recv_into(target)  # waits only when asked to (a blocking end)
        except BlockingIOError:
            return NOTHING
        except ConnectionResetError:
            count = 0
        if count == 0:
            self.closed = True
            return EOF_
        if self._large is not None:
            self._large_at += count
        else:
            self._end += count
        return FILLED if count == target.nbytes else DRAINED

    def _make_room(self) -> None:
        if self._start == self._end:
            self._start = self._end = 0
        elif self._end == len(self._buf):
            # Move the partial message to the front; it is smaller than the buffer, since a
            # message part bigger than LARGE_FRAME is read in place, and headers are bounded.
            pending = self._end - self._start
            self._buf[:pending] = self._buf[self._start : self._end]
            self._start, self._end = 0, pending

    def _parse(self, messages: list[Message]) -> None:
        """Append the messages the buffer holds whole. A message all of whose frames are small and
        here is cut at once (_cut, every job and every reply of a normal run); one with a large
        frame, or not all here yet, is taken frame by frame (_take_frames), which remembers where
        it stopped."""
        while True:
            if self._sizes is not None:
                if self._large is not None:
                    if self._large_at < len(self._large):
                        return
                    self._frames.append(self._large.obj)  # type: ignore[arg-type]
                    self._large = None
                if not self._take_frames():
                    return
                messages.append(self._frames)
                self._frames, self._sizes = [], None
            if not self._cut(messages):
                return

    def _cut(self, messages: list[Message]) -> bool:
        """Cut whole small messages out of the buffer, in one loop over locals; True when it
        stopped at a message for _take_frames (its header read, `_sizes` set), False when the
        buffer holds no whole header."""
        buf, view, start, end = self._buf, self._view, self._start, self._end
        try:
            while end - start >= 4:
                (count,) = U32.unpack_from(buf, start)
                if not 1 <= count <= MAX_FRAMES:
                    raise ChannelError(f"a message of {count} frames")
                at = start + 4 + 4 * count  # within the buffer: MAX_FRAMES bounds the header
                if at > end:
                    return False
                sizes = header_struct(count).unpack_from(buf, start)[1:]
                largest = max(sizes)
                if largest > self.max_frame:
                    raise ChannelError(f"a frame of {largest} bytes, over the limit of {self.max_frame}")
                stop = at + sum(sizes)
                if stop > end or largest >= LARGE_FRAME:
                    start, self._sizes = at, list(sizes)
                    return True
                if count == 1:
                    messages.append([bytes(view[at:stop])])
                else:
                    whole, offset = bytes(view[at:stop]), 0
                    frames: Message = []
                    for size in sizes:
                        frames.append(whole[offset : offset + size])
                        offset += size
                    messages.append(frames)
                start = stop
            return False
        finally:
            self._start = start

    def _take_frames(self) -> bool:
        """Cut the frames of the message being read out of the buffer; True once it is whole."""
        sizes, frames, view = self._sizes, self._frames, self._view
        assert sizes is not None
        start, end = self._start, self._end
        for size in sizes[len(frames) :]:
            if size >= LARGE_FRAME:
                self._start = start
                self._start_large(size, end - start)
                if self._large is not None:
                    return False
                start = self._start
            elif end - start < size:
                self._start = start
                return False
            else:
                frames.append(bytes(view[start : start + size]))
                start += size
        self._start = start
        return True

    def _start_large(self, size: int, available: int) -> None:
        """Give a large frame a buffer of its own, with what has arrived of it already."""
        target = bytearray(size)
        have = min(size, available)
        target[:have] = self._view[self._start : self._start + have]
        self._start += have
        if have == size:
            self._frames.append(target)
            return
        self._large, self._large_at = memoryview(target), have

    def close(self) -> None:
        self.closed = True
        self.out.clear()
        self.sock.close()
