"""Descriptors (issue 18, item 3c): every child of the daemon holds only its own.

A descriptor another process also holds is a channel that is not its own: a worker of a later
generation once read another worker's results off one, a respawned GPU worker held the CPU
workers' channels, and a retired zygote lived on because a newer process held its peer end. So
after each event that starts processes (reloads, a standby takeover, a GPU worker respawn, a
bridge restart) the test lists /proc/PID/fd of every process of the daemon's tree and checks:

- nothing past stderr is shared: no socket or pipe of a child is held by the master or by any
  other process of the tree (socket and pipe inodes are unique; a shared one was inherited);
- fd 0 is /dev/null, and 1 and 2 are the master's own stdout and stderr;
- each child holds exactly what its role needs:
  serving zygote  its channel (peer held by the master) and its wake pipe (both ends:
                  signal.set_wakeup_fd writes it, select reads it);
  standby zygote  its channel, nothing else (it forked off its zygote and closed the rest);
  CPU worker      its channel and its stack-dump file (private_dir/stack-PID.txt, which
                  faulthandler keeps open to write the dump a timeout asks for);
  GPU worker      the same two;
  Ray bridge      exactly one channel (peer held by the master); the rest is Ray's own (its
                  sockets to the GCS and raylet, its logs), shared with no process of ours;
- every process of the tree is one of those, or a Ray process under the bridge: a retired
  zygote that outlives its generation fails this too.

Sockets' peers come from `ss -x` (sock_diag), which shows the peer inode of a socketpair.
Transient states (a fork whose channel end the zygote has not sent yet, a retiring zygote on its
way out) settle within moments; a leak does not, so each check waits for a clean listing and
fails with the last one it saw.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import pytest

from tests.conftest import Daemon, wait_until
from tests.integration.test_cluster import cluster_config, environment
from tests.reliability.harness import report, workers_of
from tests.reliability.test_orphans import assert_nothing_outlives_the_master, tree
from tests.reliability.test_seams import kill_gpu_worker, pipeline_config, replaced, start_seams, zygote
from workerctl import Client

SETTLE_S = 20.0
# Descriptors whose readlink names one object (an inode); anon_inode:[eventfd] names them all.
SHARED_KINDS = ("socket:", "pipe:")


@dataclass
class Holder:
    """One process and its descriptors past stderr: fd -> readlink target."""

    pid: int
    role: str
    stdio: list[str]
    fds: dict[int, str] = field(default_factory=dict)

    def targets(self, prefix: str) -> list[str]:
        return [t for t in self.fds.values() if t.startswith(prefix)]


def descriptors(pid: int) -> dict[int, str]:
    found = {}
    for name in os.listdir(f"/proc/{pid}/fd"):
        try:
            found[int(name)] = os.readlink(f"/proc/{pid}/fd/{name}")
        except FileNotFoundError:
            pass  # closed while we listed
    return found


def socket_peers() -> dict[str, str]:
    """socket:[inode] -> socket:[peer inode], for every Unix socket with a peer."""
    lines = subprocess.run(["ss", "-x", "-a", "-n", "-H"], capture_output=True, text=True, check=True)
    peers = {}
    for line in lines.stdout.splitlines():
        fields = line.split()
        if len(fields) >= 4 and fields[-1].isdigit() and fields[-1] != "0":
            peers[f"socket:[{fields[-3]}]"] = f"socket:[{fields[-1]}]"
    return peers


def roles(client: Client) -> dict[int, str]:
    """pid -> role of every process the master says it runs."""
    status, memory = client.status(), client.memory_status()
    found = {int(z["pid"]): f"{z['role']} zygote" for z in memory["zygotes"]}
    found.update({pid: "CPU worker" for pid in workers_of(status)})
    if status["gpu"]["pid"] is not None:
        found[int(status["gpu"]["pid"])] = "GPU worker"
    cluster = status.get("cluster") or {}
    if cluster.get("pid"):
        found[int(cluster["pid"])] = "bridge"
    return found


def snapshot(master: int, known: dict[int, str]) -> tuple[Holder, list[Holder]]:
    """The master and every process under it, each with its role ("Ray" under the bridge)."""
    bridge = next((pid for pid, role in known.items() if role == "bridge"), None)
    ray = {p.pid for p in psutil.Process(bridge).children(recursive=True)} if bridge else set()
    holders = []
    for process in [psutil.Process(master), *psutil.Process(master).children(recursive=True)]:
        guess = "master" if process.pid == master else "Ray" if process.pid in ray else "?"
        role = known.get(process.pid, guess)
        try:
            fds = descriptors(process.pid)
        except FileNotFoundError:
            continue  # exited while we listed
        stdio = [fds.pop(fd, "") for fd in (0, 1, 2)]
        holders.append(Holder(process.pid, role, stdio, fds))
    return holders[0], holders[1:]


def command(pid: int) -> str:
    try:
        return " ".join(psutil.Process(pid).cmdline())[:200]
    except psutil.NoSuchProcess:
        return "(gone)"


def expected(holder: Holder, stack_dir: str) -> list[str]:
    """What `holder` holds past stderr that its role does not explain."""
    stack = os.path.join(stack_dir, f"stack-{holder.pid}.txt")
    sockets, pipes = holder.targets("socket:"), holder.targets("pipe:")
    others = [t for t in holder.fds.values() if not t.startswith(("socket:", "pipe:"))]
    if holder.role == "serving zygote":
        ok = len(sockets) == 1 and len(pipes) == 2 and len(set(pipes)) == 1 and not others
    elif holder.role == "standby zygote":
        ok = len(sockets) == 1 and not pipes and not others
    elif holder.role in ("CPU worker", "GPU worker"):
        ok = len(sockets) == 1 and not pipes and others == [stack]
    else:
        return []  # the bridge and Ray's processes: checked for sharing and for their channel
    return [] if ok else [f"{holder.role} {holder.pid} holds {sorted(holder.fds.items())}"]


def problems(daemon: Daemon, client: Client, stack_dir: str) -> list[str]:
    master, children = snapshot(daemon.proc.pid, roles(client))
    peers = socket_peers()
    found = []
    holders: dict[str, set[int]] = {}
    for holder in [master, *children]:
        for target in holder.fds.values():
            if target.startswith(SHARED_KINDS):
                holders.setdefault(target, set()).add(holder.pid)
    ray = {holder.pid for holder in children if holder.role == "Ray"}
    for holder in children:
        if holder.role == "?":
            found.append(f"an unknown process {holder.pid}: {command(holder.pid)}")
        if holder.role != "Ray" and holder.stdio != ["/dev/null", *master.stdio[1:]]:
            found.append(f"{holder.role} {holder.pid} has stdio {holder.stdio}")
        # Ray's processes share pipes among themselves (raylet and its workers): theirs to share.
        mine = {holder.pid} | (ray if holder.role == "Ray" else set())
        shared = {t: holders[t] - mine for t in holder.fds.values() if holders.get(t, set()) - mine}
        if shared:
            found.append(f"{holder.role} {holder.pid} shares {shared}")
        channels = [t for t in holder.targets("socket:") if peers.get(t) in master.fds.values()]
        if holder.role != "Ray" and len(channels) != 1:
            found.append(f"{holder.role} {holder.pid} has {len(channels)} channels to the master")
        found += expected(holder, stack_dir)
    return found


def assert_own_descriptors(daemon: Daemon, client: Client, stack_dir: str, after: str) -> int:
    """Wait for a clean listing of the whole tree; returns how many children it checked."""
    deadline = time.monotonic() + SETTLE_S
    while found := problems(daemon, client, stack_dir):
        assert time.monotonic() < deadline, f"after {after}:\n" + "\n".join(found)
        time.sleep(0.2)
    return len(psutil.Process(daemon.proc.pid).children(recursive=True))


def private_dir(daemon: Daemon) -> str:
    """The master's private directory (where stack dumps go), read off a worker's fds."""
    for pid in roles_of(daemon, "CPU worker"):
        for target in descriptors(pid).values():
            if os.path.basename(target) == f"stack-{pid}.txt":
                return os.path.dirname(target)
    raise AssertionError("no CPU worker holds its stack-dump file")


def roles_of(daemon: Daemon, role: str) -> list[int]:
    with daemon.client() as client:
        return [pid for pid, r in roles(client).items() if r == role]


def reload(client: Client, target: int) -> None:
    """Reload and wait until the new generation serves alone."""
    old = set(workers_of(client.status()))
    generation = client.status()["pool"]["generation"]
    client.reload()
    wait_until(lambda: replaced(client, old, target), timeout=60)
    wait_until(lambda: all(z["generation"] > generation for z in client.memory_status()["zygotes"]), 30)


def test_every_child_holds_only_its_own_descriptors(
    start_daemon: Callable[..., Daemon], tmp_path: Path
) -> None:
    """Reloads, a standby takeover, a reload after it, a GPU worker respawn: after each, every
    zygote (serving and standby), CPU worker and GPU worker holds only its own."""
    config = pipeline_config(tmp_path, gpu="true", modules=["moda"]).replace("workers = 1", "workers = 2")
    daemon = start_seams(start_daemon, tmp_path, config)
    with daemon.client() as client:
        client.execute("p")  # the GPU worker holds its pipeline: a running worker, not a fresh one
        stack_dir = private_dir(daemon)
        checked = {"boot": assert_own_descriptors(daemon, client, stack_dir, "boot")}
        for n in (1, 2):
            reload(client, 2)
            checked[f"reload {n}"] = assert_own_descriptors(daemon, client, stack_dir, f"reload {n}")
        old = set(workers_of(client.status()))
        os.kill(zygote(client), signal.SIGKILL)
        wait_until(lambda: replaced(client, old, 2), timeout=30)
        checked["takeover"] = assert_own_descriptors(daemon, client, stack_dir, "a standby takeover")
        reload(client, 2)
        checked["takeover+reload"] = assert_own_descriptors(daemon, client, stack_dir, "takeover + reload")
        kill_gpu_worker(client)
        client.execute("p")  # the GPU worker holds its pipeline: a running worker, not a fresh one
        checked["GPU respawn"] = assert_own_descriptors(daemon, client, stack_dir, "a GPU worker respawn")
        for pid in workers_of(client.status()):
            assert client.execute("moda:echo", pid) == pid  # every worker still answers for itself
    report("descriptors", **{k.replace(" ", "_"): v for k, v in checked.items()})


def test_the_retired_zygote_exits_after_a_takeover_and_a_reload(
    start_daemon: Callable[..., Daemon], tmp_path: Path
) -> None:
    """The standby serves after its zygote is killed; a reload then retires it, and it exits
    (a newer zygote once held the master's end of its channel, so it never saw EOF)."""
    daemon = start_seams(start_daemon, tmp_path, pipeline_config(tmp_path, gpu="false", modules=["moda"]))
    with daemon.client() as client:
        old = set(workers_of(client.status()))
        standby = zygote(client, role="standby")
        os.kill(zygote(client), signal.SIGKILL)
        wait_until(lambda: replaced(client, old, 1), timeout=30)
        assert zygote(client) == standby
        reload(client, 1)
        wait_until(lambda: not psutil.pid_exists(standby) or zombie(standby), timeout=30)
        assert client.execute("moda:echo", 7) == 7


def zombie(pid: int) -> bool:
    try:
        return bool(psutil.Process(pid).status() == psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return True


@pytest.mark.skipif(not os.path.exists("/usr/bin/ss") and not os.path.exists("/bin/ss"), reason="no ss")
def test_the_bridge_and_its_successor_hold_only_their_own(
    start_daemon: Callable[..., Daemon], tmp_path: Path
) -> None:
    """With a private Ray head: the bridge, every CPU worker and zygote hold only their own,
    at boot, after a reload, and after the bridge is SIGKILLed and started again. Then the
    master is SIGKILLed: the private head's processes go with it (item 3k)."""
    pytest.importorskip("ray")
    daemon = start_daemon(config=cluster_config(mode="overflow"), env=environment(), wait=False)
    daemon.wait_ready(timeout=120)
    with daemon.client(timeout=60) as client:
        wait_until(lambda: client.status()["cluster"]["state"] == "ready", timeout=120)
        stack_dir = private_dir(daemon)
        assert_own_descriptors(daemon, client, stack_dir, "boot")
        reload(client, 1)
        assert_own_descriptors(daemon, client, stack_dir, "a reload")
        bridge = client.status()["cluster"]["pid"]
        os.kill(bridge, signal.SIGKILL)
        wait_until(lambda: ready_bridge(client, bridge), timeout=120)
        assert_own_descriptors(daemon, client, stack_dir, "a bridge restart")
        before = tree(daemon.proc.pid)
    assert any("raylet" in command for command in before.values()), before
    assert_nothing_outlives_the_master(daemon, before)  # item 3k: Ray's processes included


def ready_bridge(client: Client, old: int) -> Any:
    cluster = client.status()["cluster"]
    return cluster["state"] == "ready" and cluster["pid"] not in (None, old)
