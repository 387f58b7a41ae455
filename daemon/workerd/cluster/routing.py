"""Where an accepted execute runs: here (the CPU pool, the GPU worker) or on the cluster.

Runs in: the master.

A pure decision, taken for every execute by handlers.py: it must cost nothing when the cluster
is off, so the local queue's depth (a walk of the workers) is asked for only in overflow mode.
"""

from __future__ import annotations

from collections.abc import Callable

from workerd.config import ClusterConfig

LOCAL, CLUSTER = "local", "cluster"


def destination(
    cluster: ClusterConfig,
    is_pipeline: bool,
    connected: bool,
    local_depth: Callable[[], int],
    cluster_room: Callable[[], bool],
) -> str:
    """LOCAL or CLUSTER, by [cluster]:

    - engine off: LOCAL;
    - a pipeline: CLUSTER when `pipelines = true` (then it has no local home: while the head is
      down it fails with the head's line instead of running on a GPU worker it was moved from);
    - a CPU task, mode "all": CLUSTER (the same: down means the error, not a silent fallback);
    - a CPU task, mode "overflow": CLUSTER only while the bridge is connected, more than
      `spill_queue` jobs wait for the local pool, and the cluster has room to start it soon
      (`cluster_room`); the local pool keeps serving otherwise. Without the last condition a
      spilled job could wait behind a queue on the cluster while local workers go idle:
      measured, 1 local worker and one 1-CPU node ran 50 ms sleeps at 29/s instead of ~40/s.
    """
    if not cluster.enabled:
        return LOCAL
    if is_pipeline:
        return CLUSTER if cluster.pipelines else LOCAL
    if cluster.mode == "all":
        return CLUSTER
    return CLUSTER if spills(cluster, connected, local_depth, cluster_room) else LOCAL


def spills(
    cluster: ClusterConfig,
    connected: bool,
    local_depth: Callable[[], int],
    cluster_room: Callable[[], bool],
) -> bool:
    """Overflow's rule, for a new execute and for a job already waiting in the local queue: the
    master moves waiting jobs to the cluster while this holds, so a batch does not end with the
    cluster idle behind a local queue that was filled while the cluster had no room."""
    return (
        cluster.enabled
        and cluster.mode == "overflow"
        and connected
        and local_depth() > cluster.spill_queue
        and cluster_room()
    )
