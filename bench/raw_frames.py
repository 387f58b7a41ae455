"""A 1 MiB payload round trip (client -> master -> worker -> master -> client): raw frames vs
msgpack-embedded bytes.

    .venv/bin/python bench/raw_frames.py [--rounds 5] [--reps 100] [--mib 1] [--no-write]

Each variant sends the payload to `workerd.examples.tasks:echo` and gets it back:

  * ndarray, raw frame: a float64 numpy array; travels as ext 2 + a raw frame, comes back as an
    array that is a view of the received frame;
  * bytes, raw frame: bytes at the top level of args (>= 64 KiB), promoted to a raw frame;
  * bytes, embedded in msgpack: the same bytes one level down ([payload]), so inside the body;
  * ndarray via tobytes(), embedded: what a client without raw frames does (tobytes, embed,
    frombuffer on return).

Time: median round trip over --reps calls per round, rounds interleaved, minus nothing (the
small-payload row is the fixed cost). Client allocations: bytes allocated by Python per round
trip in this process (tracemalloc; libzmq's own buffers are not Python allocations), i.e. how
many payload-sized copies the client makes. The copies in the daemon are counted from the code
path (see the table's note).
"""

from __future__ import annotations

import argparse
import statistics
import tracemalloc
from collections.abc import Callable
from typing import Any

import numpy as np

import benchlib
from benchlib import table
from workerctl import Client

ECHO = "workerd.examples.tasks:echo"

# Payload-sized memcpy's in user space per round trip, read off the code path (see the note
# printed under the table).
DAEMON_COPIES = {"raw": 5, "embedded": 9}


def variants(client: Client, size: int) -> dict[str, tuple[Callable[[], Any], str, int]]:
    array = np.arange(size // 8, dtype="<f8")
    payload = array.tobytes()

    def ndarray_raw() -> Any:
        out = client.execute(ECHO, array)
        assert out.nbytes == size
        return out

    def bytes_raw() -> Any:
        out = client.execute(ECHO, payload)
        assert len(out) == size
        return out

    def bytes_embedded() -> Any:
        out = client.execute(ECHO, [payload])
        assert len(out[0]) == size
        return out

    def ndarray_tobytes() -> Any:
        out = client.execute(ECHO, [array.tobytes()])
        back = np.frombuffer(out[0], dtype="<f8")
        assert back.nbytes == size
        return back

    def small() -> Any:
        return client.execute(ECHO, 1)

    return {
        "ndarray, raw frame": (ndarray_raw, "raw", 0),
        "bytes, raw frame": (bytes_raw, "raw", 1),
        "bytes, embedded in msgpack": (bytes_embedded, "embedded", 4),
        "ndarray via tobytes(), embedded": (ndarray_tobytes, "embedded", 5),
        "1-byte payload (fixed cost)": (small, "-", 0),
    }


def client_peak(call: Callable[[], Any], reps: int = 10) -> float:
    """The most memory Python held at once in this process during a call, beyond what it held
    before (tracemalloc; libzmq's own buffers are not Python allocations)."""
    call()
    tracemalloc.start()
    try:
        peaks = []
        for _ in range(reps):
            tracemalloc.reset_peak()
            current, _ = tracemalloc.get_traced_memory()
            result = call()
            _, peak = tracemalloc.get_traced_memory()
            peaks.append(peak - current)
            del result
    finally:
        tracemalloc.stop()
    return statistics.median(peaks)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--reps", type=int, default=100)
    parser.add_argument("--mib", type=float, default=1.0)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    size = int(args.mib * 1024 * 1024)
    samples: dict[str, list[float]] = {}
    peaks: dict[str, float] = {}
    with benchlib.Daemon(workers=1) as daemon:
        daemon.wait_ready()
        with daemon.client(timeout=60) as client:
            table_of = variants(client, size)
            for label, (call, _, _) in table_of.items():
                benchlib.timed(call, 10)  # warm up
                peaks[label] = client_peak(call)
            names = list(table_of)
            for round_no in range(args.rounds):
                shift = round_no % len(names)
                for label in names[shift:] + names[:shift]:
                    times = benchlib.timed(table_of[label][0], args.reps)
                    samples.setdefault(label, []).append(statistics.median(times))
    base = statistics.median(samples["ndarray, raw frame"])
    rows = []
    for label, (_, kind, client_copies) in table_of.items():
        median_s = statistics.median(samples[label])
        copies = "-" if kind == "-" else f"{client_copies} + {DAEMON_COPIES[kind]}"
        rows.append(
            [
                label,
                benchlib.spread(samples[label], 0, 1e6),
                f"{median_s / base:.2f}x",
                copies,
                f"{peaks[label] / 2**20:.1f}",
            ]
        )
    body = (
        f"### {args.mib:g} MiB round trip through echo (1 worker; median per call over {args.reps} calls, "
        f"{args.rounds} rounds interleaved; µs median (min-max) of the rounds)\n\n"
        + table(
            [
                "payload",
                "round trip µs",
                "vs ndarray raw",
                "payload copies: client + daemon",
                "client peak Python MiB (measured)",
            ],
            rows,
        )
        + "\n\nCopies are payload-sized memcpy's in user space, counted from the code path (the kernel "
        "copies each of the 4 hops alike in every variant). Client, embedded: packb, the copied send, "
        "the copied receive of the body, unpack (4; tobytes() adds 1); raw: sent and received "
        "zero-copy, an array is a view of the received frame (0), bytes are copied out of it once "
        "(1). Daemon: the master copies each frame it receives and each it sends (pyzmq copy=True), "
        "on the way in and on the way out (4); the worker copies the frames it receives (1) and sends "
        "a raw result zero-copy; embedded, the master also decodes the body (1) and the worker "
        "unpacks, packs and sends with a copy (3)."
    )
    benchlib.report("raw_frames", body, write=not args.no_write)


if __name__ == "__main__":
    main()
