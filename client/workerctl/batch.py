"""`workerctl run NAME --batch IN.jsonl --output OUT.jsonl`: one call per input line.

Memory stays flat however long the input: the input file is read as the window of requests in
flight frees up, each result is appended to the output as it completes, and only the inputs of
the calls in flight are held. The output is always a valid JSON-lines file that says which
inputs are done, so a batch stopped by Ctrl-C, a daemon restart or a crash is resumed with
--resume:

    input line  {"x": 1}             a JSON object: keyword arguments
                [1, 2]               a JSON array: positional arguments
    output line {"line": 7, "input": {"x": 1}, "result": ...}
                {"line": 8, "input": [1, 2], "error": {"code", "message", "details"}}

Output lines come in completion order. A failed call is recorded with its error and the batch
goes on. A call whose connection was lost (the daemon restarted under it) is not recorded: its
outcome is unknown, and --resume runs it again. Lines are written whole (one write per group of
lines), so an interrupted batch leaves complete lines; a partial last line, left only by a
crash mid-write, is cut off by --resume.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from collections.abc import Iterator
from typing import IO, Any

from . import core, errors
from .client import DEFAULT_WINDOW, Client
from .jsonout import dumps

BAD_INPUT = "BAD_INPUT"
# Output is written at least this often (and at the end); between writes lines wait in memory.
FLUSH_INTERVAL_S = 0.1
FLUSH_LINES = 1000
PROGRESS_INTERVAL_S = 0.1


JSON_KINDS = {bool: "true or false", int: "a number", float: "a number", str: "a string", type(None): "null"}


def parse_input(text: str, number: int) -> tuple[Any, core.Call | None, str | None]:
    """(input as recorded, the call, None) or (input as recorded, None, why it is no call);
    `number` is the line's number in the file, which the reason names."""
    text = text.rstrip("\r\n")  # else an error at the line's end is "column 1" of the next
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        return text, None, f"input line {number} is not valid JSON: {exc.msg} at column {exc.colno}"
    if isinstance(value, dict):
        return value, ((), value), None
    if isinstance(value, list):
        return value, (value, {}), None
    kind = JSON_KINDS.get(type(value), type(value).__name__)
    return (
        value,
        None,
        f"input line {number} is {kind}: it must be a JSON object (keyword arguments) or array",
    )


def record(line: int, value: Any, ok: bool, outcome: Any) -> dict[str, Any]:
    if ok:
        return {"line": line, "input": value, "result": outcome}
    error = {"code": outcome.code, "message": outcome.message, "details": outcome.details}
    return {"line": line, **quote(value), "error": error}


# An error line quotes at most this many characters of its input: a 70 MB input refused as too
# large must not make a 70 MB error line. --resume needs only the line number.
QUOTE_CHARS = 200


def quote(value: Any) -> dict[str, Any]:
    """The input of an error line: itself, or past QUOTE_CHARS as JSON text, its first
    QUOTE_CHARS characters as a string and "input_length" its length."""
    text = value if isinstance(value, str) else dumps(value)
    if len(text) <= QUOTE_CHARS:
        return {"input": value}
    return {"input": text[:QUOTE_CHARS] + "…", "input_length": len(text)}


class LineSet:
    """A set of positive line numbers as a bitmap: 1M lines cost 125 KB, not a set's ~60 MB."""

    def __init__(self) -> None:
        self.bits = bytearray()
        self.count = 0

    def add(self, line: int) -> None:
        byte, bit = divmod(line, 8)
        if byte >= len(self.bits):
            self.bits.extend(bytes(byte + 1 - len(self.bits) + 4096))
        if not self.bits[byte] & (1 << bit):
            self.bits[byte] |= 1 << bit
            self.count += 1

    def __contains__(self, line: int) -> bool:
        byte, bit = divmod(line, 8)
        return byte < len(self.bits) and bool(self.bits[byte] & (1 << bit))

    def __len__(self) -> int:
        return self.count


def read_done(path: str) -> LineSet:
    """The line numbers an output file already records; a partial last line is cut off."""
    done = LineSet()
    try:
        handle = open(path, "rb")  # noqa: SIM115 - closed below; truncated by name
    except FileNotFoundError:
        return done
    with handle:
        good = 0  # bytes up to the end of the last complete line
        for raw in handle:
            if not raw.endswith(b"\n"):
                break
            try:
                line = json.loads(raw)["line"]
            except (ValueError, KeyError, TypeError):
                line = None
            if isinstance(line, int) and not isinstance(line, bool) and line > 0:
                done.add(line)
            good += len(raw)
        size = handle.seek(0, os.SEEK_END)
    if size > good:
        os.truncate(path, good)
    return done


def drop_failed(path: str) -> int:
    """Rewrite the output at `path` without its error lines (and a partial last line), so that
    --resume runs those inputs again and each input keeps one line; how many were dropped.

    The file is replaced whole (a new file renamed over it): a crash meanwhile leaves the old
    one, never a mix."""
    dropped = 0
    partial = f"{path}.retry"
    try:
        source = open(path, "rb")  # noqa: SIM115 - closed by the with below
    except FileNotFoundError:
        return 0
    with source, open(partial, "wb") as kept:
        for raw in source:
            if not raw.endswith(b"\n"):
                break
            try:
                failed = "error" in json.loads(raw)
            except (ValueError, TypeError):
                failed = False  # not ours to judge: kept, as read_done ignores it
            if failed:
                dropped += 1
            else:
                kept.write(raw)
        kept.flush()
        os.fsync(kept.fileno())
    os.replace(partial, path)
    return dropped


def count_lines(path: str) -> int:
    total = 0
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            total += chunk.count(b"\n")
    return total


class Output:
    """Appends whole lines, written together at most every FLUSH_INTERVAL_S.

    Lines for a terminal that also shows the progress bar (stdout and stderr on one screen)
    clear the bar first and draw it again after, so a result never runs into it."""

    def __init__(self, path: str, bar: Progress | None = None) -> None:
        self.path = path
        self.to_stdout = path == "-"
        try:
            self.fd = (
                sys.stdout.fileno()
                if self.to_stdout
                else os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            )
        except OSError as exc:
            raise errors.OutputUnwritable(f"cannot create --output {path}: {exc.strerror}") from None
        self.bar = (
            bar
            if bar is not None and bar.stream is not None and self.to_stdout and os.isatty(self.fd)
            else None
        )
        self.pending: list[str] = []
        self.last = time.monotonic()

    def add(self, line: str) -> None:
        self.pending.append(line)
        if len(self.pending) >= FLUSH_LINES or time.monotonic() - self.last >= FLUSH_INTERVAL_S:
            self.flush()

    def flush(self) -> None:
        self.last = time.monotonic()
        if not self.pending:
            return
        data = memoryview(("\n".join(self.pending) + "\n").encode())
        self.pending.clear()
        if self.to_stdout:
            sys.stdout.flush()
        if self.bar is not None:
            self.bar.clear()
        while data:
            written = os.write(self.fd, data)
            data = data[written:]
        if self.bar is not None:
            self.bar.update(force=True)

    def close(self) -> None:
        self.flush()
        if not self.to_stdout:
            os.fsync(self.fd)
            os.close(self.fd)


@dataclasses.dataclass
class Progress:
    """Counts, and the progress bar drawn on stderr when it is a terminal."""

    total: int | None = None  # lines in the input, when the bar is shown
    done: int = 0
    failed: int = 0
    lost: int = 0
    skipped: int = 0
    retried: int = 0  # failed lines of an earlier run dropped from the output to run again
    stream: IO[str] | None = None
    started: float = dataclasses.field(default_factory=time.monotonic)
    drawn: float = 0.0

    @property
    def finished(self) -> int:
        return self.done + self.failed

    def rate(self) -> float:
        elapsed = time.monotonic() - self.started
        return self.finished / elapsed if elapsed > 0 else 0.0

    def line(self, width: int = 24) -> str:
        rate = self.rate()
        text = f"{self.done} done, {self.failed} failed"
        if self.lost:
            text += f", {self.lost} lost"
        text += f", {rate:,.0f}/s"
        if self.total:
            left = max(self.total - self.skipped - self.finished - self.lost, 0)
            share = min((self.skipped + self.finished) / self.total, 1.0)
            filled = int(share * width)
            eta = f"{format_duration(left / rate)}" if rate > 0 else "?"
            text = f"[{'#' * filled}{'.' * (width - filled)}] {share:4.0%} {text}, ETA {eta}"
        return text

    def update(self, force: bool = False) -> None:
        if self.stream is None:
            return
        now = time.monotonic()
        if force or now - self.drawn >= PROGRESS_INTERVAL_S:
            self.drawn = now
            self.stream.write("\r" + self.line() + "\033[K")
            self.stream.flush()

    def clear(self) -> None:
        if self.stream is not None:
            self.stream.write("\r\033[K")
            self.stream.flush()

    def summary(self) -> dict[str, Any]:
        return {
            "done": self.done,
            "failed": self.failed,
            "lost": self.lost,
            "skipped": self.skipped,
            "retried": self.retried,
            "seconds": round(time.monotonic() - self.started, 3),
        }


def format_duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


@dataclasses.dataclass
class Options:
    name: str
    input: str
    output: str
    resume: bool = False
    retry_failed: bool = False  # with resume: run the lines whose output is an error again
    window: int = DEFAULT_WINDOW
    chunksize: int = 1
    timeout_s: float | None = None
    retries: int = 0
    show_progress: bool = False


def run_batch(client: Client, options: Options, progress: Progress) -> None:
    """Run the batch, updating `progress`; errors that stop it (Ctrl-C, the daemon gone for good,
    a client timeout) propagate after everything completed so far is written."""
    if options.retry_failed:
        progress.retried = drop_failed(options.output)
    done = read_done(options.output) if options.resume else LineSet()
    progress.skipped = 0
    if options.show_progress:
        progress.total = count_lines(options.input)
    output = Output(options.output, progress)
    flying: dict[int, tuple[int, Any]] = {}  # call index -> (line number, input)

    def calls() -> Iterator[core.Call]:
        index = 0
        with open(options.input, encoding="utf-8") as handle:
            for number, text in enumerate(handle, 1):
                if not text.strip():
                    continue
                if number in done:
                    progress.skipped += 1
                    continue
                value, call, problem = parse_input(text, number)
                if call is None:
                    bad = errors.WorkerdError(problem or "bad input")
                    bad.code = BAD_INPUT
                    output.add(dumps(record(number, value, False, bad)))
                    progress.failed += 1
                    continue
                flying[index] = (number, value)
                index += 1
                yield call

    try:
        # The client's internal form of execute_many: tuples, no Outcome per call, and a hook
        # that writes what completed before the client blocks waiting for more.
        outcomes = client._outcomes(
            options.name,
            calls(),
            options.window,
            options.chunksize,
            options.timeout_s,
            options.retries,
            idle=output.flush,
        )
        for index, ok, value in outcomes:
            number, given = flying.pop(index)
            if ok:
                output.add(dumps(record(number, given, True, value)))
                progress.done += 1
            elif isinstance(value, errors.ConnectionLost):
                progress.lost += 1  # unknown outcome: not recorded, so --resume runs it again
            else:
                output.add(dumps(record(number, given, False, value)))
                progress.failed += 1
            progress.update()
    finally:
        output.close()
        progress.update(force=True)
        progress.clear()
