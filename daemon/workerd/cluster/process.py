"""One Ray bridge process, as the master sees it: a core.child.Child (its channel, the jobs it
holds, what was asked of it) and what is the bridge's own: its phase and what it has done.

Runs in: the master. The cluster backend (backend.py) holds one serving bridge and, after a
reload, retiring ones that finish the jobs they hold and stop; each bridge's child reports its
messages to the backend tagged with the bridge, so that a reaped pid, a message or a deadline
reaches the bridge it belongs to and no other.
"""

from __future__ import annotations

import logging
import os
import signal
from collections.abc import Callable
from typing import Any

from workerd import memory, messages
from workerd.config import Config, gpu_worker_settings
from workerd.core.child import Child
from workerd.core.lifecycle import Lane

log = logging.getLogger("workerd.cluster")

# Jobs a bridge holds at first, before it says how many CPUs the cluster has (backend.py).
MIN_IN_FLIGHT = 16

Callback = Callable[[Any], None]
Frames = list[Any]

# Phases: starting (spawned, not connected) -> ready -> stopping (told to stop, or killed).
STARTING, READY, STOPPING = "starting", "ready", "stopping"


def bridge_settings(config: Config, temp_dir: str) -> dict[str, Any]:
    """What a bridge is started with (bridge.py main)."""
    cluster = config.cluster
    gpu = gpu_worker_settings(config)
    return {
        "master_pid": os.getpid(),
        "log_level": logging.getLogger().getEffectiveLevel(),
        "address": cluster.address,
        "ship_modules": cluster.ship_modules,
        "task_modules": list(config.tasks.modules),
        "pipelines_on_cluster": cluster.pipelines,
        "pipelines": gpu.pop("pipelines"),
        "gpu": gpu,
        "num_gpus": cluster.num_gpus,
        "max_message_bytes": config.daemon.max_message_bytes,
        "temp_dir": temp_dir,
    }


class Bridge:
    def __init__(self, child: Child) -> None:
        assert child.pid is not None
        self.child = child
        self.pid = child.pid  # kept once reaped, for the logs
        self.phase = STARTING
        self.jobs_done = 0

    @property
    def lane(self) -> Lane:
        return self.child.lane

    def stop(self) -> None:
        """Ask it to end: ray.shutdown() when connected (a private head stops with it), SIGTERM
        while it is still connecting. Once."""
        if self.phase == STOPPING:
            return
        if self.phase == READY:
            self.child.send([messages.STOP])
        else:
            self.child.signal(signal.SIGTERM)
        self.phase = STOPPING

    def kill(self) -> None:
        self.child.kill_now()
        self.phase = STOPPING

    def describe(self, state: str) -> dict[str, Any]:
        """Its line in memory_status's `workers`."""
        line = {"pid": self.pid, "kind": "bridge", "state": state, "tasks_done": self.jobs_done}
        return line | memory.process_memory(self.pid)
