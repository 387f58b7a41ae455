"""Where the control socket lives. The daemon and the client resolve it the same way."""

from __future__ import annotations

import os
from collections.abc import Mapping

SOCKET_NAME = "workerd.sock"
SYSTEM_SOCKET = "/run/workerd/workerd.sock"

# sun_path is 108 bytes on Linux, one of which is the terminating NUL.
MAX_SOCKET_PATH = 107


def resolve_socket_path(explicit: str | None = None, env: Mapping[str, str] | None = None) -> str:
    """The first that applies: explicit, $WORKERD_SOCKET, $RUNTIME_DIRECTORY (set by systemd),
    the system socket if it exists, $XDG_RUNTIME_DIR, /tmp/workerd-$UID."""
    env = os.environ if env is None else env
    if explicit:
        return explicit
    if env.get("WORKERD_SOCKET"):
        return env["WORKERD_SOCKET"]
    if env.get("RUNTIME_DIRECTORY"):
        # systemd lists one directory per RuntimeDirectory= entry, colon-separated.
        return os.path.join(env["RUNTIME_DIRECTORY"].split(":")[0], SOCKET_NAME)
    if os.path.exists(SYSTEM_SOCKET):
        return SYSTEM_SOCKET
    if env.get("XDG_RUNTIME_DIR"):
        return os.path.join(env["XDG_RUNTIME_DIR"], "workerd", SOCKET_NAME)
    return f"/tmp/workerd-{os.getuid()}/{SOCKET_NAME}"


def endpoint(path: str) -> str:
    return f"ipc://{path}"
