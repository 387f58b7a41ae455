"""workerctl as a user meets it (issue 20): signals, cancel from the shell, task errors, and the
command-line conventions; each against a real daemon, workerctl run as a real process."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import BASE_CONFIG, Daemon, wait_until
from workerctl import errors

WORKERCTL = [sys.executable, "-m", "workerctl.cli"]
TASKS = "workerd.examples.tasks"
NOBODY = "65534"
# A task that runs far longer than any wait below: a run that is not stopped stays busy.
LONG_S = "120"


def workerctl(*args: str, user: str | None = None) -> subprocess.CompletedProcess[str]:
    command = [*WORKERCTL, *args]
    if user:
        command = ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups", *command]
    return subprocess.run(command, capture_output=True, text=True, timeout=60)


def start_workerctl(*args: str) -> subprocess.Popen[str]:
    """workerctl as a terminal starts it: a test runner started in the background (SIGINT
    ignored) or under nohup (SIGHUP ignored) must not make it ignore the signals sent to it."""
    return subprocess.Popen(
        [*WORKERCTL, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=default_signals,
    )


def default_signals() -> None:
    for signum in (signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, signal.SIG_DFL)


def status(daemon: Daemon) -> dict[str, Any]:
    with daemon.client() as client:
        return client.status()


def busy(daemon: Daemon) -> int:
    return int(status(daemon)["pool"]["busy"])


def idle_and_empty(daemon: Daemon) -> bool:
    now = status(daemon)
    return now["pool"]["busy"] == 0 and now["queue"]["depth"] == 0


def read_request_id(proc: subprocess.Popen[str]) -> Any:
    """The first stderr line of `run --json`: {"request_id": N}."""
    assert proc.stderr is not None
    return json.loads(proc.stderr.readline())["request_id"]


# -- 1. work dies with its client: the client's side ---------------------------------------------


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP])
def test_a_signalled_run_stops_its_running_task(daemon: Daemon, sig: signal.Signals) -> None:
    proc = start_workerctl("--socket", daemon.socket, "run", f"{TASKS}:sleep", f"seconds={LONG_S}")
    try:
        wait_until(lambda: busy(daemon) == 1, timeout=30)
        proc.send_signal(sig)
        _, stderr = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 128 + sig, stderr
    assert stderr.count("\n") == 1 and stderr.startswith("workerctl: "), stderr
    # Cancelled with terminate: the worker is killed and replaced, not left running 120 s.
    wait_until(lambda: idle_and_empty(daemon), timeout=30)
    assert status(daemon)["counters"].get("execute_cancelled") == 1


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP])
def test_a_signalled_batch_leaves_nothing_queued(daemon: Daemon, tmp_path: Path, sig: signal.Signals) -> None:
    source, output = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    # 2 s calls, 64 in flight on 2 workers: a queue that would take a minute to drain by itself.
    source.write_text('{"seconds": 2}\n' * 300)
    proc = start_workerctl(
        "--socket", daemon.socket, "run", f"{TASKS}:sleep", "--batch", str(source), "--output", str(output)
    )
    try:
        wait_until(lambda: status(daemon)["queue"]["depth"] > 10, timeout=30)
        proc.send_signal(sig)
        _, stderr = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 128 + sig, stderr
    assert "stopped early; rerun with --resume to finish" in stderr
    wait_until(lambda: status(daemon)["queue"]["depth"] == 0, timeout=15)
    assert status(daemon)["counters"].get("execute_cancelled", 0) > 10
    for line in output.read_text().splitlines():  # whole lines only, each a finished call
        assert "result" in json.loads(line)


# -- 2. workerctl cancel -------------------------------------------------------------------------


def test_cancel_from_another_process_by_the_id_run_json_printed(daemon: Daemon) -> None:
    proc = start_workerctl("--socket", daemon.socket, "run", "--json", f"{TASKS}:sleep", f"seconds={LONG_S}")
    try:
        request = read_request_id(proc)
        wait_until(lambda: busy(daemon) == 1, timeout=30)
        # Without --terminate a running request goes on: said so, and exit 1.
        plain = workerctl("--socket", daemon.socket, "cancel", str(request))
        assert plain.returncode == errors.EXIT_FAILED and "running, not stopped" in plain.stdout
        assert busy(daemon) == 1
        killed = workerctl("cancel", str(request), "--terminate", "--json", "--socket", daemon.socket)
        assert killed.returncode == errors.EXIT_OK, killed.stderr
        assert json.loads(killed.stdout) == {"cancelled": [request], "running": [], "unknown": []}
        stdout, stderr = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == errors.EXIT_FAILED
    assert json.loads(stdout)["error"]["code"] == "CANCELLED"
    assert "workerctl: CANCELLED: " in stderr
    wait_until(lambda: idle_and_empty(daemon), timeout=30)


def test_cancel_of_an_unknown_id_says_so(daemon: Daemon) -> None:
    result = workerctl("--socket", daemon.socket, "cancel", "12345", "some-id")
    assert result.returncode == errors.EXIT_FAILED
    assert "unknown (already answered, never sent, or another user's): 12345 some-id" in result.stdout


def test_a_client_of_its_own_connection_only_still_cancels_nothing_elsewhere(daemon: Daemon) -> None:
    """A plain cancel (no any_connection) keeps the protocol's rule: this connection's ids only."""
    with daemon.client() as owner, daemon.client() as other:
        request = owner.send("execute", name=f"{TASKS}:sleep", kwargs={"seconds": float(LONG_S)})
        wait_until(lambda: busy(daemon) == 1, timeout=30)
        assert other.cancel([request], terminate=True)["unknown"] == [request]
        assert owner.cancel([request], terminate=True, any_connection=True)["cancelled"] == [request]
        with pytest.raises(errors.Cancelled):
            owner.wait_result(request)


needs_root = pytest.mark.skipif(
    os.getuid() != 0 or not shutil.which("setpriv"), reason="needs root and setpriv to act as another user"
)


@pytest.fixture
def shared_socket() -> Iterator[str]:
    """A socket path that uid 65534 may reach: in a directory of root's, mode 0755, under /tmp
    (pytest's own directories are root's alone)."""
    directory = tempfile.mkdtemp(prefix="workerd-shared-", dir="/tmp")
    os.chmod(directory, 0o755)
    yield os.path.join(directory, "workerd.sock")
    shutil.rmtree(directory, ignore_errors=True)


def start_shared(start_daemon: Callable[..., Daemon], path: str, config: str | None = None) -> Daemon:
    daemon = start_daemon(config=config, socket=path)
    os.chmod(path, 0o666)
    return daemon


@needs_root
def test_another_user_cannot_cancel_my_request(
    start_daemon: Callable[..., Daemon], shared_socket: str
) -> None:
    daemon = start_shared(start_daemon, shared_socket)
    proc = start_workerctl("--socket", daemon.socket, "run", "--json", f"{TASKS}:sleep", f"seconds={LONG_S}")
    try:
        request = read_request_id(proc)
        wait_until(lambda: busy(daemon) == 1, timeout=30)
        result = workerctl("--socket", daemon.socket, "cancel", "--terminate", str(request), user=NOBODY)
        assert result.returncode == errors.EXIT_FAILED, result.stderr
        assert "unknown" in result.stdout and busy(daemon) == 1
        assert proc.poll() is None
    finally:
        proc.kill()
        proc.communicate()


@needs_root
def test_cancel_by_another_connection_follows_access_execute(
    start_daemon: Callable[..., Daemon], shared_socket: str
) -> None:
    config = BASE_CONFIG.format(workers=1) + '\n[access]\nexecute = ["root"]\n'
    daemon = start_shared(start_daemon, shared_socket, config)
    result = workerctl("--socket", daemon.socket, "cancel", "--terminate", "1", user=NOBODY)
    assert result.returncode == errors.EXIT_DENIED
    assert "DENIED: cancel with any_connection: uid 65534 may not use execute" in result.stderr


# -- 3. task errors ------------------------------------------------------------------------------


FAILING = """\
class Custom(Exception):
    pass


def builtin(message):
    raise ValueError(message)


def custom(message):
    raise Custom(message)


def key_error(message):
    raise KeyError(message)
"""


@pytest.mark.parametrize(
    ("task", "kind", "text"),
    [("builtin", "ValueError", "oops"), ("custom", "Custom", "oops"), ("key_error", "KeyError", "'oops'")],
)
def test_every_task_error_prints_code_type_message_and_traceback(
    start_daemon: Callable[..., Daemon], tmp_path: Path, task: str, kind: str, text: str
) -> None:
    (tmp_path / "failing.py").write_text(FAILING)
    config = BASE_CONFIG.format(workers=1).replace(f'"{TASKS}"', '"failing"')
    daemon = start_daemon(config=config, env={"PYTHONPATH": str(tmp_path)})
    call = ["run", f"failing:{task}", "message=oops"]
    result = workerctl("--socket", daemon.socket, *call)
    assert result.returncode == errors.EXIT_FAILED, result.stderr
    first, *rest = result.stderr.splitlines()
    assert first == f"workerctl: TASK_ERROR: {kind}: {text}"
    assert rest[0] == "Traceback (most recent call last):" and rest[-1].endswith(f"{kind}: {text}")
    assert result.stdout == ""
    as_json = workerctl("--socket", daemon.socket, "--json", *call)
    assert as_json.returncode == errors.EXIT_FAILED
    error = json.loads(as_json.stdout)["error"]  # exactly one document: json.loads takes no more
    assert error["code"] == "TASK_ERROR" and error["details"]["type"] == kind
    assert f"raise {kind}(message)" in error["details"]["traceback"]


# -- 4. conventions ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args",
    [
        ["status", "--json"],
        ["status", "--json", "--socket", "{socket}"],
        ["--json", "status", "--timeout", "10"],
        ["ping", "--timeout", "10", "--json"],
        ["run", f"{TASKS}:echo", "n=3", "--json"],
    ],
)
def test_global_options_after_the_command(daemon: Daemon, args: list[str]) -> None:
    args = [arg.replace("{socket}", daemon.socket) for arg in args]
    if "--socket" not in args:
        args = ["--socket", daemon.socket, *args]
    result = workerctl(*args)
    assert result.returncode == errors.EXIT_OK, result.stderr
    json.loads(result.stdout)


def test_output_in_a_missing_directory_is_one_line_and_exit_73(daemon: Daemon, tmp_path: Path) -> None:
    source = tmp_path / "in.jsonl"
    source.write_text("[1]\n")
    target = tmp_path / "absent" / "out.jsonl"
    result = workerctl(
        "--socket", daemon.socket, "run", f"{TASKS}:echo", "--batch", str(source), "--output", str(target)
    )
    assert result.returncode == errors.EXIT_CANTCREAT == 73
    assert result.stderr == f"workerctl: cannot create --output {target}: no directory {target.parent}\n"


def test_a_batch_error_line_quotes_at_most_200_characters_of_its_input(
    start_daemon: Callable[..., Daemon], tmp_path: Path
) -> None:
    config = BASE_CONFIG.format(workers=1).replace("[daemon]\n", "[daemon]\nmax_message_mb = 1\n", 1)
    daemon = start_daemon(config=config)
    big = json.dumps({"text": "x" * (2 << 20)})  # refused as over the message limit
    broken = "[" + "1, " * 5000  # not JSON
    source = tmp_path / "in.jsonl"
    source.write_text(f"{big}\n{broken}\n")
    result = workerctl("--socket", daemon.socket, "run", f"{TASKS}:echo", "--batch", str(source))
    assert result.returncode == errors.EXIT_FAILED
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    by_line = {line["line"]: line for line in lines}
    assert by_line[1]["error"]["code"] == "BAD_REQUEST"
    assert by_line[1]["input_length"] == len(big) and by_line[1]["input"] == big[:200] + "…"
    assert by_line[2]["error"]["code"] == "BAD_INPUT"
    assert by_line[2]["input_length"] == len(broken) and by_line[2]["input"] == broken[:200] + "…"
    assert max(map(len, result.stdout.splitlines())) < 1000


def test_a_malformed_json_line_names_the_column_of_its_error(daemon: Daemon, tmp_path: Path) -> None:
    source = tmp_path / "in.jsonl"
    source.write_text('{"a": 1,\n{"a" 1}\n')
    result = workerctl("--socket", daemon.socket, "run", f"{TASKS}:echo", "--batch", str(source))
    messages = sorted(json.loads(line)["error"]["message"] for line in result.stdout.splitlines())
    assert messages == [
        "input line 1 is not valid JSON: Expecting property name enclosed in double quotes at column 9",
        "input line 2 is not valid JSON: Expecting ':' delimiter at column 6",
    ]


def test_run_without_arguments_asks_for_the_name_only() -> None:
    result = workerctl("run")
    assert result.returncode == errors.EXIT_USAGE
    assert "the following arguments are required: name\n" in result.stderr
    assert "key=value" not in result.stderr.splitlines()[-1]


def test_status_of_a_degraded_daemon_does_not_say_running(start_daemon: Callable[..., Daemon]) -> None:
    config = BASE_CONFIG.format(workers=1).replace(
        "[tasks]", 'preload = ["no_such_module_anywhere"]\n[tasks]'
    )
    daemon = start_daemon(config=config)
    result = workerctl("--socket", daemon.socket, "status")
    assert result.returncode == errors.EXIT_OK
    head = result.stdout.splitlines()[0]
    assert "state degraded" in head and "running" not in head
    assert "ERROR   CPU pool unavailable" in result.stdout
