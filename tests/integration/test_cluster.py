"""The Ray bridge on a real private Ray head (`[cluster] address = "local"`), loopback only.

One daemon serves the module (a Ray head costs seconds to start on 2 cores): mode "all", so
every CPU execute goes to Ray, and pipelines = true, so pipelines run in a Ray actor. The
overflow test starts a daemon of its own. The last test stops the shared daemon.
"""

from __future__ import annotations

import ipaddress
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy
import psutil
import pytest

from tests.conftest import Daemon, wait_until
from tests.reliability.harness import Counter, request
from workerctl import errors

REPO = Path(__file__).resolve().parents[2]
# This checkout's code, in the daemon and in the Ray workers it starts, whichever checkout the
# environment's own install points at.
PYTHONPATH = os.pathsep.join([str(REPO / "daemon"), str(REPO / "client"), str(REPO)])
TASKS = '["workerd.examples.tasks", "tests.cluster_tasks"]'
PIPELINE = """
VERSION = {version}

def load(device):
    return {{"version": VERSION}}

def run(obj, x=0):
    return {{"version": obj["version"], "x": x}}
"""


def cluster_config(
    pipeline: Path | None = None,
    mode: str = "all",
    extra: str = "",
    address: str = "local",
    modules: str = TASKS,
    ship: bool = False,
) -> str:
    text = textwrap.dedent(f"""\
        [daemon]
        stop_timeout_s = 20
        [pool]
        workers = 1
        task_timeout_s = 60
        {extra}
        [tasks]
        modules = {modules}
        [gpu]
        enabled = "false"
        [cluster]
        engine = "ray"
        address = "{address}"
        mode = "{mode}"
        pipelines = {"true" if pipeline else "false"}
        ship_modules = {"true" if ship else "false"}
        """)
    if pipeline is not None:
        text += f'[pipelines.echo]\npath = "{pipeline}"\n'
    return text


def environment() -> dict[str, str]:
    # The Ray workers a private head starts inherit this: they import tests.cluster_tasks.
    return {"PYTHONPATH": PYTHONPATH, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}


def ray_processes(bridge_pid: int) -> list[psutil.Process]:
    """The private head's processes: the bridge's descendants (they share its fate)."""
    try:
        return psutil.Process(bridge_pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


@pytest.fixture(scope="module")
def pipeline_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("pipelines") / "echo_pipeline.py"
    path.write_text(PIPELINE.format(version=1))
    return path


@pytest.fixture(scope="module")
def cluster_daemon(tmp_path_factory: pytest.TempPathFactory, pipeline_file: Path) -> Iterator[Daemon]:
    daemon = Daemon(
        tmp_path_factory.mktemp("cluster"), cluster_config(pipeline_file), [], environment(), None
    )
    try:
        daemon.wait_ready(timeout=90)
        yield daemon
    finally:
        daemon.stop(signal.SIGKILL if daemon.proc.poll() is None else signal.SIGTERM, timeout=5)


def alive(process: psutil.Process) -> bool:
    try:
        return process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def cluster_status(daemon: Daemon) -> dict[str, Any]:
    with daemon.client() as client:
        return client.status()["cluster"]  # type: ignore[no-any-return]


def cluster_requests(daemon: Daemon) -> dict[str, int]:
    with daemon.client() as client:
        requests = client.status()["metrics"]["requests"]
    return {
        r["outcome"]: r["count"] for r in requests if r["command"] == "execute" and r["pool"] == "cluster"
    }


def test_every_ray_process_is_on_loopback_and_the_master_never_imports_ray(cluster_daemon: Daemon) -> None:
    status = cluster_status(cluster_daemon)
    assert status["state"] == "ready" and status["address"].startswith("127.0.0.1:")
    assert [node["address"] for node in status["nodes"]] == ["127.0.0.1"]
    processes = ray_processes(status["pid"])
    names = {p.name() for p in processes}
    assert {"gcs_server", "raylet"} <= names
    connections = [
        conn
        for process in [*processes, psutil.Process(status["pid"])]
        for conn in process.net_connections(kind="inet")
    ]
    listening = [conn.laddr for conn in connections if conn.status == psutil.CONN_LISTEN]
    reaching = [conn.raddr for conn in connections if conn.raddr]
    assert listening and reaching, "the private head listens, and its processes talk"
    for address in listening + reaching:
        ip = ipaddress.ip_address(address.ip)
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
            ip = ip.ipv4_mapped  # [::ffff:127.0.0.1], as Ray's gRPC servers show it
        assert ip.is_loopback, f"a Ray process binds or reaches {address.ip}:{address.port}"
    with open(f"/proc/{cluster_daemon.proc.pid}/maps") as maps:
        assert "_raylet" not in maps.read()


def test_the_same_client_code_runs_on_the_cluster(cluster_daemon: Daemon) -> None:
    before = cluster_requests(cluster_daemon).get("ok", 0)
    with cluster_daemon.client() as client:
        assert client.execute("workerd.examples.tasks:echo", "hello") == "hello"
        assert client.execute("workerd.examples.tasks:word_lengths", text="a bb cc") == {1: 1, 2: 2}
        ran = client.execute("tests.cluster_tasks:where")
        local = {w["pid"] for w in client.status()["pool"]["workers"]}
        with pytest.raises(errors.TaskError, match="fails on purpose"):
            client.execute("workerd.examples.tasks:fail")
    assert ran["pid"] not in local
    assert psutil.Process(ran["parent"]).name() == "raylet"
    assert cluster_requests(cluster_daemon)["ok"] == before + 3


def test_pipeline_hosts_leave_every_cpu_to_the_tasks(cluster_daemon: Daemon) -> None:
    """A pipeline host holds no CPU (an actor naming any resource, num_gpus=0 included, would
    hold Ray's default of one for its life): as many tasks as the head has CPUs run at once."""
    status = cluster_status(cluster_daemon)
    assert status["hosts"] >= 1
    with cluster_daemon.client() as client:
        sent = [
            client.send("execute", name="tests.cluster_tasks:span", args=[3.0])
            for _ in range(int(status["cpus"]))
        ]
        spans = [client.wait_result(r, timeout=60) for r in sent]
    assert max(s["start"] for s in spans) < min(s["end"] for s in spans), "every task ran at once"


def test_a_generator_streams_its_items(cluster_daemon: Daemon) -> None:
    with cluster_daemon.client() as client:
        # The first run finds out it is a generator (its items come with its result) ...
        assert list(client.stream("workerd.examples.tasks:count", kwargs={"n": 3})) == [1, 2, 3]
        # ... the next ones stream as the items are yielded.
        started = time.monotonic()
        arrivals = []
        for item in client.stream("workerd.examples.tasks:count", kwargs={"n": 3, "delay": 0.4}):
            arrivals.append((item, time.monotonic() - started))
    assert [item for item, _ in arrivals] == [1, 2, 3]
    assert arrivals[0][1] < arrivals[-1][1] - 0.5


def test_a_chunk_is_one_ray_task(cluster_daemon: Daemon) -> None:
    with cluster_daemon.client() as client:
        outcomes = list(client.execute_many("tests.cluster_tasks:where", [([], {})] * 6, chunksize=3))
    assert len(outcomes) == 6 and all(o.error is None for o in outcomes)
    by_index = {o.index: o.result["pid"] for o in outcomes}
    assert by_index[0] == by_index[1] == by_index[2]
    assert by_index[3] == by_index[4] == by_index[5]


def test_raw_frames_cross_the_cluster(cluster_daemon: Daemon) -> None:
    array = numpy.arange(200_000, dtype=numpy.float64)
    with cluster_daemon.client() as client:
        back = client.execute("workerd.examples.tasks:echo", array)
        payload = client.execute("workerd.examples.tasks:payload", size=2_000_000)
    assert isinstance(back, numpy.ndarray) and numpy.array_equal(back, array)
    assert payload == b"x" * 2_000_000


def test_the_allow_list_is_checked_again_on_the_node(cluster_daemon: Daemon) -> None:
    with cluster_daemon.client() as client:
        with pytest.raises(errors.WorkerdError) as private:
            client.execute("tests.cluster_tasks:_private")
        with pytest.raises(errors.WorkerdError) as imported:
            client.execute("tests.cluster_tasks:imported_echo", "x")
        with pytest.raises(errors.WorkerdError) as unlisted:
            client.execute("os:getcwd")
    assert private.value.code == imported.value.code == unlisted.value.code == "DENIED"
    assert "not defined in 'tests.cluster_tasks'" in str(imported.value)  # refused on the node


def test_a_timeout_cancels_the_ray_task_and_keeps_the_bridge(cluster_daemon: Daemon) -> None:
    bridge = cluster_status(cluster_daemon)["pid"]
    with cluster_daemon.client() as client:
        started = time.monotonic()
        with pytest.raises(errors.WorkerdError) as timed_out:
            client.call("workerd.examples.tasks:sleep", kwargs={"seconds": 20}, timeout_s=1)
        elapsed = time.monotonic() - started
        assert client.execute("workerd.examples.tasks:echo", "after") == "after"
    assert timed_out.value.code == "TIMEOUT" and elapsed < 5
    assert cluster_status(cluster_daemon)["pid"] == bridge


def test_cancel_reaches_a_running_cluster_job(cluster_daemon: Daemon) -> None:
    with cluster_daemon.client() as client:
        request = client.send("execute", name="workerd.examples.tasks:sleep", kwargs={"seconds": 20})
        time.sleep(0.5)
        assert client.cancel([request]) == {"cancelled": [], "running": [request], "unknown": []}
        assert client.cancel([request], terminate=True)["cancelled"] == [request]
        with pytest.raises(errors.WorkerdError) as cancelled:
            client.wait_result(request, timeout=5)
        assert cancelled.value.code == "CANCELLED"
        assert client.execute("workerd.examples.tasks:echo", 1) == 1


def test_a_lost_ray_worker_is_retried_when_asked(cluster_daemon: Daemon, tmp_path: Path) -> None:
    with cluster_daemon.client() as client:
        again = client.call("tests.cluster_tasks:crash_once", [str(tmp_path / "a")], retries=1)
        with pytest.raises(errors.WorkerdError) as lost:
            client.call("tests.cluster_tasks:crash_once", [str(tmp_path / "b")])
    assert again == "second attempt"
    assert lost.value.code == "WORKER_LOST"


def test_an_edited_pipeline_reloads_on_its_actor(cluster_daemon: Daemon, pipeline_file: Path) -> None:
    with cluster_daemon.client() as client:
        first = client.execute("echo", x=1)
        warm = client.execute("echo", x=2)
        pipeline_file.write_text(PIPELINE.format(version=2))
        edited = client.execute("echo", x=3)
        hosts = client.memory_status()["cluster"]["hosts"]
    assert first["output"] == {"version": 1, "x": 1} and first["start"] == "cold"
    assert warm["start"] == "warm" and warm["sha256"] == first["sha256"]
    assert edited["output"] == {"version": 2, "x": 3} and edited["start"] == "cold"
    assert edited["sha256"] != first["sha256"]
    [host] = hosts
    assert [(p["name"], p["sha256"]) for p in host["pipelines"]] == [("echo", edited["sha256"])]


def test_memory_status_shows_the_nodes_and_their_ray_processes(cluster_daemon: Daemon) -> None:
    with cluster_daemon.client() as client:
        memory = client.memory_status()
    cluster = memory["cluster"]
    [node] = cluster["nodes"]
    assert node["address"] == "127.0.0.1" and node["alive"]
    workers = [p for p in node["processes"] if p["name"].startswith("ray::")]
    assert workers and all(p["rss_bytes"] > 0 for p in workers)
    assert any(w["kind"] == "bridge" for w in memory["workers"])


def workerctl(daemon: Daemon, *args: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "workerctl.cli", "--socket", daemon.socket, *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=60)


def test_workerctl_commands_work_unchanged(cluster_daemon: Daemon) -> None:
    run = workerctl(cluster_daemon, "run", "workerd.examples.tasks:echo", "text=hi")
    assert run.returncode == 0 and '"hi"' in run.stdout
    status = workerctl(cluster_daemon, "status")
    assert status.returncode == 0
    assert "cluster ray at 127.0.0.1:" in status.stdout and "1 node(s)" in status.stdout
    memory = workerctl(cluster_daemon, "memory")
    assert memory.returncode == 0 and "ray::" in memory.stdout and "pipeline host 0" in memory.stdout
    clear = workerctl(cluster_daemon, "clear", "--level", "full")
    assert clear.returncode == 0 and "pipeline host" in clear.stdout and "dropped: echo" in clear.stdout


def test_stop_drains_cluster_requests(cluster_daemon: Daemon) -> None:
    """Last: stops the module's daemon. A request in flight on the cluster gets its result."""
    bridge = cluster_status(cluster_daemon)["pid"]
    head = ray_processes(bridge)
    with cluster_daemon.client() as client:
        request = client.send("execute", name="workerd.examples.tasks:sleep", kwargs={"seconds": 1.5})
        time.sleep(0.3)
        cluster_daemon.proc.send_signal(signal.SIGTERM)
        assert client.wait_result(request, timeout=20)["end"] > 0
    assert cluster_daemon.proc.wait(30) == 0
    wait_until(lambda: not [p for p in head if alive(p)], 10)


def test_overflow_spills_only_past_spill_queue(start_daemon: Callable[..., Daemon]) -> None:
    daemon = start_daemon(
        config=cluster_config(mode="overflow", extra="prefetch = 0").replace(
            'mode = "overflow"', 'mode = "overflow"\nspill_queue = 2'
        ),
        env=environment(),
    )
    with daemon.client() as client:
        local = {w["pid"] for w in client.status()["pool"]["workers"]}

        def run(count: int) -> list[bool]:
            sent = [
                client.send("execute", name="tests.cluster_tasks:where", args=[0.5]) for _ in range(count)
            ]
            return [client.wait_result(r, timeout=30)["pid"] in local for r in sent]

        # One runs and two wait locally: not more than spill_queue, nothing spills.
        assert run(3) == [True] * 3
        assert cluster_requests(daemon) == {}
        # Six: one runs and two wait locally, whatever arrives beyond goes to the cluster (a job
        # already waiting may be the one moved there, while the cluster has room).
        placed = run(6)
    assert placed[0] and placed.count(True) == 3
    assert cluster_requests(daemon) == {"ok": 3}


def test_a_reload_serves_new_work_on_a_new_bridge_while_the_old_one_drains(
    start_daemon: Callable[..., Daemon], tmp_path: Path
) -> None:
    """A reload retires the bridge and starts a new one at once: a request sent after it is
    answered by the new bridge's head while the old bridge still runs the jobs it holds (as a
    new zygote's workers serve while an old generation's finish). Each request: one reply."""
    daemon = start_daemon(config=cluster_config(), env=environment())
    old = cluster_status(daemon)
    old_head = ray_processes(old["pid"])
    count = old["capacity"]  # every job held by the old bridge, none left waiting in the daemon
    # The old jobs wait on the gate, opened once the new request is answered (or has had a
    # minute): so the old bridge surely still runs them all while the new head starts and
    # serves, however long that takes (0.1-0.5 s sleeps left that to timing: ~13 s of them).
    gate = tmp_path / "gate"
    with Counter(daemon.socket) as counter:
        for n in range(count):
            counter.send(request(n, "execute", name="tests.cluster_tasks:where", kwargs={"gate": str(gate)}))
        wait_until(lambda: cluster_status(daemon)["running"] == count, 30, 0.1)
        with daemon.client() as client:
            client.reload()
            during = client.status()["cluster"]
        counter.send(request("new", "execute", name="tests.cluster_tasks:where"))
        order: list[Any] = []
        deadline = time.monotonic() + 60
        while "new" not in order and time.monotonic() < deadline:
            order += counter.receive(0.2)
        gate.touch()
        deadline = time.monotonic() + 120
        while len(order) < count + 1 and time.monotonic() < deadline:
            order += counter.receive(0.2)
        counter.settle(1.0)
        tally = counter.tally
    assert tally.replies == count + 1 and not tally.duplicates() and tally.codes == {"OK": count + 1}
    after_new = len(order) - 1 - order.index("new")
    # Before: 0 (the new request waited for every old job, which waited for the gate).
    assert after_new == count, f"only {after_new} of {count} old jobs were answered after the new one"
    assert during["pid"] != old["pid"] and during["retiring"][0]["pid"] == old["pid"]
    assert during["retiring"][0]["running"] > 0
    old_raylets = {tally.results[n]["parent"] for n in range(count)}
    assert tally.results["new"]["parent"] not in old_raylets, "the new request ran on the new head"
    # Drained, the old bridge stops (and is reaped), and its private head with it.
    wait_until(lambda: cluster_status(daemon)["retiring"] == [], 30, 0.2)
    wait_until(lambda: not [p for p in old_head if alive(p)], 30, 0.2)
    assert f"retired Ray bridge (pid {old['pid']}) exited with status 0" in daemon.log_path.read_text()


def test_a_retiring_bridge_that_dies_has_its_jobs_retried_on_the_new_one(
    start_daemon: Callable[..., Daemon], tmp_path: Path
) -> None:
    """The death of a retiring bridge is its own: its jobs are settled (every one may have run;
    these asked for a retry, which the new bridge runs) and the serving bridge serves on, the
    cluster neither down nor restarted."""
    daemon = start_daemon(config=cluster_config(), env=environment())
    old = cluster_status(daemon)
    count = old["capacity"]
    # Every job waits on the gate, so the old bridge surely holds them all when it is killed
    # (0.5 s sleeps did so only while the new head took longer to start than the old one took
    # to run them, and then the retries ran 0.5 s each: ~14 s); the gate opens after the kill.
    gate = str(tmp_path / "gate")
    with Counter(daemon.socket) as counter:
        for n in range(count):
            where = request(n, "execute", name="tests.cluster_tasks:where", kwargs={"gate": gate}, retries=1)
            counter.send(where)
        wait_until(lambda: cluster_status(daemon)["running"] == count, 30, 0.1)
        with daemon.client() as client:
            client.reload()
        wait_until(lambda: cluster_status(daemon)["state"] == "ready", 60, 0.2)  # the new one connected
        new = cluster_status(daemon)
        assert new["retiring"][0]["pid"] == old["pid"] and new["retiring"][0]["running"] == count
        os.kill(old["pid"], signal.SIGKILL)
        wait_until(lambda: cluster_status(daemon)["retiring"] == [], 30, 0.1)  # its jobs settled
        Path(gate).touch()
        assert counter.wait_replies(count, timeout_s=120)
        counter.settle(1.0)
        tally = counter.tally
    assert tally.replies == count and not tally.duplicates() and tally.codes == {"OK": count}
    after = cluster_status(daemon)
    assert after["pid"] == new["pid"] and after["retiring"] == [] and after["error"] is None
    with daemon.client() as client:
        counters = client.status()["counters"]
    assert counters.get("retries", 0) >= 1 and counters.get("bridge_restarts", 0) == 0


def test_engine_ray_config_checks(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text('[cluster]\nengine = "ray"\nmode = "sometimes"\n')
    check = subprocess.run(
        [sys.executable, "-m", "workerd", "--check-config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert check.returncode == 78
    assert "[cluster] mode" in check.stderr and str(path) in check.stderr
