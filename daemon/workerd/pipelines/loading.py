"""A pipeline's code: imported afresh for each load, checked for load() and run() (and for
run_batch() with max_batch > 1), and the one line said when it needs a module this environment
lacks.

Runs in: the GPU worker, the cluster's pipeline hosts, and `workerd --check-config`.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from types import ModuleType
from typing import Any

from workerctl import protocol
from workerd import tasks
from workerd.config import PipelineConfig


class PipelineError(Exception):
    """A pipeline that cannot be loaded or run; `code` is the protocol error code."""

    def __init__(self, code: str, message: str, details: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.details = details or {}


def failure(exc: Exception) -> tuple[str, str, dict[str, Any]]:
    """What a failed load or run is answered with: (code, message, details)."""
    if isinstance(exc, PipelineError):
        return exc.code, exc.message, exc.details
    return tasks.task_failure(exc)


# What a missing module is installed with, where workerd itself brings it (the gpu extra).
EXTRAS = {"torch": "pip install 'workerd[gpu]'"}


def import_pipeline(config: PipelineConfig, path: str) -> ModuleType:
    """A fresh copy of the pipeline's code (re-executed, so edits take effect), checked for
    its load() and run(). `path` is its source file (for a module, where it was found)."""
    if config.module:
        module = sys.modules.get(config.module)
        module = importlib.reload(module) if module else importlib.import_module(config.module)
    else:
        spec = importlib.util.spec_from_file_location(f"workerd_pipeline_{config.name}", path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    for function in ("load", "run"):
        if not callable(getattr(module, function, None)):
            raise PipelineError(
                protocol.UNKNOWN_TASK, f"pipeline {config.name!r} has no {function}() function"
            )
    check_run_batch(config.name, module, config.max_batch)
    return module


def check_run_batch(name: str, module: ModuleType, max_batch: int) -> None:
    """max_batch > 1 needs run_batch(). Checked where the code is, since only there is it known
    (the master never imports a pipeline): by `workerd --check-config` (importcheck.py), which
    names the key, and by the GPU worker when a batch comes (pipelines/batching.py)."""
    if max_batch > 1 and not callable(getattr(module, "run_batch", None)):
        raise PipelineError(
            protocol.UNKNOWN_TASK,
            f"pipeline {name!r} has max_batch = {max_batch} but no run_batch(model, inputs) function",
        )


def missing_module(name: str, module: str) -> PipelineError:
    """One line for a pipeline that needs a module this environment lacks: a traceback would
    only repeat it, and the fix is an install, not a change of code."""
    fix = EXTRAS.get(module, f"install {module!r} into workerd's environment")
    message = f"pipeline {name!r} needs {module!r}, which is not installed: {fix}"
    return PipelineError(protocol.TASK_ERROR, message, {"type": "ModuleNotFoundError", "message": message})
