"""`workerd --check-config FILE`: import the configured code as the daemon would, and report
every failure.

Runs in: `workerd --check-config`, a process of its own (it imports task code).

The file check alone passes a config whose modules do not import; the daemon would then boot
degraded. So the check also imports the code, in the same kind of processes that will: one fresh
interpreter imports `[pool] preload`, then `[tasks] modules`, in that order, as a zygote does;
another imports each pipeline, as the GPU worker does (not when `[gpu] enabled = "false"`).
Every import is tried even after one has failed, so one run lists every failure. Child
processes keep user code, and a crash or a hang in it, out of the checking process.

    parent                                child (python -P -m workerd.importcheck)
    argv: JSON list of entries,    ---->  puts [tasks] path first on sys.path (as a zygote and the
          JSON [tasks] path               GPU worker do; -P: not the current directory, as they
                                          don't); first line: {"sys_path": [...]}; then imports
                                          each in order; task code's stdout goes to stderr, one
                                          JSON line per entry to the real stdout:
    reads one result per entry     <----  {"problem": null | "failed to import: ExcType: message"}
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from typing import Any

from workerd.config import Config, PipelineConfig
from workerd.core.processes import put_first_on_path

# A child that takes longer is reported as hung; the unit gives a start this long, too.
TIMEOUT_S = 300.0


def entries(config: Config) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """What each child imports: (pool entries, pipeline entries), each naming its config key."""
    pool = [{"key": "[pool] preload", "module": name} for name in config.pool.preload]
    pool += [{"key": "[tasks] modules", "module": name} for name in config.tasks.modules]
    pipelines = []
    if config.gpu.enabled != "false":
        for pipeline in config.pipelines.values():
            field = "module" if pipeline.module else "path"
            pipelines.append({"key": f"[pipelines.{pipeline.name}] {field}", "pipeline": vars(pipeline)})
    return pool, pipelines


def check(config: Config) -> tuple[list[str], list[str]]:
    """(one line per failure, each naming the file and the key: [] when everything imports;
    the sys.path the task code was searched in, [tasks] path first)."""
    batches = [batch for batch in entries(config) if batch] or [[]]  # [] still says the path
    children = [start(batch, config.tasks.path) for batch in batches]
    problems: list[str] = []
    searched: list[str] = []
    for batch, child in zip(batches, children, strict=True):
        lines, searched = finish(batch, child)
        problems += [f"{config.source}: {line}" for line in lines]
    return problems, searched


def start(batch: list[dict[str, Any]], path: tuple[str, ...]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-P", "-m", "workerd.importcheck", json.dumps(batch), json.dumps(list(path))],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        text=True,
    )


def finish(batch: list[dict[str, Any]], child: subprocess.Popen[str]) -> tuple[list[str], list[str]]:
    hung = False
    try:
        output, _ = child.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        hung = True
        child.kill()
        output, _ = child.communicate()
    results = [json.loads(line) for line in output.splitlines()]
    searched: list[str] = results.pop(0)["sys_path"] if results and "sys_path" in results[0] else []
    problems = [
        f"{entry['key']}: {what(entry)} {result['problem']}"
        for entry, result in zip(batch, results, strict=False)
        if result["problem"]
    ]
    if len(results) < len(batch):  # the child died or hung in the next import
        entry, rest = batch[len(results)], batch[len(results) + 1 :]
        if hung:
            why = f"did not finish importing within {TIMEOUT_S:g} s"
        elif child.returncode < 0:
            why = f"killed the importing process (signal {-child.returncode})"
        else:
            why = f"ended the importing process (exit status {child.returncode})"
        problems.append(f"{entry['key']}: {what(entry)} {why}")
        problems += [f"{e['key']}: {what(e)} not checked (the import before it never ended)" for e in rest]
    return problems, searched


def what(entry: dict[str, Any]) -> str:
    if "module" in entry:
        return repr(entry["module"])
    pipeline = entry["pipeline"]
    return repr(pipeline["module"] or pipeline["path"])


# -- the child --------------------------------------------------------------------------------


def problem_of(entry: dict[str, Any]) -> str | None:
    """What is wrong with importing one entry, as the end of a sentence; None if nothing."""
    try:
        if "module" in entry:
            importlib.import_module(entry["module"])
            return None
        from workerd.pipelines.loading import PipelineError, import_pipeline

        config = PipelineConfig(**entry["pipeline"])
        try:
            import_pipeline(config, config.path)
        except PipelineError as exc:  # it imported, but has no load() or run()
            return f"is no pipeline: {exc.message}"
    except BaseException as exc:  # SystemExit and KeyboardInterrupt from module code, too
        return f"failed to import: {type(exc).__name__}: {exc}"
    return None


def main(batch: list[dict[str, Any]], path: list[str]) -> None:
    # Task code may print: its output goes to stderr, and stdout carries only our results.
    results = os.fdopen(os.dup(sys.stdout.fileno()), "w")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    put_first_on_path(path)
    results.write(json.dumps({"sys_path": sys.path}) + "\n")
    results.flush()
    for entry in batch:
        results.write(json.dumps({"problem": problem_of(entry)}) + "\n")
        results.flush()


if __name__ == "__main__":
    main(json.loads(sys.argv[1]), json.loads(sys.argv[2]))
