"""Where the control socket lives. The daemon and the client resolve it the same way."""

from __future__ import annotations

import os
import stat
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


# Symbolic links followed on the way to a socket, at most (the kernel's own limit, MAXSYMLINKS).
MAX_LINKS = 40
OTHERS_WRITE = stat.S_IWGRP | stat.S_IWOTH


def why_untrusted(path: str) -> str | None:
    """Why someone other than us or root could change where PATH leads, or None if nobody can.

    A path is as safe as the directories it passes through: whoever may rename entries in one
    of them can swap what comes after for a socket of their own (for the daemon: it binds in
    their directory; for a client: its arguments go to them and their forged reply is believed).
    So every directory on the way, symbolic links followed, must let only its owner change it,
    except that a world-writable directory with the sticky bit (/tmp) is safe for the entries
    that belong to us or to root: only they may rename those. A directory's owner is trusted
    because its parent's owner let it be there: /run/workerd belongs to the workerd user because
    root made it so. The socket and its directory may not be symbolic links at all: libzmq
    resolves the path again on every reconnect. Judged from the root down with lstat, nothing
    followed before it is judged; a component that does not exist yet, or that we may not look
    at, ends the check (nothing can be connected or bound through it either).
    """
    me = os.geteuid()
    # Not abspath: it would drop "link/.." by the letter, where the kernel goes up from the
    # link's target.
    full = path if os.path.isabs(path) else os.path.join(os.getcwd(), path)
    pending = full.split(os.sep)[::-1]  # components, the first one last
    directory, here = "/", os.lstat("/")
    links = 0
    while pending:
        name = pending.pop()
        if name in ("", "."):
            continue
        if name == "..":
            directory = os.path.dirname(directory)  # already judged on the way down
            here = os.lstat(directory)
            continue
        entry = os.path.join(directory, name)
        try:
            info: os.stat_result | None = os.lstat(entry)
        except OSError:
            info = None
        problem = exposed(directory, here, entry, info, me)
        if problem is not None or info is None:
            return problem
        if stat.S_ISLNK(info.st_mode):
            if len(pending) < 2:
                return f"{entry} is a symbolic link (the socket and its directory may not be)"
            links += 1
            if links > MAX_LINKS:
                return f"too many symbolic links on the way to {path}"
            target = os.readlink(entry)
            if os.path.isabs(target):
                directory, here = "/", os.lstat("/")
            pending.extend(target.split(os.sep)[::-1])
            continue
        directory, here = entry, info
    return None


def exposed(
    directory: str, here: os.stat_result, entry: str, info: os.stat_result | None, me: int
) -> str | None:
    """Why users other than us and root could rename `entry` in `directory` (`info`: its lstat,
    None if it does not exist), or None."""
    if not here.st_mode & OTHERS_WRITE:
        return None
    mode = f"mode {stat.S_IMODE(here.st_mode):04o}"
    if not here.st_mode & stat.S_ISVTX:
        return f"{directory} is writable by its group or others ({mode}), who could swap {entry}"
    if info is not None and info.st_uid not in (me, 0):
        return (
            f"{entry} belongs to uid {info.st_uid}, in {directory} where everyone may create entries ({mode})"
        )
    return None
