"""The client's first connect() tells a missing socket from a stale one, even when the socket
goes away between the connect and its stat (a daemon starting removes the stale socket first)."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from workerctl import client, errors


def stale_socket(directory: Path) -> str:
    directory.chmod(0o700)
    path = str(directory / "w.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.close()  # the file stays, nobody listens: connect() is refused
    return path


def test_a_stale_socket_is_named_stale(tmp_path: Path) -> None:
    with pytest.raises(errors.DaemonUnreachable, match="stale socket"):
        client.probe_socket(stale_socket(tmp_path))


def test_a_socket_removed_after_the_refused_connect_is_no_socket(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = stale_socket(tmp_path)

    class RemovedFirst:
        """The client's `os`, whose stat() sees the daemon's unlink happen in the window."""

        def __getattr__(self, name: str) -> object:
            return getattr(os, name)

        @staticmethod
        def stat(target: str) -> os.stat_result:
            if target == path and os.path.exists(path):
                os.unlink(path)
            return os.stat(target)

    monkeypatch.setattr(client, "os", RemovedFirst())
    with pytest.raises(errors.DaemonUnreachable, match="no socket there"):
        client.probe_socket(path)
