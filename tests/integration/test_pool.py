"""The prefork CPU pool on a real daemon: parallelism, crashes, hangs, recycling, reload, stop."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Daemon, wait_until
from workerctl import Client, errors

TASKS = "workerd.examples.tasks"


def config(workers: int = 2, modules: tuple[str, ...] = (TASKS,), **pool: Any) -> str:
    lines = [
        f"{key} = {value!r}".replace("'", '"').replace("True", "true").replace("False", "false")
        for key, value in pool.items()
    ]
    module_list = ", ".join(f'"{m}"' for m in modules)
    return "\n".join(
        [
            "[daemon]",
            "stop_timeout_s = 10",
            "[pool]",
            f"workers = {workers}",
            *lines,
            "[tasks]",
            f"modules = [{module_list}]",
            "[gpu]",
            'enabled = "false"',
            "",
        ]
    )


def in_threads(count: int, call: Callable[[int], Any]) -> list[Any]:
    with ThreadPoolExecutor(count) as executor:
        return list(executor.map(call, range(count)))


def worker_pids(client: Client) -> list[int]:
    return [w["pid"] for w in client.status()["pool"]["workers"] if w["state"] in ("idle", "busy")]


def busy_pid(client: Client) -> int:
    busy = [w["pid"] for w in client.status()["pool"]["workers"] if w["state"] == "busy"]
    return busy[0] if busy else 0


def pool_full(daemon: Daemon, size: int) -> Callable[[], list[int] | None]:
    def check() -> list[int] | None:
        with daemon.client() as client:
            pool = client.status()["pool"]
        idle = [w["pid"] for w in pool["workers"] if w["state"] == "idle"]
        return idle if len(idle) == size and len(pool["workers"]) == size else None

    return check


def test_two_sleeps_run_in_parallel(daemon: Daemon) -> None:
    def sleep(_: int) -> dict[str, Any]:
        with daemon.client() as client:
            return client.execute(f"{TASKS}:sleep", seconds=1.0)  # type: ignore[no-any-return]

    started = time.monotonic()
    first, second = in_threads(2, sleep)
    elapsed = time.monotonic() - started
    assert first["pid"] != second["pid"]
    # Overlapping intervals: each started before the other ended.
    assert first["start"] < second["end"] and second["start"] < first["end"]
    assert elapsed < 1.9


def test_results_errors_and_streams(daemon: Daemon) -> None:
    with daemon.client() as client:
        assert client.execute(f"{TASKS}:echo", {"a": [1, 2]}) == {"a": [1, 2]}
        assert client.execute(f"{TASKS}:echo", 1, b=2) == {"args": [1], "kwargs": {"b": 2}}
        assert list(client.stream(f"{TASKS}:count", kwargs={"n": 4})) == [1, 2, 3, 4]
        with pytest.raises(errors.TaskError) as info:
            client.execute(f"{TASKS}:fail", message="boom")
        assert info.value.details["type"] == "ValueError"
        assert info.value.details["message"] == "boom"
        assert "in fail" in info.value.details["traceback"]
        assert client.execute(f"{TASKS}:payload", 3) == b"xxx"  # bytes stay bytes
        with pytest.raises(TypeError, match="takes 0 positional arguments"):  # TaskError[TypeError]
            client.execute(f"{TASKS}:pid", 1)  # wrong arguments are the task's error


@pytest.mark.parametrize(
    ("name", "error", "fragment"),
    [
        ("os:system", errors.Denied, "not listed in [tasks] modules"),
        (f"{TASKS}.sub:echo", errors.Denied, "not listed"),
        (f"{TASKS}:absent", errors.UnknownTask, "has no attribute 'absent'"),
        (f"{TASKS}:_LEAKED", errors.Denied, "is private"),
        (f"{TASKS}:os", errors.Denied, "is a module, not a function"),
        (f"{TASKS}:", errors.UnknownTask, "must be 'package.module:function'"),
        (f"{TASKS}:a.b", errors.UnknownTask, "must be 'package.module:function'"),
        ("no_such_pipeline", errors.UnknownTask, "no pipeline named"),
    ],
)
def test_bad_task_names(daemon: Daemon, name: str, error: type[errors.WorkerdError], fragment: str) -> None:
    with daemon.client() as client, pytest.raises(error) as info:
        client.execute(name)
    assert fragment in info.value.message


def test_sigkill_of_a_busy_worker_gives_worker_lost_and_refills(daemon: Daemon) -> None:
    with daemon.client() as client:
        before = set(worker_pids(client))
        request = client.send("execute", name=f"{TASKS}:sleep", kwargs={"seconds": 30})
        victim = wait_until(lambda: busy_pid(client))
        os.kill(victim, signal.SIGKILL)
        killed_at = time.monotonic()
        with pytest.raises(errors.WorkerLost) as info:
            client.wait_result(request, 10)
        # A loose bound so the test never flakes; bench/ measures the real latency.
        assert time.monotonic() - killed_at < 2.0
    assert info.value.details["pid"] == victim
    after = wait_until(pool_full(daemon, 2))
    assert victim not in after and len(set(after) - before) == 1


def test_client_reply_loop_raises_worker_lost(daemon: Daemon) -> None:
    with daemon.client() as client:
        request = client.send("execute", name=f"{TASKS}:crash")
        with pytest.raises(errors.WorkerLost, match="killed by signal 6"):
            client.wait_result(request, 10)


def test_retries_rerun_on_another_worker(daemon: Daemon) -> None:
    with daemon.client() as client:
        request = client.send("execute", name=f"{TASKS}:sleep", kwargs={"seconds": 1}, retries=1)
        victim = wait_until(lambda: busy_pid(client))
        os.kill(victim, signal.SIGKILL)
        replies = list(client.replies(request, 20))
    assert replies[-1]["ok"] is True
    assert replies[-1]["result"]["pid"] != victim


def test_timeout_kills_the_worker_and_returns_its_stack(daemon: Daemon) -> None:
    with daemon.client() as client:
        before = worker_pids(client)
        with pytest.raises(errors.TaskTimeout) as info:
            client.call(f"{TASKS}:sleep", kwargs={"seconds": 30}, timeout_s=0.5)
    details = info.value.details
    assert details["timeout_s"] == 0.5
    assert details["pid"] in before
    assert "in sleep" in details["traceback"]  # faulthandler's dump names the function
    after = wait_until(pool_full(daemon, 2))
    assert details["pid"] not in after


def test_recycle_by_task_count(start_daemon: Callable[..., Daemon]) -> None:
    daemon = start_daemon(config=config(workers=1, max_tasks_per_worker=2))
    with daemon.client() as client:
        pids = [client.execute(f"{TASKS}:pid") for _ in range(10)]
    # Limit 2 plus jitter of at most 1: no worker serves more than 3 tasks, none fails.
    assert len(set(pids)) >= 3
    assert max(pids.count(p) for p in set(pids)) <= 3


def test_recycle_by_private_memory(start_daemon: Callable[..., Daemon]) -> None:
    daemon = start_daemon(config=config(workers=1, max_worker_memory_mb=60))
    with daemon.client() as client:
        first = client.execute(f"{TASKS}:leak", mb=40)  # under the limit: kept
        second = client.execute(f"{TASKS}:leak", mb=40)  # 80 MiB private: recycled after replying
        assert first["pid"] == second["pid"] and second["leaked_mb"] == 80
        third = client.execute(f"{TASKS}:leak", mb=1)
        assert third["pid"] != first["pid"] and third["leaked_mb"] == 1
        assert client.status()["counters"]["recycled_max_memory"] == 1


def test_queue_bound_gives_busy_at_once(start_daemon: Callable[..., Daemon]) -> None:
    daemon = start_daemon(
        config=config(workers=1).replace("stop_timeout_s = 10", "stop_timeout_s = 10\nmax_queue = 2")
    )
    with daemon.client() as client:
        ids = [client.send("execute", name=f"{TASKS}:sleep", kwargs={"seconds": 0.5}) for _ in range(3)]
        wait_until(lambda: client.status()["queue"]["depth"] == 2)
        started = time.monotonic()
        with pytest.raises(errors.Busy):
            client.execute(f"{TASKS}:echo", 1)
        assert time.monotonic() - started < 1.0  # not queued behind the sleeps
        results = [list(client.replies(i, 10))[-1] for i in ids]
    assert all(r["ok"] for r in results)


def test_slow_task_does_not_block_the_others(daemon: Daemon) -> None:
    with daemon.client() as client:
        slow = client.send("execute", name=f"{TASKS}:sleep", kwargs={"seconds": 3})
        wait_until(lambda: busy_pid(client))
        started = time.monotonic()
        for i in range(20):
            assert client.execute(f"{TASKS}:echo", i) == i
        assert time.monotonic() - started < 2.5
        assert list(client.replies(slow, 10))[-1]["ok"]


def test_scale_up_and_down(daemon: Daemon) -> None:
    with daemon.client() as client:
        assert client.scale(3) == {"workers": 3}
    wait_until(pool_full(daemon, 3))
    os.kill(daemon.proc.pid, signal.SIGTTOU)
    wait_until(pool_full(daemon, 2))
    os.kill(daemon.proc.pid, signal.SIGTTIN)
    wait_until(pool_full(daemon, 3))


GARBAGE = """
import gc
import os

def cycle(n):
    # Off from here on in this worker, so that only clear_memory's gc.collect() finds the cycle.
    gc.disable()
    nodes = [[] for _ in range(n)]
    for node, after in zip(nodes, nodes[1:] + nodes[:1]):
        node.append(after)
    return os.getpid()
"""
CYCLE = 10_000


def test_memory_status_and_clear_gc(start_daemon: Callable[..., Daemon], tmp_path: Path) -> None:
    code = tmp_path / "code"
    code.mkdir()
    (code / "garbage.py").write_text(GARBAGE)
    path = os.pathsep.join(filter(None, [str(code), os.environ.get("PYTHONPATH")]))
    daemon = start_daemon(config=config(modules=(TASKS, "garbage")), env={"PYTHONPATH": path})
    with daemon.client() as client:
        littered = client.execute("garbage:cycle", CYCLE)
        memory = client.memory_status()
        assert memory["daemon"]["pid"] == daemon.proc.pid and memory["daemon"]["rss_bytes"] > 0
        assert len(memory["workers"]) == 2
        for worker in memory["workers"]:
            assert worker["kind"] == "cpu" and worker["state"] == "idle"
            assert 0 < worker["uss_bytes"] < worker["rss_bytes"]
            assert worker["pss_bytes"] > 0 and worker["shared_bytes"] > 0
        cleared = client.clear_memory("gc")
    assert cleared["level"] == "gc"
    assert sorted(w["pid"] for w in cleared["workers"]) == sorted(w["pid"] for w in memory["workers"])
    assert all(w["uss_after"] > 0 for w in cleared["workers"])
    freed = {w["pid"]: w["freed_objects"] for w in cleared["workers"]}
    assert freed[littered] >= CYCLE  # the cycle the task left, in the worker that ran it
    assert all(n < CYCLE for pid, n in freed.items() if pid != littered), freed


def write_module(directory: Path, version: int) -> None:
    (directory / "reloadable.py").write_text(
        textwrap.dedent(f"""
        import time

        def version():
            return {version}

        def slow(seconds):
            time.sleep(seconds)
            return {version}
    """)
    )


def test_reload_picks_up_edited_code_without_failing_requests(
    start_daemon: Callable[..., Daemon], tmp_path: Path
) -> None:
    code = tmp_path / "code"
    code.mkdir()
    write_module(code, 1)
    daemon = start_daemon(config=config(workers=2, modules=("reloadable",)), env={"PYTHONPATH": str(code)})
    with daemon.client() as client:
        assert client.execute("reloadable:version") == 1
        in_flight = [client.send("execute", name="reloadable:slow", args=[0.5]) for _ in range(6)]
        write_module(code, 2)
        reload_id = client.send("reload")
        replies = {i: list(client.replies(i, 30))[-1] for i in [*in_flight, reload_id]}
        assert all(r["ok"] for r in replies.values()), replies
        assert replies[reload_id]["result"]["generation"] == 2
        assert client.execute("reloadable:version") == 2
        wait_until(lambda: all(w["generation"] == 2 for w in client.status()["pool"]["workers"]))


def test_reload_with_broken_code_keeps_the_old_code(
    start_daemon: Callable[..., Daemon], tmp_path: Path
) -> None:
    code = tmp_path / "code"
    code.mkdir()
    write_module(code, 1)
    daemon = start_daemon(config=config(workers=1, modules=("reloadable",)), env={"PYTHONPATH": str(code)})
    (code / "reloadable.py").write_text("raise RuntimeError('broken on purpose')\n")
    (code / "added.py").write_text("def hello():\n    return 'hi'\n")
    assert daemon.config_path.read_text() == config(workers=1, modules=("reloadable",))  # what it reloads
    daemon.config_path.write_text(config(workers=1, modules=("reloadable", "added")))
    with daemon.client() as client:
        with pytest.raises(errors.InternalError, match="broken on purpose"):
            client.reload()
        assert client.execute("reloadable:version") == 1
        with pytest.raises(errors.Denied):  # the failed reload's config did not take effect
            client.execute("added:hello")
        write_module(code, 2)
        assert client.reload()["generation"] == 3
        assert client.execute("added:hello") == "hi"  # a module added by the reload
        assert client.execute("reloadable:version") == 2


def test_preload_failure_is_reported_and_not_a_fork_loop(start_daemon: Callable[..., Daemon]) -> None:
    text = config(workers=2).replace("[tasks]", 'preload = ["no_such_module_anywhere"]\n[tasks]')
    daemon = start_daemon(config=text)
    with daemon.client() as client:
        status = client.status()
        assert "No module named 'no_such_module_anywhere'" in status["pool"]["error"]
        with pytest.raises(errors.InternalError, match="CPU pool unavailable"):
            client.execute(f"{TASKS}:echo", 1)
        time.sleep(0.5)
        status = client.status()
        assert status["pool"]["workers"] == [] and client.ping()["pid"] == daemon.proc.pid
    assert daemon.output().count("failed to import") == 1


def test_zygote_dying_during_import_is_not_a_hang(
    start_daemon: Callable[..., Daemon], tmp_path: Path
) -> None:
    (tmp_path / "suicidal.py").write_text("import os\nos._exit(3)\n")
    text = config(workers=1).replace("[tasks]", 'preload = ["suicidal"]\n[tasks]')
    daemon = start_daemon(config=text, env={"PYTHONPATH": str(tmp_path)})
    with daemon.client() as client:
        assert "died while importing task code (exited with status 3)" in client.status()["pool"]["error"]
        assert "died while importing task code" in client.ping()["degraded"]
        with pytest.raises(errors.InternalError, match="CPU pool unavailable") as info:
            client.execute(f"{TASKS}:echo", 1)
        # The error says what to fix and how to apply it.
        assert "[pool] preload" in info.value.message and "workerctl reload" in info.value.message
    ping = subprocess.run(
        [os.path.join(os.path.dirname(sys.executable), "workerctl"), "--socket", daemon.socket, "ping"],
        capture_output=True,
        text=True,
    )
    assert ping.returncode == 0 and "degraded: CPU pool unavailable" in ping.stdout


def test_a_stream_that_sent_items_is_not_retried(daemon: Daemon) -> None:
    with daemon.client() as client:
        request = client.send("execute", name=f"{TASKS}:count", kwargs={"n": 3, "delay": 1}, retries=1)
        replies = client.replies(request, 10)
        assert next(replies)["item"] == 1
        os.kill(busy_pid(client), signal.SIGKILL)
        rest = list(replies)
    assert [r["error"]["code"] for r in rest] == ["WORKER_LOST"]


def test_scale_bounds(daemon: Daemon) -> None:
    with daemon.client() as client:
        for bad in (0, -1, 5000, "2"):
            with pytest.raises(errors.BadRequest):
                client.scale(bad)  # type: ignore[arg-type]


def test_sigterm_lets_tasks_in_flight_finish(daemon: Daemon) -> None:
    with daemon.client() as client:
        running = [client.send("execute", name=f"{TASKS}:sleep", kwargs={"seconds": 1}) for _ in range(2)]
        wait_until(lambda: client.status()["pool"]["busy"] == 2)
        queued = [client.send("execute", name=f"{TASKS}:echo", args=[i]) for i in range(3)]
        wait_until(lambda: client.status()["queue"]["depth"] == 3)
        daemon.proc.send_signal(signal.SIGTERM)
        finished = [list(client.replies(i, 20))[-1] for i in running]
        refused = [list(client.replies(i, 20))[-1] for i in queued]
    assert all(r["ok"] for r in finished)
    assert [r["error"]["code"] for r in refused] == ["SHUTTING_DOWN"] * 3
    assert daemon.proc.wait(15) == 0
    assert not os.path.exists(daemon.socket)


def test_jobs_sent_ahead_to_a_worker_stuck_in_a_long_job_go_to_an_idle_one(
    start_daemon: Callable[..., Daemon],
) -> None:
    """With prefetch, quick jobs may be sent ahead to a worker that then runs a long job: once it
    has run STEAL_AFTER_S, they are taken back for a free worker instead of waiting behind it."""
    daemon = start_daemon(config=config(workers=2, prefetch=4))
    with daemon.client() as client:
        slow = client.send("execute", name=f"{TASKS}:sleep", kwargs={"seconds": 3})
        started = time.monotonic()
        quick = [client.send("execute", name=f"{TASKS}:echo", args=[i]) for i in range(8)]
        assert [client.wait_result(q, 10) for q in quick] == list(range(8))
        assert time.monotonic() - started < 1.5  # not behind the 3 s sleep
        assert "end" in client.wait_result(slow, 10)


def test_chunk_replies_compact_or_one_map_per_call(daemon: Daemon) -> None:
    calls = [[[3], {}], [["many"], {}], [[None], {}]]
    with daemon.client() as client:
        full = client.wait_result(client.send("execute", name=f"{TASKS}:hash_work", calls=calls), 10)
        compact = client.wait_result(
            client.send("execute", name=f"{TASKS}:hash_work", calls=calls, compact=True), 10
        )
    assert [entry["ok"] for entry in full["results"]] == [True, False, False]
    assert compact["values"][0] == full["results"][0]["result"]
    assert compact["values"][1:] == [None, None]
    assert [index for index, _ in compact["errors"]] == [1, 2]
    assert compact["errors"][0][1]["code"] == "TASK_ERROR"
