"""The Ray bridge on a real 3-node Ray cluster on this machine (ray.cluster_utils), loopback only.

Each node has one CPU and its own raylet, all on 127.0.0.1: Ray takes the machine's other
address for a multi-node cluster unless each node is given node_ip_address="127.0.0.1" and
RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 is set. The cluster is the module's; the nodes' Ray
workers import tests.cluster_tasks from the repository, and nothing from the head-only module's
directory, which only the daemons see.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from tests.conftest import Daemon, wait_until
from tests.integration.test_cluster import PYTHONPATH, cluster_config
from tests.reliability.harness import Counter, request
from workerctl import errors

HEAD_ONLY = """
import os

def hello():
    return {"text": "shipped", "parent": os.getppid()}
"""


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[Any]:
    from ray.cluster_utils import Cluster

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        patch.setenv("PYTHONPATH", PYTHONPATH)  # the nodes' workers import tests.cluster_tasks
        loopback = {"num_cpus": 1, "node_ip_address": "127.0.0.1"}
        # The GCS finds a removed node dead after `failure_threshold` failed health checks,
        # `period_ms` apart: 5 x 3 s by Ray's default, which was most of the node-removal test.
        # 3 x 0.5 s here; a live node still has each check's full timeout (10 s) to answer.
        checks = {"health_check_period_ms": 500, "health_check_failure_threshold": 3}
        head = {**loopback, "include_dashboard": False, "_system_config": checks}
        cluster = Cluster(initialize_head=True, head_node_args=head)
        try:
            for _ in range(2):
                cluster.add_node(**loopback)
            cluster.wait_for_nodes()
            yield cluster
        finally:
            cluster.shutdown()


def nodes_config(address: str, modules: str, ship: bool = False) -> str:
    return cluster_config(address=address, modules=modules, ship=ship)


def start(directory: Path, config: str, pythonpath: str, env: dict[str, str] | None = None) -> Daemon:
    directory.mkdir(exist_ok=True)
    env = {"PYTHONPATH": pythonpath, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", **(env or {})}
    daemon = Daemon(directory, config, [], env, None)
    try:
        daemon.wait_ready(timeout=90)
    except BaseException:
        daemon.stop(signal.SIGKILL)
        raise
    return daemon


@pytest.fixture(scope="module")
def nodes_daemon(ray_cluster: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    config = nodes_config(ray_cluster.address, '["tests.cluster_tasks"]')
    daemon = start(tmp_path_factory.mktemp("nodes"), config, PYTHONPATH)
    yield daemon
    daemon.stop(timeout=20)


def cluster_of(daemon: Daemon) -> dict[str, Any]:
    with daemon.client() as client:
        return client.status()["cluster"]  # type: ignore[no-any-return]


def test_three_loopback_nodes_and_tasks_land_on_several(nodes_daemon: Daemon) -> None:
    status = cluster_of(nodes_daemon)
    assert status["state"] == "ready" and status["address"].startswith("127.0.0.1:")
    assert [node["address"] for node in status["nodes"]] == ["127.0.0.1"] * 3
    assert status["cpus"] == 3
    with nodes_daemon.client() as client:
        sent = [client.send("execute", name="tests.cluster_tasks:where", args=[1.0]) for _ in range(6)]
        parents = {client.wait_result(r, timeout=30)["parent"] for r in sent}
    assert len(parents) >= 2
    assert {psutil.Process(pid).name() for pid in parents} == {"raylet"}


def retries(daemon: Daemon) -> int:
    with daemon.client() as client:
        return int(client.status()["counters"].get("retries", 0))


@pytest.mark.cluster_slow
def test_a_node_removed_mid_batch_gives_each_request_one_reply(
    nodes_daemon: Daemon, ray_cluster: Any, tmp_path: Path
) -> None:
    """Every request ends in exactly one terminal reply, counted at the wire; those whose node
    went are retried (retries=2) and succeed on the nodes left."""
    count = 9
    started = tmp_path / "started"
    started.mkdir()
    # Every job waits on the gate, opened once the daemon has retried the removed node's job:
    # that job cannot end first (its Ray worker may outlive its raylet a moment, and would), as
    # a 1.5 s sleep might have, and the rest need not sleep after.
    gate = tmp_path / "gate"
    with Counter(nodes_daemon.socket) as counter:
        for n in range(count):
            where = {"args": [0, str(started)], "kwargs": {"gate": str(gate)}, "retries": 2}
            counter.send(request(n, "execute", name="tests.cluster_tasks:where", **where))
        # Once every node runs one (each node leaves a file), the one removed surely loses a task.
        wait_until(lambda: len(os.listdir(started)) >= 3, 30)
        victim = ray_cluster.list_all_nodes()[-1]
        ray_cluster.remove_node(victim, allow_graceful=False)
        try:
            wait_until(lambda: retries(nodes_daemon) >= 1, 60, 0.1)
        finally:
            gate.touch()
        assert counter.wait_replies(count, timeout_s=90)
        counter.settle(1.0)
        tally = counter.tally
    try:
        assert tally.replies == count and not tally.duplicates()
        assert tally.codes == {"OK": count}, tally.codes
        assert retries(nodes_daemon) >= 1
    finally:
        ray_cluster.add_node(num_cpus=1, node_ip_address="127.0.0.1")
        ray_cluster.wait_for_nodes()
    wait_until(lambda: cluster_of(nodes_daemon)["cpus"] == 3, 20)


@pytest.mark.cluster_slow
def test_a_module_only_on_the_heads_side_is_shipped(ray_cluster: Any, tmp_path: Path) -> None:
    """The module lies where the daemon (the head's side) finds it and no node does: shipped in
    the runtime_env (py_modules), it runs on the nodes; not shipped, it fails to import there."""
    modules = tmp_path / "headonly"
    modules.mkdir()
    (modules / "headonly_tasks.py").write_text(HEAD_ONLY)
    path = f"{PYTHONPATH}:{modules}"
    shipping = start(tmp_path / "ship", nodes_config(ray_cluster.address, '["headonly_tasks"]', True), path)
    try:
        with shipping.client() as client:
            result = client.execute("headonly_tasks:hello")
        assert result["text"] == "shipped" and psutil.Process(result["parent"]).name() == "raylet"
    finally:
        shipping.stop(timeout=20)
    installed = start(tmp_path / "noship", nodes_config(ray_cluster.address, '["headonly_tasks"]'), path)
    try:
        with installed.client() as client, pytest.raises(errors.WorkerdError) as failed:
            client.execute("headonly_tasks:hello")
        assert failed.value.code == "UNKNOWN_TASK" and "failed to import" in str(failed.value)
    finally:
        installed.stop(timeout=20)


def test_no_ray_process_of_the_cluster_listens_beyond_loopback(ray_cluster: Any) -> None:
    import ipaddress

    pids = {os.getpid()}
    for node in ray_cluster.list_all_nodes():
        pids |= {p.process.pid for processes in node.all_processes.values() for p in processes}
    listening = []
    for pid in pids:
        try:
            process = psutil.Process(pid)
            listening += [
                c.laddr for c in process.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN
            ]
        except psutil.NoSuchProcess:
            continue
    assert listening
    for address in listening:
        ip = ipaddress.ip_address(address.ip)
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
            ip = ip.ipv4_mapped
        assert ip.is_loopback, f"{address.ip}:{address.port}"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def ray_start(port: int, temp_dir: str) -> None:
    ray = str(Path(sys.executable).parent / "ray")
    command = [ray, "start", "--head", f"--port={port}", "--num-cpus=1", "--node-ip-address=127.0.0.1"]
    command += ["--include-dashboard=false", "--disable-usage-stats", f"--temp-dir={temp_dir}"]
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "PYTHONPATH": PYTHONPATH}
    subprocess.run(command, check=True, capture_output=True, timeout=120, env=env)


def kill_head(temp_dir: str) -> None:
    """End the head that `ray start` left running (by its temp dir, never `ray stop`, which
    ends every Ray on the machine)."""
    for process in psutil.process_iter(["cmdline"]):
        if any(temp_dir in part for part in process.info["cmdline"] or ()):
            with contextlib.suppress(psutil.NoSuchProcess):
                process.kill()


@pytest.mark.cluster_slow
def test_a_head_that_is_down_is_one_line_and_reconnects(tmp_path: Path) -> None:
    port = free_port()
    head_dir = tempfile.mkdtemp(prefix="wr-", dir="/tmp")
    config = nodes_config(f"127.0.0.1:{port}", '["tests.cluster_tasks"]').replace(
        'mode = "all"', 'mode = "overflow"'
    )
    # The bridge's driver gives a lost head 2 s to come back, not the daemon's 5 s: the test
    # waits for the "down" that follows, however long it is.
    reconnect = {"RAY_gcs_rpc_server_reconnect_timeout_s": "2"}
    config = config.replace("workers = 1", "workers = 1\nprefetch = 0")
    daemon = start(tmp_path / "down", config, PYTHONPATH, reconnect)
    try:
        status = cluster_of(daemon)
        assert status["state"] == "down"
        assert status["error"] == f"Ray head at 127.0.0.1:{port} is unreachable (Connection refused)"
        with daemon.client() as client:  # overflow: the local pool keeps serving
            local = {w["pid"] for w in client.status()["pool"]["workers"]}
            sent = [client.send("execute", name="tests.cluster_tasks:where", args=[0.2]) for _ in range(3)]
            assert {client.wait_result(r, timeout=30)["pid"] for r in sent} <= local
        ray_start(port, head_dir)
        wait_until(lambda: cluster_of(daemon)["state"] == "ready", 30, 0.2)
        with daemon.client() as client:
            sent = [client.send("execute", name="tests.cluster_tasks:where", args=[0.5]) for _ in range(3)]
            parents = [client.wait_result(r, timeout=30)["parent"] for r in sent]
        assert psutil.Process(parents[-1]).name() == "raylet"  # the third spilled
        kill_head(head_dir)
        wait_until(lambda: cluster_of(daemon)["state"] == "down", 30, 0.2)
        assert f"Ray head at 127.0.0.1:{port}" in cluster_of(daemon)["error"]
        # Mode "all" needs the cluster: its requests fail with the line.
        daemon.config_path.write_text(nodes_config(f"127.0.0.1:{port}", '["tests.cluster_tasks"]'))
        with daemon.client() as client:
            client.reload()
            with pytest.raises(errors.WorkerdError) as failed:
                client.execute("tests.cluster_tasks:where")
        assert failed.value.code == "INTERNAL" and "cluster unavailable: " in str(failed.value)
    finally:
        kill_head(head_dir)
        daemon.stop(timeout=20)
        shutil.rmtree(head_dir, ignore_errors=True)
