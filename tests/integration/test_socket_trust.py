"""Who may have put the control socket where it is: the daemon and the client refuse a path that
a user other than themselves and root could swap.

The attack a review reproduced: another user made `/tmp/workerd-UID -> /tmp`, the daemon bound
its socket in /tmp, and once the link was swapped to the attacker's directory the victim's
`Client.execute` sent its arguments to the attacker's socket and took its forged reply. Here the
world-writable sticky directory is a private copy of /tmp (made with mkdtemp under /tmp, mode
1777), the attacker is uid 65534 through setpriv (root only), and every refusal rule is also
tested on its own, with a real daemon start and a real client connect.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.conftest import Daemon
from workerctl import Client, errors

NOBODY = 65534
AS_ROOT = pytest.mark.skipif(
    os.getuid() != 0 or not shutil.which("setpriv"), reason="needs root and setpriv to act as another user"
)
WORKERCTL = [sys.executable, "-m", "workerctl.cli"]


def refusal(start_daemon: Callable[..., Daemon], socket: str) -> str:
    """Start a daemon on `socket`, which it must refuse: its one line of output."""
    daemon = start_daemon(socket=socket, wait=False, args=["--workers", "1"])
    assert daemon.proc.wait(30) == 69, daemon.output()
    lines = daemon.output().splitlines()
    assert len(lines) == 1 and lines[0].startswith("workerd: "), lines
    assert not os.path.exists(socket)
    return lines[0]


def client_refusal(socket: str) -> str:
    with pytest.raises(errors.UntrustedSocket) as info:
        Client(socket, timeout=5)
    assert info.value.exit_code == errors.EXIT_DENIED
    return info.value.message


@pytest.fixture
def shared() -> Iterator[Path]:
    """A directory like /tmp: root's, world-writable, sticky; reachable by uid 65534."""
    directory = Path(tempfile.mkdtemp(prefix="workerd-trust-"))
    directory.chmod(0o1777)
    try:
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def as_nobody(*command: str, **kwargs: object) -> subprocess.Popen[str]:
    return subprocess.Popen(
        ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", *command],
        text=True,
        cwd="/",
        **kwargs,  # type: ignore[call-overload]
    )


# The attacker: a ROUTER of its own that answers every request with a forged result.
ATTACKER = """
import os, sys, msgpack, zmq
shared, mode = sys.argv[1], sys.argv[2]
evil = os.path.join(shared, "evil")
os.mkdir(evil)
os.chmod(evil, 0o777)
router = zmq.Context.instance().socket(zmq.ROUTER)
router.bind(f"ipc://{evil}/workerd.sock")
os.chmod(f"{evil}/workerd.sock", 0o777)
victim = os.path.join(shared, "victim")
if mode == "link":
    os.symlink(evil, victim)
else:
    os.rename(evil, victim)
print("ready", flush=True)
received = 0
while router.poll(3000):
    peer, _, body, *_ = router.recv_multipart()
    received += 1
    request = msgpack.unpackb(body)
    reply = {"v": 1, "id": request["id"], "ok": True, "result": "forged"}
    router.send_multipart([peer, b"", msgpack.packb(reply)])
print(received, flush=True)
"""


@AS_ROOT
@pytest.mark.parametrize("mode", ["link", "directory"])
def test_another_users_socket_in_a_shared_directory_is_refused_by_both_sides(
    start_daemon: Callable[..., Daemon], shared: Path, mode: str
) -> None:
    victim = str(shared / "victim" / "workerd.sock")
    attacker = as_nobody(sys.executable, "-c", ATTACKER, str(shared), mode, stdout=subprocess.PIPE)
    with attacker:
        assert attacker.stdout is not None and attacker.stdout.readline() == "ready\n"
        message = client_refusal(victim)
        assert f"{shared}/victim belongs to uid {NOBODY}, in {shared} where everyone may" in message
        cli = subprocess.run([*WORKERCTL, "--socket", victim, "ping"], capture_output=True, text=True)
        assert cli.returncode == errors.EXIT_DENIED and "refusing to connect" in cli.stderr
        assert attacker.stdout.readline() == "0\n"  # not one request reached the attacker
    # The daemon refuses the same directory (which it would otherwise bind in, the link
    # followed into the attacker's).
    os.unlink(f"{shared}/victim/workerd.sock")
    line = refusal(start_daemon, victim)
    assert ("is a symbolic link" if mode == "link" else f"belongs to uid {NOBODY}, not to us") in line


@AS_ROOT
def test_the_daemon_refuses_a_link_to_a_shared_directory(
    start_daemon: Callable[..., Daemon], shared: Path
) -> None:
    """The first step of the attack: /tmp/workerd-UID -> /tmp, planted by someone else."""
    link = as_nobody("ln", "-s", str(shared), str(shared / "victim"))
    assert link.wait(10) == 0
    line = refusal(start_daemon, str(shared / "victim" / "workerd.sock"))
    assert f"socket directory {shared}/victim is a symbolic link; refusing it" in line
    assert os.listdir(shared) == ["victim"]  # nothing bound, no lock file made in /tmp's stead


@pytest.mark.parametrize(
    ("mode", "fragment"),
    [
        (0o1777, "is writable by its group or others (mode 1777)"),  # as /tmp itself
        (0o777, "is writable by its group or others (mode 0777)"),
        (0o770, "is writable by its group or others (mode 0770)"),
    ],
)
def test_the_daemon_refuses_a_directory_others_may_write(
    start_daemon: Callable[..., Daemon], tmp_path: Path, mode: int, fragment: str
) -> None:
    directory = tmp_path / "run"
    directory.mkdir()
    directory.chmod(mode)
    assert fragment in refusal(start_daemon, str(directory / "workerd.sock"))


def test_the_daemon_refuses_other_owners_links_and_open_parents(
    start_daemon: Callable[..., Daemon], tmp_path: Path
) -> None:
    real = tmp_path / "real"
    real.mkdir(mode=0o750)
    (tmp_path / "link").symlink_to(real)
    assert "socket directory" in refusal(start_daemon, str(tmp_path / "link" / "workerd.sock"))
    if os.getuid() == 0:
        os.chown(real, NOBODY, NOBODY)
        assert f"belongs to uid {NOBODY}, not to us" in refusal(start_daemon, str(real / "workerd.sock"))
        os.chown(real, 0, 0)
    # A parent anyone may write to without the sticky bit: our directory could be renamed away.
    parent = tmp_path / "open"
    (parent / "run").mkdir(parents=True, mode=0o750)
    parent.chmod(0o777)
    line = refusal(start_daemon, str(parent / "run" / "workerd.sock"))
    assert f"{parent} is writable by its group or others (mode 0777), who could swap {parent}/run" in line
    # A link where the lock goes must not make us create or lock a file elsewhere.
    target = tmp_path / "elsewhere"
    (real / "workerd.sock.lock").symlink_to(target)
    line = refusal(start_daemon, str(real / "workerd.sock"))
    assert "workerd.sock.lock: is a symbolic link; refusing to start" in line
    assert not target.exists()


def test_the_client_refuses_a_live_daemons_socket_reached_through_a_path_others_could_swap(
    start_daemon: Callable[..., Daemon], tmp_path: Path
) -> None:
    run = tmp_path / "run"
    run.mkdir(mode=0o750)
    daemon = start_daemon(socket=str(run / "workerd.sock"), workers=1)
    (tmp_path / "sock-link").symlink_to(daemon.socket)
    (tmp_path / "dir-link").symlink_to(run)
    (tmp_path / "up").mkdir()
    (tmp_path / "up" / "to").symlink_to("../run")  # a link higher up, in a safe directory: fine
    # ".." goes up from the link's target, as in the kernel (not from "up", as normpath would).
    with Client(str(tmp_path / "up" / "to" / ".." / "run" / "workerd.sock"), timeout=10) as client:
        assert client.ping()["pid"] == daemon.proc.pid
    assert "sock-link is a symbolic link" in client_refusal(str(tmp_path / "sock-link"))
    assert "dir-link is a symbolic link" in client_refusal(str(tmp_path / "dir-link" / "workerd.sock"))
    try:
        run.chmod(0o777)
        assert f"{run} is writable by its group or others" in client_refusal(daemon.socket)
        run.chmod(0o1777)  # sticky: the socket is root's (ours), nobody else may rename it
        with Client(daemon.socket, timeout=10) as client:
            assert client.ping()["pid"] == daemon.proc.pid
        if os.getuid() == 0:
            os.chown(daemon.socket, NOBODY, NOBODY)
            assert f"workerd.sock belongs to uid {NOBODY}, in {run}" in client_refusal(daemon.socket)
    finally:
        run.chmod(0o750)
    with Client(daemon.socket, timeout=10) as client:
        assert client.ping()["pid"] == daemon.proc.pid
