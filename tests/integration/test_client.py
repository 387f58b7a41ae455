"""Client, AsyncClient and `workerctl run --batch` against a real daemon: streams, maps, chunks,
raw frames, size limits, a daemon restart under requests in flight, an interrupted batch."""

from __future__ import annotations

import asyncio
import json
import os
import pty
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest

from tests.conftest import BASE_CONFIG, Daemon, wait_until
from workerctl import AsyncClient, Client, Raw, errors

ECHO = "workerd.examples.tasks:echo"
COUNT = "workerd.examples.tasks:count"
SLEEP = "workerd.examples.tasks:sleep"
FAIL = "workerd.examples.tasks:fail"
WORKERCTL = [sys.executable, "-m", "workerctl.cli"]

CLIENT_TASKS = textwrap.dedent("""
    import numpy as np

    def describe(x):
        return {"shape": list(x.shape), "dtype": x.dtype.str, "sum": float(x.sum())}

    def double(x):
        return x * 2

    def arrays(n, size):
        for i in range(n):
            yield np.full(size, i, dtype="int32")

    def length(b):
        return len(b)

    def fail_on(x, bad):
        if x == bad:
            raise KeyError(x)
        return x
""")


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    """One daemon for the tests that only send work (a daemon start costs about a second)."""
    directory = tmp_path_factory.mktemp("client")
    (directory / "client_tasks.py").write_text(CLIENT_TASKS)
    config = BASE_CONFIG.format(workers=2).replace(
        'modules = ["workerd.examples.tasks"]', 'modules = ["workerd.examples.tasks", "client_tasks"]'
    )
    daemon = Daemon(directory, config, [], {"PYTHONPATH": str(directory)}, None)
    try:
        daemon.wait_ready()
        yield daemon
    finally:
        daemon.stop(signal.SIGKILL if daemon.proc.poll() is None else signal.SIGTERM, timeout=5)


def busy_workers(daemon: Daemon) -> int:
    with daemon.client() as client:
        return int(client.status()["pool"]["busy"])


def workerctl(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*WORKERCTL, *args], capture_output=True, text=True, timeout=timeout)


def write_lines(path: Path, values: list[Any]) -> None:
    path.write_text("".join(json.dumps(v) + "\n" for v in values))


def output_lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# -- streaming, map, chunks ------------------------------------------------------------------


def test_stream_items_arrive_before_the_end(shared: Daemon) -> None:
    with shared.client() as client:
        events = list(client.events(COUNT, kwargs={"n": 3}))
        assert events == [("item", 1), ("item", 2), ("item", 3), ("result", {"items": 3})]
        assert list(client.stream(COUNT, kwargs={"n": 4})) == [1, 2, 3, 4]
        assert client.execute(COUNT, n=2) == [1, 2]


@pytest.mark.parametrize("chunksize", [1, 7])
def test_map_and_imap_unordered(shared: Daemon, chunksize: int) -> None:
    with shared.client() as client:
        assert client.map(ECHO, range(50), window=3, chunksize=chunksize) == list(range(50))
        got = list(client.imap_unordered(ECHO, range(50), window=4, chunksize=chunksize))
        assert sorted(got) == list(range(50))
        with pytest.raises(errors.TaskError, match="missing 1 required positional argument"):
            client.map("client_tasks:fail_on", range(10), chunksize=chunksize)  # no argument 'bad'


@pytest.mark.parametrize("chunksize", [1, 4])
def test_execute_many_reports_each_call_and_goes_on(shared: Daemon, chunksize: int) -> None:
    calls = [((i,), {"bad": 5}) for i in range(12)]
    with shared.client() as client:
        outcomes = list(client.execute_many("client_tasks:fail_on", calls, window=2, chunksize=chunksize))
    assert sorted(o.index for o in outcomes) == list(range(12))
    failed = [o for o in outcomes if not o.ok]
    assert [o.index for o in failed] == [5] and isinstance(failed[0].error, errors.TaskError)
    assert failed[0].error.details["type"] == "KeyError"
    assert all(o.result == o.index for o in outcomes if o.ok)


def test_chunks_collect_generator_items(shared: Daemon) -> None:
    with shared.client() as client:
        outcomes = list(client.execute_many(COUNT, [((), {"n": n}) for n in range(4)], chunksize=4))
    assert sorted((o.index, o.result) for o in outcomes) == [(0, []), (1, [1]), (2, [1, 2]), (3, [1, 2, 3])]


@pytest.mark.parametrize(
    ("fields", "fragment"),
    [
        ({"calls": []}, "array of 1 to"),
        ({"calls": [[[1], {}]] * 10_001}, "array of 1 to"),
        ({"calls": [[1, {}]]}, "'calls'[0]"),
        ({"calls": [[[1], {}], [[], {}, {}]]}, "'calls'[1]"),
        ({"calls": [[[], {b"k": 1}]]}, "string keys"),
        ({"calls": [[[], {}]], "args": [1]}, "one or the other"),
    ],
)
def test_malformed_chunks_are_bad_requests(shared: Daemon, fields: dict[str, Any], fragment: str) -> None:
    with shared.client() as client, pytest.raises(errors.BadRequest) as info:
        client.request("execute", name=ECHO, **fields)
    assert fragment in info.value.message


def test_chunks_are_for_tasks_not_pipelines(shared: Daemon) -> None:
    with shared.client() as client, pytest.raises(errors.BadRequest, match="not pipelines"):
        client.request("execute", name="demo", calls=[[[], {}]])


# -- raw frames and size limits -----------------------------------------------------------------


def test_numpy_arrays_and_large_bytes_travel_as_raw_frames(shared: Daemon) -> None:
    array = np.arange(300_000, dtype="<f8").reshape(1000, 300)
    big = os.urandom(200_000)
    with shared.client() as client:
        assert client.execute("client_tasks:describe", array) == {
            "shape": [1000, 300],
            "dtype": "<f8",
            "sum": float(array.sum()),
        }
        doubled = client.execute("client_tasks:double", array)
        assert isinstance(doubled, np.ndarray) and (doubled == array * 2).all()
        assert client.execute(ECHO, big) == big
        assert client.execute("client_tasks:length", Raw(memoryview(b"abc"))) == 3
        assert client.execute(ECHO, {"nested": Raw(b"xyz")}) == {"nested": b"xyz"}
        items = list(client.stream("client_tasks:arrays", kwargs={"n": 3, "size": 50_000}))
        assert [int(a[0]) for a in items] == [0, 1, 2] and all(a.shape == (50_000,) for a in items)
        outcomes = list(client.execute_many("client_tasks:double", [((array[:2],), {})] * 3, chunksize=3))
        assert all((o.result == array[:2] * 2).all() for o in outcomes)


def test_bad_raw_frame_references_are_answered_by_the_worker(shared: Daemon) -> None:
    dangling = msgpack.ExtType(1, msgpack.packb(3))  # refers to a frame the message does not have
    with shared.client() as client:
        with pytest.raises(errors.BadRequest, match="reference to raw frame 3, but the message has 0"):
            client.execute(ECHO, dangling)
        assert client.execute(ECHO, "still serving") == "still serving"


def test_oversized_requests_get_a_clear_error_and_the_client_goes_on(
    start_daemon: Callable[..., Daemon],
) -> None:
    daemon = start_daemon(
        config=BASE_CONFIG.format(workers=1).replace("[daemon]", "[daemon]\nmax_message_mb = 1")
    )
    payload = b"x" * (2 * 1024 * 1024)
    with Client(daemon.socket, max_message_bytes=1024 * 1024) as client:
        with pytest.raises(errors.MessageTooLarge, match="over the daemon's 1048576 byte message limit"):
            client.execute(ECHO, payload)
        assert client.execute(ECHO, "small") == "small"
    # Not told the limit: the client asks the daemon (ping). A daemon that does not say leaves
    # the 64 MiB default, so the message goes, libzmq drops it and ends the connection: the
    # request fails at once with ConnectionLost instead of hanging.
    with daemon.client(timeout=20) as client:
        started = time.monotonic()
        with pytest.raises((errors.MessageTooLarge, errors.ConnectionLost)):
            client.execute(ECHO, payload)
        assert time.monotonic() - started < 10  # loose: failing, not waiting out the timeout
        assert client.execute(ECHO, "after") == "after"


# -- connection loss -----------------------------------------------------------------------------


def test_a_daemon_restart_fails_requests_in_flight_and_the_client_reconnects(
    start_daemon: Callable[..., Daemon],
) -> None:
    first = start_daemon(workers=1)
    with Client(first.socket, timeout=60) as client:
        request = client.send("execute", name=SLEEP, kwargs={"seconds": 30})
        wait_until(lambda: busy_workers(first) == 1)
        first.proc.kill()
        with pytest.raises(errors.ConnectionLost) as info:
            client.wait_result(request)
        assert info.value.exit_code == errors.EXIT_UNREACHABLE
        first.proc.wait()
        second = start_daemon(workers=1, socket=first.socket)
        assert client.execute(ECHO, "back") == "back"
        assert client.ping()["pid"] == second.proc.pid


def test_async_client_reconnects_too(start_daemon: Callable[..., Daemon]) -> None:
    first = start_daemon(workers=1)

    async def scenario() -> None:
        async with AsyncClient(first.socket, timeout=60) as client:
            sleeper = asyncio.ensure_future(client.execute(SLEEP, seconds=30))
            await asyncio.sleep(0.3)
            first.proc.kill()
            with pytest.raises(errors.ConnectionLost):
                await sleeper
            first.proc.wait()
            second = await asyncio.to_thread(start_daemon, workers=1, socket=first.socket)
            assert (await client.ping())["pid"] == second.proc.pid

    asyncio.run(scenario())


# -- the async client ----------------------------------------------------------------------------


def test_async_client_under_concurrent_use(shared: Daemon) -> None:
    async def scenario() -> None:
        async with AsyncClient(shared.socket) as client:

            async def collect_stream() -> list[int]:
                return [item async for item in client.stream(COUNT, kwargs={"n": 5})]

            async def unordered() -> list[int]:
                return sorted([x async for x in client.imap_unordered(ECHO, range(200), chunksize=9)])

            results = await asyncio.gather(
                *(client.execute(ECHO, i) for i in range(100)),
                client.map(ECHO, range(300), window=5, chunksize=16),
                collect_stream(),
                unordered(),
                client.status(),
                client.execute("client_tasks:double", np.arange(100_000)),
            )
            assert results[:100] == list(range(100))
            assert results[100] == list(range(300))
            assert results[101] == [1, 2, 3, 4, 5]
            assert results[102] == list(range(200))
            assert results[103]["state"] == "running"
            assert (results[104] == np.arange(100_000) * 2).all()
            with pytest.raises(ValueError, match="fails on purpose"):  # a TaskError[ValueError]
                await client.execute(FAIL)
            with pytest.raises(errors.RequestTimeout):
                await client.request("execute", timeout=0.2, name=SLEEP, kwargs={"seconds": 1})
            outcomes = [o async for o in client.execute_many(ECHO, [((i,), {}) for i in range(10)])]
            assert sorted(o.result for o in outcomes) == list(range(10))

    asyncio.run(scenario())


# -- workerctl run -----------------------------------------------------------------------------


def test_workerctl_run_streams_and_parses_values(shared: Daemon) -> None:
    result = workerctl("--socket", shared.socket, "run", COUNT, "n=3")
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["1", "2", "3"]
    result = workerctl("--socket", shared.socket, "--json", "run", ECHO, "a=[1, 2]", "b=text")
    assert json.loads(result.stdout) == {"args": [], "kwargs": {"a": [1, 2], "b": "text"}}


def test_workerctl_run_takes_key_value_after_options_and_prints_only_json(shared: Daemon) -> None:
    result = workerctl(
        "--socket", shared.socket, "run", ECHO, "a=1", "--task-timeout", "5", "n=3", "--retries", "1", "s=x"
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {"args": [], "kwargs": {"a": 1, "n": 3, "s": "x"}}
    # NaN and the infinities are no JSON numbers: printed as null, with --json and without.
    for json_flag in (["--json"], []):
        result = workerctl(
            "--socket", shared.socket, *json_flag, "run", ECHO, "--args", "[NaN, [Infinity], -Infinity]"
        )
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout, parse_constant=no_constant) == {
            "args": [None, [None], None],
            "kwargs": {},
        }


def no_constant(name: str) -> None:
    raise AssertionError(f"{name} is not JSON")


def test_batch_records_results_and_errors_and_goes_on(shared: Daemon, tmp_path: Path) -> None:
    source = tmp_path / "in.jsonl"
    source.write_text('{"x": 1, "bad": 2}\n[2, 3]\n\nnot json\n{"x": 2, "bad": 2}\n7\n')
    out = tmp_path / "out.jsonl"
    args = ["--socket", shared.socket, "run", "client_tasks:fail_on", "--batch", str(source)]
    result = workerctl(*args, "--output", str(out), "--chunksize", "2")
    assert result.returncode == errors.EXIT_FAILED
    assert "batch: 2 done, 3 failed, 0 lost" in result.stderr
    lines = {r["line"]: r for r in output_lines(out)}
    assert sorted(lines) == [1, 2, 4, 5, 6]
    assert lines[1] == {"line": 1, "input": {"x": 1, "bad": 2}, "result": 1}
    assert lines[2]["result"] == 2
    assert lines[4]["error"]["code"] == "BAD_INPUT" and lines[4]["input"] == "not json"
    assert lines[4]["error"]["message"].startswith(
        "input line 4 is not valid JSON: Expecting value at column 1"
    )
    assert lines[6]["error"]["message"].startswith("input line 6 is a number: it must be a JSON object")
    assert lines[5]["error"]["code"] == "TASK_ERROR" and lines[5]["error"]["details"]["type"] == "KeyError"
    assert lines[6]["error"]["code"] == "BAD_INPUT"
    # Run again without --resume: refused, the output is not doubled.
    refused = workerctl(*args, "--output", str(out))
    assert refused.returncode == errors.EXIT_USAGE and "--resume" in refused.stderr
    # Resumed: nothing left to do. With --json the summary is one JSON document on stdout.
    again = workerctl("--json", *args, "--output", str(out), "--resume")
    assert json.loads(again.stdout)["skipped"] == 5 and len(output_lines(out)) == 5
    # Without --output the result lines themselves are the JSON lines on stdout.
    plain = workerctl("--json", "--socket", shared.socket, "run", ECHO, "--batch", str(source))
    assert sorted(json.loads(line)["line"] for line in plain.stdout.splitlines()) == [1, 2, 4, 5, 6]


def test_batch_usage_errors(shared: Daemon, tmp_path: Path) -> None:
    source = tmp_path / "in.jsonl"
    source.write_text("[1]\n")
    base = ["--socket", shared.socket, "run", ECHO]
    for extra in (["--batch", str(source), "a=1"], ["--batch", str(source), "--resume"], ["--output", "x"]):
        result = workerctl(*base, *extra)
        assert result.returncode == errors.EXIT_USAGE, (extra, result.stderr)
    assert workerctl(*base, "--batch", str(tmp_path / "absent")).returncode == errors.EXIT_USAGE


def test_batch_retry_failed_runs_the_failed_lines_again_each_input_once(
    shared: Daemon, tmp_path: Path
) -> None:
    source, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    source.write_text('{"x": 1, "bad": 0}\n{"x": 2, "bad": 2}\n{broken\n{"x": 4, "bad": 0}\n')
    args = [
        "--socket",
        shared.socket,
        "run",
        "client_tasks:fail_on",
        "--batch",
        str(source),
        "--output",
        str(out),
    ]
    first = workerctl(*args)
    assert first.returncode == errors.EXIT_FAILED and "2 done, 2 failed" in first.stderr
    refused = workerctl(*args, "--retry-failed")
    assert refused.returncode == errors.EXIT_USAGE and "--retry-failed goes with --resume" in refused.stderr
    # Plain --resume leaves the failures recorded: nothing to do.
    assert "0 done, 0 failed" in workerctl(*args, "--resume").stderr
    # The input fixed, --retry-failed runs lines 2 and 3 again and keeps one line per input.
    source.write_text('{"x": 1, "bad": 0}\n{"x": 2, "bad": 0}\n{"x": 3, "bad": 0}\n{"x": 4, "bad": 0}\n')
    retried = workerctl(*args, "--resume", "--retry-failed")
    assert retried.returncode == 0, retried.stderr
    assert (
        "2 done, 0 failed, 0 lost, 2 skipped" in retried.stderr
        and "2 failed lines of the output run again" in retried.stderr
    )
    assert_each_input_once(out, 4)
    assert {r["line"]: r["result"] for r in output_lines(out)} == {1: 1, 2: 2, 3: 3, 4: 4}


def test_batch_results_on_a_terminal_never_run_into_the_progress_bar(shared: Daemon, tmp_path: Path) -> None:
    """stdout and stderr on one terminal (a real pty), no --output: each result line starts on
    a line of its own, cleared of the bar, and the bar is drawn again after it."""
    source = tmp_path / "in.jsonl"
    write_lines(source, [{"seconds": 0.01}] * 40)
    leader, follower = pty.openpty()
    proc = subprocess.Popen(
        [*WORKERCTL, "--socket", shared.socket, "run", SLEEP, "--batch", str(source), "--window", "2"],
        stdin=subprocess.DEVNULL,
        stdout=follower,
        stderr=follower,
    )
    os.close(follower)
    screen = read_pty(leader)
    assert proc.wait(30) == 0
    shown = [line.rsplit("\r", 1)[-1].replace("\x1b[K", "") for line in screen.split("\n")]
    results = [line for line in shown if '"line"' in line]
    assert len(results) == 40 and all(json.loads(line)["result"]["pid"] for line in results)
    assert "%" in screen and "done" in screen  # the bar was there


def read_pty(fd: int) -> str:
    """Everything written to a pty until its last writer closed it."""
    chunks = []
    while True:
        try:
            chunk = os.read(fd, 65536)
        except OSError:  # EIO: every writer is gone
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(fd)
    return b"".join(chunks).decode().replace("\r\n", "\n")


def assert_each_input_once(out: Path, count: int) -> None:
    records = output_lines(out)
    assert sorted(r["line"] for r in records) == list(range(1, count + 1))
    assert all("result" in r for r in records)


def default_sigint() -> None:
    """In the child before exec: a job started in the background (`cmd &`) inherits SIGINT
    ignored, and Python then installs no KeyboardInterrupt handler; this test needs Ctrl-C's."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_batch_interrupted_by_ctrl_c_resumes_each_input_exactly_once(shared: Daemon, tmp_path: Path) -> None:
    source, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_lines(source, [{"seconds": 0.01}] * 300)
    args = ["--socket", shared.socket, "run", SLEEP, "--batch", str(source), "--output", str(out)]
    proc = subprocess.Popen(
        [*WORKERCTL, *args, "--window", "4"], stderr=subprocess.PIPE, text=True, preexec_fn=default_sigint
    )
    wait_until(lambda: out.exists() and out.read_text().count("\n") >= 40, timeout=30)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 130 and "stopped early; rerun with --resume" in stderr
    partial = output_lines(out)  # every line whole and valid JSON
    assert 40 <= len(partial) < 300 and len({r["line"] for r in partial}) == len(partial)
    resumed = workerctl(*args, "--resume", "--window", "8")
    assert resumed.returncode == 0, resumed.stderr
    assert f"{len(partial)} skipped" in resumed.stderr
    assert_each_input_once(out, 300)


def test_batch_survives_a_daemon_restart_and_resumes_each_input_exactly_once(
    start_daemon: Callable[..., Daemon], tmp_path: Path
) -> None:
    first = start_daemon(workers=2)
    source, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_lines(source, [{"seconds": 0.02}] * 200)
    args = ["--socket", first.socket, "run", SLEEP, "--batch", str(source), "--output", str(out)]
    proc = subprocess.Popen([*WORKERCTL, *args, "--window", "4"], stderr=subprocess.PIPE, text=True)
    wait_until(lambda: out.exists() and out.read_text().count("\n") >= 30, timeout=30)
    first.proc.kill()
    first.proc.wait()
    start_daemon(workers=2, socket=first.socket)  # the batch reconnects and goes on
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == errors.EXIT_FAILED, stderr
    assert "lost calls (the connection dropped under them) are not recorded" in stderr
    assert "rerun with --resume" in stderr
    written = output_lines(out)
    assert len({r["line"] for r in written}) == len(written) < 200
    resumed = workerctl(*args, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert_each_input_once(out, 200)
