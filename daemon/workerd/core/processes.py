"""Starting, watching and reaping the daemon's processes.

Runs in: both: the master spawns and reaps; every child asks to die with its parent.

The master starts fresh interpreters (zygotes, the GPU worker) with posix_spawn, never with
subprocess.Popen: Popen reaps its own child behind our back (poll(), wait(), and its module-level
cleanup of forgotten Popen objects), while the master must reap every child itself, through one
waitpid(-1) loop on SIGCHLD. A zygote's death used to be seen only as EOF on its pipe, which a
process that preload code forked kept open: the zygote went unnoticed, a zombie, its dead workers
shown idle.

The master is also a child subreaper: when a zygote dies, its children (the standby zygote that
takes over, workers on their way out) become the master's, not init's, so nothing outlives the
daemon unseen and the standby can be told to serve.

Descriptors: a child gets stdin (/dev/null), stdout, stderr and its `pass_fds`, nothing else.
Python makes its own descriptors non-inheritable, but not all of ours are Python's (an fd that
arrived by SCM_RIGHTS without MSG_CMSG_CLOEXEC was inheritable, and every zygote spawned after
it held another worker's channel): spawn closes every other inheritable one in the child too.

Process groups: each spawned child leads a process group of its own, which what it forks (CPU
workers, the standby) and what those start (a task's `sleep 300`, a preload's helper) join. So a
terminal's Ctrl-C reaches only the master (the foreground group), and the master's death can
take every group down: SIGKILL cannot be caught, so the master cannot do it itself; each leader
asks the kernel for MASTER_GONE when the master dies and then SIGKILLs its whole group. What a
task moves out of the group itself (setsid(), setpgid()) is beyond this; under systemd the
unit's cgroup covers that too.
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
# What the kernel sends a group leader when the master dies. Catchable (SIGKILL is not, and the
# leader must live to kill its group), and a real-time signal: nothing else sends it, and no
# library we know of claims it (SIGUSR1 dumps stacks; SIGUSR2 is Ray's dashboard's, and common).
MASTER_GONE: int = signal.SIGRTMIN + 3


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


def take_group_down_with_parent(parent: int) -> None:
    """For a group leader the master spawned (and a standby taking over): when `parent` exits,
    SIGKILL our process group, us included, so that nothing we or our children started stays
    behind (a worker dies of its zygote's death, but its own children would not).

    The handler runs in Python, in the main thread, between bytecodes: a leader stuck in C code
    that never returns to the interpreter does not run it (a blocking system call does return,
    with EINTR)."""
    signal.signal(MASTER_GONE, kill_own_group)
    _prctl(PR_SET_PDEATHSIG, MASTER_GONE)
    if os.getppid() != parent:
        kill_own_group()


def kill_own_group(signum: int = 0, frame: object = None) -> None:
    os.killpg(0, signal.SIGKILL)


def kill_group(leader: int) -> None:
    """SIGKILL what is left of the process group of `leader`, a child that has exited (and been
    reaped): what it started dies with it, whether the master lives on or not (the group's
    leader is gone, so its death signal no longer serves it). A CPU worker leads no group (it
    is in its zygote's): nothing happens, unless its task made it lead one. Not for a zygote:
    its standby, in its group, takes over. (A group id is never reused while the group has a
    member, so this reaches that group or nothing.)"""
    try:
        os.killpg(leader, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass  # nothing left


def become_subreaper() -> None:
    _prctl(PR_SET_CHILD_SUBREAPER, 1)


def spawn(
    module: str, args: Sequence[str], pass_fds: Sequence[int] = (), env: Mapping[str, str] | None = None
) -> int:
    """Start `python -P -m module args...` with stdin on /dev/null, in `env` (default: ours), as
    the leader of a new process group; returns its pid. It holds stdout, stderr and `pass_fds`.
    -P: the directory the daemon was started in is not on its sys.path, so task code is found
    where `[tasks] path` and PYTHONPATH say, wherever workerd (or --check-config) runs.

    Raises OSError when the kernel refuses (EAGAIN, ENOMEM): callers answer for it, the loop
    never dies of it."""
    faults.check("spawn")
    closes = [(os.POSIX_SPAWN_CLOSE, fd) for fd in stray_descriptors(pass_fds)]
    for fd in pass_fds:
        os.set_inheritable(fd, True)
    try:
        return os.posix_spawn(
            sys.executable,
            [sys.executable, "-P", "-m", module, *args],
            os.environ if env is None else env,
            file_actions=[*closes, (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0)],
            setpgroup=0,
        )
    finally:
        for fd in pass_fds:
            os.set_inheritable(fd, False)


def stray_descriptors(keep: Sequence[int]) -> list[int]:
    """Our inheritable descriptors past stderr, except `keep`: what a child must not get.

    Only inheritable ones: exec closes the others anyway. (glibc's closefrom action would be
    simpler, but os.posix_spawn does not offer it.)"""
    strays = []
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd <= 2 or fd in keep:
            continue
        try:
            if os.get_inheritable(fd):
                strays.append(fd)
        except OSError:
            pass  # the directory listdir had open
    return strays


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


def put_first_on_path(directories: list[str]) -> None:
    """[tasks] path, first on sys.path (in its order) before any task or pipeline is imported:
    a zygote, the GPU worker and `--check-config`'s import check search the same place."""
    for directory in reversed(directories):
        while directory in sys.path:
            sys.path.remove(directory)
        sys.path.insert(0, directory)
