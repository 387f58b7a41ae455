"""workerctl.Executor against a real daemon, modelled on the standard library's own executor
tests (Lib/test/test_concurrent_futures: executor.py, test_shutdown.py, test_future.py): submit,
map (order, exceptions, timeout, chunksize, buffersize, no result kept), shutdown (wait, no wait,
cancel_futures, after shutdown, at interpreter exit), callbacks, cancel and running().

Tests whose names end in `_needs_daemon_cancel` need the daemon's side of `cancel`
(docs/protocol.md §7.8); the others pass against a daemon that answers it UNKNOWN_COMMAND.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import gc
import subprocess
import sys
import textwrap
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FunctionType, ModuleType
from typing import Any

import pytest

from tests.conftest import Daemon, serving_module, wait_until
from workerctl import AsyncClient, Client, Executor, errors

TASKS = textwrap.dedent("""
    import os
    import time

    import numpy as np

    def mul(x, y):
        return x * y

    def capture(*args, **kwargs):
        return [list(args), kwargs]

    def nap(seconds, value=None):
        time.sleep(seconds)
        return value

    def pid_after(seconds):
        time.sleep(seconds)
        return os.getpid()

    def divide(a, b):
        return divmod(a, b)

    def array(n):
        return np.arange(n)

    def ticks(n, delay):
        for i in range(n):
            time.sleep(delay)
            yield i

    def fail(message):
        raise ValueError(message)
""")


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Daemon, ModuleType]]:
    """One daemon with 2 workers allowing `exec_tasks`, a module this process imports too."""
    directory = tmp_path_factory.mktemp("executor")
    with serving_module(directory, "exec_tasks", TASKS, "workerd.examples.tasks") as served:
        yield served


@pytest.fixture
def tasks(served: tuple[Daemon, ModuleType]) -> ModuleType:
    return served[1]


@pytest.fixture
def daemon(served: tuple[Daemon, ModuleType]) -> Daemon:
    return served[0]


@pytest.fixture
def executor(daemon: Daemon) -> Iterator[Executor]:
    with Executor(daemon.socket) as pool:
        yield pool


def busy(daemon: Daemon) -> int:
    with daemon.client() as client:
        return int(client.status()["pool"]["busy"])


# -- submit ------------------------------------------------------------------------------------


def test_submit_takes_a_function_or_a_name_and_arguments(executor: Executor, tasks: Any) -> None:
    assert executor.submit(tasks.mul, 2, 8).result() == 16
    assert executor.submit(tasks.mul, 2, y=8).result() == 16
    # `fn` and `self` are the task's keyword arguments too (submit's own is positional-only).
    assert executor.submit("exec_tasks:capture", 1, self=2, fn=3).result() == [[1], {"self": 2, "fn": 3}]
    with pytest.raises(TypeError):
        executor.submit(fn=tasks.capture, arg=1)  # type: ignore[call-arg]
    with pytest.raises(TypeError):
        executor.submit(arg=1)  # type: ignore[call-arg]
    # A tuple goes and comes back a tuple (execute's `tuples`), as with ProcessPoolExecutor.
    assert executor.submit(tasks.capture, (1, 2)).result() == [[(1, 2)], {}]


def test_functions_the_daemon_cannot_import_by_name_are_refused_at_once(
    executor: Executor, tasks: Any
) -> None:
    def local(x: int) -> int:
        return x

    in_main = FunctionType(tasks.mul.__code__, {}, "mul")
    in_main.__module__ = "__main__"
    impostor = FunctionType(tasks.mul.__code__, {}, "mul")
    impostor.__module__ = "exec_tasks"  # the name exec_tasks:mul is another function
    for fn, fragment in (
        (lambda x: x, "not a module-level function"),
        (local, "not a module-level function"),
        (Client.ping, "not a module-level function"),
        (in_main, "defined in __main__"),
        (impostor, "does not name"),
    ):
        with pytest.raises(ValueError, match=fragment):
            executor.submit(fn, 1)
    with pytest.raises(TypeError):
        executor.submit(42)  # type: ignore[arg-type]
    # Importable, but not in the daemon's [tasks] modules: refused by the daemon at once.
    started = time.monotonic()
    assert isinstance(executor.submit(pow, 2, 3).exception(timeout=10), errors.Denied)
    assert time.monotonic() - started < 2


def test_result_raises_the_tasks_builtin_type_with_its_traceback_as_cause(
    executor: Executor, tasks: Any
) -> None:
    future = executor.submit(tasks.fail, "bad input")
    with pytest.raises(ValueError, match="bad input") as caught:
        future.result()
    assert isinstance(caught.value, errors.TaskError)
    assert isinstance(caught.value.__cause__, errors.RemoteTraceback)
    assert "raise ValueError(message)" in str(caught.value.__cause__)
    assert future.exception() is caught.value


def test_a_generator_task_runs_and_returns_its_items(executor: Executor, tasks: Any) -> None:
    future = executor.submit(tasks.ticks, 4, 0.15)
    assert not future.running()
    wait_until(future.running, timeout=10)  # its first item says it has started
    assert not future.cancel()  # started: concurrent.futures cannot cancel it
    assert future.result(timeout=10) == [0, 1, 2, 3]


def test_callbacks_run_and_may_submit(executor: Executor, tasks: Any) -> None:
    second: list[concurrent.futures.Future[Any]] = []
    called = threading.Event()

    def chain(done: concurrent.futures.Future[Any]) -> None:
        second.append(executor.submit(tasks.mul, done.result(), 10))
        called.set()

    first = executor.submit(tasks.mul, 2, 3)
    first.add_done_callback(chain)
    assert called.wait(10) and second[0].result(timeout=10) == 60
    late: list[Any] = []
    first.add_done_callback(lambda done: late.append(done.result()))  # already done: runs at once
    assert late == [6]


def test_wait_and_as_completed(executor: Executor, tasks: Any) -> None:
    slow, fast = executor.submit(tasks.nap, 1.0, "slow"), executor.submit(tasks.nap, 0.05, "fast")
    done, pending = concurrent.futures.wait([slow, fast], return_when=concurrent.futures.FIRST_COMPLETED)
    assert done == {fast} and pending == {slow}
    order = [f.result() for f in concurrent.futures.as_completed([slow, fast], timeout=10)]
    assert order == ["fast", "slow"]


def test_no_finished_future_is_retained(executor: Executor, tasks: Any) -> None:
    future = executor.submit(tasks.mul, 2, 2)
    assert future.result() == 4
    ref = weakref.ref(future)
    del future
    assert ref() is None  # no cycle, no holder: gone without a collection
    dropped = weakref.ref(executor.submit(tasks.nap, 0.05))  # discarded at once, completes anyway
    wait_until(lambda: dropped() is None, timeout=10)


# -- map ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("chunksize", [1, 3])
def test_map_keeps_order_and_stops_at_the_shortest_input(
    executor: Executor, tasks: Any, chunksize: int
) -> None:
    assert list(executor.map(tasks.mul, range(10), range(10), chunksize=chunksize)) == [
        i * i for i in range(10)
    ]
    assert list(executor.map(tasks.mul, range(5), range(100), chunksize=chunksize)) == [0, 1, 4, 9, 16]
    assert list(executor.map(tasks.mul, [], [], chunksize=chunksize)) == []


@pytest.mark.parametrize("chunksize", [1, 2])
def test_map_raises_each_exception_when_its_result_is_reached(
    executor: Executor, tasks: Any, chunksize: int
) -> None:
    results = executor.map(tasks.divide, [1, 1, 1, 1], [2, 3, 0, 5], chunksize=chunksize)
    assert next(results) == (0, 1) and next(results) == (0, 1)  # divmod's tuple, a tuple
    with pytest.raises(ZeroDivisionError):
        next(results)


def test_map_times_out_from_the_original_call(executor: Executor, tasks: Any) -> None:
    got = []
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        for value in executor.map(tasks.nap, [0, 0, 1.5], ["a", "b", "c"], timeout=0.6):
            got.append(value)
    assert got == ["a", "b"] and 0.5 < time.monotonic() - started < 1.4


@pytest.mark.parametrize("chunksize", [1, 3])
def test_map_keeps_no_result_it_has_yielded(executor: Executor, tasks: Any, chunksize: int) -> None:
    for array in executor.map(tasks.array, range(1, 8), chunksize=chunksize):
        ref = weakref.ref(array)
        del array
        gc.collect()
        assert ref() is None


def test_map_with_buffersize_reads_its_input_as_it_goes(executor: Executor, tasks: Any) -> None:
    pulled = []

    def inputs() -> Iterator[int]:
        for i in range(10):
            pulled.append(i)
            yield i

    results = executor.map(tasks.mul, inputs(), range(10), buffersize=2)
    assert len(pulled) == 2  # submitted at once: two calls, not ten
    assert next(results) == 0 and len(pulled) == 3
    assert list(results) == [i * i for i in range(1, 10)] and len(pulled) == 10


# -- shutdown ----------------------------------------------------------------------------------


def test_submit_after_shutdown_is_refused_and_max_workers_is_checked(daemon: Daemon, tasks: Any) -> None:
    pool = Executor(daemon.socket)
    pool.shutdown()
    with pytest.raises(RuntimeError, match="cannot schedule new futures after shutdown"):
        pool.submit(tasks.mul, 2, 5)
    for number in (0, -1):
        with pytest.raises(ValueError, match="max_workers must be greater than 0"):
            Executor(daemon.socket, max_workers=number)
    with pytest.raises(TypeError, match="by keyword"):
        Executor(4)  # type: ignore[arg-type]


def test_shutdown_waits_for_every_call(daemon: Daemon, tasks: Any) -> None:
    pool = Executor(daemon.socket, max_workers=4)  # 46 of the 50 wait here, not at the daemon
    futures = [pool.submit(tasks.nap, 0.01, i) for i in range(50)]
    pool.shutdown()
    assert [f.result(timeout=0) for f in futures] == list(range(50))


def test_shutdown_without_wait_and_a_dropped_executor_still_finish(daemon: Daemon, tasks: Any) -> None:
    pool = Executor(daemon.socket)
    results = pool.map(abs_task := "exec_tasks:mul", range(-5, 5), [-1] * 10)
    thread = pool._engine.thread
    pool.shutdown(wait=False)
    thread.join(10)
    assert not thread.is_alive() and list(results) == [-i for i in range(-5, 5)]
    dropped = Executor(daemon.socket)
    futures = [dropped.submit(abs_task, i, 2) for i in range(5)]
    thread = dropped._engine.thread
    del dropped
    gc.collect()
    thread.join(10)
    assert not thread.is_alive() and [f.result(timeout=0) for f in futures] == [0, 2, 4, 6, 8]


def test_shutdown_cancel_futures_cancels_the_calls_not_yet_sent(daemon: Daemon, tasks: Any) -> None:
    pool = Executor(daemon.socket, max_workers=1)
    first = pool.submit(tasks.nap, 0.3)
    wait_until(lambda: busy(daemon) == 1)
    futures = [pool.submit(tasks.nap, 0.1) for _ in range(19)]
    pool.shutdown(cancel_futures=True)
    assert all(f.cancelled() for f in futures)  # none of them had left this process
    assert first.done() and not first.cancelled() and first.exception() is None


def test_calls_not_yet_sent_are_cancelled_here(daemon: Daemon, tasks: Any) -> None:
    with Executor(daemon.socket, max_workers=1) as pool:
        first = pool.submit(tasks.nap, 0.5)
        queued = [pool.submit(tasks.nap, 0.5) for _ in range(4)]
        assert all(f.cancel() for f in queued) and all(f.cancelled() and f.done() for f in queued)
        assert not any(f.running() for f in queued)
        with pytest.raises(concurrent.futures.CancelledError):
            queued[0].result()
        assert first.result(timeout=10) is None


def run_script(daemon: Daemon, tasks: Any, body: str) -> subprocess.CompletedProcess[str]:
    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(Path(tasks.__file__).parent)!r})
        import exec_tasks
        from workerctl import Executor
    """) + textwrap.dedent(body)
    return subprocess.run(
        [sys.executable, "-c", script.replace("SOCKET", repr(daemon.socket))],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_pending_work_is_finished_at_interpreter_exit(daemon: Daemon, tasks: Any) -> None:
    done = run_script(
        daemon,
        tasks,
        """
        pool = Executor(SOCKET)
        future = pool.submit(exec_tasks.nap, 0.5, "apple")
        future.add_done_callback(lambda f: print(f.result(), flush=True))
        """,
    )
    assert (done.returncode, done.stdout, done.stderr) == (0, "apple\n", "")


def test_submit_after_interpreter_shutdown_is_refused(daemon: Daemon, tasks: Any) -> None:
    done = run_script(
        daemon,
        tasks,
        """
        import atexit

        @atexit.register
        def run_last():
            try:
                pool.submit(exec_tasks.mul, 1, 2)
            except RuntimeError as exc:
                print(exc)

        pool = Executor(SOCKET)
        pool.submit(exec_tasks.mul, 4, 2).result()
        """,
    )
    assert (done.returncode, done.stdout) == (0, "cannot schedule new futures after interpreter shutdown\n")


def test_a_lost_daemon_fails_the_calls_in_flight(start_daemon: Callable[..., Daemon]) -> None:
    doomed = start_daemon(workers=1)
    with Executor(doomed.socket) as pool:
        future = pool.submit("workerd.examples.tasks:sleep", 5)
        wait_until(lambda: busy(doomed) == 1)
        doomed.proc.kill()
        assert isinstance(future.exception(timeout=10), errors.ConnectionLost)


# -- with the daemon's side of cancel ------------------------------------------------------------


def test_future_cancel_of_calls_queued_at_the_daemon_needs_daemon_cancel(daemon: Daemon, tasks: Any) -> None:
    with Executor(daemon.socket) as pool:
        running = [pool.submit(tasks.nap, 1.0, i) for i in range(2)]
        wait_until(lambda: busy(daemon) == 2)
        queued = [pool.submit(tasks.nap, 1.0) for _ in range(6)]
        time.sleep(0.2)  # sent: they wait at the daemon (queued or prefetched), not here
        assert all(f.cancel() for f in queued) and all(f.cancelled() for f in queued)
        assert not any(f.cancel() for f in running) and all(f.running() for f in running)
        assert [f.result(timeout=10) for f in running] == [0, 1]


def test_shutdown_cancel_futures_reaches_the_daemon_needs_daemon_cancel(daemon: Daemon, tasks: Any) -> None:
    pool = Executor(daemon.socket)  # 32 at the daemon at once: most of them queued there
    futures = [pool.submit(tasks.nap, 0.3) for _ in range(20)]
    wait_until(lambda: busy(daemon) == 2)
    started = time.monotonic()
    pool.shutdown(cancel_futures=True)
    assert time.monotonic() - started < 1.5  # 18 x 0.3 s on 2 workers would take 2.7 s
    assert sum(f.cancelled() for f in futures) >= 14
    assert all(f.done() for f in futures)


def test_client_cancel_queued_and_terminate_running_needs_daemon_cancel(daemon: Daemon) -> None:
    with daemon.client() as client:
        sleeps = [
            client.send("execute", name="exec_tasks:pid_after", args=[2.0], kwargs={}) for _ in range(4)
        ]
        wait_until(lambda: busy(daemon) == 2)
        time.sleep(0.2)
        result = client.cancel([*sleeps, 999_999])
        assert sorted(result["cancelled"] + result["running"]) == sorted(sleeps)
        assert len(result["cancelled"]) == 2 and result["unknown"] == [999_999]
        for request_id in result["cancelled"]:
            with pytest.raises(errors.Cancelled):
                client.wait_result(request_id, timeout=1)  # its reply came before the cancel's
        before = {w["pid"] for w in client.status()["pool"]["workers"]}
        killed = client.cancel(result["running"], terminate=True)
        assert sorted(killed["cancelled"]) == sorted(result["running"])
        for request_id in killed["cancelled"]:
            with pytest.raises(errors.Cancelled):
                client.wait_result(request_id, timeout=1)
        wait_until(lambda: len({w["pid"] for w in client.status()["pool"]["workers"]} - before) == 2)


def test_leaving_a_stream_early_terminates_it_needs_daemon_cancel(daemon: Daemon) -> None:
    with daemon.client() as client:
        for item in client.stream("exec_tasks:ticks", [100, 0.05]):
            if item == 2:
                break  # the 5 s generator is not wanted any more
        wait_until(lambda: busy(daemon) == 0, timeout=2)


def test_a_map_left_early_cancels_its_queued_calls_needs_daemon_cancel(daemon: Daemon) -> None:
    with daemon.client() as client:
        calls = client.imap_unordered("exec_tasks:nap", [0.5] * 12, window=12)
        next(calls)
        calls.close()  # 11 in flight: at most the 2 running finish, the rest are cancelled
        started = time.monotonic()
        wait_until(lambda: busy(daemon) == 0 and client.status()["queue"]["depth"] == 0, timeout=3)
        assert time.monotonic() - started < 1.0  # not 11 x 0.5 s on 2 workers


def test_async_client_cancel_needs_daemon_cancel(daemon: Daemon) -> None:
    async def scenario() -> None:
        async with AsyncClient(daemon.socket) as client:
            ids = [
                await client.send("execute", name="exec_tasks:nap", args=[1.0], kwargs={}) for _ in range(4)
            ]
            await asyncio.sleep(0.3)
            result = await client.cancel(ids)
            assert len(result["cancelled"]) == 2 and len(result["running"]) == 2
            for request_id in result["cancelled"]:
                with pytest.raises(errors.Cancelled):
                    await client.wait_result(request_id, timeout=1)

    asyncio.run(scenario())
