"""What the master's decode of one request costs: `protocol.decode_request`, the call it makes on
every message, for small executes and for chunks of 4 to 100 calls. Beside it the envelope path
alone (`unpack_envelope`, which decode_request takes above WHOLE_DECODE_MAX bytes).

    .venv/bin/python bench/envelope.py [--repeats 9] [--number 2000]

Prints, per body, the median and the spread (min-max) over --repeats runs of --number decodes, in
µs per decode. Two references beside it, on the same bytes, for the two ways the master could
also check an execute's args/kwargs/calls against §3 (it leaves them to the worker):
`msgpack.unpackb` of the whole body (msgpack's C decoder building every value) and a Python walk
that checks map keys and UTF-8 without building the values (msgpack.Unpacker's read_*_header,
skip and unpack, one call per item). To compare two versions of
protocol.py, run this script once with each on PYTHONPATH (e.g. a `git archive` of the older
commit's client/). No daemon is started; nothing asserts a timing.
"""

from __future__ import annotations

import argparse
import statistics
import timeit
from collections.abc import Callable
from typing import Any

import msgpack

from workerctl import protocol

ECHO = "workerd.examples.tasks:echo"


def dicts(count: int) -> list[Any]:
    """`count` calls of bench/throughput.py's payload: a small dict each."""
    payloads = ({"user": f"user{n}", "n": n, "tags": ["a", "b", str(n)], "ok": True} for n in range(count))
    return [[[payload], {}] for payload in payloads]


BODIES = {
    "small execute": {"v": 1, "id": 7, "cmd": "execute", "name": ECHO, "args": [1], "kwargs": {}},
    "one dict": {"v": 1, "id": 7, "cmd": "execute", "name": ECHO, "args": dicts(1)[0][0], "kwargs": {}},
    "chunk of 4 dicts": {"v": 1, "id": 7, "cmd": "execute", "name": ECHO, "calls": dicts(4)},
    "chunk of 16 dicts": {"v": 1, "id": 7, "cmd": "execute", "name": ECHO, "calls": dicts(16)},
    "chunk of 100 [[i], {}]": {
        "v": 1,
        "id": 8,
        "cmd": "execute",
        "name": ECHO,
        "calls": [[[i], {}] for i in range(100)],
        "timeout_s": 10,
    },
    "chunk of 100 [[i, str], {k: i, name: str}]": {
        "v": 1,
        "id": 9,
        "cmd": "execute",
        "name": ECHO,
        "calls": [[[i, "abc"], {"k": i, "name": "x"}] for i in range(100)],
        "timeout_s": 10,
    },
}

# First bytes of a msgpack array, map and str.
ARRAYS = frozenset([*range(0x90, 0xA0), 0xDC, 0xDD])
MAPS = frozenset([*range(0x80, 0x90), 0xDE, 0xDF])
STRS = frozenset([*range(0xA0, 0xC0), 0xD9, 0xDA, 0xDB])


def walk(unpacker: msgpack.Unpacker, data: bytes) -> None:
    """Check one value's map keys and strings without building its arrays, maps or bins."""
    first = data[unpacker.tell()]
    if first in ARRAYS:
        for _ in range(unpacker.read_array_header()):
            walk(unpacker, data)
    elif first in MAPS:
        for _ in range(unpacker.read_map_header()):
            if not isinstance(unpacker.unpack(), str | bytes):
                raise ValueError("map key is not a string")
            walk(unpacker, data)
    elif first in STRS:
        unpacker.unpack()  # decodes it: the UTF-8 check
    else:
        unpacker.skip()


def walked_envelope(data: bytes) -> dict[str, Any]:
    unpacker = msgpack.Unpacker(raw=False, strict_map_key=True, max_buffer_size=len(data))
    unpacker.feed(data)
    body: dict[str, Any] = {}
    for _ in range(unpacker.read_map_header()):
        key = unpacker.unpack()
        if key in protocol.BULKY_FIELDS:
            walk(unpacker, data)
        else:
            body[key] = unpacker.unpack()
    return body


def timed(decode: Callable[[bytes], Any], data: bytes, repeats: int, number: int) -> str:
    runs = [t / number * 1e6 for t in timeit.repeat(lambda: decode(data), number=number, repeat=repeats)]
    return f"{statistics.median(runs):.2f} ({min(runs):.2f}-{max(runs):.2f})"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--number", type=int, default=2000)
    options = parser.parse_args()
    full = lambda data: msgpack.unpackb(data, raw=False, strict_map_key=True)  # noqa: E731
    print(f"protocol: {protocol.__file__}")
    print(f"decode_request decodes a body whole up to {protocol.WHOLE_DECODE_MAX} bytes")
    print("| body | bytes | decode_request µs | unpack_envelope µs | msgpack.unpackb µs | Python walk µs |")
    print("|---|---|---|---|---|---|")
    for name, body in BODIES.items():
        data = protocol.pack(body)
        cells = [
            timed(f, data, options.repeats, options.number)
            for f in (protocol.decode_request, protocol.unpack_envelope, full, walked_envelope)
        ]
        print(f"| {name} | {len(data)} | {' | '.join(cells)} |")


if __name__ == "__main__":
    main()
