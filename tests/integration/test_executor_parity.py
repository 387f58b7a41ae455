"""workerctl.Executor against concurrent.futures.ProcessPoolExecutor: the same test bodies run
on both, the standard library's executor as the reference. Derived from CPython's
Lib/test/test_concurrent_futures (executor.py, test_shutdown.py, test_wait.py,
test_as_completed.py, test_future.py): submit, map, shutdown (wait, cancel_futures), cancel,
running(), callbacks, timeouts, wait (FIRST_COMPLETED, FIRST_EXCEPTION, ALL_COMPLETED),
as_completed, exceptions, tuples.

`make(max_workers)` gives an executor of the kind under test; ProcessPoolExecutor's (spawned
workers) and workerd's (a real daemon with 2 CPU workers; max_workers is the executor's window)
are shut down at the end of each test. A few tests at the end are workerd's alone: what the
daemon's start notice and `cancel` add.
"""

from __future__ import annotations

import concurrent.futures
import multiprocessing
import textwrap
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ALL_COMPLETED, FIRST_COMPLETED, FIRST_EXCEPTION, Future
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from tests.conftest import Daemon, serving_module, wait_until
from workerctl import Executor, errors

TASKS = textwrap.dedent("""
    import collections
    import os
    import time

    Point = collections.namedtuple("Point", "x y")

    def mul(x, y):
        return x * y

    def div(a, b):
        return divmod(a, b)

    def sleep(seconds, value=None):
        time.sleep(seconds)
        return value

    def hold(gate=None, value=None):
        # Until the file `gate` exists (at once for None; 60 s at most, should a test hang).
        deadline = time.monotonic() + 60
        while gate is not None and not os.path.exists(gate) and time.monotonic() < deadline:
            time.sleep(0.01)
        return value

    def sleep_and_raise(seconds):
        time.sleep(seconds)
        raise Exception("this is an exception")

    def fail(*args):
        raise ValueError(*args)

    def missing(key):
        return {}[key]

    def echo(*args, **kwargs):
        return args, kwargs

    def shapes():
        return {"pair": (1, 2), "nested": (1, (2, (3,)), [4, (5, 6)]), "empty": (), "list": [1, 2],
                "in_list": [(1,), [(2, 3)]], "point": tuple(Point(1, 2))}
""")

MakeExecutor = Callable[..., concurrent.futures.Executor]


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Daemon, ModuleType]]:
    with serving_module(tmp_path_factory.mktemp("parity"), "parity_tasks", TASKS, "") as served:
        yield served


@pytest.fixture
def tasks(served: tuple[Daemon, ModuleType]) -> ModuleType:
    return served[1]


@pytest.fixture
def gate(tmp_path: Path) -> str:
    """A path for tasks.hold: a call held on it runs until `make` opens it (creates the file) at
    the end of the test. A call that must still be running when the test looks runs so, however
    slow the machine, and the shutdown after the test need not wait out a long sleep."""
    return str(tmp_path / "gate")


@pytest.fixture(params=["ProcessPoolExecutor", "workerctl.Executor"])
def make(
    request: pytest.FixtureRequest, served: tuple[Daemon, ModuleType], gate: str
) -> Iterator[MakeExecutor]:
    made: list[concurrent.futures.Executor] = []

    def factory(max_workers: int = 2) -> concurrent.futures.Executor:
        executor: concurrent.futures.Executor
        if request.param == "ProcessPoolExecutor":
            context = multiprocessing.get_context("spawn")  # no fork of a process with threads
            executor = concurrent.futures.ProcessPoolExecutor(max_workers, mp_context=context)
        else:
            executor = Executor(served[0].socket, max_workers=max_workers)
        made.append(executor)
        return executor

    yield factory
    Path(gate).touch()
    for executor in made:
        executor.shutdown(wait=True, cancel_futures=True)


def finished(value: Any = None, exception: BaseException | None = None) -> Future[Any]:
    future: Future[Any] = Future()
    if exception is None:
        future.set_result(value)
    else:
        future.set_exception(exception)
    return future


def cancelled_and_notified() -> Future[Any]:
    future: Future[Any] = Future()
    future.cancel()
    future.set_running_or_notify_cancel()
    return future


def occupied(executor: concurrent.futures.Executor, task: Any, arg: Any) -> list[Future[Any]]:
    """Two calls running: every worker of the pool (2) busy with task(arg, i) (tasks.sleep for
    a time, tasks.hold until the gate opens)."""
    blockers = [executor.submit(task, arg, i) for i in range(2)]
    wait_until(lambda: all(f.running() for f in blockers), timeout=30)
    return blockers


# -- submit and results --------------------------------------------------------------------------


def test_submit(make: MakeExecutor, tasks: Any) -> None:
    executor = make()
    assert executor.submit(tasks.mul, 2, 8).result() == 16
    assert executor.submit(tasks.mul, 2, y=8).result() == 16


def test_tuples_come_back_as_tuples(make: MakeExecutor, tasks: Any) -> None:
    executor = make()
    assert executor.submit(tasks.div, 7, 2).result() == (3, 1)
    assert type(executor.submit(tasks.div, 7, 2).result()) is tuple
    shapes = executor.submit(tasks.shapes).result()
    assert shapes == tasks.shapes()
    assert repr(shapes) == repr(tasks.shapes())  # equal and of the same types: (1,) is not [1]
    # Arguments go as they are: a tuple is a tuple in the task, and a dict key there.
    assert executor.submit(tasks.echo, (1, 2), [3], k=(4,)).result() == (((1, 2), [3]), {"k": (4,)})


# -- map -------------------------------------------------------------------------------------------


def test_map(make: MakeExecutor, tasks: Any) -> None:
    executor = make()
    assert list(executor.map(tasks.mul, range(10), range(10))) == [i * i for i in range(10)]
    assert list(executor.map(tasks.mul, range(10), range(10), chunksize=3)) == [i * i for i in range(10)]


@pytest.mark.parametrize("chunksize", [1, 2])
def test_map_exception(make: MakeExecutor, tasks: Any, chunksize: int) -> None:
    executor = make()
    results = executor.map(tasks.div, [1, 1, 1, 1], [2, 3, 0, 5], chunksize=chunksize)
    assert next(results) == (0, 1)
    assert next(results) == (0, 1)
    with pytest.raises(ZeroDivisionError):
        next(results)


def test_map_timeout(make: MakeExecutor, tasks: Any, gate: str) -> None:
    executor = make()
    results = []
    with pytest.raises(TimeoutError):
        for value in executor.map(tasks.hold, [None, None, gate], timeout=0.5):
            results.append(value)
    assert results == [None, None]


# -- shutdown --------------------------------------------------------------------------------------


def test_run_after_shutdown(make: MakeExecutor, tasks: Any) -> None:
    executor = make()
    executor.shutdown()
    with pytest.raises(RuntimeError):
        executor.submit(tasks.mul, 2, 5)


def test_more_calls_than_workers_all_complete(make: MakeExecutor, tasks: Any) -> None:
    """No shutdown to wake anything: every call beyond max_workers is sent as one ends (a reply
    that frees the window used to leave the rest waiting until the next submit or shutdown)."""
    executor = make(max_workers=1)
    futures = [executor.submit(tasks.sleep, 0.05, i) for i in range(8)]
    _, pending = concurrent.futures.wait(futures, timeout=30)
    assert not pending and [f.result() for f in futures] == list(range(8))


def test_shutdown_waits(make: MakeExecutor, tasks: Any) -> None:
    executor = make()
    futures = [executor.submit(tasks.sleep, 0.05, i) for i in range(8)]
    executor.shutdown(wait=True)
    assert [f.result(timeout=0) for f in futures] == list(range(8))


def test_shutdown_without_wait_finishes_the_work(make: MakeExecutor, tasks: Any) -> None:
    executor = make()
    futures = [executor.submit(tasks.sleep, 0.1, i) for i in range(4)]
    executor.shutdown(wait=False)
    assert [f.result(timeout=30) for f in futures] == list(range(4))


def test_context_manager_shuts_down(make: MakeExecutor, tasks: Any) -> None:
    with make() as executor:
        future = executor.submit(tasks.sleep, 0.1, "done")
    assert future.done() and future.result() == "done"
    with pytest.raises(RuntimeError):
        executor.submit(tasks.mul, 1, 1)


def test_cancel_futures(make: MakeExecutor, tasks: Any) -> None:
    executor = make()
    futures = [executor.submit(tasks.sleep, 0.1) for _ in range(50)]
    executor.shutdown(cancel_futures=True)
    # The exact number cancelled is not known, but with 2 workers most are.
    cancelled = [f for f in futures if f.cancelled()]
    assert len(cancelled) > 20
    others = [f for f in futures if not f.cancelled()]
    assert others and all(f.done() and f.exception() is None for f in others)


def test_cancel_futures_lets_the_running_calls_finish(make: MakeExecutor, tasks: Any) -> None:
    executor = make(max_workers=4)
    first = executor.submit(tasks.sleep, 0.5, "first")
    wait_until(first.running, timeout=30)
    futures = [first, *(executor.submit(tasks.sleep, 0.2, i) for i in range(10))]
    running = [f for f in futures if f.running()]  # once running, never cancelled
    executor.shutdown(cancel_futures=True)
    assert first.result(timeout=0) == "first"
    assert all(f.done() for f in futures)
    assert not any(f.cancelled() for f in running)
    assert sum(f.cancelled() for f in futures) >= 5


# -- cancel and running ----------------------------------------------------------------------------


def test_running_and_cancel_of_a_started_call(make: MakeExecutor, tasks: Any) -> None:
    executor = make()
    future = executor.submit(tasks.sleep, 1.0, "slept")
    wait_until(future.running, timeout=30)
    assert not future.done()
    assert not future.cancel()
    assert not future.cancelled()
    assert future.result(timeout=30) == "slept"
    assert not future.running()


def test_cancel_of_pending_calls(make: MakeExecutor, tasks: Any) -> None:
    executor = make()
    blockers = occupied(executor, tasks.sleep, 1.0)
    later = [executor.submit(tasks.sleep, 1.0, i) for i in range(6)]
    answers = [f.cancel() for f in later]
    assert sum(answers) >= 5  # ProcessPoolExecutor has handed one more to its call queue
    for future, answer in zip(later, answers, strict=True):
        if answer:
            assert future.cancelled() and future.done() and not future.running()
            with pytest.raises(concurrent.futures.CancelledError):
                future.result()
        else:
            assert future.result(timeout=30) is not None
    assert [f.result(timeout=30) for f in blockers] == [0, 1]


def test_a_call_cancelled_while_pending_is_done_for_wait_and_as_completed(
    make: MakeExecutor, tasks: Any
) -> None:
    executor = make()
    # Sleeps, not held calls: ProcessPoolExecutor notifies a cancelled call only when its queue
    # moves up to it, as the calls ahead of it end.
    occupied(executor, tasks.sleep, 1.0)
    later = [executor.submit(tasks.sleep, 1.0) for _ in range(6)]
    cancelled = later[-1]
    assert cancelled.cancel()
    # Done at once for wait(): it would report it pending, after its timeout, if nobody
    # called set_running_or_notify_cancel() (the time limit is only there so as not to hang).
    done, pending = concurrent.futures.wait([cancelled], timeout=20)
    assert done == {cancelled} and not pending
    assert list(concurrent.futures.as_completed([cancelled], timeout=20)) == [cancelled]
    for future in later[:-1]:
        future.cancel()


# -- callbacks ------------------------------------------------------------------------------------


def test_done_callbacks(make: MakeExecutor, tasks: Any) -> None:
    executor = make()
    seen: list[Any] = []
    called = threading.Event()

    def callback(future: Future[Any]) -> None:
        seen.append(future.result())
        called.set()

    future = executor.submit(tasks.mul, 2, 21)
    future.add_done_callback(callback)
    assert called.wait(30) and seen == [42]
    future.add_done_callback(lambda f: seen.append(f.result() + 1))  # already done: at once
    assert seen == [42, 43]


def test_done_callback_of_a_cancelled_call(make: MakeExecutor, tasks: Any, gate: str) -> None:
    executor = make()
    occupied(executor, tasks.hold, gate)
    later = [executor.submit(tasks.hold, gate) for _ in range(4)]
    calls: list[bool] = []
    later[-1].add_done_callback(lambda f: calls.append(f.cancelled()))
    assert later[-1].cancel()
    wait_until(lambda: calls, timeout=30)
    assert calls == [True]


def test_done_callback_raising_is_logged_and_others_run(make: MakeExecutor, tasks: Any) -> None:
    executor = make()
    seen: list[int] = []
    future = executor.submit(tasks.sleep, 0.2, 5)

    def broken(f: Future[Any]) -> None:
        raise RuntimeError("a broken callback")

    future.add_done_callback(broken)
    future.add_done_callback(lambda f: seen.append(f.result()))
    assert future.result(timeout=30) == 5
    wait_until(lambda: seen == [5], timeout=30)


# -- timeouts --------------------------------------------------------------------------------------


def test_result_and_exception_time_out(make: MakeExecutor, tasks: Any) -> None:
    executor = make()
    future = executor.submit(tasks.sleep, 1.0, "late")
    with pytest.raises(TimeoutError):
        future.result(timeout=0.1)
    with pytest.raises(TimeoutError):
        future.exception(timeout=0.1)
    assert future.result(timeout=30) == "late"


# -- wait ------------------------------------------------------------------------------------------


def test_first_completed(make: MakeExecutor, tasks: Any, gate: str) -> None:
    executor = make()
    future1 = executor.submit(tasks.mul, 21, 2)
    future2 = executor.submit(tasks.hold, gate)
    not_notified: Future[Any] = Future()
    not_notified.cancel()  # CANCELLED, not notified: not done for wait()
    done, not_done = concurrent.futures.wait([not_notified, future1, future2], return_when=FIRST_COMPLETED)
    assert done == {future1}
    assert not_done == {not_notified, future2}


def test_first_completed_some_already_completed(make: MakeExecutor, tasks: Any, gate: str) -> None:
    executor = make()
    future1 = executor.submit(tasks.hold, gate)
    ready = [cancelled_and_notified(), finished(42)]
    done, not_done = concurrent.futures.wait([*ready, future1], return_when=FIRST_COMPLETED)
    assert done == set(ready) and not_done == {future1}


def test_first_exception(make: MakeExecutor, tasks: Any, gate: str) -> None:
    executor = make()
    future1 = executor.submit(tasks.mul, 2, 21)
    future2 = executor.submit(tasks.sleep_and_raise, 0.5)
    future3 = executor.submit(tasks.hold, gate)
    done, not_done = concurrent.futures.wait([future1, future2, future3], return_when=FIRST_EXCEPTION)
    assert done == {future1, future2}
    assert not_done == {future3}
    assert str(future2.exception()) == "this is an exception"


def test_first_exception_one_already_failed(make: MakeExecutor, tasks: Any, gate: str) -> None:
    executor = make()
    future1 = executor.submit(tasks.hold, gate)
    failed = finished(exception=OSError())
    done, not_done = concurrent.futures.wait([failed, future1], return_when=FIRST_EXCEPTION)
    assert done == {failed} and not_done == {future1}


def test_all_completed(make: MakeExecutor, tasks: Any) -> None:
    executor = make()
    future1 = executor.submit(tasks.div, 2, 0)
    future2 = executor.submit(tasks.mul, 2, 21)
    ready = [finished(42), finished(exception=OSError()), cancelled_and_notified()]
    done, not_done = concurrent.futures.wait([*ready, future1, future2], return_when=ALL_COMPLETED)
    assert done == {*ready, future1, future2} and not not_done
    assert isinstance(future1.exception(), ZeroDivisionError) and future2.result() == 42


def test_wait_timeout(make: MakeExecutor, tasks: Any, gate: str) -> None:
    executor = make()
    future1 = executor.submit(tasks.mul, 6, 7)
    future2 = executor.submit(tasks.hold, gate)
    future1.result(timeout=30)
    done, not_done = concurrent.futures.wait([future1, future2], timeout=0.3, return_when=ALL_COMPLETED)
    assert done == {future1} and not_done == {future2}


# -- as_completed ----------------------------------------------------------------------------------


def test_as_completed(make: MakeExecutor, tasks: Any) -> None:
    executor = make()
    future1 = executor.submit(tasks.mul, 2, 21)
    future2 = executor.submit(tasks.mul, 7, 6)
    ready = [cancelled_and_notified(), finished(exception=OSError()), finished(42)]
    completed = set(concurrent.futures.as_completed([*ready, future1, future2], timeout=30))
    assert completed == {*ready, future1, future2}


def test_as_completed_zero_timeout(make: MakeExecutor, tasks: Any, gate: str) -> None:
    executor = make()
    future1 = executor.submit(tasks.hold, gate)
    ready = [finished(42), cancelled_and_notified()]
    completed = set()
    with pytest.raises(TimeoutError):
        for future in concurrent.futures.as_completed([*ready, future1], timeout=0):
            completed.add(future)
    assert completed == set(ready)


def test_as_completed_order_and_duplicates(make: MakeExecutor, tasks: Any) -> None:
    executor = make()
    slow = executor.submit(tasks.sleep, 1.0, "slow")
    fast = executor.submit(tasks.sleep, 0.05, "fast")
    order = [f.result() for f in concurrent.futures.as_completed([slow, fast, fast], timeout=30)]
    assert order == ["fast", "slow"]


# -- exceptions ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("task", "args", "kind"),
    [
        ("fail", ("boom",), ValueError),
        ("fail", ("several", 2, None), ValueError),
        ("fail", (), ValueError),
        ("missing", ("key",), KeyError),
        ("div", (1, 0), ZeroDivisionError),
    ],
)
def test_exceptions_keep_their_type_str_and_args(
    make: MakeExecutor, tasks: Any, task: str, args: tuple[Any, ...], kind: type[Exception]
) -> None:
    executor = make()
    future = executor.submit(getattr(tasks, task), *args)
    exc = future.exception(timeout=30)
    assert isinstance(exc, kind)
    try:
        getattr(tasks, task)(*args)
    except Exception as original:
        assert str(exc) == str(original)
        assert exc.args == original.args
    assert kind.__name__ in repr(exc)
    with pytest.raises(kind) as raised:
        future.result()
    assert raised.value is exc
    assert f"{task}" in str(exc.__cause__)  # the task's traceback, where it failed


# -- workerd's own -----------------------------------------------------------------------------------


def test_task_error_names_its_type_and_traceback(served: tuple[Daemon, ModuleType], tasks: Any) -> None:
    with Executor(served[0].socket) as executor:
        exc = executor.submit(tasks.fail, "boom").exception(timeout=30)
    assert isinstance(exc, errors.TaskError) and isinstance(exc, ValueError)
    assert (str(exc), exc.args, exc.type, exc.code) == ("boom", ("boom",), "ValueError", "TASK_ERROR")
    assert "raise ValueError(*args)" in exc.traceback
    assert repr(exc).startswith("TaskError[ValueError]('boom', type='ValueError', traceback='Traceback")
    assert exc.message == "ValueError: boom"  # the protocol's line, as the CLI prints it


def test_running_comes_from_the_daemon_and_cancel_reaches_its_queue(
    served: tuple[Daemon, ModuleType], tasks: Any
) -> None:
    daemon = served[0]
    with Executor(daemon.socket, max_workers=8) as executor:  # all 6 at the daemon at once
        blockers = [executor.submit(tasks.sleep, 1.0, i) for i in range(2)]
        wait_until(lambda: all(f.running() for f in blockers), timeout=30)  # the start notices
        later = [executor.submit(tasks.sleep, 1.0) for _ in range(4)]
        with daemon.client() as client:  # sent: queued or prefetched there, not waiting here
            wait_until(lambda: client.status()["queue"]["depth"] == 4, timeout=30)
        assert not any(f.running() for f in later)
        assert all(f.cancel() for f in later)
        done, pending = concurrent.futures.wait(later, timeout=20)
        assert done == set(later) and not pending
        assert not any(f.cancel() for f in blockers)
        assert [f.result(timeout=30) for f in blockers] == [0, 1]
