"""Hostile input on the live control socket of a real daemon.

Every kind of message a careless or malicious peer can send: random bytes, truncated and mutated
msgpack, invalid msgpack, wrong types in every field of every command, deep nesting, huge
declared lengths, huge real messages (under and over the limit), unknown commands and versions,
broken framing, and floods of half-open connections. The invariants, checked at the wire:

- every message under the size limit gets exactly one terminal reply, with the id the daemon
  could read from it (the multiset of reply ids equals the multiset of expected ids);
- afterwards the daemon answers ping, runs tasks correctly, and its RSS grew by less than 10 MB.

The generators are seeded (the seed is in the report), so a failure can be replayed.
"""

from __future__ import annotations

import collections
import contextlib
import math
import os
import random
import resource
import socket
import struct
import time
from collections.abc import Callable, Iterator
from typing import Any

import msgpack
import pytest
import zmq

from tests.conftest import Daemon
from tests.reliability.harness import Counter, fds, mib, report, rss, scaled
from workerctl import Client, errors, protocol

TASKS = "workerd.examples.tasks"
ECHO = f"{TASKS}:echo"
MAX_MESSAGE_MB = 2
LIMIT = MAX_MESSAGE_MB * 1024 * 1024
CONFIG = f"""\
[daemon]
max_message_mb = {MAX_MESSAGE_MB}
stop_timeout_s = 5

[pool]
workers = 2
task_timeout_s = 5

[tasks]
modules = ["{TASKS}"]

[gpu]
enabled = "false"
"""
RSS_GROWTH_LIMIT = 10 * 1024 * 1024

# Task names the fuzzer may put in `name`: none of them sleeps, loops or allocates on request,
# so hostile arguments cost the workers little (sleep, count, leak, payload, crash are left out).
NAMES = [
    ECHO,
    f"{TASKS}:fail",
    f"{TASKS}:word_lengths",
    f"{TASKS}:pid",
    f"{TASKS}:absent",
    f"{TASKS}:_LEAKED",
    "os:system",
    "builtins:eval",
    "subprocess:run",
    "demo",
    "no-such-pipeline",
    "",
    ":",
    "a:",
    ":b",
    "a:b:c",
    "x" * 10_000,
    "workerd.examples.tasks:echo\x00",
]
FIELDS = ["v", "id", "cmd", "name", "args", "kwargs", "timeout_s", "retries", "calls", "level", "workers"]
COMMANDS = ["ping", "status", "memory_status", "clear_memory", "execute", "scale"]
BASES: dict[str, dict[str, Any]] = {
    "ping": {},
    "status": {},
    "memory_status": {},
    "clear_memory": {"level": "gc"},
    "execute": {"name": ECHO, "args": [1], "kwargs": {"k": "v"}},
    "scale": {"workers": 2},
}
WRONG: list[Any] = [
    None,
    True,
    False,
    0,
    -1,
    2**64 - 1,
    -(2**63),
    1.5,
    math.nan,
    math.inf,
    -math.inf,
    1e308,  # a finite timeout_s this large once overflowed the master's poll timeout
    1e20,
    1e-300,
    "",
    "x" * 300,
    "\x00",
    "é✓",
    b"bytes",
    [],
    [1, [2]],
    [[], {}],
    {},
    {"a": 1},
    {"": None},
    msgpack.ExtType(1, msgpack.packb(0)),  # a raw-frame reference with no frame behind it
    msgpack.ExtType(1, msgpack.packb(-1)),
    msgpack.ExtType(2, msgpack.packb({"dtype": "O", "shape": [1], "frame": 0})),
    msgpack.ExtType(2, b"\xc1"),
    msgpack.ExtType(99, b""),
]


def pack(value: Any) -> bytes:
    return msgpack.packb(value, use_bin_type=True)  # type: ignore[no-any-return]


def expected_id(frames: list[bytes]) -> Any:
    """The id the daemon can read from this message (None when it cannot): what its one reply
    must carry. The same decode the master runs, on this side."""
    if len(frames) < 2 or frames[0] != b"":
        return None
    try:
        return protocol.decode_request(frames[1])["id"]
    except protocol.ProtocolError as exc:
        return exc.request_id


def harmless(body: Any) -> Any:
    """Keep the fuzz from giving orders a real client would: no reload (it has no fields to get
    wrong) and no scale to another size (legitimate, but each fork costs this 2-core machine)."""
    if isinstance(body, dict):
        if body.get("cmd") == "reload":
            body["cmd"] = "reload?"
        workers = body.get("workers")
        if (
            body.get("cmd") == "scale"
            and isinstance(workers, int)
            and not isinstance(workers, bool)
            and 1 <= workers <= 1024
        ):
            body["workers"] = 2
        if body.get("cmd") == "execute" and body.get("name") not in NAMES:
            body["name"] = ECHO if isinstance(body.get("name"), str) else body.get("name")
    return body


# -- generators: each yields DEALER frames -------------------------------------------------------


def wrong_types(ids: Iterator[int]) -> Iterator[list[bytes]]:
    """Every field of every command, set to every wrong (or borderline) value in turn."""
    for cmd in COMMANDS:
        for field in FIELDS:
            for value in WRONG:
                if cmd == "scale" and field == "workers" and value in (2,):
                    continue
                body = {"v": 1, "id": f"w{next(ids)}", "cmd": cmd, **BASES[cmd], field: value}
                yield [b"", pack(harmless(body))]


def random_value(rng: random.Random, depth: int = 0) -> Any:
    kind = rng.randrange(12 if depth < 3 else 8)
    if kind == 0:
        return None
    if kind == 1:
        return rng.random() < 0.5
    if kind == 2:
        return rng.choice([0, 1, -1, 2**31, 2**63 - 1, -(2**63), 2**64 - 1, rng.randint(-1000, 1000)])
    if kind == 3:
        return rng.choice([0.0, -0.0, 1e-300, 1e300, math.inf, -math.inf, math.nan, rng.uniform(-1e6, 1e6)])
    if kind == 4:
        return "".join(
            chr(rng.choice([rng.randint(32, 126), rng.randint(0x80, 0xD7FF)]))
            for _ in range(rng.randint(0, 20))
        )
    if kind == 5:
        return rng.randbytes(rng.randint(0, 40))
    if kind == 6:
        return rng.choice(NAMES)
    if kind == 7:
        return msgpack.ExtType(rng.choice([0, 1, 2, 3, 127]), rng.randbytes(rng.randint(0, 12)))
    if kind in (8, 9):
        return [random_value(rng, depth + 1) for _ in range(rng.randint(0, 5))]
    keys: list[Any] = [rng.choice([*FIELDS, "x", "", "é"]) for _ in range(rng.randint(0, 5))]
    if rng.random() < 0.1:
        keys.append(rng.choice([1, None, 2.5, b"bin"]))  # non-string keys: refused by the decoder
    return {key: random_value(rng, depth + 1) for key in keys}


def random_requests(rng: random.Random, ids: Iterator[int], count: int) -> Iterator[list[bytes]]:
    """Envelopes that are mostly right, with random fields and values."""
    for _ in range(count):
        body: dict[Any, Any] = {
            "v": 1 if rng.random() < 0.9 else random_value(rng),
            "id": f"r{next(ids)}" if rng.random() < 0.9 else random_value(rng),
            "cmd": rng.choice([*COMMANDS, "execute", "execute", "nope"])
            if rng.random() < 0.95
            else random_value(rng),
        }
        if body["cmd"] == "execute":
            body["name"] = rng.choice(NAMES)
            if rng.random() < 0.3:
                body["calls"] = [
                    [random_value(rng, 2), random_value(rng, 2)] if rng.random() < 0.5 else [[1], {}]
                    for _ in range(rng.randint(0, 4))
                ]
        for _ in range(rng.randint(0, 4)):
            body[rng.choice(FIELDS)] = random_value(rng)
        try:
            yield [b"", pack(harmless(body))]
        except (TypeError, ValueError, OverflowError):
            continue  # not encodable (msgpack refuses it before it leaves)


def valid_bodies() -> list[bytes]:
    return [
        protocol.encode_request(1, "ping"),
        protocol.encode_request("abc", "status"),
        protocol.encode_request(2, "execute", name=ECHO, args=[1, "two", b"3", [4.5]], kwargs={}),
        protocol.encode_request(3, "execute", name=ECHO, kwargs={"a": {"b": [None, True]}}, timeout_s=3.0),
        protocol.encode_request(4, "execute", name=ECHO, calls=[[[1], {}], [[2], {"x": 1}]], retries=1),
        protocol.encode_request(5, "clear_memory", level="gc"),
        protocol.encode_request(6, "memory_status"),
        protocol.encode_request(7, "execute", name=f"{TASKS}:word_lengths", kwargs={"text": "a bb ccc"}),
    ]


def mutate(rng: random.Random, data: bytes) -> bytes:
    buf = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        op = rng.randrange(6)
        if not buf:
            buf = bytearray(rng.randbytes(4))
        position = rng.randrange(len(buf))
        if op == 0:
            buf[position] ^= 1 << rng.randrange(8)
        elif op == 1:
            buf[position] = rng.randrange(256)
        elif op == 2:
            buf[position:position] = rng.randbytes(rng.randint(1, 8))
        elif op == 3:
            del buf[position : position + rng.randint(1, 8)]
        elif op == 4:
            del buf[position:]  # truncated
        else:
            buf[position:position] = buf[position : position + rng.randint(1, 16)]
    return bytes(buf)


def mutations(rng: random.Random, count: int) -> Iterator[list[bytes]]:
    """Valid requests, truncated or with bytes flipped, inserted, dropped or repeated."""
    bases = valid_bodies()
    for _ in range(count):
        data = mutate(rng, rng.choice(bases))
        try:
            body = protocol.decode_request(data)
        except protocol.ProtocolError:
            yield [b"", data]
            continue
        if body != harmless(dict(body)):  # a mutation that reads as an order: make it harmless
            continue
        yield [b"", data]


def random_bytes(rng: random.Random, count: int) -> Iterator[list[bytes]]:
    for _ in range(count):
        data = rng.randbytes(rng.randint(0, 300))
        if rng.random() < 0.5:
            data = bytes([0x80 | rng.randint(0, 15)]) + data  # a fixmap header: parsed further
        yield [b"", data]


def invalid_msgpack(ids: Iterator[int]) -> Iterator[list[bytes]]:
    envelope = b"\x83\xa1v\x01\xa2id"
    yield from (
        [b"", data]
        for data in [
            b"",
            b"\xc1",
            b"\xc1" * 100,
            envelope + b"\xa2\xff\xfe\xa3cmd\xa4ping",  # an id that is not UTF-8
            pack({1: 2}),
            pack({None: 1, "v": 1}),
            pack({b"v": 1, b"id": 1, b"cmd": b"ping"}),  # bin keys and values
            pack({"v": 1, "id": 1, "cmd": "ping"}) + b"\x00",  # trailing data
            pack({"v": 1, "id": 1, "cmd": "ping"})[:-1],
            pack([1, 2, 3]),
            pack("a string"),
            pack(None),
            b"\x81\xa1v" + b"\xcb" + struct.pack(">d", math.nan),
            b"\xdc\x00\x02\x01",  # array16 of 2 with 1 element
            envelope + b"\x01\xa3cmd\xc7\x03\xff\x00\x00\x00",  # a timestamp of an impossible length
            envelope + b"\x01\xa3cmd\xd6\xff\xff\xff\xff\xff",  # a valid timestamp where a str goes
        ]
    )
    for n in range(200):
        yield [b"", b"\x84\xa1v\x01\xa2id" + pack(f"i{next(ids)}") + b"\xa3cmd" + bytes([0xA0 | (n % 32)])]


def deep_nesting(ids: Iterator[int]) -> Iterator[list[bytes]]:
    """Arrays and maps nested far past any sane depth, alone and inside a valid envelope."""
    for depth in (10, 100, 510, 511, 512, 1000, 10_000, 100_000, 1_000_000):
        yield [b"", b"\x91" * depth + b"\xc0"]
        yield [b"", b"\x81\xa1a" * min(depth, 300_000) + b"\xc0"]
        prefix = pack({"v": 1, "id": f"d{next(ids)}", "cmd": "execute", "name": ECHO, "kwargs": {}})
        # The same map with one more entry, "args", whose value nests `depth` arrays.
        body = bytes([prefix[0] + 1]) + prefix[1:] + pack("args") + b"\x91" * depth + b"\xc0"
        yield [b"", body]


def huge_lengths(ids: Iterator[int]) -> Iterator[list[bytes]]:
    """Headers that declare gigabytes (or billions of entries) with a few bytes behind them."""
    headers = [
        b"\xdb\xff\xff\xff\xff",  # str32
        b"\xc6\xff\xff\xff\xff",  # bin32
        b"\xdd\xff\xff\xff\xff",  # array32
        b"\xdf\xff\xff\xff\xff",  # map32
        b"\xc9\xff\xff\xff\xff\x01",  # ext32
        b"\xda\xff\xff",  # str16
        b"\xde\xff\xff",  # map16
        b"\xdc\xff\xff",  # array16
    ]
    for header in headers:
        for tail in (b"", b"\x00" * 7, b"\xc0" * 100):
            yield [b"", header + tail]
            prefix = pack({"v": 1, "id": f"h{next(ids)}", "cmd": "execute", "name": ECHO})
            yield [b"", bytes([prefix[0] + 1]) + prefix[1:] + pack("args") + header + tail]
            yield [b"", b"\x83\xa1v\x01\xa2id" + pack(f"h{next(ids)}") + b"\xa3cmd" + header + tail]


def unknown_commands(rng: random.Random, ids: Iterator[int], count: int) -> Iterator[list[bytes]]:
    for n in range(count):
        if n % 2:
            cmd = "".join(chr(rng.randint(32, 0x2FF)) for _ in range(rng.randint(0, 40)))
            yield [b"", pack({"v": 1, "id": f"u{next(ids)}", "cmd": "x" * 100_000 if n % 97 == 1 else cmd})]
        else:
            version = rng.choice([0, 2, -1, 99, 2**63 - 1, -(2**63), 2**64 - 1, rng.randint(-(10**9), 10**9)])
            yield [b"", pack({"v": version, "id": f"u{next(ids)}", "cmd": rng.choice(COMMANDS)})]


def broken_framing(ids: Iterator[int]) -> Iterator[list[bytes]]:
    ping = protocol.encode_request(1, "ping")
    for n in range(30):
        yield [ping]  # no delimiter
        yield [b"x", ping]  # a delimiter that is not empty
        yield [b""]  # nothing but the delimiter
        yield [b"", b"", b""]
        yield [b"\x00" * (n + 1), b"", ping]
    execute = protocol.encode_request(f"f{next(ids)}", "execute", name=ECHO, args=[])
    yield [b"", execute, *([b""] * 1025)]  # more raw frames than allowed
    yield [b"", protocol.encode_request(f"f{next(ids)}", "ping"), *([b"x"] * 2000)]
    for ext in (
        msgpack.ExtType(1, pack(0)),
        msgpack.ExtType(1, pack(5)),
        msgpack.ExtType(1, pack("zero")),
        msgpack.ExtType(2, pack({"dtype": "<f8", "shape": [3], "frame": 0})),
        msgpack.ExtType(2, pack({"dtype": "<f8", "shape": [-1], "frame": 0})),
        msgpack.ExtType(2, pack({"dtype": "V0", "shape": [5], "frame": 0})),
        msgpack.ExtType(2, pack({"dtype": "no-such-dtype", "shape": [1], "frame": 0})),
        msgpack.ExtType(2, pack({"dtype": "(2,)i4,O", "shape": [1], "frame": 0})),
        msgpack.ExtType(2, pack({"dtype": "<i4", "shape": [2**62, 2**62], "frame": 0})),
        msgpack.ExtType(2, pack([1, 2])),
    ):
        body = pack({"v": 1, "id": f"f{next(ids)}", "cmd": "execute", "name": ECHO, "args": [ext]})
        yield [b"", body, b"\x00" * 8]


def huge_messages(rng: random.Random, ids: Iterator[int], count: int) -> Iterator[list[bytes]]:
    """Real messages just under the limit: garbage, a big argument echoed back, a raw frame."""
    size = LIMIT - 64 * 1024
    for n in range(count):
        kind = n % 4
        if kind == 0:
            yield [b"", rng.randbytes(size)]
        elif kind == 1:
            yield [b"", protocol.encode_request(f"g{next(ids)}", "execute", name=ECHO, args=["x" * size])]
        elif kind == 2:
            body = pack(
                {
                    "v": 1,
                    "id": f"g{next(ids)}",
                    "cmd": "execute",
                    "name": ECHO,
                    "args": [msgpack.ExtType(1, pack(0))],
                }
            )
            yield [b"", body, rng.randbytes(size)]
        else:
            yield [b"", protocol.encode_request(f"g{next(ids)}", "ping", junk=b"\x00" * size)]


# -- the test ------------------------------------------------------------------------------------


def check_serving(daemon: Daemon) -> None:
    """The daemon answers ping and runs tasks correctly: results, errors and streams."""
    with daemon.client(timeout=30) as client:
        assert client.ping()["pid"] == daemon.proc.pid
        assert client.map(ECHO, range(200), window=16) == list(range(200))
        assert client.execute(f"{TASKS}:count", n=5) == [1, 2, 3, 4, 5]
        with pytest.raises(errors.TaskError, match="fails on purpose"):  # str: the task's own
            client.execute(f"{TASKS}:fail")
        status = client.status()
    assert status["state"] == "running" and status["pool"]["error"] is None


def warm_up(daemon: Daemon) -> None:
    """Bring the daemon's memory to its working size before the baseline is taken."""
    with daemon.client() as client:
        client.map(ECHO, range(500), window=32)
        client.map(ECHO, ["x" * 10_000] * 50, window=8)
        # A reply over pyzmq's copy threshold is sent zero-copy, which starts pyzmq's garbage
        # collector thread (its own context: 7 descriptors) once for the process's life.
        client.execute(ECHO, "x" * 100_000)
        client.memory_status()
        client.clear_memory("gc")
        client.status()


def settled_rss(pid: int) -> int:
    """The daemon's RSS once it has had time to give freed memory back (it trims its heap after
    a second of idleness) and the reading is steady (0.5 s apart, within 64 KiB)."""
    time.sleep(1.5)
    previous = rss(pid)
    for _ in range(20):
        time.sleep(0.5)
        current = rss(pid)
        if abs(current - previous) < 64 * 1024:
            return current
        previous = current
    return previous


@pytest.mark.timeout(scaled(300, 3600))
def test_fuzz_the_live_control_socket(start_daemon: Callable[..., Daemon]) -> None:
    daemon = start_daemon(config=CONFIG)
    alive = lambda: daemon.proc.poll() is None  # noqa: E731
    warm_up(daemon)
    rss_before = settled_rss(daemon.proc.pid)
    fds_before = fds(daemon.proc.pid)
    seed = int(os.environ.get("WORKERD_FUZZ_SEED", random.randrange(2**32)))
    rng = random.Random(seed)
    ids = iter(range(10**9))
    factor = scaled(1, 11)
    # (name, messages, window): wrong types go one at a time, so that each hostile value meets an
    # otherwise idle daemon (a huge timeout_s crashed the master only when no other deadline was
    # nearer); the rest are pipelined, 200 unanswered at most.
    sources: list[tuple[str, Iterator[list[bytes]], int]] = [
        ("wrong_types", wrong_types(ids), 1),
        ("random_requests", random_requests(rng, ids, 3000 * factor), 200),
        ("mutations", mutations(rng, 3000 * factor), 200),
        ("random_bytes", random_bytes(rng, 2000 * factor), 200),
        ("invalid_msgpack", invalid_msgpack(ids), 200),
        ("deep_nesting", deep_nesting(ids), 200),
        ("huge_lengths", huge_lengths(ids), 200),
        ("unknown_commands", unknown_commands(rng, ids, 1000 * factor), 200),
        ("broken_framing", broken_framing(ids), 200),
        ("huge_messages", huge_messages(rng, ids, 8 * factor), 4),
    ]
    sent: collections.Counter[str] = collections.Counter()
    expected: collections.Counter[Any] = collections.Counter()

    def counted(name: str, messages: Iterator[list[bytes]]) -> Iterator[list[bytes]]:
        for frames in messages:
            sent[name] += 1
            expected[expected_id(frames)] += 1
            yield frames

    unanswered = 0
    with Counter(daemon.socket) as counter:
        for name, messages, window in sources:
            unanswered += counter.drive_by_count(
                counted(name, messages), window=window, timeout_s=scaled(240, 1800), alive=alive
            )
        tally = counter.tally
    assert daemon.proc.poll() is None, f"workerd died:\n{daemon.output()[-3000:]}"
    assert unanswered == 0, f"{unanswered} messages without a reply"
    assert tally.undecodable == 0
    received = tally.terminal
    assert received == expected, (
        f"reply ids differ from the expected ones: missing {dict(expected - received)}, "
        f"extra {dict(received - expected)}"
    )
    check_serving(daemon)
    rss_after = settled_rss(daemon.proc.pid)
    fds_after = fds(daemon.proc.pid)
    report(
        "fuzz",
        seed=seed,
        messages_tried=sent.total(),
        replies_received=tally.replies,
        requests_lost=sent.total() - tally.replies,
        duplicates=len(tally.duplicates()),
        **{f"sent_{name}": n for name, n in sent.items()},
        codes=dict(tally.codes),
        rss_before=mib(rss_before),
        rss_after=mib(rss_after),
        fds_before=fds_before,
        fds_after=fds_after,
    )
    assert sent.total() >= 10_000
    assert rss_after - rss_before < RSS_GROWTH_LIMIT
    assert fds_after <= fds_before + 2


# -- floods of connections -----------------------------------------------------------------------

# systemd's default for a service: LimitNOFILE=1024:524288 (soft:hard).
SYSTEMD_SOFT_NOFILE = 1024
ZMTP_GREETING_START = b"\xff" + b"\x00" * 8 + b"\x7f" + b"\x03"  # signature, then major version 3


@contextlib.contextmanager
def soft_fd_limit(limit: int) -> Iterator[None]:
    """Children started inside get `limit` as their soft RLIMIT_NOFILE, as under systemd."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(limit, hard), hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def open_connections(path: str, count: int, first: bytes = b"") -> list[socket.socket]:
    """`count` plain connections to the socket, each sending `first` (maybe nothing) and no more."""
    held = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            held.append(sock)
            # Blocking, so that connect() waits while the listen backlog is full (as a client's
            # would), but never longer than 10 s.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, struct.pack("ll", 10, 0))
            sock.connect(path)
            if first:
                sock.sendall(first)
    except OSError:
        for sock in held:
            sock.close()
        raise
    return held


def pings_while_flooded(daemon: Daemon) -> bool:
    with Client(daemon.socket, timeout=30) as client:
        return bool(client.ping()["pid"] == daemon.proc.pid)


@pytest.mark.timeout(scaled(300, 1800))
def test_floods_of_half_open_connections(start_daemon: Callable[..., Daemon]) -> None:
    # Started with systemd's default soft limit of 1024 descriptors: libzmq 4.3.5 aborts the
    # process when accept() fails with EMFILE on an ipc socket, so before the daemon raised its
    # own soft limit, the second phase below (2,000 idle connections) killed it.
    with soft_fd_limit(SYSTEMD_SOFT_NOFILE):
        daemon = start_daemon(config=CONFIG, wait=False)
    daemon.wait_ready()
    warm_up(daemon)
    pid = daemon.proc.pid
    rss_before, fds_before = settled_rss(pid), fds(pid)
    rng = random.Random(int(os.environ.get("WORKERD_FUZZ_SEED", random.randrange(2**32))))
    counts: collections.Counter[str] = collections.Counter()
    context = zmq.Context.instance()
    # 1. Connections that send nothing, held open together, then closed together.
    idle = scaled(1_500, 5_000)  # past systemd's soft limit of 1,024
    held = open_connections(daemon.socket, idle)
    counts["idle_connections"] += idle
    assert pings_while_flooded(daemon)
    for sock in held:
        sock.close()
    # 2. Connections that start a ZMTP greeting and stall, held together.
    stalled = scaled(500, 4_000)
    held = open_connections(daemon.socket, stalled, ZMTP_GREETING_START)
    counts["stalled_greetings"] += stalled
    assert pings_while_flooded(daemon)
    for sock in held:
        sock.close()
    # 3. Connections that send random bytes instead of ZMTP, then go.
    for _ in range(scaled(500, 10_000)):
        (sock,) = open_connections(daemon.socket, 1, rng.randbytes(rng.randint(1, 512)))
        sock.close()
        counts["garbage_connections"] += 1
    # 4. Real clients that send a request and vanish before the reply, 100 at a time (a closed
    # socket holds one of the context's 1023 socket slots until its linger ends).
    for _ in range(scaled(5, 100)):
        dealers = []
        for n in range(100):
            dealer = context.socket(zmq.DEALER)
            dealer.setsockopt(zmq.LINGER, 100)  # long enough for the request to leave
            dealer.connect(f"ipc://{daemon.socket}")
            if n % 2:
                body = protocol.encode_request(n, "execute", name=ECHO, args=["x" * 1000])
            else:
                body = protocol.encode_request(n, "status")
            dealer.send_multipart([b"", body])
            dealers.append(dealer)
        for dealer in dealers:
            dealer.close()
        counts["vanishing_clients"] += len(dealers)
        time.sleep(0.15)
    assert daemon.proc.poll() is None, f"workerd died:\n{daemon.output()[-3000:]}"
    # libzmq closes its side of each connection in its own time (and frees its memory after).
    deadline = time.monotonic() + 30
    while fds(pid) > fds_before + 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    time.sleep(2)
    check_serving(daemon)
    rss_after, fds_after = settled_rss(pid), fds(pid)
    report(
        "connection floods",
        **counts,
        connections_total=counts.total(),
        rss_before=mib(rss_before),
        rss_after=mib(rss_after),
        fds_before=fds_before,
        fds_after=fds_after,
    )
    assert rss_after - rss_before < RSS_GROWTH_LIMIT
    assert fds_after <= fds_before + 2


def test_messages_over_the_limit_are_dropped_and_the_daemon_goes_on(
    start_daemon: Callable[..., Daemon],
) -> None:
    """Over max_message_mb: libzmq drops the message and the connection, no reply; nothing else."""
    daemon = start_daemon(config=CONFIG)
    rng = random.Random(0)
    context = zmq.Context.instance()
    count = scaled(6, 30)
    dealers = []
    for n in range(count):
        dealer = context.socket(zmq.DEALER)
        dealer.setsockopt(zmq.LINGER, 0)
        dealer.connect(f"ipc://{daemon.socket}")
        if n % 2:
            dealer.send_multipart([b"", rng.randbytes(LIMIT + 1)])
        else:
            body = protocol.encode_request(n, "execute", name=ECHO, args=["x" * LIMIT])
            dealer.send_multipart([b"", body])
        dealers.append(dealer)
    replies = sum(1 for dealer in dealers if dealer.poll(1000 if dealer is dealers[0] else 100))
    for dealer in dealers:
        dealer.close()
    check_serving(daemon)
    report("over the size limit", messages=count, replies=replies)
    assert replies == 0


# -- §3 for the whole body (issue 18, 3i) --------------------------------------------------------------

NOT_UTF8 = b"\xa2\xff\xfe"  # a str of two bytes that are not UTF-8


def with_entry(body: dict[str, Any], key: bytes, value: bytes) -> bytes:
    """`body` packed with one more entry, key and value given as msgpack bytes (fixmap only)."""
    data = pack(body)
    return bytes([data[0] + 1]) + data[1:] + key + value


def strictness_violations() -> Iterator[tuple[Any, str, bytes]]:
    """(id, cmd, body): bodies a strict full decode refuses while their map is sound msgpack."""
    for n, key in enumerate((7, -1, None, 1.5, True)):
        yield f"k{n}", "ping", with_entry({"v": 1, "id": f"k{n}", "cmd": "ping"}, pack(key), pack(0))
    contents = [
        ("kwargs", pack({1: "a"})),
        ("args", pack([[{None: 1}]])),
        ("calls", pack([[[], {False: 1}]])),
        ("args", b"\x91" + NOT_UTF8),
        ("kwargs", b"\x81" + NOT_UTF8 + b"\x01"),
        ("calls", b"\x91\x92\x91" + NOT_UTF8 + b"\x80"),
    ]
    bases = [
        {"cmd": "ping"},
        {"cmd": "status"},
        {"cmd": "scale", "workers": 2},
        {"cmd": "execute", "name": ECHO},
    ]
    for n, (base, (field, value)) in enumerate((b, c) for b in bases for c in contents):
        yield n, base["cmd"], with_entry({"v": 1, "id": n, **base}, pack(field), value)


def test_bad_keys_and_utf8_anywhere_are_refused_with_the_id(start_daemon: Callable[..., Daemon]) -> None:
    """Envelope keys that are not strings, and keys or UTF-8 that break §3 inside args, kwargs
    or calls: one BAD_REQUEST each, with the request's id. The master refuses all but an
    execute's before any handler (nothing is counted or done: scale's `workers` is 2 anyway);
    an execute's args, kwargs and calls are its worker's to decode, on the fast path."""
    daemon = start_daemon(config=CONFIG)
    with daemon.client() as client:
        before = collections.Counter(client.status()["counters"])
    cases = list(strictness_violations())
    for _, _, data in cases:  # the oracle: msgpack's own strict decoder refuses each one
        with pytest.raises(ValueError):
            msgpack.unpackb(data, raw=False, strict_map_key=True)
    dealer = zmq.Context.instance().socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    dealer.connect(f"ipc://{daemon.socket}")
    replies = []
    try:
        for _, _, data in cases:
            dealer.send_multipart([b"", data])
            assert dealer.poll(10_000), f"no reply to {data!r}"
            replies.append(protocol.decode_reply(dealer.recv_multipart()[1]))
        assert not dealer.poll(300), "more than one reply"
    finally:
        dealer.close()
    got = [(reply["id"], reply.get("error", {}).get("code")) for reply in replies]
    assert got == [(request_id, protocol.BAD_REQUEST) for request_id, _, _ in cases]
    assert all(reply["error"]["message"].startswith("body is not valid msgpack: ") for reply in replies)
    with daemon.client() as client:
        counted = collections.Counter(client.status()["counters"]) - before
    executes = sum(cmd == "execute" for _, cmd, _ in cases)
    assert counted["bad_requests"] == len(cases) - executes
    assert {name: n for name, n in counted.items() if name.startswith("requests_")} == {
        "requests_execute": executes,
        "requests_status": 1,  # the status just asked
    }
    check_serving(daemon)
