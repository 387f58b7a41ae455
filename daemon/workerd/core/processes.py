"""Starting, watching and reaping the daemon's processes.

The master starts fresh interpreters (zygotes, the GPU worker) with posix_spawn, never with
subprocess.Popen: Popen reaps its own child behind our back (poll(), wait(), and its module-level
cleanup of forgotten Popen objects), while the master must reap every child itself, through one
waitpid(-1) loop on SIGCHLD. A zygote's death used to be seen only as EOF on its pipe, which a
process that preload code forked kept open: the zygote went unnoticed, a zombie, its dead workers
shown idle.

The master is also a child subreaper: when a zygote dies, its children (the standby zygote that
takes over, workers on their way out) become the master's, not init's, so nothing outlives the
daemon unseen and the standby can be told to serve.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
from collections.abc import Iterator, Mapping, Sequence

from workerd import faults

PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36


def _prctl(option: int, value: int) -> bool:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return bool(libc.prctl(option, value, 0, 0, 0) == 0)
    except (OSError, AttributeError):  # pragma: no cover - not Linux
        return False


def die_with_parent(parent: int) -> None:
    """Ask the kernel to SIGKILL us when our parent exits.

    `parent` is the pid we expect as parent: if it died before the request was made (the race
    prctl leaves open), we have been re-parented already and exit now rather than live orphaned.
    """
    _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:
        os._exit(1)


def become_subreaper() -> None:
    _prctl(PR_SET_CHILD_SUBREAPER, 1)


def spawn(
    module: str, args: Sequence[str], pass_fds: Sequence[int] = (), env: Mapping[str, str] | None = None
) -> int:
    """Start `python -m module args...` with stdin on /dev/null, in `env` (default: ours);
    returns its pid.

    Raises OSError when the kernel refuses (EAGAIN, ENOMEM): callers answer for it, the loop
    never dies of it."""
    faults.check("spawn")
    for fd in pass_fds:
        os.set_inheritable(fd, True)
    try:
        return os.posix_spawn(
            sys.executable,
            [sys.executable, "-m", module, *args],
            os.environ if env is None else env,
            file_actions=[(os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0)],
        )
    finally:
        for fd in pass_fds:
            os.set_inheritable(fd, False)


def reap() -> Iterator[tuple[int, int]]:
    """(pid, exit code) of every child that has exited; negative codes are signals."""
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        yield pid, os.waitstatus_to_exitcode(status)


def signal_quietly(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass


def describe_exit(code: int) -> str:
    return f"killed by signal {-code}" if code < 0 else f"exited with status {code}"
