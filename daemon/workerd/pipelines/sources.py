"""Pipeline source files: where a pipeline's code lives, and the SHA-256 that keys its cache.

Runs in: the GPU worker, the cluster's pipeline hosts and the Ray bridge.

Used by the GPU worker's pipeline cache (cache.py), which reloads a pipeline whose file
changed, and by the Ray bridge (cluster/bridge.py), which ships the source and its digest with each run
so that an edited file reloads on every node. Kept apart from cache.py because that module
imports torch, and the bridge never does.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import os

from workerctl import protocol
from workerd.config import PipelineConfig


class SourceError(Exception):
    """A pipeline whose source cannot be found or read; `code` is the protocol error code."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.code = protocol.UNKNOWN_TASK
        self.message = message


@dataclasses.dataclass(frozen=True)
class Source:
    path: str
    sha256: str
    data: bytes


class Sources:
    """Finds pipeline files and reads them, again only when a file's size, mtime or inode changed."""

    def __init__(self) -> None:
        self._read: dict[str, tuple[tuple[int, int, int], Source]] = {}
        self._origins: dict[str, str] = {}

    def path(self, config: PipelineConfig) -> str:
        if config.path:
            return config.path
        # find_spec walks sys.path (and imports a dotted name's parent packages): once per module.
        if config.module not in self._origins:
            try:
                spec = importlib.util.find_spec(config.module)
            except (ImportError, ValueError):
                spec = None
            if spec is None or not spec.origin or not os.path.isfile(spec.origin):
                raise SourceError(f"pipeline {config.name!r}: module {config.module!r} not found")
            self._origins[config.module] = spec.origin
        return self._origins[config.module]

    def read(self, path: str) -> Source:
        try:
            info = os.stat(path)
            key = (info.st_mtime_ns, info.st_size, info.st_ino)
            known = self._read.get(path)
            if known and known[0] == key:
                return known[1]
            with open(path, "rb") as handle:
                data = handle.read()
        except OSError as exc:
            raise SourceError(f"pipeline source {path}: {exc.strerror}") from None
        source = Source(path, hashlib.sha256(data).hexdigest(), data)
        self._read[path] = (key, source)
        return source
