"""The control socket: find it, claim it safely, bind it (or adopt systemd's), lock it down.

Runs in: the master.

libzmq unlinks whatever sits at an ipc path when it binds, so binding blindly would let a second
daemon silently steal a live daemon's socket. We probe the path first: a socket that accepts a
connection belongs to a live daemon and we refuse; one that refuses is stale and we remove it.
"""

from __future__ import annotations

import errno
import fcntl
import os
import resource
import socket
import stat
from typing import Any

import zmq

from workerctl import paths
from workerd import limits

SOCKET_MODE = 0o660  # group access is the grant: add users to the socket's group
DIRECTORY_MODE = 0o750
SD_LISTEN_FDS_START = 3


class ControlSocketError(Exception):
    pass


def raise_fd_limit() -> tuple[int, int]:
    """Raise our soft limit on open descriptors to the hard limit; returns (old, new) soft limit.

    Every client connection holds one descriptor in the daemon, and libzmq (4.3.5) aborts the
    whole process when accept() on an ipc socket fails with EMFILE. Under systemd's default
    (LimitNOFILE=1024:524288) a thousand idle connections from any member of the socket's group
    killed the daemon. The hard limit is the one systemd means us to use (its documentation
    asks services that need many descriptors to raise the soft limit themselves); the loop
    polls with epoll, so descriptors above 1024 are no problem.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft == resource.RLIM_INFINITY or soft >= hard:
        return soft, soft
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ValueError, OSError):  # pragma: no cover - a hard limit we may not take
        return soft, soft
    return soft, hard


def inherited_fd() -> int | None:
    """The listening socket systemd passed us (socket activation), if any.

    The LISTEN_* variables are consumed so that children do not think the fd is theirs.
    """
    pid = os.environ.pop("LISTEN_PID", None)
    count = os.environ.pop("LISTEN_FDS", None)
    os.environ.pop("LISTEN_FDNAMES", None)
    if pid != str(os.getpid()) or not count or int(count) < 1:
        return None
    if int(count) > 1:
        raise ControlSocketError(f"systemd passed {count} sockets; workerd takes exactly one")
    fd = SD_LISTEN_FDS_START
    os.set_inheritable(fd, False)
    return fd


def inherited_path(fd: int) -> str:
    sock = socket.socket(fileno=os.dup(fd))
    try:
        if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
            raise ControlSocketError("the socket systemd passed is not a Unix stream socket")
        name = sock.getsockname()
    finally:
        sock.close()
    if not isinstance(name, str) or not name:
        raise ControlSocketError("the socket systemd passed has no filesystem path")
    return name


def check_path(path: str) -> None:
    if len(os.fsencode(path)) > paths.MAX_SOCKET_PATH:
        raise ControlSocketError(
            f"socket path {path} is {len(os.fsencode(path))} bytes; "
            f"Unix sockets allow at most {paths.MAX_SOCKET_PATH}"
        )


def ensure_directory(path: str) -> None:
    """Create the directory of socket PATH (0750), or make sure the one there is ours alone.

    Refused: a symbolic link (another user's /tmp/workerd-UID -> /tmp made us bind in /tmp,
    then a swapped link sent our clients to their socket), a directory that belongs to another
    user, one that its group or others may write to (/tmp is root's, but anyone could replace
    our socket there), and a path through any directory that lets others swap what follows
    (paths.why_untrusted, which clients check too). Root's directories pass when only root may
    write them: that is /run as systemd and tmpfiles make it, and a daemon that is not root
    cannot bind in one anyway (systemd's RuntimeDirectory= hands it over, 0750 or 0755)."""
    directory = os.path.dirname(path) or "."
    # Under a umask that leaves what we create (missing parents too) exactly 0750, whatever
    # ours is: a parent made 0777 under umask 000 would let anyone swap what is in it.
    previous = os.umask(0o777 & ~DIRECTORY_MODE)
    try:
        os.makedirs(directory, mode=DIRECTORY_MODE)
    except FileExistsError:
        pass  # judged below, whatever it is (a dangling link included)
    except OSError as exc:
        raise ControlSocketError(f"cannot create socket directory {directory}: {exc.strerror}") from None
    finally:
        os.umask(previous)
    info = os.lstat(directory)
    if stat.S_ISLNK(info.st_mode):
        raise untrusted(directory, "is a symbolic link")
    if not stat.S_ISDIR(info.st_mode):
        raise untrusted(directory, "is not a directory")
    if info.st_uid not in (os.geteuid(), 0):
        raise untrusted(directory, f"belongs to uid {info.st_uid}, not to us")
    if info.st_mode & paths.OTHERS_WRITE:
        raise untrusted(
            directory, f"is writable by its group or others (mode {stat.S_IMODE(info.st_mode):04o})"
        )
    problem = paths.why_untrusted(path)
    if problem is not None:
        raise ControlSocketError(f"socket directory {directory} is not safe: {problem}; refusing it")


def untrusted(directory: str, why: str) -> ControlSocketError:
    return ControlSocketError(f"socket directory {directory} {why}; refusing it")


def lock_path(path: str) -> None:
    """Hold PATH.lock for our whole life, so that two daemons never claim one path at once.

    Without it, a daemon starting in the instant between another's bind() and listen() would
    find the socket refusing connections, take it for stale and unlink it. The lock goes with
    the process (the fd is never closed), however it exits. O_NOFOLLOW: a link planted there
    must not make us create or lock a file elsewhere."""
    lock = f"{path}.lock"
    try:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    except OSError as exc:
        why = "is a symbolic link" if exc.errno == errno.ELOOP else exc.strerror
        raise ControlSocketError(f"cannot open {lock}: {why}; refusing to start") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise ControlSocketError(f"another workerd is already serving {path}; refusing to start") from None


def claim_path(path: str) -> None:
    """Refuse a live daemon's socket; remove a stale one."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(info.st_mode):
        raise ControlSocketError(f"{path} exists and is not a socket; refusing to replace it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except ConnectionRefusedError:
        os.unlink(path)  # stale: left by a daemon that died without cleaning up
        return
    finally:
        probe.close()
    raise ControlSocketError(f"another workerd is already serving {path}; refusing to start")


def bind(
    context: zmq.Context[Any], path: str | None, max_message_bytes: int, fd: int | None
) -> tuple[zmq.Socket[Any], str]:
    """The bound ROUTER and the path it serves (closed again if it cannot be bound)."""
    router = context.socket(zmq.ROUTER)
    try:
        return router, bind_router(router, path, max_message_bytes, fd)
    except BaseException:
        router.close(linger=0)
        raise


def bind_router(router: zmq.Socket[Any], path: str | None, max_message_bytes: int, fd: int | None) -> str:
    router.setsockopt(zmq.LINGER, 0)
    # libzmq drops a peer that sends a frame bigger than this instead of buffering it.
    router.setsockopt(zmq.MAXMSGSIZE, max_message_bytes)
    # A reply to a client that has gone, or whose queue is full, raises instead of vanishing
    # (limits.ClientLimits.send skips the first and cuts the second off); the queue holds at
    # most this many replies.
    router.setsockopt(zmq.ROUTER_MANDATORY, 1)
    router.setsockopt(zmq.SNDHWM, limits.CLIENT_SNDHWM)
    if fd is not None:
        path = inherited_path(fd)
        router.setsockopt(zmq.USE_FD, fd)
        router.bind(paths.endpoint(path))
        return path
    assert path is not None
    check_path(path)
    ensure_directory(path)
    lock_path(path)
    claim_path(path)
    # Bind under a umask that leaves the socket 0660 from its first instant: a chmod after the
    # bind would leave a window in which it has the process umask's wider mode.
    previous = os.umask(0o117)
    try:
        router.bind(paths.endpoint(path))
    except zmq.ZMQError as exc:
        raise ControlSocketError(f"cannot bind {path}: {exc}") from None
    finally:
        os.umask(previous)
    os.chmod(path, SOCKET_MODE)
    return path


def remove_own_socket(path: str, inode: int) -> None:
    """Unlink the socket file we bound, unless another daemon has bound one there since."""
    try:
        if os.stat(path).st_ino == inode:
            os.unlink(path)
    except OSError:
        pass
