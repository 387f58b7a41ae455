"""Stack dumps: how a timed-out child tells the master where it was stuck.

Runs in: both. A child (CPU or GPU worker) opens its dump file at start and has faulthandler
write every thread's stack into it on SIGUSR1, from C, even while Python is stuck in a long call;
the master sends SIGUSR1 when a task's timeout ends, reads the file a moment later (kill.py), and
removes it once the child is gone. The files live in the master's private directory.
"""

from __future__ import annotations

import faulthandler
import os
import signal
from typing import IO


def stack_path(stack_dir: str, pid: int) -> str:
    return os.path.join(stack_dir, f"stack-{pid}.txt")


def open_dump(stack_dir: str) -> IO[str]:
    """In a child: the file SIGUSR1 dumps our stacks into (kept open for the child's life)."""
    dump = open(stack_path(stack_dir, os.getpid()), "w")  # noqa: SIM115
    faulthandler.register(signal.SIGUSR1, file=dump, all_threads=True)
    return dump


def read_stack(stack_dir: str, pid: int) -> str:
    try:
        with open(stack_path(stack_dir, pid), encoding="utf-8", errors="replace") as handle:
            return handle.read()
    except OSError:
        return ""


def remove_stack(stack_dir: str, pid: int) -> None:
    try:
        os.unlink(stack_path(stack_dir, pid))
    except OSError:
        pass
