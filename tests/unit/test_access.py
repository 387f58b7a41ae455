"""[access]: parsing the section, reading peer credentials, and the decision, without a socket."""

from __future__ import annotations

import grp
import os
import pwd
from pathlib import Path
from typing import Any

import pytest
import zmq

from workerd import access, config

ROOT_GROUP = grp.getgrgid(0).gr_name


class FakeFrame:
    """What the master hands Access.denial: something with zmq.Frame's get()."""

    def __init__(self, address: Any) -> None:
        self.address = address

    def get(self, name: str) -> Any:
        assert name == access.PEER_PROPERTY
        if self.address is None:
            raise zmq.ZMQError(22)
        return self.address


def load(tmp_path: Path, text: str) -> config.Config:
    path = tmp_path / "c.toml"
    path.write_text(text)
    return config.load(str(path))


def test_entries_resolve_to_uids_and_gids(tmp_path: Path) -> None:
    cfg = load(tmp_path, f'[access]\nexecute = ["root", "@{ROOT_GROUP}", "uid:1234", "gid:99"]\n')
    rule = cfg.access.execute
    assert rule.uids == {0, 1234} and rule.gids == {0, 99}
    assert rule.names == ("root", f"@{ROOT_GROUP}", "uid:1234", "gid:99")
    assert not cfg.access.scale and not cfg.access.reload and not cfg.access.clear_memory


def test_the_default_restricts_nothing() -> None:
    assert config.load(None).access == config.AccessConfig()
    assert access.Access(config.AccessConfig()).restricted == set()


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ('execute = ["no-such-user-xyz"]', "[access] execute: unknown user 'no-such-user-xyz'"),
        ('scale = ["@no-such-group-xyz"]', "[access] scale: unknown group 'no-such-group-xyz'"),
        ('reload = ["uid:abc"]', "[access] reload: 'uid:abc': expected uid:N"),
        ('clear_memory = "root"', "[access] clear_memory: expected a list"),
        ("execute = [0]", "[access] execute: expected a list"),
        ('ping = ["root"]', "[access] unknown key 'ping'"),
    ],
)
def test_mistakes_name_the_key(tmp_path: Path, text: str, fragment: str) -> None:
    with pytest.raises(config.ConfigError) as info:
        load(tmp_path, f"[access]\n{text}\n")
    assert fragment in str(info.value) and str(tmp_path / "c.toml") in str(info.value)


@pytest.mark.parametrize(
    ("text", "peer"),
    [
        ("localhost:0:0:9029", access.Peer(0, 0, 9029)),
        ("localhost:1001:65534:42", access.Peer(1001, 65534, 42)),
        ("localhost", None),
        ("localhost:1:2", None),
        ("localhost:a:2:3", None),
        ("localhost:-1:2:3", None),
        ("", None),
    ],
)
def test_peer_address(text: str, peer: access.Peer | None) -> None:
    assert access.parse_peer_address(text) == peer


def rule(uids: set[int] = set(), gids: set[int] = set()) -> config.Principals:  # noqa: B006
    return config.Principals(("x",), frozenset(uids), frozenset(gids))


def test_allows_by_uid_primary_gid_or_group_database() -> None:
    looked_up: list[tuple[int, int]] = []

    def groups(uid: int, gid: int) -> frozenset[int]:
        looked_up.append((uid, gid))
        return frozenset({gid, 50})

    assert access.allows(rule(uids={7}), access.Peer(7, 100, 1), groups)
    assert not access.allows(rule(uids={7}), access.Peer(8, 100, 1), groups)
    assert looked_up == []  # no group in the rule: no lookup
    assert access.allows(rule(gids={100}), access.Peer(8, 100, 1), groups)  # primary gid
    assert looked_up == []
    assert access.allows(rule(gids={50}), access.Peer(8, 100, 1), groups)  # supplementary
    assert not access.allows(rule(gids={51}), access.Peer(8, 100, 1), groups)


def test_group_list_of_a_real_user_and_of_an_unknown_uid() -> None:
    me = pwd.getpwuid(os.getuid())
    assert set(os.getgrouplist(me.pw_name, me.pw_gid)) == access.group_list(os.getuid(), me.pw_gid)
    assert access.group_list(2**31 - 7, 4242) == {4242}


def test_group_cache_expires_and_stays_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    now = [0.0]
    calls: list[int] = []

    def lookup(uid: int, gid: int) -> frozenset[int]:
        calls.append(uid)
        return frozenset({gid})

    cache = access.GroupCache(lookup, clock=lambda: now[0])
    cache.groups(1, 1)
    cache.groups(1, 1)
    assert calls == [1]
    now[0] += access.GROUPS_TTL_S + 1
    cache.groups(1, 1)
    assert calls == [1, 1]
    monkeypatch.setattr(access, "GROUPS_CACHE_MAX", 10)
    for uid in range(100):
        cache.groups(uid, 0)
    assert len(cache.entries) <= 10


def test_denial_names_the_uid_and_the_command_and_fails_closed() -> None:
    policy = access.Access(config.AccessConfig(scale=rule(uids={5})))
    assert policy.restricted == {"scale"}
    assert policy.denial("ping", FakeFrame(None)) is None  # unrestricted: never reads the frame
    assert policy.denial("scale", FakeFrame("localhost:5:5:1")) is None
    refused = policy.denial("scale", FakeFrame("localhost:6:6:77"))
    assert refused is not None
    message, details = refused
    assert message == "uid 6 may not use scale (see [access] scale in the daemon's config)"
    assert details == {"command": "scale", "uid": 6, "gid": 6, "pid": 77}
    for unreadable in (None, "garbage", 12):
        refused = policy.denial("scale", FakeFrame(unreadable))
        assert refused is not None and "credentials are unknown" in refused[0]
    policy.reconfigure(config.AccessConfig())
    assert policy.denial("scale", FakeFrame("localhost:6:6:77")) is None
