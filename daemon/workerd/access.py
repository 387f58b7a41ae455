"""Who may use which command: the peer's credentials, checked against `[access]`.

Runs in: the master.

The socket's mode (0660) and group decide who may connect at all. `[access]` narrows four
commands (execute, clear_memory, scale, reload) further, to listed users and groups; a command
with no list stays open to everyone who can connect.

Where the credentials come from: for every connection on an ipc socket libzmq reads the peer's
SO_PEERCRED at accept() and attaches it to each message received on that connection, as the
metadata property "Peer-Address" = "localhost:UID:GID:PID" (libzmq 4.3; ZAP would see the same,
at the cost of a handler socket in the loop). The kernel fills these in; a client cannot forge
them. The GID is the peer's effective group at connect time only, so supplementary groups are
looked up in the group database by user name (getgrouplist), and cached: membership changes
reach the daemon within GROUPS_TTL_S, as they reach a user's processes at their next login.

Only a request for a restricted command pays for any of this; everything else never reads the
property.
"""

from __future__ import annotations

import dataclasses
import os
import pwd
import time
from collections.abc import Callable
from typing import Any

from workerd.config import ACCESS_COMMANDS, AccessConfig
from workerd.configvalues import Principals

PEER_PROPERTY = "Peer-Address"
GROUPS_TTL_S = 60.0
GROUPS_CACHE_MAX = 4096


@dataclasses.dataclass(frozen=True)
class Peer:
    uid: int
    gid: int
    pid: int


def parse_peer_address(text: str) -> Peer | None:
    """The credentials in a Peer-Address value ("localhost:UID:GID:PID"), or None."""
    parts = text.rsplit(":", 3)
    if len(parts) != 4 or not all(part.isdigit() for part in parts[1:]):
        return None
    return Peer(int(parts[1]), int(parts[2]), int(parts[3]))


def peer_of(frame: Any) -> Peer | None:
    """The credentials of the connection a message came on (a zmq.Frame of it), or None."""
    try:
        return parse_peer_address(frame.get(PEER_PROPERTY))
    except Exception:  # zmq.ZMQError when the property is missing; TypeError on odd values
        return None


def group_list(uid: int, gid: int) -> frozenset[int]:
    """The groups of user `uid` from the group database, with `gid` (the peer's own) among them.

    A uid without a passwd entry has only the gid it connected with."""
    try:
        name = pwd.getpwuid(uid).pw_name
        return frozenset(os.getgrouplist(name, gid))
    except (KeyError, OSError):
        return frozenset((gid,))


class GroupCache:
    """group_list with a time-to-live: the lookup may go to NSS (LDAP, sssd) and the loop must
    not pay for it on every request."""

    def __init__(
        self,
        lookup: Callable[[int, int], frozenset[int]] = group_list,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.lookup = lookup
        self.clock = clock
        self.entries: dict[tuple[int, int], tuple[frozenset[int], float]] = {}

    def groups(self, uid: int, gid: int) -> frozenset[int]:
        now = self.clock()
        entry = self.entries.get((uid, gid))
        if entry is not None and entry[1] > now:
            return entry[0]
        if len(self.entries) >= GROUPS_CACHE_MAX:
            self.entries.clear()  # bounded: a flood of distinct uids cannot grow it
        groups = self.lookup(uid, gid)
        self.entries[(uid, gid)] = (groups, now + GROUPS_TTL_S)
        return groups


def allows(rule: Principals, peer: Peer, groups: Callable[[int, int], frozenset[int]]) -> bool:
    """Whether `rule` admits `peer`: its uid is listed, or one of its groups is."""
    if peer.uid in rule.uids:
        return True
    if not rule.gids:
        return False
    return peer.gid in rule.gids or not rule.gids.isdisjoint(groups(peer.uid, peer.gid))


class Access:
    """The [access] rules of the running config, and the check the master makes per request."""

    def __init__(self, config: AccessConfig) -> None:
        self.config = config
        self.cache = GroupCache()
        self.restricted = {cmd for cmd in ACCESS_COMMANDS if getattr(config, cmd)}

    def reconfigure(self, config: AccessConfig) -> None:
        self.config = config
        self.restricted = {cmd for cmd in ACCESS_COMMANDS if getattr(config, cmd)}
        self.cache.entries.clear()

    def denial(self, cmd: str, frame: Any) -> tuple[str, dict[str, Any]] | None:
        """None if the sender of `frame` (a zmq.Frame of its message) may use `cmd`; else the
        DENIED message and details. Credentials that cannot be read deny (fail closed)."""
        if cmd not in self.restricted:
            return None
        peer = peer_of(frame)
        if peer is None:
            return f"{cmd} is limited by [access] {cmd} and the peer's credentials are unknown", {
                "command": cmd
            }
        if allows(getattr(self.config, cmd), peer, self.cache.groups):
            return None
        details = {"command": cmd, "uid": peer.uid, "gid": peer.gid, "pid": peer.pid}
        return f"uid {peer.uid} may not use {cmd} (see [access] {cmd} in the daemon's config)", details
