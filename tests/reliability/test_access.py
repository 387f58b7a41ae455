"""Who gets in, with real users and groups created for the test.

Two gates, both checked with `workerctl` (and workerctl.Client) running as those users through
`setpriv --reuid --regid --init-groups`:

1. The socket: mode 0660 in a set-gid directory of the socket group, so only members connect;
   anyone else gets workerctl's exit 77 and one clear line.
2. [access]: execute, clear_memory, scale and reload limited to listed users and groups, checked
   on the peer's credentials (SO_PEERCRED, as libzmq reports them); a denied request gets DENIED
   naming the uid and the command, and workerctl exits 77.

Needs root (useradd, groupadd, setpriv); skipped otherwise.
"""

from __future__ import annotations

import grp
import json
import os
import pwd
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import Daemon
from tests.reliability.harness import report
from workerctl import errors

TOOLS = ("useradd", "userdel", "groupadd", "groupdel", "setpriv")
pytestmark = pytest.mark.skipif(
    os.getuid() != 0 or not all(shutil.which(tool) for tool in TOOLS),
    reason="needs root and useradd/groupadd/setpriv to create users and act as them",
)

ECHO = "workerd.examples.tasks:echo"
NOGROUP = "nogroup"


@dataclass
class Users:
    """The cast: names of real users and groups, unique to this run."""

    socket_group: str  # may connect
    exec_group: str  # may execute
    member: str  # socket group + exec group (supplementary)
    primary: str  # socket group, and the exec group as its primary group
    plain: str  # socket group only
    operator: str  # socket group; named in scale/reload, uid:N in clear_memory
    outsider: str  # no group of ours

    def uid(self, name: str) -> int:
        return pwd.getpwnam(name).pw_uid


def run(*command: str) -> None:
    subprocess.run(command, check=True, capture_output=True, timeout=30)


@pytest.fixture(scope="module")
def users() -> Iterator[Users]:
    tag = secrets.token_hex(3)
    cast = Users(*(f"wd{role}{tag}" for role in ("sock", "exec", "mem", "pri", "pla", "ope", "out")))
    made_users: list[str] = []
    made_groups: list[str] = []
    try:
        for group in (cast.socket_group, cast.exec_group):
            run("groupadd", group)
            made_groups.append(group)
        accounts = {
            cast.member: (NOGROUP, f"{cast.socket_group},{cast.exec_group}"),
            cast.primary: (cast.exec_group, cast.socket_group),
            cast.plain: (NOGROUP, cast.socket_group),
            cast.operator: (NOGROUP, cast.socket_group),
            cast.outsider: (NOGROUP, ""),
        }
        for name, (primary, supplementary) in accounts.items():
            extra = ["-G", supplementary] if supplementary else []
            run("useradd", "-M", "-N", "-s", "/usr/sbin/nologin", "-g", primary, *extra, name)
            made_users.append(name)
        yield cast
    finally:
        for name in made_users:
            subprocess.run(["userdel", name], capture_output=True, timeout=30)
        for group in made_groups:
            subprocess.run(["groupdel", group], capture_output=True, timeout=30)


def as_user(user: str, *command: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run `command` as `user` with its primary group and all its groups from the database."""
    gid = pwd.getpwnam(user).pw_gid
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONDONTWRITEBYTECODE": "1", "HOME": "/"}
    return subprocess.run(
        ["setpriv", f"--reuid={user}", f"--regid={gid}", "--init-groups", *command],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd="/",
    )


def workerctl_as(user: str, socket: str, *args: str) -> subprocess.CompletedProcess[str]:
    return as_user(user, sys.executable, "-m", "workerctl.cli", "--socket", socket, *args)


CLIENT_SCRIPT = """
import json, sys
from workerctl import Client, errors
try:
    with Client(sys.argv[1], timeout=30) as client:
        result = client.execute(sys.argv[2], "hello")
    print(json.dumps({"ok": result}))
except errors.WorkerdError as exc:
    print(json.dumps({"error": type(exc).__name__, "code": exc.code, "details": exc.details}))
"""


@pytest.fixture(scope="module")
def socket_dir(users: Users) -> Iterator[str]:
    """A set-gid directory of the socket group: the daemon's socket inherits the group."""
    directory = tempfile.mkdtemp(prefix="workerd-access-")
    os.chown(directory, 0, grp.getgrnam(users.socket_group).gr_gid)
    os.chmod(directory, 0o2750)
    try:
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def config(users: Users, execute: str | None = None) -> str:
    rule = execute if execute is not None else f'["@{users.exec_group}"]'
    return f"""\
[pool]
workers = 1
[tasks]
modules = ["workerd.examples.tasks"]
[gpu]
enabled = "false"
[access]
execute = {rule}
clear_memory = ["uid:{users.uid(users.operator)}"]
scale = ["{users.operator}"]
reload = ["{users.operator}"]
"""


@pytest.fixture
def guarded(start_daemon: Callable[..., Daemon], users: Users, socket_dir: str) -> Daemon:
    daemon = start_daemon(config=config(users), socket=os.path.join(socket_dir, "workerd.sock"))
    info = os.stat(daemon.socket)
    assert info.st_mode & 0o777 == 0o660
    assert info.st_gid == grp.getgrnam(users.socket_group).gr_gid
    probe = workerctl_as(users.plain, daemon.socket, "--json", "ping")
    if probe.returncode != 0 and "No module named" in probe.stderr:
        pytest.skip(f"the test interpreter is not usable by other users: {probe.stderr.strip()}")
    return daemon


def test_only_the_socket_group_connects(guarded: Daemon, users: Users) -> None:
    outsider = workerctl_as(users.outsider, guarded.socket, "ping")
    assert outsider.returncode == errors.EXIT_DENIED, outsider.stderr
    assert outsider.stderr.strip() == (
        f"workerctl: permission denied on {guarded.socket}: join the socket's group "
        "(e.g. 'workerd') or ask its owner"
    )
    member = workerctl_as(users.plain, guarded.socket, "--json", "ping")
    assert member.returncode == 0, member.stderr
    assert json.loads(member.stdout)["pid"] == guarded.proc.pid


def test_access_rules_on_execute_clear_scale_reload(guarded: Daemon, users: Users) -> None:
    socket = guarded.socket
    outcomes: dict[str, int] = {}

    def check(user: str, expect_ok: bool, *args: str) -> subprocess.CompletedProcess[str]:
        result = workerctl_as(user, socket, *args)
        outcomes[f"{user}:{args[0]}"] = result.returncode
        if expect_ok:
            assert result.returncode == 0, (user, args, result.stderr)
        else:
            command = {"run": "execute", "clear": "clear_memory"}.get(args[0], args[0])
            assert result.returncode == errors.EXIT_DENIED, (user, args, result.stderr)
            assert result.stderr.strip() == (
                f"workerctl: DENIED: uid {users.uid(user)} may not use {command} "
                f"(see [access] {command} in the daemon's config)"
            ), result.stderr
        return result

    # execute: members of the exec group, by supplementary or primary group; nobody else.
    assert check(users.member, True, "--json", "run", ECHO, "--args", '["hi"]').stdout.strip() == '"hi"'
    check(users.primary, True, "run", ECHO, "--args", '["hi"]')
    check(users.plain, False, "run", ECHO, "--args", '["hi"]')
    check(users.operator, False, "run", ECHO, "--args", '["hi"]')
    # Commands without a rule stay open to everyone who can connect.
    check(users.plain, True, "status")
    check(users.plain, True, "memory")
    # clear_memory by uid:N, scale and reload by user name.
    check(users.operator, True, "clear", "--level", "gc")
    check(users.plain, False, "clear", "--level", "gc")
    check(users.member, False, "scale", "2")
    check(users.operator, True, "scale", "2")
    check(users.plain, False, "reload")
    check(users.operator, True, "reload")
    # Root is no exception: it is not listed for execute.
    with guarded.client() as client, pytest.raises(errors.Denied) as info:
        client.execute(ECHO, 1)
    assert info.value.details == {
        "command": "execute",
        "uid": 0,
        "gid": os.getgid(),
        "pid": os.getpid(),
    }
    with guarded.client() as client:
        counters = client.status()["counters"]
    denied = sum(1 for key, code in outcomes.items() if code == errors.EXIT_DENIED) + 1
    report(
        "access",
        commands_tried=len(outcomes) + 1,
        denied=denied,
        counter_access_denied=counters["access_denied"],
    )
    assert counters["access_denied"] == denied


def test_client_library_as_another_user(guarded: Daemon, users: Users) -> None:
    allowed = as_user(users.member, sys.executable, "-c", CLIENT_SCRIPT, guarded.socket, ECHO)
    assert json.loads(allowed.stdout) == {"ok": "hello"}, allowed.stderr
    refused = as_user(users.plain, sys.executable, "-c", CLIENT_SCRIPT, guarded.socket, ECHO)
    outcome = json.loads(refused.stdout)
    assert outcome["error"] == "Denied" and outcome["code"] == "DENIED", refused.stderr
    assert outcome["details"]["uid"] == users.uid(users.plain)
    assert outcome["details"]["command"] == "execute"


def test_reload_applies_new_access_rules_at_once(guarded: Daemon, users: Users) -> None:
    assert workerctl_as(users.plain, guarded.socket, "run", ECHO).returncode == errors.EXIT_DENIED
    assert guarded.config_path.read_text() == config(users)  # the file the SIGHUP rereads
    guarded.config_path.write_text(config(users, execute="[]"))  # open to all who can connect
    guarded.proc.send_signal(signal.SIGHUP)
    with guarded.client() as client:
        client.ping()
    opened = workerctl_as(users.plain, guarded.socket, "--json", "run", ECHO, "--args", '["now"]')
    assert opened.returncode == 0, opened.stderr
    assert opened.stdout.strip() == '"now"'


def test_unknown_names_are_config_errors(users: Users, tmp_path: Path) -> None:
    for text, fragment in (
        (f'[access]\nexecute = ["{users.outsider}x"]\n', "[access] execute: unknown user"),
        (f'[access]\nscale = ["@{users.exec_group}x"]\n', "[access] scale: unknown group"),
    ):
        path = tmp_path / "bad.toml"
        path.write_text(text)
        result = subprocess.run(
            [sys.executable, "-m", "workerd", "--check-config", str(path)],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert result.returncode == 78
        assert str(path) in result.stderr and fragment in result.stderr
