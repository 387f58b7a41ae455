"""The docs against behaviour: every workerctl command shown in README.md's and
docs/operations.md's shell blocks runs against a live daemon, and the troubleshooting lines of
operations.md §13 that can be made to happen here are what workerctl prints (and exits with).

Commands are taken from the files as they are, so a doc edited into a false claim fails here.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import socket
import stat
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import msgpack
import pytest

from tests.conftest import BASE_CONFIG, Daemon

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", ROOT / "docs" / "operations.md"]
SHELLS = {"sh", "bash", "shell", "console"}
# A block runs if each of its commands is one of these: the others (install, systemctl, sudo)
# change the machine.
RUNNABLE = ("workerctl ", ".venv/bin/workerctl ", "printf ")
# Inline `workerctl …` spans worth running: read-only commands with literal arguments only.
INLINE_COMMANDS = {"ping", "status", "memory"}
PLACEHOLDER = re.compile(r"\b(?:[A-Z]{1,4}|NAME|FILE|DEVICE|ExcType|message)\b|<OS error>")


def shell_blocks() -> Iterator[tuple[str, str]]:
    for doc in DOCS:
        text = doc.read_text()
        for match in re.finditer(r"^```(\w*)\n(.*?)^```", text, re.S | re.M):
            lang, body = match.groups()
            commands = [line for line in body.splitlines() if line.strip() and not line.startswith("#")]
            runnable = commands and all(line.startswith(RUNNABLE) for line in commands)
            if lang in SHELLS and runnable and any("workerctl" in line for line in commands):
                line = text.count("\n", 0, match.start()) + 1
                yield f"{doc.name}:{line}", body


def inline_commands() -> Iterator[str]:
    for doc in DOCS:
        for span in re.findall(r"`(workerctl [^`]+)`", doc.read_text()):
            words = shlex.split(span)
            if (
                len(words) > 1
                and words[1] in INLINE_COMMANDS
                and all(word.startswith("--") for word in words[2:])
                and "--socket" not in words
            ):
                yield span


def command_wrappers(directory: Path) -> dict[str, str]:
    """`workerctl` on PATH and `.venv/bin/workerctl` under `directory`: this checkout's CLI."""
    bin_dir = directory / ".venv" / "bin"
    bin_dir.mkdir(parents=True)
    wrapper = bin_dir / "workerctl"
    wrapper.write_text(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} -m workerctl.cli "$@"\n')
    wrapper.chmod(0o755)
    return {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}


@pytest.fixture
def embedded(start_daemon: Callable[..., Daemon]) -> Daemon:
    """The daemon a fresh install runs (the embedded default): what the README's steps meet."""
    return start_daemon(embedded=True)


def test_the_docs_show_commands_to_check() -> None:
    blocks = list(shell_blocks())
    assert len(blocks) >= 3 and sum(body.count("workerctl") for _, body in blocks) >= 10
    assert "workerctl status --json" in list(inline_commands())


def test_every_workerctl_command_in_the_docs_shell_blocks_runs(embedded: Daemon, tmp_path: Path) -> None:
    env = {**command_wrappers(tmp_path), "WORKERD_SOCKET": embedded.socket}
    for where, body in shell_blocks():
        script = "set -e\n" + body
        result = subprocess.run(
            ["sh", "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
        )
        assert result.returncode == 0, f"{where}:\n{body}\n{result.stderr}"


def test_every_inline_read_only_workerctl_command_runs(embedded: Daemon, tmp_path: Path) -> None:
    env = {**command_wrappers(tmp_path), "WORKERD_SOCKET": embedded.socket}
    for span in set(inline_commands()):
        result = subprocess.run(shlex.split(span), env=env, capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, f"`{span}`: {result.stderr}"
        if "--json" in span:
            json.loads(result.stdout)


# -- operations.md §13, keyed by the line workerctl prints ----------------------------------------


def troubleshooting_rows() -> dict[str, str]:
    """Each quoted `workerctl:` line of §13 (every alternative of a row) -> its Exit cell."""
    text = (ROOT / "docs" / "operations.md").read_text()
    section = text[text.index("## 13. Troubleshooting") : text.index("Daemon side (`workerd:`")]
    rows: dict[str, str] = {}
    for line in section.splitlines():
        if line.startswith("| `") and not line.startswith("| `workerctl:`"):
            first, exit_cell = line.split(" | ")[:2]
            for quoted in re.findall(r"`([^`]+)`", first):
                rows[quoted] = exit_cell.strip()
    return rows


def pattern(quoted: str) -> re.Pattern[str]:
    """The doc's line as a regular expression: placeholders (PATH, N, 'X', …) match anything."""
    parts = []
    for piece in re.split(r"(…|" + PLACEHOLDER.pattern + ")", quoted):
        if piece == "…" or (piece and PLACEHOLDER.fullmatch(piece)):
            parts.append(".+?")
        elif piece:
            parts.append(re.escape(piece))
    return re.compile("".join(parts))


FAILING = """\
def unencodable():
    return {1, 2}


def keys():
    return {1: "a", 2: "b"}
"""


@pytest.fixture
def tasks_daemon(start_daemon: Callable[..., Daemon], tmp_path: Path) -> Daemon:
    (tmp_path / "doctasks.py").write_text(FAILING)
    config = BASE_CONFIG.format(workers=1).replace(
        '["workerd.examples.tasks"]', '["workerd.examples.tasks", "doctasks"]'
    )
    return start_daemon(config=config, env={"PYTHONPATH": str(tmp_path)})


def stale_socket(path: Path) -> str:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(path))
    sock.close()  # the file stays, nobody listens
    assert stat.S_ISSOCK(path.stat().st_mode)
    return str(path)


def test_troubleshooting_lines_are_what_workerctl_prints(tasks_daemon: Daemon, tmp_path: Path) -> None:
    rows = troubleshooting_rows()
    regular = tmp_path / "regular"
    regular.write_text("")
    source = tmp_path / "in.jsonl"
    source.write_text("[1]\n")
    tasks = "workerd.examples.tasks"
    on = ["--socket", tasks_daemon.socket]
    cases = {
        "cannot connect to workerd at PATH: no socket there; is it running? (systemctl status workerd)": [
            "--socket",
            str(tmp_path / "absent.sock"),
            "ping",
        ],
        "cannot connect to workerd at PATH: stale socket, the daemon is not running (systemctl status "
        "workerd)": ["--socket", stale_socket(tmp_path / "stale.sock"), "ping"],
        "cannot connect to workerd at PATH: that is not a socket (wrong --socket?)": [
            "--socket",
            str(regular),
            "ping",
        ],
        "socket path too long: PATH (Unix sockets allow 107 bytes)": [
            "--socket",
            "/tmp/" + "x" * 200,
            "ping",
        ],
        "TASK_ERROR: ExcType: message": [*on, "run", f"{tasks}:fail", "message=boom"],
        "TASK_ERROR: TypeError: cannot serialize X (msgpack types, Raw and numpy arrays only)": [
            *on,
            "run",
            "doctasks:unencodable",
        ],
        "UNKNOWN_TASK: no pipeline named 'X' (tasks are named 'package.module:function')": [
            *on,
            "run",
            "nosuchpipeline",
        ],
        "DENIED: module 'M' is not listed in [tasks] modules": [*on, "run", "os.path:join"],
        "expected key=value, got 'X'": [*on, "run", f"{tasks}:echo", "novalue"],
        "--args is not valid JSON: …": [*on, "run", f"{tasks}:echo", "--args", "[1,"],
        "--kwargs must be a JSON object": [*on, "run", f"{tasks}:echo", "--kwargs", "[]"],
        "cannot create --output FILE: no directory DIR": [
            *on,
            "run",
            f"{tasks}:echo",
            "--batch",
            str(source),
            "--output",
            str(tmp_path / "absent" / "out.jsonl"),
        ],
        "argument --task-timeout: must be a positive number of seconds, got '0'": [
            *on,
            "run",
            f"{tasks}:echo",
            "--task-timeout",
            "0",
        ],
    }
    for quoted, args in cases.items():
        assert quoted in rows, f"operations.md §13 no longer has the line {quoted!r}"
        result = subprocess.run(
            [sys.executable, "-m", "workerctl.cli", *args], capture_output=True, text=True, timeout=60
        )
        first = result.stderr.splitlines()[-1 if result.returncode == 2 else 0]
        assert first.startswith("workerctl") and pattern(quoted).search(first), (quoted, result.stderr)
        assert str(result.returncode) == rows[quoted], (quoted, result.returncode, result.stderr)


def test_a_result_with_non_string_keys_prints_as_json(tasks_daemon: Daemon) -> None:
    """operations.md §13 once said such a result gives `reply is not valid msgpack`."""
    result = subprocess.run(
        [sys.executable, "-m", "workerctl.cli", "--socket", tasks_daemon.socket, "run", "doctasks:keys"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0 and json.loads(result.stdout) == {"1": "a", "2": "b"}


def test_protocol_section_3_ids_of_refused_bodies(tasks_daemon: Daemon) -> None:
    """protocol.md §3: a sound map with a non-string key is answered with its id; a body nested
    past 1024 levels with `id: null`."""
    import zmq

    context = zmq.Context.instance()
    sock = context.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(f"ipc://{tasks_daemon.socket}")
    try:
        keyed = msgpack.packb({"v": 1, "id": 5, "cmd": "ping", "x": {1: 2}})
        deep = msgpack.packb({"v": 1, "id": 6, "cmd": "ping", "x": None})[:-1] + b"\x91" * 1100 + b"\xc0"
        answers = []
        for body in (keyed, deep):
            sock.send_multipart([b"", body])
            assert sock.poll(10_000)
            answers.append(msgpack.unpackb(sock.recv_multipart()[1]))
    finally:
        sock.close()
    assert [(a["id"], a["error"]["code"]) for a in answers] == [(5, "BAD_REQUEST"), (None, "BAD_REQUEST")]
