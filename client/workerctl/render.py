"""Human-readable tables for `workerctl status`, `workerctl memory` and `workerctl clear`."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any


def mib(value: Any) -> str:
    return "-" if value is None else f"{value / 1048576:.1f}"


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [list(map(str, headers))] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    return "\n".join(
        "  ".join(cell.rjust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in cells
    )


def client_row(c: dict[str, Any]) -> list[Any]:
    share = f"{c['share']:.0%}"
    return [c["client"], c.get("user") or "-", c["weight"], c["queued"], c["running"], c["completed"], share]


def render_status(status: dict[str, Any]) -> str:
    pool = status.get("pool", {})
    queue = status.get("queue", {})
    lines = [
        f"workerd {status.get('version')}  pid {status.get('pid')}  "
        f"up {status.get('uptime_s', 0):.1f} s  state {state(status)}",
        f"socket  {status.get('socket')}",
        f"config  {status.get('config')}",
        f"pool    {pool.get('size', 0)}/{pool.get('target', 0)} workers "
        f"({pool.get('idle', 0)} idle, {pool.get('busy', 0)} busy), "
        f"generation {pool.get('generation', 0)}",
        f"queue   {queue.get('depth', 0)}/{queue.get('max', 0)} waiting",
    ]
    if pool.get("error"):
        lines.insert(4, f"ERROR   CPU pool unavailable: {pool['error']}")
    searched = (status.get("tasks") or {}).get("sys_path")
    if searched:  # where the zygote found the task code: [tasks] path first
        lines.append(f"path    {':'.join(map(str, searched))}")
    gpu = status.get("gpu") or {}
    if gpu.get("error"):
        lines.append(f"ERROR   pipelines unavailable: {gpu['error']}")
    each = status.get("gpus") or []
    if gpu.get("enabled") and len(each) > 1:
        lines.append(f"gpu     {len(each)} workers, {gpu.get('queue', 0)} waiting")
        lines.extend(f"  {g.get('device')}  {gpu_state(g)}" for g in each)
    elif gpu.get("enabled"):
        lines.append(f"gpu     {worker_state(gpu)} on {gpu.get('device') or '-'}, {gpu_state(gpu, 'state')}")
    cluster = status.get("cluster")
    if cluster:
        lines.append(cluster_line(cluster))
    clients = [c for c in status.get("clients") or [] if c.get("queued") or c.get("running")]
    if clients:  # fair share (docs/operations.md): only those with work in flight
        lines.append("clients")
        headers = ["client", "user", "weight", "queued", "running", "done", "share"]
        rows = [client_row(c) for c in clients]
        lines.extend("  " + line for line in table(headers, rows).splitlines())
    lines.extend(render_metrics(status.get("metrics") or {}))
    counters = status.get("counters") or {}
    if counters:
        lines.append("counters")
        lines.extend(f"  {key}: {value}" for key, value in sorted(counters.items()))
    return "\n".join(lines)


def state(status: dict[str, Any]) -> str:
    """The daemon's state; "degraded" while it runs but cannot serve CPU tasks (the task code
    failed to import: the ERROR line says why), never "running" then."""
    failed = status.get("degraded") or (status.get("pool") or {}).get("error")
    if status.get("state") == "running" and failed:
        return "degraded"
    return str(status.get("state"))


def cluster_line(cluster: dict[str, Any]) -> str:
    """One line: where the cluster is and how it serves, or the one line saying why it cannot."""
    head = f"cluster {cluster.get('engine')} at {cluster.get('address')}, mode {cluster.get('mode')}"
    if cluster.get("state") == "down":
        return f"{head}: DOWN: {cluster.get('error')}"
    if cluster.get("state") != "ready":
        return f"{head}: {cluster.get('state')}"
    nodes = cluster.get("nodes") or []
    return (
        f"{head}: {len(nodes)} node(s), {cluster.get('cpus', 0):g} CPUs, {cluster.get('gpus', 0):g} GPUs, "
        f"{cluster.get('queue', 0)} waiting, {cluster.get('running', 0)} running"
        + (f", {cluster.get('hosts', 0)} pipeline host(s)" if cluster.get("pipelines") else "")
    )


def gpu_state(gpu: dict[str, Any], *leave_out: str) -> str:
    """A GPU worker's line in `status`: state, pid, runs waiting, pipelines by tier."""
    parts = {
        "state": worker_state(gpu),
        "pid": f"pid {gpu.get('pid') or '-'}",
        "queue": f"{gpu.get('queue', 0)} waiting",
        "cached": f"cached: {', '.join(gpu.get('cached') or []) or '-'}",
    }
    if gpu.get("parked"):
        parts["parked"] = f"parked: {', '.join(gpu['parked'])}"
    return ", ".join(text for key, text in parts.items() if key not in leave_out)


def worker_state(gpu: dict[str, Any]) -> str:
    """Its state, and the size of the batch it runs ("busy, batch of 8")."""
    batch = gpu.get("batch") or 0
    return f"{gpu.get('state')}, batch of {batch}" if batch > 1 else str(gpu.get("state"))


def each_gpu(result: dict[str, Any]) -> list[dict[str, Any] | None]:
    """Every device's map in a memory_status or clear_memory result (`gpus`; from a daemon
    that predates it, `gpu` alone)."""
    each = result.get("gpus")
    return list(each) if each is not None else [result.get("gpu")]


def gpu_label(gpu: dict[str, Any] | None, several: bool) -> str:
    return f"gpu {gpu.get('index')}" if several and gpu else "gpu"


def render_metrics(metrics: dict[str, Any]) -> list[str]:
    """The same figures the Prometheus endpoint serves (docs/operations.md, "Metrics")."""
    lines = [f"metrics {metrics.get('endpoint') or 'endpoint off ([metrics] listen)'}"]
    latency = {(h["command"], h["pool"]): h for h in metrics.get("latency_seconds", [])}
    rows = []
    for entry in metrics.get("requests", []):
        histogram = latency.get((entry["command"], entry["pool"]))
        rows.append(
            [
                entry["command"],
                entry["pool"] or "-",
                entry["outcome"],
                entry["count"],
                *latency_cells(histogram),
            ]
        )
    if rows:
        headers = ["command", "pool", "outcome", "count", "mean ms", "p50 <= ms", "p99 <= ms"]
        lines += ["", table(headers, rows), "(latency per command and pool, all outcomes together)", ""]
    cache = metrics.get("pipeline_cache") or {}
    if any(cache.values()):
        lines.append("pipeline cache  " + ", ".join(f"{key} {value}" for key, value in cache.items()))
    recycles = metrics.get("recycles") or {}
    if recycles:
        lines.append("recycled  " + ", ".join(f"{key} {value}" for key, value in recycles.items()))
    restarts = [r for r in metrics.get("restarts", []) if r["count"]]
    if restarts:
        lines.append("restarts  " + ", ".join(f"{r['kind']} {r['reason']} {r['count']}" for r in restarts))
    return lines


def latency_cells(histogram: dict[str, Any] | None) -> list[str]:
    """Mean, and the bucket bounds the median and 99th percentile fall under, in ms."""
    if not histogram or not histogram["count"]:
        return ["-", "-", "-"]
    count = histogram["count"]
    mean = f"{histogram['sum'] / count * 1000:.2f}"
    return [mean, *(bucket_bound(histogram["buckets"], count, q) for q in (0.5, 0.99))]


def bucket_bound(buckets: Sequence[Sequence[float]], count: int, q: float) -> str:
    """The smallest bucket bound (ms) with at least q of the observations at or under it."""
    for bound, cumulative in buckets:
        if cumulative >= q * count:
            return f"{bound * 1000:g}"
    return f"> {buckets[-1][0] * 1000:g}" if buckets else "-"


def render_memory(memory: dict[str, Any]) -> str:
    daemon = memory.get("daemon", {})
    lines = [f"daemon pid {daemon.get('pid')}  rss {mib(daemon.get('rss_bytes'))} MiB", ""]
    rows = [
        [
            w.get("pid"),
            w.get("kind"),
            w.get("state"),
            w.get("tasks_done"),
            mib(w.get("rss_bytes")),
            mib(w.get("uss_bytes")),
            mib(w.get("pss_bytes")),
            mib(w.get("shared_bytes")),
        ]
        for w in memory.get("workers", [])
    ]
    headers = ["pid", "kind", "state", "tasks", "rss MiB", "uss MiB", "pss MiB", "shared MiB"]
    lines.append(table(headers, rows))
    each = each_gpu(memory)
    for gpu in each:
        if gpu and "pipelines" in gpu:
            lines += render_gpu_memory(gpu)
        elif gpu and gpu.get("error"):
            lines += ["", f"{gpu_label(gpu, len(each) > 1):<8}{gpu['error']}"]
    cluster = memory.get("cluster")
    if cluster:
        lines.extend(render_cluster_memory(cluster))
    return "\n".join(lines)


def render_cluster_memory(cluster: dict[str, Any]) -> list[str]:
    """Each node, its Ray processes' memory, and each pipeline host's cache."""
    lines = ["", cluster_line(cluster)]
    rows = []
    for node in cluster.get("nodes") or []:
        for process in node.get("processes") or []:
            rows.append(
                [
                    str(node.get("node_id", ""))[:12],
                    node.get("address"),
                    process.get("pid"),
                    process.get("name"),
                    mib(process.get("rss_bytes")),
                    mib(process.get("uss_bytes")),
                ]
            )
    if rows:
        lines.append(table(["node", "address", "pid", "process", "rss MiB", "uss MiB"], rows))
    for host in cluster.get("hosts") or []:
        if "error" in host:
            lines += ["", f"pipeline host {host.get('index')}: {host['error']}"]
            continue
        node = str(host.get("node_id", ""))[:12]
        lines.extend(
            render_gpu_memory(host, f"pipeline host {host.get('index')} (node {node}, pid {host.get('pid')})")
        )
    return lines


def render_gpu_memory(gpu: dict[str, Any], title: str = "gpu") -> list[str]:
    """One pipeline cache's figures and its pipelines, in `workerctl memory`: a GPU worker's, or
    a cluster pipeline host's."""
    lines = [
        "",
        f"{title} {gpu.get('device')}  allocated {mib(gpu.get('allocated_bytes'))} MiB  "
        f"reserved {mib(gpu.get('reserved_bytes'))} MiB  "
        f"peak {mib(gpu.get('peak_allocated_bytes'))} MiB  "
        f"free {mib(gpu.get('free_bytes'))} / {mib(gpu.get('total_bytes'))} MiB  "
        f"runs {gpu.get('runs')}",
    ]
    if gpu.get("host_budget_bytes"):
        lines.append(
            f"host tier  parked {mib(gpu.get('host_bytes'))} / {mib(gpu['host_budget_bytes'])} MiB  "
            f"pinned {mib(gpu.get('pinned_bytes'))} MiB"
        )
    now = time.time()
    pipelines = [
        [
            p.get("name"),
            str(p.get("sha256", ""))[:12],
            p.get("tier", "device"),
            mib(p.get("bytes")),
            mib(p.get("retained_bytes")),
            p.get("runs"),
            f"{now - p['last_used']:.0f} s ago" if p.get("last_used") else "-",
        ]
        for p in gpu.get("pipelines", [])
    ]
    if pipelines:
        headers = ["pipeline", "sha256", "tier", "MiB", "retained MiB", "runs", "last used"]
        lines.append(table(headers, pipelines))
    return lines


def render_clear(result: dict[str, Any]) -> str:
    """What `clear_memory` freed: a row per CPU worker, then a line per GPU worker."""
    rows = []
    for w in result.get("workers", []):
        if "skipped" in w:
            rows.append([w.get("pid"), "-", "-", "-", "-", f"skipped ({w['skipped']})"])
            continue
        before, after = w.get("uss_before"), w.get("uss_after")
        freed = None if before is None or after is None else max(before - after, 0)
        rows.append([w.get("pid"), w.get("freed_objects"), mib(before), mib(after), mib(freed), ""])
    headers = ["pid", "objects freed", "uss before MiB", "uss after MiB", "freed MiB", "note"]
    lines = [
        f"level {result.get('level')}: CPU workers freed {mib(result.get('freed_bytes'))} MiB",
        "",
        table(headers, rows),
    ]
    each = each_gpu(result)
    for gpu in each:
        label = f"{gpu_label(gpu, len(each) > 1):<8}"
        if gpu is None or ("error" not in gpu and "level" not in gpu):
            lines += ["", f"{label}not running"]
        elif "error" in gpu:
            lines += ["", f"{label}{gpu['error']}"]
        else:
            lines += ["", cleared_line(gpu, "gpu")]
    cluster = result.get("cluster") or {}
    for host in cluster.get("hosts", []):
        title = f"pipeline host (node {str(host.get('node_id', ''))[:12]})"
        lines += ["", f"{title}     {host['error']}" if "error" in host else cleared_line(host, title)]
    if "error" in cluster:
        lines += ["", f"cluster {cluster['error']}"]
    return "\n".join(lines)


def cleared_line(gpu: dict[str, Any], title: str) -> str:
    """What clear_memory freed in one pipeline cache."""
    dropped = ", ".join(gpu.get("dropped") or []) or "-"
    return (
        f"{title} {gpu.get('device')}  objects freed {gpu.get('freed_objects')}  "
        f"allocated {mib(gpu.get('allocated_before'))} -> {mib(gpu.get('allocated_after'))} MiB  "
        f"reserved {mib(gpu.get('reserved_before'))} -> {mib(gpu.get('reserved_after'))} MiB  "
        f"freed {mib(gpu.get('freed_bytes'))} MiB  dropped: {dropped}"
    )
