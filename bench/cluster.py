"""The Ray bridge: what it costs, what the cluster adds, how fast it starts and recovers.

    .venv/bin/python bench/cluster.py            # ~4 min on 2 cores; writes the "Cluster" section
    .venv/bin/python bench/cluster.py --quick    # ~1.5 min, fewer rounds (figures noisier)
    .venv/bin/python bench/cluster.py --parts cost --cases trivial --rounds 5 --no-write   # ~20 s

Four parts, every Ray process on 127.0.0.1:

1. The bridge's cost. One daemon with `[cluster] engine = "ray"`, `address = "local"`, mode
   "all" (its bridge starts a private head with this machine's 2 CPUs); this script connects to
   that same head as a second Ray driver. Rounds alternate: N trivial (or 50 ms) tasks through
   workerd (Client.execute_many, 64 in flight), then N through Ray directly (@ray.remote, 64 in
   flight with ray.wait). The figure is wall time per task; the ratio is workerd's over Ray's.
2. Overflow. A 1-worker local pool saturated by 50 ms sleeps (64 in flight, spill_queue = 0),
   on a ray.cluster_utils cluster of 1, 2, then 3 one-CPU nodes (nodes added between steps).
3. Start-up: Popen to READY=1 (read from a NOTIFY_SOCKET of our own), engine off and
   engine = "ray" with address = "local"; also until the first cluster result.
4. A node's death: three 1 s tasks (retries = 1), one per node of a 3-node cluster; a non-head
   node is killed 0.4 s in; the time from the kill to the last (retried) result, less the 1 s
   the retried task takes to run again.
"""

from __future__ import annotations

import argparse
import functools
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import psutil

import benchlib
from workerctl import Client, errors

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import ray  # after the environment it reads

IN_FLIGHT = 64
ROLES = ("client", "master", "bridge", "ray")


def cluster_section(address: str, mode: str, spill_queue: int = 0) -> str:
    return (
        f'\n[cluster]\nengine = "ray"\naddress = "{address}"\nmode = "{mode}"\nspill_queue = {spill_queue}\n'
    )


def start(workers: int, extra: str, env: dict[str, str] | None = None) -> benchlib.Daemon:
    daemon = benchlib.Daemon(workers, extra_config=extra, env=env)
    daemon.wait_ready(timeout=180)
    return daemon


# -- 1: the bridge's cost ------------------------------------------------------------------------


@ray.remote(max_retries=0)
def echo(value: Any) -> Any:
    return value


@ray.remote(max_retries=0)
def sleep(seconds: float) -> float:
    time.sleep(seconds)
    return seconds


# --cases: (label, task name, its kwargs, the same task for Ray direct, its argument, tasks a round)
COST_CASES = {
    "trivial": ("trivial (echo)", "workerd.examples.tasks:echo", {"value": 1}, echo, 1, 1000),
    "sleep": ("50 ms sleep", "workerd.examples.tasks:sleep", {"seconds": 0.05}, sleep, 0.05, 200),
}


def direct(remote: Any, arg: Any, count: int) -> float:
    """Seconds per task, `count` tasks, IN_FLIGHT at a time, through Ray alone."""
    started = time.perf_counter()
    pending: list[Any] = []
    sent = done = 0
    while done < count:
        while sent < count and len(pending) < IN_FLIGHT:
            pending.append(remote.remote(arg))
            sent += 1
        ready, pending = ray.wait(pending, num_returns=1)
        ray.get(ready)
        done += len(ready)
    return (time.perf_counter() - started) / count


def through_workerd(client: Client, name: str, kwargs: dict[str, Any], count: int) -> float:
    started = time.perf_counter()
    outcomes = list(client.execute_many(name, [([], kwargs)] * count, window=IN_FLIGHT))
    elapsed = time.perf_counter() - started
    failed = [o.error for o in outcomes if o.error is not None]
    if failed:
        raise RuntimeError(f"{len(failed)} failed: {failed[0]}")
    return elapsed / count


def cpu_by_role(daemon_pid: int, bridge_pid: int) -> dict[str, dict[int, float]]:
    """CPU seconds so far, per process, of: this script (the client, or the direct driver), the
    master, the bridge, and the private head's processes (its descendants: GCS, raylet, workers)."""
    roles = {"client": [os.getpid()], "master": [daemon_pid], "bridge": [bridge_pid]}
    roles["ray"] = [p.pid for p in psutil.Process(bridge_pid).children(recursive=True)]
    return {role: benchlib.cpu_seconds(pids) for role, pids in roles.items()}


def spent(before: dict[int, float], after: dict[int, float]) -> float:
    return sum(after[pid] - before[pid] for pid in after if pid in before)


def bridge_cost(rounds: int, kinds: list[str]) -> tuple[str, list[dict[str, Any]]]:
    daemon = start(1, cluster_section("local", "all"))
    rows, csv, cpu_rows = [], [], []
    try:
        status = daemon.status()
        assert status is not None
        bridge = status["cluster"]["pid"]
        ray.init(address=status["cluster"]["address"], _node_ip_address="127.0.0.1", log_to_driver=False)
        cases = [COST_CASES[kind] for kind in kinds]
        with daemon.client() as client:
            for label, name, kwargs, remote, arg, count in cases:
                through_workerd(client, name, kwargs, count // 4)  # warm both paths' workers
                direct(remote, arg, count // 4)
                ours, theirs = [], []
                cpu = {"workerd": dict.fromkeys(ROLES, 0.0), "direct": dict.fromkeys(ROLES, 0.0)}
                paths = {
                    "workerd": (ours, functools.partial(through_workerd, client, name, kwargs, count)),
                    "direct": (theirs, functools.partial(direct, remote, arg, count)),
                }
                for _ in range(rounds):
                    for path, (times, run) in paths.items():
                        before = cpu_by_role(daemon.pid, bridge)
                        times.append(run())
                        after = cpu_by_role(daemon.pid, bridge)
                        for role in ROLES:
                            cpu[path][role] += spent(before[role], after[role]) / (count * rounds)
                ratios = [a / b for a, b in zip(ours, theirs, strict=True)]
                rows.append(
                    [
                        label,
                        count,
                        benchlib.spread([t * 1e6 for t in theirs]),
                        benchlib.spread([t * 1e6 for t in ours]),
                        benchlib.spread(ratios, 2),
                    ]
                )
                for path, label_path in (("direct", "Ray direct"), ("workerd", "workerd -> Ray")):
                    used = cpu[path]
                    cells = [f"{used[role] * 1e6:.0f}" for role in ROLES]
                    cpu_rows.append([label, label_path, *cells, f"{sum(used.values()) * 1e6:.0f}"])
                csv.append(
                    {
                        "part": "bridge_cost",
                        "case": label,
                        "ray_us": statistics.median(theirs) * 1e6,
                        "workerd_us": statistics.median(ours) * 1e6,
                        "ratio": statistics.median(ratios),
                    }
                )
    finally:
        ray.shutdown()
        daemon.stop()
    headers = ["tasks", "per round", "Ray direct us/task", "workerd -> Ray us/task", "ratio"]
    cpu_headers = ["tasks", "path", *(f"{role} CPU us" for role in ROLES), "total CPU us/task"]
    text = (
        f"**The bridge's cost** ({IN_FLIGHT} in flight, a private head with 2 CPUs, {rounds} rounds "
        "alternating, median (min-max)):\n\n"
        + benchlib.table(headers, rows)
        + "\n\nCPU per task, by process (the same rounds; `client` is this script: workerd's client, "
        "or the Ray driver of the direct path; `ray` is every process of the private head):\n\n"
        + benchlib.table(cpu_headers, cpu_rows)
    )
    return text, csv


# -- 2: overflow ---------------------------------------------------------------------------------


def throughput(client: Client, count: int) -> float:
    started = time.perf_counter()
    outcomes = list(
        client.execute_many(
            "workerd.examples.tasks:sleep", [([], {"seconds": 0.05})] * count, window=IN_FLIGHT
        )
    )
    assert all(o.error is None for o in outcomes)
    return count / (time.perf_counter() - started)


def pool_counts(client: Client) -> dict[str, int]:
    counts: dict[str, int] = {}
    for entry in client.status()["metrics"]["requests"]:
        if entry["command"] == "execute" and entry["outcome"] == "ok":
            counts[entry["pool"]] = counts.get(entry["pool"], 0) + entry["count"]
    return counts


def overflow(count: int) -> tuple[str, list[dict[str, Any]]]:
    from ray.cluster_utils import Cluster

    rows, csv = [], []
    local = start(1, "")
    with local.client() as client:
        throughput(client, count // 4)
        alone = throughput(client, count)
    local.stop()
    rows.append(["local pool only (engine off)", 0, f"{alone:.1f}", "-"])
    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 1, "node_ip_address": "127.0.0.1", "include_dashboard": False},
    )
    try:
        daemon = start(1, cluster_section(cluster.address, "overflow"))
        try:
            with daemon.client() as client:
                for nodes in (1, 2, 3):
                    if nodes > 1:
                        cluster.add_node(num_cpus=1, node_ip_address="127.0.0.1")
                        cluster.wait_for_nodes()
                        benchlib_wait(lambda n=nodes: client.status()["cluster"]["cpus"] == n)
                    throughput(client, count // 4)  # the new node's workers start
                    before = pool_counts(client)
                    rate = throughput(client, count)
                    after = pool_counts(client)
                    spilled = after.get("cluster", 0) - before.get("cluster", 0)
                    rows.append(
                        [f"local pool + {nodes} node(s)", nodes, f"{rate:.1f}", f"{spilled / count:.0%}"]
                    )
                    csv.append(
                        {"part": "overflow", "nodes": nodes, "tasks_per_s": rate, "spilled": spilled / count}
                    )
        finally:
            daemon.stop()
    finally:
        cluster.shutdown()
    csv.insert(0, {"part": "overflow", "nodes": 0, "tasks_per_s": alone, "spilled": 0})
    headers = ["setup", "Ray nodes (1 CPU each)", "50 ms tasks/s", "ran on the cluster"]
    text = (
        f"**Overflow** (1 local worker, 50 ms sleeps, {IN_FLIGHT} in flight, {count} tasks a step, "
        "spill_queue = 0):\n\n" + benchlib.table(headers, rows)
    )
    return text, csv


def benchlib_wait(predicate: Any, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise RuntimeError("condition not met in time")
        time.sleep(0.1)


# -- 3: start-up ---------------------------------------------------------------------------------


def time_to_ready(extra: str) -> tuple[float, float]:
    """(Popen to READY=1, Popen to the first execute's result), from a NOTIFY_SOCKET of ours."""
    directory = Path(tempfile.mkdtemp(prefix="wbench-"))
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(directory / "notify"))
    notify.settimeout(180)
    config = directory / "w.toml"
    config.write_text(
        benchlib.BASE_CONFIG.format(
            workers=1, preload="[]", gc_freeze="true", modules='["workerd.examples.tasks"]'
        )
        + extra
    )
    env = {**os.environ, "NOTIFY_SOCKET": str(directory / "notify")}
    sock = str(directory / "w.sock")
    started = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "workerd", "--socket", sock, "--config", str(config)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        while b"READY=1" not in notify.recv(4096):
            pass
        ready = time.perf_counter() - started
        with Client(sock, timeout=60) as client:
            client.execute("workerd.examples.tasks:echo", 1)
        first = time.perf_counter() - started
    finally:
        proc.terminate()
        proc.wait(30)
        notify.close()
    return ready, first


def startup(runs: int) -> tuple[str, list[dict[str, Any]]]:
    rows, csv = [], []
    for label, extra in [
        ("engine off", ""),
        ('engine = "ray", address = "local"', cluster_section("local", "all")),
    ]:
        samples = [time_to_ready(extra) for _ in range(runs)]
        ready, first = [s[0] for s in samples], [s[1] for s in samples]
        rows.append([label, benchlib.spread(ready, 2), benchlib.spread(first, 2)])
        csv.append(
            {
                "part": "startup",
                "case": label,
                "ready_s": statistics.median(ready),
                "first_s": statistics.median(first),
            }
        )
    headers = ["config", "start to READY=1 (s)", "start to first result (s)"]
    text = f"**Start-up** ({runs} runs, median (min-max)):\n\n" + benchlib.table(headers, rows)
    return text, csv


# -- 4: a node's death ---------------------------------------------------------------------------


def ray_rss(cluster: Any) -> int:
    total = 0
    for node in cluster.list_all_nodes():
        for infos in node.all_processes.values():
            for info in infos:
                try:
                    process = psutil.Process(info.process.pid)
                    total += process.memory_info().rss
                    total += sum(c.memory_info().rss for c in process.children(recursive=True))
                except psutil.NoSuchProcess:
                    continue
    return total


def kill_one(socket_path: str, cluster: Any, retries: int) -> tuple[float, float]:
    """Three 1 s sleeps, one per node; a non-head node killed 0.4 s in. (Seconds from the kill
    to the first WORKER_LOST or retried result, seconds to the last reply.) Each request on a
    client and thread of its own, so each reply's time is its own arrival."""
    ends: list[tuple[float, str]] = []
    killed = [0.0]

    def one() -> None:
        with Client(socket_path, timeout=60) as client:
            try:
                client.call("workerd.examples.tasks:sleep", kwargs={"seconds": 1.0}, retries=retries)
                ends.append((time.perf_counter() - killed[0], "ok"))
            except errors.WorkerdError as exc:
                ends.append((time.perf_counter() - killed[0], exc.code))

    threads = [threading.Thread(target=one) for _ in range(3)]
    for thread in threads:
        thread.start()
    time.sleep(0.4)
    killed[0] = time.perf_counter()
    cluster.remove_node(cluster.list_all_nodes()[-1], allow_graceful=False)
    for thread in threads:
        thread.join()
    lost = [t for t, what in ends if what == "WORKER_LOST"]
    return (lost[0] if lost else max(t for t, _ in ends)), max(t for t, _ in ends)


def warm(client: Client, cluster: Any, loopback: dict[str, Any]) -> None:
    """Back to three nodes, each with a Ray worker started."""
    while len([n for n in cluster.list_all_nodes()]) < 3:
        cluster.add_node(**loopback)
    cluster.wait_for_nodes()
    benchlib_wait(lambda: client.status()["cluster"]["cpus"] == 3)
    for _ in range(2):
        list(client.execute_many("workerd.examples.tasks:sleep", [([], {"seconds": 0.3})] * 3, window=3))


def node_death(runs: int) -> tuple[str, list[dict[str, Any]]]:
    from ray.cluster_utils import Cluster

    loopback = {"num_cpus": 1, "node_ip_address": "127.0.0.1"}
    started = time.perf_counter()
    cluster = Cluster(initialize_head=True, head_node_args={**loopback, "include_dashboard": False})
    for _ in range(2):
        cluster.add_node(**loopback)
    cluster.wait_for_nodes()
    up = time.perf_counter() - started
    rss = ray_rss(cluster)
    detected, retried = [], []
    try:
        daemon = start(1, cluster_section(cluster.address, "all"))
        try:
            with daemon.client() as client:
                for _ in range(runs):
                    warm(client, cluster, loopback)
                    detected.append(kill_one(daemon.socket, cluster, retries=0)[0])
                    warm(client, cluster, loopback)
                    retried.append(kill_one(daemon.socket, cluster, retries=1)[1])
                retries = client.status()["counters"].get("retries", 0)
        finally:
            daemon.stop()
    finally:
        cluster.shutdown()
    text = (
        f"**Three simulated nodes** (ray.cluster_utils, 1 CPU each, 127.0.0.1): up in {up:.1f} s, "
        f"{rss / 2**30:.2f} GiB RSS (every Ray process of the three nodes, idle).\n\n"
        f"**A node's death** ({runs} runs; three 1 s sleeps, one per node, a non-head node killed 0.4 s in): "
        f"the kill to WORKER_LOST (retries = 0) {benchlib.spread(detected, 2)} s; the kill to the "
        f"retried result (retries = 1) {benchlib.spread(retried, 2)} s, which holds the 1 s re-run and "
        f"the wait for a free CPU (the two other nodes are busy until 0.6 s after the kill); "
        f"{retries} retries counted."
    )
    rows = [{"part": "node_death", "up_s": up, "rss_bytes": rss}]
    rows[0] |= {"lost_s": statistics.median(detected), "retried_s": statistics.median(retried)}
    return text, rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds")
    parser.add_argument("--no-write", action="store_true", help="print only")
    parser.add_argument("--parts", default="cost,overflow,startup,death", help="which parts, comma-separated")
    parser.add_argument("--rounds", type=int, help="the bridge's cost: rounds a case (8; --quick 2)")
    parser.add_argument(
        "--cases", default="trivial,sleep", help=f"the bridge's cost: which tasks ({', '.join(COST_CASES)})"
    )
    args = parser.parse_args()
    rounds, runs, count = (2, 1, 200) if args.quick else (8, 3, 400)
    rounds = args.rounds or rounds
    unknown = set(args.cases.split(",")) - set(COST_CASES)
    if unknown:
        parser.error(f"--cases: unknown {', '.join(sorted(unknown))}")
    chosen = args.parts.split(",")
    parts = [
        run()
        for part, run in [
            ("cost", lambda: bridge_cost(rounds, args.cases.split(","))),
            ("overflow", lambda: overflow(count)),
            ("startup", lambda: startup(runs)),
            ("death", lambda: node_death(runs)),
        ]
        if part in chosen
    ]
    body = "\n\n".join(text for text, _ in parts)
    benchlib.write_csv("cluster", [row for _, rows in parts for row in rows])
    benchlib.report("Cluster", body, write=not args.no_write, script="cluster")


if __name__ == "__main__":
    main()
