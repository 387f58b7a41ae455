"""The control socket against hostile input, and workerctl's exit codes, on a real daemon."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import msgpack
import pytest
import zmq

from tests.conftest import Daemon, wait_until
from workerctl import Client, errors, protocol

WORKERCTL = [sys.executable, "-m", "workerctl.cli"]


def raw_exchange(path: str, frames: list[bytes], timeout_ms: int = 2000) -> list[bytes] | None:
    """Send frames on a fresh DEALER; the reply frames, or None if none came."""
    context = zmq.Context.instance()
    sock = context.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(f"ipc://{path}")
    try:
        sock.send_multipart(frames)
        if sock.poll(timeout_ms):
            return sock.recv_multipart()
        return None
    finally:
        sock.close()


def error_code(frames: list[bytes] | None) -> str:
    assert frames is not None, "no reply"
    assert frames[0] == b""
    body = msgpack.unpackb(frames[1])
    assert body["ok"] is False
    return str(body["error"]["code"])


def workerctl(
    *args: str, env: dict[str, str] | None = None, user: str | None = None
) -> subprocess.CompletedProcess[str]:
    command = [*WORKERCTL, *args]
    if user:
        command = ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups", *command]
    return subprocess.run(
        command, capture_output=True, text=True, timeout=30, env={**os.environ, **(env or {})}
    )


def test_ping_reports_identity(daemon: Daemon) -> None:
    with daemon.client() as client:
        pong = client.ping()
    assert pong["pid"] == daemon.proc.pid
    assert pong["protocols"] == [1]
    assert pong["uptime_s"] > 0


@pytest.mark.parametrize(
    ("frames", "code"),
    [
        ([b"", b"\xc1not msgpack"], protocol.BAD_REQUEST),
        ([b"", msgpack.packb([1, 2, 3])], protocol.BAD_REQUEST),
        ([b"", msgpack.packb({"v": 1, "cmd": "ping"})], protocol.BAD_REQUEST),
        ([b"", msgpack.packb({"v": 1, "id": 1, "cmd": "fly"})], protocol.UNKNOWN_COMMAND),
        ([b"", msgpack.packb({"v": 99, "id": 1, "cmd": "ping"})], protocol.UNSUPPORTED_VERSION),
        ([b"", msgpack.packb({"v": 1, "id": 1, "cmd": "execute", "name": 5})], protocol.BAD_REQUEST),
        (
            [b"", msgpack.packb({"v": 1, "id": 1, "cmd": "execute", "name": "a:b", "args": {}})],
            protocol.BAD_REQUEST,
        ),
        ([b"", msgpack.packb({"v": 1, "id": 1, "cmd": "scale", "workers": -1})], protocol.BAD_REQUEST),
        (
            [b"", msgpack.packb({"v": 1, "id": 1, "cmd": "clear_memory", "level": "all"})],
            protocol.BAD_REQUEST,
        ),
        ([msgpack.packb({"v": 1, "id": 1, "cmd": "ping"})], protocol.BAD_REQUEST),  # no delimiter
        ([b"", b"x", b"y"], protocol.BAD_REQUEST),
    ],
)
def test_bad_input_gets_a_typed_error_and_the_daemon_keeps_serving(
    daemon: Daemon, frames: list[bytes], code: str
) -> None:
    assert error_code(raw_exchange(daemon.socket, frames)) == code
    with daemon.client() as client:
        assert client.ping()["pid"] == daemon.proc.pid


def test_error_reply_echoes_the_request_id(daemon: Daemon) -> None:
    frames = raw_exchange(daemon.socket, [b"", msgpack.packb({"v": 1, "id": "abc", "cmd": "nope"})])
    assert frames is not None
    assert msgpack.unpackb(frames[1])["id"] == "abc"


def test_oversized_message_is_dropped_and_the_daemon_keeps_serving(
    start_daemon: Callable[..., Daemon],
) -> None:
    config = (
        "[daemon]\nmax_message_mb = 1\n[pool]\nworkers = 1\n[tasks]\nmodules = ['workerd.examples.tasks']\n"
    )
    daemon = start_daemon(config=config)
    big = protocol.encode_request(
        1, "execute", name="workerd.examples.tasks:echo", args=["x" * (2 * 1024 * 1024)]
    )
    assert raw_exchange(daemon.socket, [b"", big], timeout_ms=1000) is None
    with daemon.client() as client:
        assert client.execute("workerd.examples.tasks:echo", "small") == "small"


def test_result_over_the_size_limit_is_a_clear_error(start_daemon: Callable[..., Daemon]) -> None:
    config = (
        "[daemon]\nmax_message_mb = 1\n[pool]\nworkers = 1\n[tasks]\nmodules = ['workerd.examples.tasks']\n"
    )
    daemon = start_daemon(config=config)
    with daemon.client() as client, pytest.raises(errors.TaskError, match=r"over the .* byte message limit"):
        client.execute("workerd.examples.tasks:payload", 2 * 1024 * 1024)
    with daemon.client() as client:
        assert client.execute("workerd.examples.tasks:payload", 10) == b"x" * 10


def test_second_daemon_refuses_a_live_socket(daemon: Daemon, tmp_path: Path) -> None:
    second = subprocess.run(
        [sys.executable, "-m", "workerd", "--socket", daemon.socket, "--workers", "1"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert second.returncode == 69
    assert f"another workerd is already serving {daemon.socket}" in second.stderr
    with daemon.client() as client:
        assert client.ping()["pid"] == daemon.proc.pid


def test_socket_and_directory_modes(start_daemon: Callable[..., Daemon], tmp_path: Path) -> None:
    daemon = start_daemon(socket=str(tmp_path / "sub" / "w.sock"))
    assert os.stat(daemon.socket).st_mode & 0o777 == 0o660
    assert os.stat(tmp_path / "sub").st_mode & 0o777 == 0o750


def test_workerctl_ping_json(daemon: Daemon) -> None:
    result = workerctl("--socket", daemon.socket, "--json", "ping")
    assert result.returncode == 0, result.stderr
    assert f'"pid": {daemon.proc.pid}' in result.stdout


def test_workerctl_finds_the_socket_from_the_environment(daemon: Daemon) -> None:
    result = workerctl("status", env={"WORKERD_SOCKET": daemon.socket})
    assert result.returncode == 0, result.stderr
    assert "state running" in result.stdout


def test_workerctl_not_running(tmp_path: Path) -> None:
    result = workerctl("--socket", str(tmp_path / "absent.sock"), "ping")
    assert result.returncode == errors.EXIT_UNREACHABLE
    assert "is it running?" in result.stderr and result.stderr.count("\n") == 1


def test_workerctl_stale_socket(tmp_path: Path) -> None:
    path = str(tmp_path / "stale.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(path)
    sock.close()  # the file stays, nobody listens: what a crashed daemon leaves
    result = workerctl("--socket", path, "ping")
    assert result.returncode == errors.EXIT_UNREACHABLE
    assert "stale socket" in result.stderr


def test_daemon_cleans_a_stale_socket(start_daemon: Callable[..., Daemon], tmp_path: Path) -> None:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(tmp_path / "workerd.sock"))
    sock.close()
    daemon = start_daemon()
    with daemon.client() as client:
        assert client.ping()["pid"] == daemon.proc.pid


def test_workerctl_timeout(tmp_path: Path) -> None:
    # A peer that accepts the connection and never answers: a wedged daemon.
    path = str(tmp_path / "mute.sock")
    context = zmq.Context.instance()
    mute = context.socket(zmq.ROUTER)
    mute.setsockopt(zmq.LINGER, 0)
    mute.bind(f"ipc://{path}")
    try:
        result = workerctl("--socket", path, "--timeout", "0.3", "ping")
    finally:
        mute.close()
    assert result.returncode == errors.EXIT_TIMEOUT
    assert "no reply from workerd within 0.3 s" in result.stderr


@pytest.mark.skipif(
    os.getuid() != 0 or not shutil.which("setpriv"), reason="needs root and setpriv to act as another user"
)
def test_workerctl_permission_denied(daemon: Daemon, tmp_path: Path) -> None:
    os.chmod(tmp_path, 0o755)  # let 'nobody' reach the socket file itself; its 0660 mode keeps them out
    result = workerctl("--socket", daemon.socket, "ping", user="65534")
    assert result.returncode == errors.EXIT_DENIED, result.stderr
    assert "permission denied" in result.stderr


def test_workerctl_usage_errors(daemon: Daemon) -> None:
    assert workerctl("--socket", daemon.socket, "frobnicate").returncode == errors.EXIT_USAGE
    result = workerctl("--socket", daemon.socket, "run", "workerd.examples.tasks:echo", "--args", "{")
    assert result.returncode == errors.EXIT_USAGE and "--args is not valid JSON" in result.stderr


@pytest.mark.parametrize(
    ("args", "flag", "fragment"),
    [
        (["--timeout", "0", "ping"], "--timeout", "must be a positive number of seconds, got '0'"),
        (["--timeout", "nan", "ping"], "--timeout", "must be a positive number of seconds"),
        (["run", "m:f", "--task-timeout", "-1"], "--task-timeout", "must be a positive number of seconds"),
        (["run", "m:f", "--task-timeout", "inf"], "--task-timeout", "must be a positive number of seconds"),
        (["run", "m:f", "--retries", "11"], "--retries", "must be an integer from 0 to 10, got '11'"),
        (["run", "m:f", "--retries", "x"], "--retries", "must be an integer from 0 to 10"),
        (["run", "m:f", "--priority", "10"], "--priority", "must be an integer from -9 to 9, got '10'"),
        (["scale", "0"], "N", "must be an integer from 1 to 1024, got '0'"),
        (["scale", "1025"], "N", "must be an integer from 1 to 1024"),
        (["run", "m:f", "--chunksize", "10001"], "--chunksize", "must be an integer from 1 to 10000"),
        (["run", "m:f", "--window", "0"], "--window", "must be an integer of at least 1"),
        (["run", "m:f", "--retry-failed"], "--retry-failed", "goes with --resume"),
        (["run", "m:f", "--bogus", "a=1"], "--bogus", "unrecognized arguments: --bogus"),
        (["ping", "a=1"], "a=1", "unrecognized arguments: a=1"),
    ],
)
def test_workerctl_checks_its_flags_before_connecting(
    tmp_path: Path, args: list[str], flag: str, fragment: str
) -> None:
    """No daemon at that socket: exit 2, not 69, proves nothing was tried; the line names the flag."""
    result = workerctl("--socket", str(tmp_path / "none.sock"), *args)
    assert result.returncode == errors.EXIT_USAGE
    assert flag in result.stderr and fragment in result.stderr, result.stderr


def test_scale_beyond_the_cpus_warns_and_clear_prints_a_table(daemon: Daemon) -> None:
    beyond = str((os.cpu_count() or 1) + 1)
    scaled = workerctl("--socket", daemon.socket, "scale", beyond)
    assert scaled.returncode == 0 and scaled.stdout == f"workers: {beyond}\n"
    assert scaled.stderr.startswith(f"workerctl: warning: {beyond} workers on {os.cpu_count()} CPUs")
    quiet = workerctl("--socket", daemon.socket, "scale", "1")
    assert (quiet.returncode, quiet.stderr) == (0, "")
    with daemon.client() as client:
        wait_until(lambda: client.status()["pool"]["size"] == 1)
        pid = client.status()["pool"]["workers"][0]["pid"]
    cleared = workerctl("--socket", daemon.socket, "clear", "--level", "gc")
    assert cleared.returncode == 0, cleared.stderr
    lines = cleared.stdout.splitlines()
    assert lines[0].startswith("level gc: CPU workers freed ") and lines[0].endswith(" MiB")
    assert lines[2].split() == [
        "pid",
        "objects",
        "freed",
        "uss",
        "before",
        "MiB",
        "uss",
        "after",
        "MiB",
        "freed",
        "MiB",
        "note",
    ]
    assert lines[3].split()[0] == str(pid) and lines[-1] == "gpu     not running"


def test_check_config(tmp_path: Path) -> None:
    good = tmp_path / "good.toml"
    good.write_text("[pool]\nworkers = 2\n")
    bad = tmp_path / "bad.toml"
    bad.write_text("[pool]\nworkers = 'many'\n")
    ok = subprocess.run(
        [sys.executable, "-m", "workerd", "--check-config", str(good)], capture_output=True, text=True
    )
    assert ok.returncode == 0
    fail = subprocess.run(
        [sys.executable, "-m", "workerd", "--check-config", str(bad)], capture_output=True, text=True
    )
    assert fail.returncode == 78
    assert str(bad) in fail.stderr and "workers" in fail.stderr


def test_check_config_imports_the_code_and_reports_each_failure(tmp_path: Path) -> None:
    """In child processes, as the zygote and the GPU worker would: every failure, each naming
    its key; the task code's own output stays off stdout."""
    (tmp_path / "loud.py").write_text("print('imported loud')\nraise RuntimeError('boom')\n")
    (tmp_path / "half.py").write_text("def load(device):\n    return None\n")
    (tmp_path / "crash.py").write_text("import os\nos.abort()\n")
    path = tmp_path / "imports.toml"
    path.write_text(
        '[pool]\npreload = ["json", "workerd_absent_preload"]\n'
        '[tasks]\nmodules = ["workerd.examples.tasks", "loud", "crash", "workerd_never_reached"]\n'
        'path = ["."]\n'
        f'[pipelines.half]\npath = "{tmp_path / "half.py"}"\n'
        f'[pipelines.gone]\npath = "{tmp_path / "gone.py"}"\n'
        '[pipelines.demo]\nmodule = "workerd.examples.demo_pipeline"\n'
        '[pipelines.wide]\nmodule = "workerd.examples.demo_pipeline"\nmax_batch = 4\n'
    )
    result = subprocess.run(
        [sys.executable, "-m", "workerd", "--check-config", str(path)],
        capture_output=True,
        text=True,
        timeout=120,  # [tasks] path: the config's own directory, wherever this runs
    )
    assert result.returncode == 78 and result.stdout == ""
    lines = [line for line in result.stderr.splitlines() if line.startswith("workerd: ")]
    where = f"workerd: {path}: "
    searched = "task code is searched for in (sys.path, [tasks] path first)"
    assert lines.pop().startswith(f"{where}{searched}: {tmp_path}:")
    assert lines == [
        f"{where}[pool] preload: 'workerd_absent_preload' failed to import: ModuleNotFoundError: "
        "No module named 'workerd_absent_preload'",
        f"{where}[tasks] modules: 'loud' failed to import: RuntimeError: boom",
        f"{where}[tasks] modules: 'crash' killed the importing process (signal 6)",
        f"{where}[tasks] modules: 'workerd_never_reached' not checked (the import before it never ended)",
        f"{where}[pipelines.half] path: '{tmp_path / 'half.py'}' is no pipeline: "
        "pipeline 'half' has no run() function",
        f"{where}[pipelines.gone] path: '{tmp_path / 'gone.py'}' failed to import: FileNotFoundError: "
        f"[Errno 2] No such file or directory: '{tmp_path / 'gone.py'}'",
        f"{where}[pipelines.wide] module: 'workerd.examples.demo_pipeline' is no pipeline: "
        "pipeline 'wide' has max_batch = 4 but no run_batch(model, inputs) function",
    ]
    assert "imported loud" in result.stderr
    (tmp_path / "half.py").write_text("def load(device):\n    return None\n\ndef run(obj):\n    return 1\n")
    path.write_text(
        f'[tasks]\nmodules = ["workerd.examples.tasks"]\n[pipelines.half]\npath = "{tmp_path / "half.py"}"\n'
    )
    fixed = subprocess.run(
        [sys.executable, "-m", "workerd", "--check-config", str(path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert (fixed.returncode, fixed.stdout.splitlines()[0], fixed.stderr) == (0, f"{path}: ok", "")


def test_a_bad_log_level_in_the_environment_is_a_config_error(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "workerd", "--socket", str(tmp_path / "w.sock")],
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, "WORKERD_LOG_LEVEL": "bogus"},
    )
    assert result.returncode == 78
    assert result.stderr == (
        "workerd: WORKERD_LOG_LEVEL: expected one of debug, info, warning, error, got 'bogus'\n"
    )
    assert not (tmp_path / "w.sock").exists()


def test_daemons_starting_together_on_one_path_leave_exactly_one(tmp_path: Path) -> None:
    path = str(tmp_path / "race.sock")
    command = [sys.executable, "-m", "workerd", "--socket", path, "--workers", "1"]
    procs = [subprocess.Popen(command, stderr=subprocess.PIPE) for _ in range(3)]
    try:
        wait_until(lambda: sum(p.poll() is not None for p in procs) == 2, timeout=30)
        survivor = next(p for p in procs if p.poll() is None)
        losers = [p for p in procs if p is not survivor]
        assert [p.returncode for p in losers] == [69, 69]
        for loser in losers:
            _, stderr = loser.communicate(timeout=10)
            assert f"another workerd is already serving {path}; refusing to start" in stderr.decode()
        with Client(path) as client:
            assert client.ping()["pid"] == survivor.pid
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
            assert proc.stderr is not None
            proc.stderr.close()


def test_workerctl_usage_errors_come_before_connecting(tmp_path: Path) -> None:
    absent = str(tmp_path / "absent.sock")
    result = workerctl("--socket", absent, "run", "x:y", "--kwargs", "[1]")
    assert result.returncode == errors.EXIT_USAGE and "--kwargs must be a JSON object" in result.stderr
    result = workerctl("--socket", absent, "run", "x:y", "--batch", str(tmp_path / "missing.jsonl"))
    assert result.returncode == errors.EXIT_USAGE and "no such file" in result.stderr


def test_workerctl_tells_a_regular_file_from_a_stale_socket(tmp_path: Path) -> None:
    path = tmp_path / "plain-file"
    path.write_text("")
    result = workerctl("--socket", str(path), "ping")
    assert result.returncode == errors.EXIT_UNREACHABLE and "not a socket" in result.stderr


def test_workerctl_socket_path_too_long(tmp_path: Path) -> None:
    result = workerctl("--socket", "/tmp/" + "x" * 200 + "/w.sock", "ping")
    assert result.returncode == errors.EXIT_USAGE and "socket path too long" in result.stderr


def test_results_with_integer_map_keys(daemon: Daemon) -> None:
    with daemon.client() as client:
        assert client.execute("workerd.examples.tasks:word_lengths", "a bb cc ddd") == {1: 1, 2: 2, 3: 1}
    result = workerctl(
        "--socket", daemon.socket, "--json", "run", "workerd.examples.tasks:word_lengths", "text=a bb"
    )
    assert result.returncode == 0 and '"1": 1' in result.stdout


def test_workerctl_quiet_when_its_reader_goes_away(daemon: Daemon) -> None:
    command = [*WORKERCTL, "--socket", daemon.socket, "run", "workerd.examples.tasks:count", "n=100000"]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stderr is not None
    assert proc.stdout.readline() == b"1\n"
    proc.stdout.close()  # like `| head -1`
    stderr = proc.stderr.read().decode()
    proc.stderr.close()
    assert proc.wait(30) == 0
    assert "Traceback" not in stderr
