"""`[tasks] path`: where the daemon finds task code, against a real daemon and a real
`--check-config`: the directories are resolved relative to the config file, put first on the
zygote's and the GPU worker's sys.path, and shown by `status` and `--check-config`; the directory
either one happens to run in is not searched (so they agree wherever they run)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import Daemon, clean_environment
from workerctl import errors

TASK_MODULE = "def where():\n    return __file__\n"
PIPELINE_MODULE = (
    "def load(device):\n    return __file__\n\ndef run(obj, **kwargs):\n    return {'loaded_from': obj}\n"
)
CONFIG = """\
[pool]
workers = 1

[tasks]
modules = ["pathtasks"]
path = ["../app"]

[gpu]
enabled = "true"
device = "cpu"

[pipelines.pathpipe]
module = "pathpipe"
"""


@pytest.fixture
def layout(tmp_path: Path) -> tuple[Path, Path]:
    """tmp/etc/ holds the config, tmp/app/ the task and pipeline modules: on no PYTHONPATH."""
    etc, app = tmp_path / "etc", tmp_path / "app"
    etc.mkdir()
    app.mkdir()
    (app / "pathtasks.py").write_text(TASK_MODULE)
    (app / "pathpipe.py").write_text(PIPELINE_MODULE)
    return etc, app


def check_config(path: Path, cwd: Path | str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "workerd", "--check-config", str(path)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=cwd,
        env=clean_environment(),
    )


def test_the_daemon_finds_task_code_on_the_task_path(layout: tuple[Path, Path]) -> None:
    etc, app = layout
    assert not any(str(app) in entry for entry in os.environ.get("PYTHONPATH", "").split(os.pathsep))
    daemon = Daemon(etc, CONFIG, [], {}, None)
    try:
        daemon.wait_ready()
        with daemon.client() as client:
            assert client.execute("pathtasks:where") == str(app / "pathtasks.py")
            status = client.status()
            assert status["tasks"]["path"] == [str(app)]
            assert status["tasks"]["sys_path"][0] == str(app)
            assert os.getcwd() not in status["tasks"]["sys_path"]
            # The GPU worker (a fresh interpreter) imports its pipelines from there too.
            run = client.execute("pathpipe", timeout=120)
            assert run["output"]["loaded_from"] == str(app / "pathpipe.py")
    finally:
        assert daemon.stop() == 0


def test_check_config_searches_the_task_path_from_any_directory(layout: tuple[Path, Path]) -> None:
    etc, app = layout
    (etc / "workerd.toml").write_text(CONFIG)
    for cwd in ("/", app):
        result = check_config(etc / "workerd.toml", cwd)
        assert result.returncode == 0, result.stderr
        lines = result.stdout.splitlines()
        assert lines[0] == f"{etc / 'workerd.toml'}: ok"
        searched = "task code is searched for in (sys.path, [tasks] path first)"
        assert lines[1].startswith(f"{etc / 'workerd.toml'}: {searched}: {app}:")


def test_without_the_task_path_the_current_directory_does_not_count(layout: tuple[Path, Path]) -> None:
    """The module sits in the directory --check-config runs in: it is not found there, as the
    daemon would not find it, and the line says where it looked."""
    etc, app = layout
    (etc / "workerd.toml").write_text('[tasks]\nmodules = ["pathtasks"]\n[gpu]\nenabled = "false"\n')
    result = check_config(etc / "workerd.toml", app)
    assert result.returncode == 78
    lines = [line for line in result.stderr.splitlines() if line.startswith("workerd: ")]
    assert lines[0] == (
        f"workerd: {etc / 'workerd.toml'}: [tasks] modules: 'pathtasks' failed to import: "
        "ModuleNotFoundError: No module named 'pathtasks'"
    )
    assert lines[1].startswith(f"workerd: {etc / 'workerd.toml'}: task code is searched for in (sys.path")
    assert f":{app}:" not in f":{lines[1].partition('first): ')[2]}:"


def test_a_task_path_that_is_no_directory_is_a_config_error(layout: tuple[Path, Path]) -> None:
    etc, _ = layout
    path = etc / "workerd.toml"
    for value, shown in (
        ('["../nowhere"]', f"'../nowhere' ({etc.parent / 'nowhere'}) is not a directory"),
        ('"../app"', "expected a list of directories, got '../app'"),
        ('[""]', "expected a list of directories"),
    ):
        path.write_text(f"[tasks]\nmodules = []\npath = {value}\n")
        result = check_config(path, "/")
        assert result.returncode == 78 and result.stdout == ""
        assert result.stderr.startswith(f"workerd: {path}: [tasks] path")
        assert shown in result.stderr


def test_a_daemon_without_the_path_cannot_import_the_module(layout: tuple[Path, Path]) -> None:
    etc, _ = layout
    daemon = Daemon(etc, CONFIG.replace('path = ["../app"]\n', ""), [], {}, None)
    try:
        status = daemon.wait_ready()
        assert "No module named 'pathtasks'" in status["pool"]["error"]
        with daemon.client() as client, pytest.raises(errors.InternalError):
            client.execute("pathtasks:where")
    finally:
        daemon.stop()
