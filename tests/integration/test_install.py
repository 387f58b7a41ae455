"""scripts/install for real, under --root: a virtual environment with the package installed
from this checkout (no extras: the base install, without torch), the links, the units and
snippets where systemd looks; then the installed commands run, the installed units verify, the
base install answers `run demo` with the extra to install, and --uninstall removes it all.

One test, because the install is the slow part (a venv and a pip install, ~8 s on 2 cores with
pip's cache warm); everything after it reuses the one tree.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from tests.conftest import wait_until
from tests.integration.test_systemd import analyze, clean_env, needs_analyze, system_units_for_verify

REPO = Path(__file__).resolve().parents[2]
INSTALL = REPO / "scripts" / "install"
COMMANDS = ("workerd", "workerctl")


def run(
    *command: str | Path, timeout: float = 300, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    # The interpreter of this suite makes the venv: a known Python >= 3.11. Without our
    # PYTHONPATH (a checkout's daemon/ on it would be what the installed venv imports).
    environment = clean_env(PYTHON=sys.executable, **(env or {}))
    environment.pop("PYTHONPATH", None)
    return subprocess.run(
        [str(part) for part in command], capture_output=True, text=True, timeout=timeout, env=environment
    )


def apply_snippets(root: Path) -> Path:
    """What systemd does at boot: the workerd user (sysusers.d), then /etc/workerd and its
    starter config (tmpfiles.d), each tool finding our snippet by its own search path in root."""
    (root / "etc").mkdir()
    for tool in (["systemd-sysusers"], ["systemd-tmpfiles", "--create"]):
        done = run(*tool, f"--root={root}", env={"SYSTEMD_LOG_LEVEL": "warning"})
        assert (done.returncode, done.stderr) == (0, ""), tool
    return root / "etc/workerd/workerd.toml"


def ask_demo(root: Path, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    """`workerctl run demo` against the installed daemon on its embedded default."""
    socket = str(tmp_path / "installed.sock")
    log = open(tmp_path / "installed.log", "wb")  # noqa: SIM115 - closed below
    daemon = subprocess.Popen(
        [root / "usr/local/bin/workerd", "--socket", socket, "--workers", "1"],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=clean_env(),
    )
    try:
        workerctl = root / "usr/local/bin/workerctl"
        wait_until(lambda: run(workerctl, "--socket", socket, "ping").returncode == 0, timeout=30)
        return run(workerctl, "--socket", socket, "run", "demo", timeout=60)
    finally:
        daemon.terminate()
        daemon.wait(20)
        log.close()


@needs_analyze
def test_install_under_a_root_runs_verifies_and_uninstalls(tmp_path: Path) -> None:
    root = tmp_path / "root"
    installed = run(INSTALL, "--root", root)
    assert installed.returncode == 0, installed.stdout + installed.stderr
    venv = root / "opt/workerd"
    assert "include-system-site-packages = false" in (venv / "pyvenv.cfg").read_text()
    for name in COMMANDS:  # relative links: right under --root and in the root they are for
        link = root / "usr/local/bin" / name
        assert os.readlink(link) == f"../../../opt/workerd/bin/{name}"
        assert link.resolve() == (venv / "bin" / name).resolve()
    # A copy of the package, not a link to this checkout, and no torch without the gpu extra.
    where = run(venv / "bin/python", "-c", "import workerd; print(workerd.__file__)")
    assert where.stdout.startswith(str(venv / "lib")), where
    assert run(venv / "bin/python", "-c", "import torch").returncode == 1
    units = root / "usr/local/lib/systemd/system"
    for shipped, target in (
        ("workerd.service", units / "workerd.service"),
        ("workerd.socket", units / "workerd.socket"),
        ("sysusers.d/workerd.conf", root / "usr/local/lib/sysusers.d/workerd.conf"),
        ("tmpfiles.d/workerd.conf", root / "usr/local/lib/tmpfiles.d/workerd.conf"),
    ):
        assert target.read_bytes() == (REPO / "systemd" / shipped).read_bytes()

    helped = run(root / "usr/local/bin/workerctl", "--help")
    assert helped.returncode == 0 and "scale" in helped.stdout
    # The starter config systemd-tmpfiles writes (needs root to chown), else the full sample.
    can_apply = os.geteuid() == 0 and shutil.which("systemd-sysusers") and shutil.which("systemd-tmpfiles")
    config = apply_snippets(root) if can_apply else REPO / "systemd/workerd.toml"
    checked = run(root / "usr/local/bin/workerd", "--check-config", config)
    assert (checked.returncode, checked.stdout.splitlines()[0]) == (0, f"{config}: ok"), checked.stderr
    service, socket_unit = system_units_for_verify(
        tmp_path / "verify", units, workerd=str(root / "usr/local/bin/workerd")
    )
    for unit in (service, socket_unit):
        verified = analyze("verify", "--man=no", str(unit))
        assert (verified.returncode, verified.stderr, verified.stdout) == (0, "", "")

    demo = ask_demo(root, tmp_path)
    assert demo.returncode == 1 and demo.stdout == ""
    assert demo.stderr == (
        "workerctl: TASK_ERROR: pipeline 'demo' needs 'torch', which is not installed: "
        "pip install 'workerd[gpu]'\n"
    )

    removed = run(INSTALL, "--root", root, "--uninstall")
    assert removed.returncode == 0, removed.stdout + removed.stderr
    left = sorted(str(p.relative_to(root)) for p in root.rglob("*") if not p.is_dir())
    assert not any(path.startswith(("opt/", "usr/")) for path in left), left
    if can_apply:  # the operator's config and state stay
        assert config.exists()
