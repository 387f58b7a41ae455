"""Where an accepted execute runs: here (the CPU pool, the GPU worker) or on the cluster.

A pure decision, taken for every execute by handlers.py: it must cost nothing when the cluster
is off, so the local queue's depth (a walk of the workers) is asked for only in overflow mode.
"""

from __future__ import annotations

from collections.abc import Callable

from ..config import ClusterConfig

LOCAL, CLUSTER = "local", "cluster"


def destination(
    cluster: ClusterConfig, is_pipeline: bool, connected: bool, local_waiting: Callable[[], int]
) -> str:
    """LOCAL or CLUSTER, by [cluster]:

    - engine off: LOCAL;
    - a pipeline: CLUSTER when `pipelines = true` (then it has no local home: while the head is
      down it fails with the head's line instead of running on a GPU worker it was moved from);
    - a CPU task, mode "all": CLUSTER (the same: down means the error, not a silent fallback);
    - a CPU task, mode "overflow": CLUSTER only while the bridge is connected and more than
      `spill_queue` jobs wait for the local pool; the local pool keeps serving otherwise.
    """
    if not cluster.enabled:
        return LOCAL
    if is_pipeline:
        return CLUSTER if cluster.pipelines else LOCAL
    if cluster.mode == "all":
        return CLUSTER
    return CLUSTER if connected and local_waiting() > cluster.spill_queue else LOCAL
