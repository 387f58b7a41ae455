"""Who a request's client is, for fair share: a user, or a systemd unit (`[fairness] identity`).

Runs in: the master.

A client is what the kernel says of the connection's peer (SO_PEERCRED, which libzmq attaches
to every message as "Peer-Address", access.py): its uid, or with identity = "unit" the unit its
process runs in, read from /proc/PID/cgroup when the connection is first seen. It is never the
connection nor a request id: a client that opens ten connections is still one client, with one
share (core/queue.py). A peer whose credentials cannot be read shares one client, "unknown".

Each request costs a read of its connection's Peer-Address (about 0.6 µs) and a dict lookup:
the client is cached by that text for CACHE_TTL_S, so a weight granted to a group reaches a
user whose membership changed, and a reused pid's new unit is seen, within that time.
"""

from __future__ import annotations

import pwd
import time
from collections.abc import Callable
from typing import Any

from workerd.access import PEER_PROPERTY, GroupCache, Peer, parse_peer_address
from workerd.config import FairnessConfig
from workerd.core.lifecycle import Tenant

CACHE_TTL_S = 60.0
# Bounds on what a flood of distinct peers can make the master keep: past them the cache is
# dropped, and clients with nothing in flight are forgotten (their completed counts with them).
CACHE_MAX = 4096
CLIENTS_MAX = 1024
UNKNOWN = "unknown"


def unit_of(cgroup_text: str) -> str:
    """The systemd unit in a /proc/PID/cgroup text: the innermost one of its cgroup path
    ("0::/system.slice/ingest.service" -> "ingest.service"), or "" outside any (a slice only,
    or a container's root). Where systemd keeps a hierarchy of its own (cgroup v1, or the hybrid
    layout) that one says; on a unified (v2) system, the one path there is."""
    paths = {}
    for line in cgroup_text.splitlines():
        hierarchy, _, rest = line.partition(":")
        controllers, _, where = rest.partition(":")
        if controllers == "name=systemd" or (hierarchy == "0" and controllers == ""):
            paths[controllers] = where
    path = paths.get("name=systemd", paths.get("", ""))
    for part in reversed(path.split("/")):
        if part.endswith((".service", ".scope")):
            return part
    return ""


def read_unit(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cgroup", encoding="utf-8") as handle:
            return unit_of(handle.read())
    except OSError:  # gone already, or no /proc: it is known by its uid
        return ""


def user_name(uid: int) -> str | None:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return None


class Clients:
    """The clients of the running config, each one Tenant (its share and its counts)."""

    def __init__(
        self, config: FairnessConfig, groups: GroupCache, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.config = config
        self.groups = groups
        self.clock = clock
        self.by_name: dict[str, Tenant] = {}
        self.users: dict[str, str | None] = {}  # client name -> user name, for `status`
        self.peers: dict[str, tuple[Peer, str]] = {}  # client name -> (a peer of it, its unit)
        self.cache: dict[str, tuple[Tenant, float]] = {}  # Peer-Address text -> (client, until)

    def reconfigure(self, config: FairnessConfig) -> None:
        """Weights and caps apply at once to clients already known; the identity to requests
        read from now on (a queued job keeps the client it was accepted for)."""
        self.config = config
        self.cache.clear()
        for name, (peer, unit) in self.peers.items():
            self.grant(self.by_name[name], peer, unit)

    def of(self, origin: Any) -> Tenant:
        """The client of the connection a message came on (a zmq.Frame of it)."""
        try:
            address = origin.get(PEER_PROPERTY)
        except Exception:  # zmq.ZMQError without the property; AttributeError with no frame
            return self.named(UNKNOWN)
        now = self.clock()
        entry = self.cache.get(address)
        if entry is not None and entry[1] > now:
            return entry[0]
        tenant = self.resolve(address)
        if len(self.cache) >= CACHE_MAX:
            self.cache.clear()
        self.cache[address] = (tenant, now + CACHE_TTL_S)
        return tenant

    def resolve(self, address: str) -> Tenant:
        peer = parse_peer_address(str(address))
        if peer is None:
            return self.named(UNKNOWN)
        unit = read_unit(peer.pid) if self.config.identity == "unit" else ""
        name = f"unit:{unit}" if unit else f"uid:{peer.uid}"
        tenant = self.named(name)
        self.users.setdefault(name, user_name(peer.uid))
        self.peers[name] = (peer, unit)
        self.grant(tenant, peer, unit)
        return tenant

    def grant(self, tenant: Tenant, peer: Peer, unit: str) -> None:
        """Its weight and cap from [fairness] (the most specific entry: unit, user, group)."""
        groups = lambda: self.groups.groups(peer.uid, peer.gid)  # noqa: E731 - looked up only if needed
        tenant.weight = self.config.weights.lookup(unit, peer.uid, groups, 1)
        tenant.max_priority = self.config.max_priority.lookup(unit, peer.uid, groups, 0)

    def named(self, name: str) -> Tenant:
        tenant = self.by_name.get(name)
        if tenant is None:
            if len(self.by_name) >= CLIENTS_MAX:
                self.forget_idle()
            tenant = self.by_name[name] = Tenant(name)
        return tenant

    def forget_idle(self) -> None:
        for name, tenant in list(self.by_name.items()):
            if not tenant.in_flight:
                del self.by_name[name]
                self.users.pop(name, None)
                self.peers.pop(name, None)
        self.cache.clear()

    def status(self) -> list[dict[str, Any]]:
        """Each client's work (`status` "clients", and the metrics): queued (accepted, not
        started), running, completed; and its share, the part of the workers its weight gives
        it among the clients with work in flight (0 while it has none)."""
        active = sum(tenant.weight for tenant in self.by_name.values() if tenant.in_flight)
        return [
            {
                "client": name,
                "user": self.users.get(name),
                "weight": tenant.weight,
                "max_priority": tenant.max_priority,
                "queued": tenant.waiting,
                "running": tenant.running,
                "completed": tenant.completed,
                "share": round(tenant.weight / active, 4) if tenant.in_flight else 0.0,
            }
            for name, tenant in sorted(self.by_name.items())
        ]
