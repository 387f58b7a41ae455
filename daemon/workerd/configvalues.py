"""How each config value is read: a checker per kind of value, returning it or raising
ValueError that says what was expected (config.py names the file, section and key).

Runs in: both, with config.py (the master reads the file with it; children import config.py).
"""

from __future__ import annotations

import dataclasses
import grp
import ipaddress
import os
import pwd
import re
from collections.abc import Callable
from typing import Any

MODULE_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")


@dataclasses.dataclass(frozen=True)
class Principals:
    """Who may use one command: users (by uid) and members of groups (by gid).

    Empty means anyone who can connect to the socket (its mode and group are the first gate).
    Names are resolved when the config is read: a user or group created later needs a reload."""

    names: tuple[str, ...] = ()  # as written: "alice", "@ops", "uid:1000", "gid:50"
    uids: frozenset[int] = frozenset()
    gids: frozenset[int] = frozenset()

    def __bool__(self) -> bool:
        return bool(self.names)


Checker = Callable[[Any], Any]


def integer(minimum: int = 0, maximum: int | None = None) -> Checker:
    def check(value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ValueError(f"expected an integer >= {minimum}")
        if maximum is not None and value > maximum:
            raise ValueError(f"expected an integer from {minimum} to {maximum}")
        return value

    return check


def number(minimum: float = 0.0, exclusive: bool = False) -> Checker:
    def check(value: Any) -> float:
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        if not ok or value < minimum or (exclusive and value == minimum):
            raise ValueError(f"expected a number {'>' if exclusive else '>='} {minimum:g}")
        return float(value)

    return check


def boolean(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError("expected true or false")
    return value


def string(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError("expected a string")
    return value


def module_names(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError("expected a list of module names")
    for name in value:
        if not MODULE_NAME.match(name):
            raise ValueError(f"{name!r} is not a module name")
    return tuple(value)


def principals(value: Any) -> Principals:
    """A list of "user", "@group", "uid:N" or "gid:N"; names must exist on this machine."""
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError('expected a list of user names, "@group" names, "uid:N" or "gid:N"')
    uids: set[int] = set()
    gids: set[int] = set()
    for entry in value:
        kind, _, number = entry.partition(":")
        if kind in ("uid", "gid") and number:
            if not number.isdigit():
                raise ValueError(f"{entry!r}: expected {kind}:N with N a number")
            (uids if kind == "uid" else gids).add(int(number))
        elif entry.startswith("@"):
            try:
                gids.add(grp.getgrnam(entry[1:]).gr_gid)
            except KeyError:
                raise ValueError(f"unknown group {entry[1:]!r}") from None
        else:
            try:
                uids.add(pwd.getpwnam(entry).pw_uid)
            except KeyError:
                raise ValueError(f"unknown user {entry!r}") from None
    return Principals(tuple(value), frozenset(uids), frozenset(gids))


LOOPBACK_NAMES = {"localhost": "127.0.0.1"}


def listen_address(value: Any) -> tuple[str, int]:
    """("127.0.0.1", 9464) from "127.0.0.1:9464", "[::1]:9464" or "localhost:9464".

    Loopback only: the metrics say what runs and how much memory it holds, and an HTTP server
    reachable from the network is more than this daemon should open. Port 0 picks a free one
    (`workerctl status` shows which)."""
    if not isinstance(value, str) or ":" not in value:
        raise ValueError('expected "HOST:PORT", e.g. "127.0.0.1:9464"')
    host, _, port = value.rpartition(":")
    host = LOOPBACK_NAMES.get(host, host.removeprefix("[").removesuffix("]"))
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise ValueError(
            "the metrics endpoint listens on a loopback address only (127.0.0.1, ::1, localhost)"
        )
    if not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError("expected a port from 0 to 65535")
    return host, int(port)


def device_indices(value: Any) -> tuple[int, ...]:
    if (
        not isinstance(value, list)
        or not value
        or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value)
    ):
        raise ValueError("expected a non-empty list of device indices (integers >= 0)")
    if len(set(value)) != len(value):
        raise ValueError("a device is listed twice")
    return tuple(value)


def devices(value: Any) -> str | tuple[int, ...]:
    if value == "all":
        return "all"
    try:
        return device_indices(value)
    except ValueError:
        raise ValueError('expected "all" or a non-empty list of device indices, e.g. [0, 1]') from None


def listen(value: Any) -> str:
    if value != "":
        listen_address(value)
    return str(value)


def cluster_address(value: Any) -> str:
    """ "local", or "host:port" of a Ray head (its GCS port, 6379 unless `ray start` was told)."""
    if value == "local":
        return "local"
    if not isinstance(value, str) or ":" not in value:
        raise ValueError('expected "local" or "HOST:PORT" of a Ray head, e.g. "10.0.0.5:6379"')
    host, _, port = value.rpartition(":")
    if not host or "/" in host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError('expected "local" or "HOST:PORT" of a Ray head (a port from 1 to 65535)')
    return value


def engine(value: Any) -> str:
    if value not in ("", "ray"):
        raise ValueError('expected "" (off) or "ray"')
    return str(value)


def one_of(*choices: Any) -> Checker:
    def check(value: Any) -> str:
        # TOML writes `enabled = true`; keep the three-way setting as one string.
        text = str(value).lower() if isinstance(value, bool) else value
        if text not in choices:
            raise ValueError(f"expected one of {', '.join(map(str, choices))}")
        return str(text)

    return check


def module_name(value: Any) -> str:
    if not isinstance(value, str) or not MODULE_NAME.match(value):
        raise ValueError("expected a module name")
    return value


def directories(value: Any) -> tuple[str, ...]:
    """[tasks] path: directory names, as written (config.parse resolves them against the file)."""
    if not isinstance(value, list) or not all(isinstance(v, str) and v and "\0" not in v for v in value):
        raise ValueError("expected a list of directories")
    return tuple(value)


def absolute_path(value: Any) -> str:
    if not isinstance(value, str) or not os.path.isabs(value):
        raise ValueError("expected an absolute file path")
    return value


@dataclasses.dataclass(frozen=True)
class Grants:
    """A number per client ([fairness] weights and max_priority), by systemd unit, user or group.

    The most specific entry wins: the client's unit, then its user, then the highest of its
    groups' (clients.py); a client no entry names gets the section's default."""

    names: tuple[str, ...] = ()  # as written: "alice", "@ops", "uid:1000", "gid:50", "unit:x.service"
    units: dict[str, int] = dataclasses.field(default_factory=dict)
    uids: dict[int, int] = dataclasses.field(default_factory=dict)
    gids: dict[int, int] = dataclasses.field(default_factory=dict)

    def lookup(self, unit: str, uid: int, groups: Callable[[], frozenset[int]], default: int) -> int:
        if unit in self.units:
            return self.units[unit]
        if uid in self.uids:
            return self.uids[uid]
        if not self.gids:
            return default
        mine = groups()
        granted = [value for gid, value in self.gids.items() if gid in mine]
        return max(granted) if granted else default


UNIT_NAME = re.compile(r"^[A-Za-z0-9:_.\\@-]+\.(service|scope|slice|socket|timer)$")


def grants(low: int, high: int) -> Checker:
    """A table of client -> integer from `low` to `high`; clients as in `principals`, or
    "unit:NAME" (a systemd unit, e.g. "unit:ingest.service")."""

    def check(value: Any) -> Grants:
        if not isinstance(value, dict):
            raise ValueError('expected a table, e.g. {"alice" = 2, "@render" = 3, "unit:ingest.service" = 4}')
        units: dict[str, int] = {}
        uids: dict[int, int] = {}
        gids: dict[int, int] = {}
        for key, number in value.items():
            if isinstance(number, bool) or not isinstance(number, int) or not low <= number <= high:
                raise ValueError(f"{key!r}: expected an integer from {low} to {high}")
            if key.startswith("unit:"):
                if not UNIT_NAME.match(key[5:]):
                    raise ValueError(f"{key!r}: expected unit:NAME with NAME a unit such as ingest.service")
                units[key[5:]] = number
                continue
            who = principals([key])
            for uid in who.uids:
                uids[uid] = number
            for gid in who.gids:
                gids[gid] = number
        return Grants(tuple(value), units, uids, gids)

    return check
