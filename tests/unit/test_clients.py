"""clients.py and the [fairness] config on their own: which unit a cgroup path names, which
grant applies to a client, and the config's errors."""

from __future__ import annotations

import pytest

from workerd import config
from workerd.access import GroupCache
from workerd.clients import Clients, unit_of
from workerd.configvalues import grants


@pytest.mark.parametrize(
    ("text", "unit"),
    [
        ("0::/system.slice/ingest.service\n", "ingest.service"),
        ("0::/user.slice/user-1000.slice/user@1000.service/app.slice/render.service\n", "render.service"),
        ("0::/user.slice/user-1000.slice/session-4.scope\n", "session-4.scope"),
        ("0::/system.slice\n", ""),
        ("0::/\n", ""),
        # v1 and hybrid: systemd's own hierarchy says, whatever the unified one shows
        ("9:name=systemd:/system.slice/a.service\n8:pids:/\n0::/\n", "a.service"),
        ("4:memory:/x.service\n", ""),
        ("", ""),
    ],
)
def test_unit_of_reads_the_innermost_unit(text: str, unit: str) -> None:
    assert unit_of(text) == unit


def test_the_most_specific_grant_wins() -> None:
    table = grants(1, 1000)({"unit:a.service": 5, "uid:1000": 3, "gid:50": 2, "gid:60": 4})
    lookup = table.lookup
    assert lookup("a.service", 1000, lambda: frozenset({50}), 1) == 5
    assert lookup("", 1000, lambda: frozenset({50}), 1) == 3
    assert lookup("", 1001, lambda: frozenset({50, 60}), 1) == 4  # the highest of its groups
    assert lookup("", 1001, lambda: frozenset(), 1) == 1

    def no_lookup() -> frozenset[int]:
        raise AssertionError("groups looked up without a group entry")

    assert grants(1, 10)({"uid:7": 2}).lookup("", 8, no_lookup, 1) == 1


@pytest.mark.parametrize(
    ("section", "fragment"),
    [
        ('identity = "pid"', "identity: expected one of uid, unit"),
        ('weights = {"uid:1" = 0}', "expected an integer from 1 to 1000"),
        ('weights = {"uid:1" = true}', "expected an integer from 1 to 1000"),
        ('max_priority = {"uid:1" = 10}', "expected an integer from -9 to 9"),
        ('weights = {"nosuchuser-wd" = 2}', "unknown user"),
        ('weights = {"unit:bad/name" = 2}', "expected unit:NAME"),
        ("weights = [1]", "expected a table"),
    ],
)
def test_fairness_config_errors_name_the_key(section: str, fragment: str) -> None:
    with pytest.raises(config.ConfigError, match=r"\[fairness\]") as caught:
        config.parse(f"[fairness]\n{section}\n", "t.toml")
    assert fragment in str(caught.value)


def test_defaults_need_no_config() -> None:
    parsed = config.parse("", "t.toml")
    assert parsed.fairness.identity == "uid" and parsed.pool.max_queue_per_client == 0
    embedded = config.load(None)
    assert embedded.fairness == parsed.fairness


class Origin:
    """What Clients reads of a message: its connection's Peer-Address."""

    def __init__(self, address: str | None) -> None:
        self.address = address

    def get(self, name: str) -> str:
        if self.address is None:
            raise ValueError("no such property")
        return self.address


def test_clients_are_users_not_connections_and_are_regranted_on_reload() -> None:
    fairness = config.parse('[fairness]\nweights = {"uid:4242" = 3}\n', "t.toml").fairness
    clients = Clients(fairness, GroupCache(lambda uid, gid: frozenset({gid})))
    one, other = clients.of(Origin("localhost:4242:0:100")), clients.of(Origin("localhost:4242:0:200"))
    assert one is other and one.name == "uid:4242" and one.weight == 3
    assert clients.of(Origin(None)).name == "unknown" and clients.of(Origin("garbage")).name == "unknown"
    clients.reconfigure(config.parse("", "t.toml").fairness)
    assert one.weight == 1 and clients.of(Origin("localhost:4242:0:300")) is one
    one.in_flight = 1
    assert [entry["client"] for entry in clients.status()] == ["uid:4242", "unknown"]
    assert clients.status()[0]["share"] == 1.0
