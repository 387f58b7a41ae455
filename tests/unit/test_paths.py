"""paths.why_untrusted on real directories under tmp_path (no daemon: the rules alone)."""

from __future__ import annotations

from pathlib import Path

import pytest

from workerctl.paths import why_untrusted


def test_a_private_path_is_trusted_and_so_is_one_not_made_yet(tmp_path: Path) -> None:
    (tmp_path / "run").mkdir(mode=0o750)
    assert why_untrusted(str(tmp_path / "run" / "workerd.sock")) is None
    assert why_untrusted(str(tmp_path / "absent" / "deeper" / "workerd.sock")) is None


def test_a_missing_entry_in_an_open_directory_is_not(tmp_path: Path) -> None:
    (tmp_path / "open").mkdir()
    (tmp_path / "open").chmod(0o777)
    problem = why_untrusted(str(tmp_path / "open" / "run" / "workerd.sock"))
    assert problem == (
        f"{tmp_path}/open is writable by its group or others (mode 0777), who could swap {tmp_path}/open/run"
    )


def test_links_are_followed_where_they_are_safe_and_loops_end(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "run").mkdir()
    (tmp_path / "a").symlink_to("b")
    (tmp_path / "b").symlink_to("a")
    assert why_untrusted(str(tmp_path / "a" / "x" / "workerd.sock")) == (
        f"too many symbolic links on the way to {tmp_path}/a/x/workerd.sock"
    )
    (tmp_path / "up").symlink_to(tmp_path)  # absolute target, then a relative path
    monkeypatch.chdir(tmp_path)
    assert why_untrusted("up/up/run/workerd.sock") is None
    assert (
        why_untrusted("up/run/../up/workerd.sock")
        == f"{tmp_path}/up is a symbolic link (the socket and its directory may not be)"
    )
