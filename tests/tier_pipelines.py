"""Pipeline files for the host-tier tests, written under a test's tmp_path.

`hooks` pipelines hold real torch tensors and define to_host/to_device, which copy them into
new storage with `.to(..., copy=True)` and log every move (with the tensor's data pointer, so a
test sees a real copy happened). On a CPU-only machine both tiers are the CPU: the copies are
real, the device they land on is the same, and the log is how a test sees what moved where.
`plain` pipelines hold a dict with no hooks (cannot be parked); `module` ones a torch.nn.Module.
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path
from typing import Any

MB = 1024 * 1024

COMMON = """
import json, os, torch

NAME = {name!r}
LOG = {log!r}
SIZE_MB = {size_mb}
VERSION = {version}
FAIL = {fail!r}
LEAKED = []
OOMS = []


def record(event, obj=None):
    line = {{"pipeline": NAME, "event": event}}
    if obj is not None:
        line.update(ptr=obj["w"].data_ptr(), device=str(obj["w"].device))
    with open(LOG, "a") as handle:
        handle.write(json.dumps(line) + "\\n")


def load(device):
    obj = {{"w": torch.full((int(SIZE_MB * 2**20) // 4,), 1.0, device=device)}}
    record("load", obj)
    return obj


def unload(obj):
    record("unload")


def run(obj, leak_mb=0, oom=0, crash=False):
    if crash:
        os.abort()
    if len(OOMS) < oom:  # simulated: the first `oom` attempts in this load run out of memory
        OOMS.append(1)
        raise MemoryError("simulated out of memory")
    if leak_mb:
        LEAKED.append(torch.ones(int(leak_mb * 2**20) // 4, device=obj["w"].device))  # kept: a leak
    return {{"version": VERSION, "sum": float(obj["w"][:8].sum())}}
"""

HOOKS = """

def to_host(obj):
    if FAIL == "to_host":
        raise RuntimeError("simulated: to_host failed")
    moved = {"w": obj["w"].to("cpu", copy=True)}
    record("to_host", moved)
    return moved


def to_device(obj, device):
    if FAIL == "to_device":
        raise RuntimeError("simulated: to_device failed")
    moved = {"w": obj["w"].to(device, copy=True)}
    record("to_device", moved)
    return moved
"""

MODULE = """
import torch


def load(device):
    return torch.nn.Linear(1024, {rows}, bias=False, device=device)  # {size_mb} MiB of float32


def run(model):
    with torch.no_grad():
        model.weight.fill_(0.5)
        return {{"sum": float(model.weight.sum()), "device": str(model.weight.device)}}
"""


def write(
    directory: Path,
    name: str,
    kind: str = "hooks",
    size_mb: float = 16,
    version: int = 1,
    fail: str = "",
) -> Path:
    """Write pipeline `name` of `kind` ("hooks", "plain" or "module"); returns its path."""
    path = directory / f"{name}.py"
    log = str(directory / "moves.jsonl")
    if kind == "module":
        text = MODULE.format(rows=int(size_mb * MB / 4 / 1024), size_mb=size_mb)
    else:
        text = COMMON.format(name=name, log=log, size_mb=size_mb, version=version, fail=fail)
        text += HOOKS if kind == "hooks" else ""
    path.write_text(textwrap.dedent(text))
    return path


def moves(directory: Path) -> list[dict[str, Any]]:
    """What the pipelines logged, in order."""
    path = directory / "moves.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines()]


def events(directory: Path) -> list[tuple[str, str]]:
    return [(m["pipeline"], m["event"]) for m in moves(directory)]
