"""The systemd integration, for real where a machine without systemd as PID 1 allows it.

- The shipped unit files pass `systemd-analyze verify` without a single warning, and agree with
  the daemon's constants (exit codes, modes, grace periods); the sysusers.d and tmpfiles.d
  snippets apply cleanly to a scratch root.
- The notify protocol is checked against a real AF_UNIX datagram socket standing in for
  systemd's, with SO_PASSCRED so every datagram's sender is known (NotifyAccess=main).
- Socket activation runs under `systemd-socket-activate`, which does for one socket what
  systemd does for workerd.socket: listen, wait for the first connection, then exec the daemon
  with LISTEN_FDS=1 and the socket as fd 3.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import signal
import socket
import stat
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from tests.conftest import BASE_CONFIG, Daemon, wait_until
from workerctl import Client, paths
from workerd import cli, control, master
from workerd import config as configuration
from workerd.config import DaemonConfig

REPO = Path(__file__).resolve().parents[2]
UNITS = REPO / "systemd"
BIN = Path(sys.executable).parent
SYSTEMD_ANALYZE = shutil.which("systemd-analyze")
SOCKET_ACTIVATE = shutil.which("systemd-socket-activate")
needs_analyze = pytest.mark.skipif(SYSTEMD_ANALYZE is None, reason="systemd-analyze is not installed")
needs_activate = pytest.mark.skipif(
    SOCKET_ACTIVATE is None, reason="systemd-socket-activate is not installed"
)

# Variables through which systemd talks to a service; a test sets the ones it means to.
SYSTEMD_ENV = (
    "NOTIFY_SOCKET",
    "WATCHDOG_USEC",
    "WATCHDOG_PID",
    "LISTEN_FDS",
    "LISTEN_PID",
    "LISTEN_FDNAMES",
    "RUNTIME_DIRECTORY",
    "WORKERD_SOCKET",
)


def installed_script(name: str) -> str:
    """The console script pip installed next to this interpreter (what ExecStart= runs)."""
    script = BIN / name
    if script.exists():
        return str(script)
    found = shutil.which(name)
    if found is None:
        pytest.skip(f"the {name} console script is not installed")
    return found


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in SYSTEMD_ENV}
    env.update(extra)
    return env


def workerctl(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """workerctl as a real process, the way a user or a script runs it."""
    return subprocess.run(
        [installed_script("workerctl"), *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=env or clean_env(),
    )


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[Callable[..., subprocess.Popen[bytes]]]:
    """Start a command in its own session, logging to a file; kill what is left at the end.

    For daemons the conftest fixture cannot start: another launcher in front (sh, the socket
    activator), no --socket flag, a chosen umask. The session is ours alone, so killing its
    process group at the end reaps the daemon, its zygote and its workers, and nothing else.
    """
    started: list[subprocess.Popen[bytes]] = []
    logs = []

    def start(command: list[str], env: dict[str, str], umask: int = -1, log: str = "spawn.log") -> Any:
        handle = open(tmp_path / log, "ab")  # noqa: SIM115 - closed at teardown
        logs.append(handle)
        proc = subprocess.Popen(
            command, stdout=handle, stderr=subprocess.STDOUT, env=env, umask=umask, start_new_session=True
        )
        started.append(proc)
        return proc

    yield start
    for proc in started:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # its session: the daemon and its children
        except (ProcessLookupError, PermissionError):
            pass
        if proc.poll() is None:
            proc.wait(5)
    for handle in logs:
        handle.close()


def accepts(path: Path | str) -> bool:
    """Whether something listens on the socket: its file appears at bind(), before listen()."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except OSError:
        return False
    finally:
        probe.close()
    return True


def write_config(tmp_path: Path, workers: int = 1) -> str:
    path = tmp_path / "workerd.toml"
    path.write_text(BASE_CONFIG.format(workers=workers))
    return str(path)


def log_of(tmp_path: Path, name: str = "spawn.log") -> str:
    return (tmp_path / name).read_text(errors="replace")


# -- unit files ----------------------------------------------------------------------------------


def parse_unit(path: Path) -> dict[str, dict[str, list[str]]]:
    """A unit file as {section: {key: [values in order]}}: keys may repeat (DeviceAllow=)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] = {}
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        key, _, value = line.partition("=")
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def one(unit: dict[str, dict[str, list[str]]], section: str, key: str) -> str:
    values = unit[section].get(key, [])
    assert len(values) == 1, f"[{section}] {key}= is set {len(values)} times"
    return values[0]


def analyze(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    assert SYSTEMD_ANALYZE is not None
    base = clean_env(
        # Pin what systemd-analyze prints: warnings and up, no colours, no pager, plain text.
        SYSTEMD_LOG_LEVEL="info",
        SYSTEMD_LOG_COLOR="0",
        SYSTEMD_PAGER="",
        LC_ALL="C.UTF-8",
    )
    return subprocess.run(
        [SYSTEMD_ANALYZE, *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**base, **(env or {})},
    )


def system_units_for_verify(directory: Path, units: Path = UNITS, workerd: str = "") -> tuple[Path, Path]:
    """Copies of the system units in `units` that `verify` can check on this machine.

    verify insists that ExecStart='s binary exists; /usr/local/bin/workerd is where
    scripts/install links it, which is not where this test environment's is (or, for an install
    under --root, `workerd`). That one path is the only difference from the files given.
    """
    directory.mkdir()
    shipped = (units / "workerd.service").read_text()
    original = "ExecStart=/usr/local/bin/workerd "
    assert shipped.count(original) == 1
    service = directory / "workerd.service"
    service.write_text(shipped.replace(original, f"ExecStart={workerd or installed_script('workerd')} "))
    # The socket's Service= must resolve: verify finds units beside the one it is given.
    socket_unit = directory / "workerd.socket"
    shutil.copyfile(units / "workerd.socket", socket_unit)
    return service, socket_unit


@needs_analyze
@pytest.mark.parametrize("name", ["workerd.service", "workerd.socket"])
def test_system_units_verify_without_warnings(tmp_path: Path, name: str) -> None:
    service, socket_unit = system_units_for_verify(tmp_path / "units")
    unit = service if name == "workerd.service" else socket_unit
    # --man=no: no Documentation=man: pages to look up (there are none, and a missing man(1)
    # would be this machine's problem, not the unit's). Dependencies are checked recursively.
    result = analyze("verify", "--man=no", str(unit))
    assert (result.returncode, result.stderr, result.stdout) == (0, "", "")


@needs_analyze
def test_user_unit_verifies_without_warnings(tmp_path: Path) -> None:
    """The user unit, byte for byte: %h points at a home whose ~/.local/bin holds workerd."""
    home = tmp_path / "home"
    (home / ".local" / "bin").mkdir(parents=True)
    (home / ".local" / "bin" / "workerd").symlink_to(installed_script("workerd"))
    runtime = tmp_path / "xdg"  # a user manager needs $XDG_RUNTIME_DIR; this machine has none
    runtime.mkdir(mode=0o700)
    units = tmp_path / "units"
    units.mkdir()
    shutil.copyfile(UNITS / "user" / "workerd.service", units / "workerd.service")
    result = analyze(
        "--user",
        "verify",
        "--man=no",
        str(units / "workerd.service"),
        env={"HOME": str(home), "XDG_RUNTIME_DIR": str(runtime)},
    )
    assert (result.returncode, result.stderr, result.stdout) == (0, "", "")


@needs_analyze
def test_verify_reports_what_it_should(tmp_path: Path) -> None:
    """The check above is not vacuous: a bad key and a wrong value are reported on stderr."""
    service, _ = system_units_for_verify(tmp_path / "units")
    service.write_text(service.read_text().replace("KillMode=mixed", "KillMode=mixd\nRestartSecs=1"))
    result = analyze("verify", "--man=no", str(service))
    assert "Failed to parse kill mode" in result.stderr
    assert "Unknown key 'RestartSecs'" in result.stderr


@needs_analyze
def test_service_hardening_exposure(tmp_path: Path) -> None:
    """`systemd-analyze security` rates the service at most 4.0 ("OK"); it was 3.1 when written.

    The remaining exposure is deliberate: device access for the GPU, network for tasks, no
    syscall filter or W^X for arbitrary task code (the unit says why for each).
    """
    service, _ = system_units_for_verify(tmp_path / "units")
    result = analyze("security", "--offline=yes", "--threshold=40", "--no-pager", str(service))
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr
    assert "Overall exposure level for workerd.service" in result.stdout


def test_units_agree_with_the_daemon() -> None:
    service = parse_unit(UNITS / "workerd.service")
    socket_unit = parse_unit(UNITS / "workerd.socket")
    user = parse_unit(UNITS / "user" / "workerd.service")
    for unit in (service, user):
        assert one(unit, "Service", "Type") == "notify"
        assert one(unit, "Service", "NotifyAccess") == "main"
        assert one(unit, "Service", "ExecReload") == "/bin/kill -HUP $MAINPID"
        assert one(unit, "Service", "Restart") == "on-failure"
        # The daemon's named exit codes for what a restart cannot fix.
        prevented = {int(code) for code in one(unit, "Service", "RestartPreventExitStatus").split()}
        assert {cli.EXIT_CONFIG, cli.EXIT_UNAVAILABLE} <= prevented
        # systemd must not SIGKILL a daemon that is still inside its own grace period.
        grace = DaemonConfig().stop_timeout_s + master.EXIT_WAIT_S
        assert float(one(unit, "Service", "TimeoutStopSec")) > grace
        assert float(one(unit, "Service", "WatchdogSec")) > 0
        assert one(unit, "Service", "RuntimeDirectory") == "workerd"
        # Nothing may hide /dev/nvidia* from the GPU worker.
        assert unit["Service"].get("PrivateDevices", ["no"]) == ["no"]
        assert unit["Service"].get("DevicePolicy", ["auto"]) == ["auto"]
    assert one(service, "Service", "ExecStart") == "/usr/local/bin/workerd --config /etc/workerd/workerd.toml"
    assert one(user, "Service", "ExecStart") == "%h/.local/bin/workerd"
    assert "User" not in user["Service"]
    assert one(service, "Service", "User") == one(service, "Service", "Group") == "workerd"
    assert one(service, "Service", "UMask") == "0007"
    assert int(one(service, "Service", "RuntimeDirectoryMode"), 8) == control.DIRECTORY_MODE
    assert one(service, "Service", "StateDirectory") == "workerd"
    assert one(service, "Service", "KillMode") == "mixed"
    # The socket unit serves the path clients look for first, with the daemon's own modes.
    assert one(socket_unit, "Socket", "ListenStream") == paths.SYSTEM_SOCKET
    assert os.path.dirname(paths.SYSTEM_SOCKET) == "/run/" + one(service, "Service", "RuntimeDirectory")
    assert int(one(socket_unit, "Socket", "SocketMode"), 8) == control.SOCKET_MODE
    assert int(one(socket_unit, "Socket", "DirectoryMode"), 8) == control.DIRECTORY_MODE
    assert one(socket_unit, "Socket", "SocketUser") == one(socket_unit, "Socket", "SocketGroup") == "workerd"
    assert one(socket_unit, "Socket", "Service") == "workerd.service"
    assert one(service, "Unit", "Requires") == one(service, "Unit", "After") == "workerd.socket"


@pytest.mark.skipif(shutil.which("systemd-sysusers") is None, reason="systemd-sysusers is not installed")
@pytest.mark.skipif(shutil.which("systemd-tmpfiles") is None, reason="systemd-tmpfiles is not installed")
@pytest.mark.skipif(os.geteuid() != 0, reason="systemd-tmpfiles --root needs root to chown")
def test_sysusers_and_tmpfiles_apply_to_a_scratch_root(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    sysusers = UNITS / "sysusers.d" / "workerd.conf"
    tmpfiles = UNITS / "tmpfiles.d" / "workerd.conf"
    env = clean_env(SYSTEMD_LOG_LEVEL="warning", SYSTEMD_LOG_COLOR="0")
    run = subprocess.run(
        ["systemd-sysusers", f"--root={root}", str(sysusers)], capture_output=True, text=True, env=env
    )
    assert (run.returncode, run.stderr) == (0, "")
    user = next(
        line for line in (root / "etc/passwd").read_text().splitlines() if line.startswith("workerd:")
    )
    _, _, uid, gid, _, home, shell = user.split(":")
    assert home == "/var/lib/workerd"  # the service's StateDirectory
    assert shell.endswith("nologin")
    assert re.search(rf"^workerd:x:{gid}:", (root / "etc/group").read_text(), re.MULTILINE)
    # tmpfiles resolves workerd in the scratch root's /etc/passwd, as it would on first boot.
    run = subprocess.run(
        ["systemd-tmpfiles", "--create", f"--root={root}", str(tmpfiles)],
        capture_output=True,
        text=True,
        env=env,
    )
    assert (run.returncode, run.stderr) == (0, "")
    info = os.stat(root / "run/workerd")
    assert (stat.S_IMODE(info.st_mode), info.st_uid, info.st_gid) == (0o750, int(uid), int(gid))
    info = os.stat(root / "etc/workerd")
    assert (stat.S_IMODE(info.st_mode), info.st_uid, info.st_gid) == (0o750, 0, int(gid))
    config = root / "etc/workerd/workerd.toml"
    info = os.stat(config)
    assert (stat.S_IMODE(info.st_mode), info.st_uid, info.st_gid) == (0o640, 0, int(gid))
    check = subprocess.run(
        [installed_script("workerd"), "--check-config", str(config)], capture_output=True, text=True
    )
    assert check.returncode == 0, check.stderr
    # It is the embedded default written out: a fresh install under systemd serves what
    # `workerd` with no config does.
    starter = dataclasses.replace(configuration.load(str(config)), source="")
    assert starter == dataclasses.replace(configuration.load(None), source="")
    # An operator's edit is never overwritten by a later run (tmpfiles `f` creates, never replaces).
    config.write_text("[pool]\nworkers = 3\n")
    subprocess.run(["systemd-tmpfiles", "--create", f"--root={root}", str(tmpfiles)], check=True, env=env)
    assert config.read_text() == "[pool]\nworkers = 3\n"


# -- the notify protocol -------------------------------------------------------------------------


class NotifySocket:
    """Systemd's side of sd_notify: a datagram socket that records who sent what, and when.

    It is drained by a thread for as long as it is open: a notify socket nobody reads fills up,
    and then the daemon's next send blocks its loop (as it would with libsystemd's sd_notify).
    """

    def __init__(self, path: Path) -> None:
        self.path = str(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        # Ask the kernel for each sender's credentials: how systemd enforces NotifyAccess=main.
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.sock.settimeout(0.05)
        self.messages: list[tuple[float, int, list[str]]] = []  # (monotonic time, pid, lines)
        self.lock = threading.Lock()
        self.closed = threading.Event()
        self.thread = threading.Thread(target=self.drain, daemon=True)
        self.thread.start()

    def drain(self) -> None:
        creds_size = struct.calcsize("3i")
        while not self.closed.is_set():
            try:
                data, ancillary, _, _ = self.sock.recvmsg(4096, socket.CMSG_SPACE(creds_size))
            except TimeoutError:
                continue
            except OSError:
                return
            pid = -1
            for level, kind, payload in ancillary:
                if (level, kind) == (socket.SOL_SOCKET, socket.SCM_CREDENTIALS):
                    pid = struct.unpack("3i", payload[:creds_size])[0]
            with self.lock:
                self.messages.append((time.monotonic(), pid, data.decode().split("\n")))

    def snapshot(self) -> list[tuple[float, int, list[str]]]:
        with self.lock:
            return list(self.messages)

    def wait_for(self, line: str, after: int = 0, timeout: float = 20.0) -> int:
        """The index of the first message from index `after` on that has `line`."""

        def found() -> int | None:
            for index, (_, _, lines) in enumerate(self.snapshot()[after:], start=after):
                if line in lines:
                    return index + 1  # +1 so that index 0 is truthy; undone below
            return None

        return int(wait_until(found, timeout)) - 1

    def count(self, line: str, after: int = 0) -> int:
        return sum(line in lines for _, _, lines in self.snapshot()[after:])

    def close(self) -> None:
        self.closed.set()
        self.thread.join(5)
        self.sock.close()


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[NotifySocket]:
    listener = NotifySocket(tmp_path / "notify.sock")
    yield listener
    listener.close()


def value_of(lines: list[str], key: str) -> str | None:
    for line in lines:
        if line.startswith(key + "="):
            return line.split("=", 1)[1]
    return None


def test_notify_ready_watchdog_reload_stop(
    start_daemon: Callable[..., Daemon], notify_socket: NotifySocket, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in SYSTEMD_ENV:  # the daemon's environment is ours plus `env`: WATCHDOG_PID unset
        monkeypatch.delenv(name, raising=False)
    env = {"NOTIFY_SOCKET": notify_socket.path, "WATCHDOG_USEC": "200000"}
    daemon = start_daemon(workers=1, env=env, wait=False)

    ready = notify_socket.wait_for("READY=1")
    # READY=1 means "serving": a client that connects on the strength of it gets an answer.
    with Client(daemon.socket, timeout=5.0) as client:
        assert client.ping()["pid"] == daemon.proc.pid
    messages = notify_socket.snapshot()
    assert value_of(messages[ready][2], "STATUS") == f"serving {daemon.socket}"
    assert any(value_of(lines, "STATUS") for _, _, lines in messages[:ready]), "no STATUS= before READY=1"

    # WATCHDOG_USEC=200000 asks for a ping at least every 0.2 s; the daemon pings every 0.1 s.
    wait_until(lambda: notify_socket.count("WATCHDOG=1", after=ready) >= 5, timeout=5)

    # The zygote and the workers must not be able to speak for the service.
    daemon.wait_ready()
    children = psutil.Process(daemon.proc.pid).children(recursive=True)
    assert children, "no zygote or workers"
    for child in children:
        leaked = {"NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"} & set(child.environ())
        assert not leaked, f"{child.pid} inherited {leaked}"

    mark = len(notify_socket.snapshot())
    daemon.proc.send_signal(signal.SIGHUP)
    reloading = notify_socket.wait_for("RELOADING=1", after=mark)
    now_usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    lines = notify_socket.snapshot()[reloading][2]
    usec = value_of(lines, "MONOTONIC_USEC")
    assert usec is not None and usec.isdigit(), lines
    assert 0 <= now_usec - int(usec) < 10_000_000  # CLOCK_MONOTONIC, taken as the reload began
    notify_socket.wait_for("READY=1", after=reloading + 1)  # the reload is done
    with Client(daemon.socket, timeout=5.0) as client:
        assert client.ping()["pid"] == daemon.proc.pid

    mark = len(notify_socket.snapshot())
    daemon.proc.send_signal(signal.SIGTERM)
    notify_socket.wait_for("STOPPING=1", after=mark)
    assert daemon.proc.wait(20) == 0
    time.sleep(0.1)  # let the drain thread take in anything sent just before the exit
    final = notify_socket.snapshot()
    # Every datagram came from the main process: NotifyAccess=main would accept them all.
    assert {pid for _, pid, _ in final} == {daemon.proc.pid}
    assert not any("READY=1" in lines for _, _, lines in final[mark:]), "READY=1 after STOPPING=1"


@pytest.mark.parametrize("owner", ["self", "other"])
def test_watchdog_pid_names_who_must_ping(
    tmp_path: Path, spawn: Callable[..., subprocess.Popen[bytes]], notify_socket: NotifySocket, owner: str
) -> None:
    """systemd sets WATCHDOG_PID to the main pid; a daemon that is not that pid must not ping."""
    sock = str(tmp_path / "workerd.sock")
    command = f"{sys.executable} -m workerd --socket {sock} --config {write_config(tmp_path)}"
    # The shell's pid is the daemon's after exec, just as systemd's fork is the service's.
    pid_expr = "$$" if owner == "self" else "1"
    env = clean_env(NOTIFY_SOCKET=notify_socket.path, WATCHDOG_USEC="200000")
    proc = spawn(["/bin/sh", "-c", f"WATCHDOG_PID={pid_expr} exec {command}"], env)
    notify_socket.wait_for("READY=1")
    time.sleep(0.6)  # six pings' worth at the 0.1 s interval
    pings = notify_socket.count("WATCHDOG=1")
    if owner == "self":
        assert pings >= 3
    else:
        assert pings == 0
    assert proc.poll() is None


# -- socket activation ---------------------------------------------------------------------------


def process_name(pid: int) -> str:
    return Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode()


@needs_activate
def test_socket_activation_starts_the_daemon_on_first_connection(
    tmp_path: Path, spawn: Callable[..., subprocess.Popen[bytes]]
) -> None:
    assert SOCKET_ACTIVATE is not None
    sock = str(tmp_path / "workerd.sock")
    command = [
        *(SOCKET_ACTIVATE, "-l", sock),
        *(sys.executable, "-m", "workerd", "--socket", sock, "--workers", "1"),
        *("--config", write_config(tmp_path)),
    ]
    # systemd 252's activator has no --now: it listens, waits for a connection, then execs.
    proc = spawn(command, clean_env())
    wait_until(lambda: os.path.exists(sock) and stat.S_ISSOCK(os.lstat(sock).st_mode))
    listening = os.lstat(sock)
    time.sleep(0.5)
    # Nobody has connected yet: the activator holds the socket and the daemon has not started.
    assert proc.poll() is None
    assert os.path.basename(process_name(proc.pid)) == "systemd-socket-activate"
    assert not psutil.Process(proc.pid).children()
    assert "Communication attempt" not in log_of(tmp_path)

    # The first connection starts it, and that very client gets its answer.
    result = workerctl("--socket", sock, "--json", "ping")
    assert result.returncode == 0, result.stderr + log_of(tmp_path)
    pong = json.loads(result.stdout)
    assert pong["pid"] == proc.pid  # the activator exec'd into the daemon: same pid, as systemd
    assert process_name(proc.pid) == sys.executable

    # It adopted fd 3 rather than binding anew: same socket file, same inode, same mode.
    status = json.loads(workerctl("--socket", sock, "--json", "status").stdout)
    assert status["socket"] == sock
    now = os.lstat(sock)
    assert (now.st_ino, now.st_mode) == (listening.st_ino, listening.st_mode)
    with Client(sock, timeout=10.0) as client:
        wait_until(lambda: client.status()["state"] == "running")
        assert client.execute("workerd.examples.tasks:echo", 2, 3)["args"] == [2, 3]

    proc.send_signal(signal.SIGTERM)
    assert proc.wait(20) == 0, log_of(tmp_path)
    # The socket belongs to whoever passed it (the socket unit): the daemon leaves it in place,
    # so the next connection can start the service again.
    assert os.lstat(sock).st_ino == listening.st_ino


@needs_activate
def test_socket_activation_with_two_sockets_is_refused(
    tmp_path: Path, spawn: Callable[..., subprocess.Popen[bytes]]
) -> None:
    assert SOCKET_ACTIVATE is not None
    first, second = str(tmp_path / "a.sock"), str(tmp_path / "b.sock")
    command = [
        *(SOCKET_ACTIVATE, "-l", first, "-l", second),
        *(sys.executable, "-m", "workerd", "--workers", "1", "--config", write_config(tmp_path)),
    ]
    proc = spawn(command, clean_env())
    wait_until(lambda: os.path.exists(first) and os.path.exists(second))
    poke = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    poke.connect(first)
    poke.close()
    assert proc.wait(20) == cli.EXIT_UNAVAILABLE  # RestartPreventExitStatus: no restart loop
    assert "systemd passed 2 sockets; workerd takes exactly one" in log_of(tmp_path)


# -- claiming the socket -------------------------------------------------------------------------


def test_second_daemon_on_a_live_socket_exits_69(start_daemon: Callable[..., Daemon], tmp_path: Path) -> None:
    daemon = start_daemon(workers=1)
    before = os.lstat(daemon.socket)
    second = subprocess.run(
        [installed_script("workerd"), "--socket", daemon.socket, "--workers", "1"],
        capture_output=True,
        text=True,
        timeout=30,
        env=clean_env(),
    )
    assert second.returncode == cli.EXIT_UNAVAILABLE == 69
    message = second.stderr.strip().splitlines()[-1]
    assert message == f"workerd: another workerd is already serving {daemon.socket}; refusing to start"
    # The first daemon keeps its socket (libzmq would have unlinked it to bind) and answers.
    assert os.lstat(daemon.socket).st_ino == before.st_ino
    result = workerctl("--socket", daemon.socket, "--json", "ping")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["pid"] == daemon.proc.pid


def test_stale_socket_file_is_cleaned_and_the_daemon_starts(
    start_daemon: Callable[..., Daemon], tmp_path: Path
) -> None:
    path = tmp_path / "workerd.sock"
    leftover = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    leftover.bind(str(path))
    leftover.close()  # what a SIGKILLed daemon leaves: a socket file nobody listens on
    os.chmod(path, 0o600)
    daemon = start_daemon(workers=1)
    # Replaced, not reused: the file now has the daemon's mode (inode numbers get recycled).
    assert stat.S_IMODE(os.lstat(path).st_mode) == 0o660
    with daemon.client() as client:
        assert client.ping()["pid"] == daemon.proc.pid


@pytest.mark.parametrize("umask", [0o000, 0o007, 0o022, 0o077], ids=lambda umask: f"umask{umask:03o}")
def test_socket_and_directory_modes_whatever_the_umask(
    tmp_path: Path, spawn: Callable[..., subprocess.Popen[bytes]], umask: int
) -> None:
    """0660 and 0750 however the daemon is started (the unit's UMask=0007, a shell's 022, ...)."""
    sock = tmp_path / "run" / "workerd" / "workerd.sock"
    command = [installed_script("workerd"), "--socket", str(sock), "--config", write_config(tmp_path)]
    proc = spawn(command, clean_env(), umask=umask)
    wait_until(lambda: proc.poll() is not None or accepts(sock))
    assert proc.poll() is None, log_of(tmp_path)
    assert stat.S_IMODE(os.lstat(sock).st_mode) == control.SOCKET_MODE == 0o660
    assert stat.S_IMODE(os.stat(sock.parent).st_mode) == control.DIRECTORY_MODE == 0o750
    with Client(str(sock), timeout=10.0) as client:
        assert client.ping()["pid"] == proc.pid


def test_runtime_directory_is_where_daemon_and_client_meet(
    tmp_path: Path, spawn: Callable[..., subprocess.Popen[bytes]]
) -> None:
    """Without --socket, as the units run it: systemd's RuntimeDirectory= sets $RUNTIME_DIRECTORY."""
    runtime = tmp_path / "runtime" / "workerd"
    runtime.mkdir(parents=True, mode=0o750)  # systemd creates it (RuntimeDirectoryMode=0750)
    proc = spawn(
        [installed_script("workerd"), "--config", write_config(tmp_path)],
        clean_env(RUNTIME_DIRECTORY=str(runtime)),
        umask=0o007,
    )
    sock = runtime / "workerd.sock"
    wait_until(lambda: proc.poll() is not None or accepts(sock))
    assert proc.poll() is None, log_of(tmp_path)
    assert stat.S_IMODE(os.lstat(sock).st_mode) == 0o660
    # A process of the same service (or a drop-in ExecStartPost=) finds it the same way...
    result = workerctl("--json", "ping", env=clean_env(RUNTIME_DIRECTORY=str(runtime)))
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["pid"] == proc.pid
    # ...and so does the user's shell for the user unit, where %t/workerd is
    # $XDG_RUNTIME_DIR/workerd, unless a system daemon's socket exists (it comes first).
    if not os.path.exists(paths.SYSTEM_SOCKET):
        result = workerctl("--json", "ping", env=clean_env(XDG_RUNTIME_DIR=str(runtime.parent)))
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout)["pid"] == proc.pid
