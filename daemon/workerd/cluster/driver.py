"""The bridge as a Ray driver: connecting to the head (or starting a private one on 127.0.0.1),
what ships in the job's runtime_env, and how a Ray failure reads to the master.

Runs in: the Ray bridge (cluster/bridge.py).
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import logging
import socket
import threading
from collections.abc import Callable
from typing import Any

from workerctl import protocol
from workerd import messages

log = logging.getLogger("workerd.cluster.bridge")

# A head that accepts the TCP connection but never answers would keep ray.init waiting for
# many minutes (measured: 820 s); past this the bridge reports it down and exits.
CONNECT_TIMEOUT_S = 60.0
PROBE_TIMEOUT_S = 2.0
RAY_ENVIRONMENT = {
    "RAY_gcs_rpc_server_reconnect_timeout_s": "5",  # a lost head ends this driver in seconds
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_USAGE_STATS_ENABLED": "0",
}
LOST_ERRORS = (
    "WorkerCrashedError",
    "NodeDiedError",
    "ObjectLostError",
    "ObjectFetchTimedOutError",
    "OwnerDiedError",
    "LocalRayletDiedError",
    "RayActorError",
    "ActorDiedError",
    "ActorUnavailableError",
    "OutOfMemoryError",
)


def one_line(exc: BaseException, limit: int = 400) -> str:
    text = str(exc).strip().splitlines()
    line = text[0] if text else type(exc).__name__
    return line if len(line) <= limit else line[: limit - 3] + "..."


def loopback(address: str) -> bool:
    return address == "local" or address.rpartition(":")[0] in ("127.0.0.1", "localhost", "::1", "[::1]")


def py_modules(task_modules: list[str]) -> list[str]:
    """What ships in the runtime_env: each task module's top-level package (its directory) or
    single file, found here without importing it. workerd's own packages are not shipped: every
    node has them installed (its Ray workers import cluster/remote.py)."""
    paths: list[str] = []
    for name in task_modules:
        top = name.partition(".")[0]
        if top in ("workerd", "workerctl"):
            continue
        spec = importlib.util.find_spec(top)
        if spec is None:
            log.error("[cluster] ship_modules: module %r is not importable here; not shipped", top)
            continue
        locations = list(spec.submodule_search_locations or [])
        path = locations[0] if locations else spec.origin
        if path and path not in paths:
            paths.append(path)
    return paths


def classify(exc: BaseException) -> tuple[bytes, dict[str, Any]]:
    """How a job's Ray failure is reported: LOST (what ran it died; it may have run) or
    FAILED (Ray could not run it)."""
    names = {cls.__name__ for cls in type(exc).__mro__}
    if names & set(LOST_ERRORS):
        return messages.LOST, {"what": "the Ray worker running it", "how": f"was lost ({one_line(exc)})"}
    if "RuntimeEnvSetupError" in names:
        return messages.FAILED, {
            "code": protocol.INTERNAL,
            "message": f"Ray could not set up the runtime_env: {one_line(exc)}",
        }
    cause = getattr(exc, "cause", None)
    message = f"the Ray task failed: {one_line(cause if isinstance(cause, BaseException) else exc)}"
    return messages.FAILED, {"code": protocol.INTERNAL, "message": message}


def probe(address: str) -> str | None:
    """Why the head at host:port cannot be reached over TCP (None: it accepts connections)."""
    host, _, port = address.rpartition(":")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=PROBE_TIMEOUT_S).close()
    except OSError as exc:
        return exc.strerror or str(exc)
    return None


def connect(settings: dict[str, Any], give_up: Callable[[str], None]) -> tuple[Any, str]:
    """ray.init for [cluster] address; returns (the ray module, the GCS address). Raises
    ConnectionError with one line when the head cannot be reached.

    On this thread, the main one, never on a helper thread: Ray starts a private head's
    processes with PR_SET_PDEATHSIG, which fires when the *thread* that started them ends
    (measured: a head started from a pool thread died with it, 5 s after connecting). A head
    that never answers is given up on by a timer thread, which says so and ends the process."""
    address = settings["address"]
    if address != "local":
        why = probe(address)
        if why is not None:
            raise ConnectionError(f"Ray head at {address} is unreachable ({why})")
    import ray

    options: dict[str, Any] = {
        "include_dashboard": False,
        "log_to_driver": False,
        "logging_level": logging.WARNING,
        "namespace": "workerd",
    }
    if loopback(address):
        options["_node_ip_address"] = "127.0.0.1"
    if address == "local":
        options["_temp_dir"] = settings["temp_dir"]
    else:
        options["address"] = address
    from workerd.cluster.remote import MAX_MESSAGE_BYTES, TASK_MODULES

    # What every Ray worker of this job needs to know (cluster/remote.py reads it once).
    variables = {
        TASK_MODULES: json.dumps(settings["task_modules"]),
        MAX_MESSAGE_BYTES: str(settings["max_message_bytes"]),
    }
    options["runtime_env"] = {"env_vars": variables}
    if settings["ship_modules"]:
        options["runtime_env"]["py_modules"] = py_modules(settings["task_modules"])
    where = "a private Ray head" if address == "local" else f"Ray head at {address}"
    timer = threading.Timer(
        CONNECT_TIMEOUT_S, give_up, [f"{where} did not answer within {CONNECT_TIMEOUT_S:g} s"]
    )
    timer.daemon = True
    timer.start()
    try:
        context = ray.init(**options)
    except Exception as exc:
        raise ConnectionError(f"cannot connect to {where}: {one_line(exc)}") from None
    finally:
        timer.cancel()
    return ray, context.address_info.get("gcs_address", address)


def cluster_state(ray: Any) -> dict[str, Any]:
    """The cluster's nodes as the master shows them, and the CPUs and GPUs of those alive."""
    nodes = [
        {
            "node_id": node["NodeID"],
            "address": node["NodeManagerAddress"],
            "alive": bool(node["Alive"]),
            "cpus": node.get("Resources", {}).get("CPU", 0),
            "gpus": node.get("Resources", {}).get("GPU", 0),
        }
        for node in ray.nodes()
    ]
    alive = [node for node in nodes if node["alive"]]
    return {
        "nodes": nodes,
        "cpus": sum(node["cpus"] for node in alive),
        "gpus": sum(node["gpus"] for node in alive),
    }


async def gather(refs: list[Any], wait: float) -> list[Any]:
    """Each ref's value, or {"error": …} for one that failed or did not answer in time."""

    async def one(ref: Any) -> Any:
        try:
            return await asyncio.wait_for(ref, wait)
        except Exception as exc:
            return {"error": one_line(exc) if str(exc) else f"no answer within {wait:g} s"}

    return list(await asyncio.gather(*(one(ref) for ref in refs)))
