"""Configuration: TOML with the pinned names (docs/operations.md §2), checked key by key.

Runs in: both: the master reads the file; children are given plain settings from it (and
the GPU worker and the bridge build PipelineConfig from theirs).

Every mistake is one ConfigError naming the file and the key, so `workerd --check-config` and a
failed boot say exactly what to fix. With no file, EMBEDDED_DEFAULT serves the bundled examples.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import re
import tomllib
from typing import Any

from workerctl import protocol
from workerd.configvalues import (
    Checker,
    Grants,
    Principals,
    absolute_path,
    boolean,
    cluster_address,
    device_indices,
    devices,
    directories,
    engine,
    grants,
    integer,
    listen,
    listen_address,
    module_name,
    module_names,
    number,
    one_of,
    principals,
    string,
)

EMBEDDED_DEFAULT = """\
# workerd's embedded default: serves the bundled examples on a fresh install.
[daemon]
max_queue = 10000
max_message_mb = 64
stop_timeout_s = 30

[pool]
workers = 0
preload = []
gc_freeze = true
max_tasks_per_worker = 0
max_worker_memory_mb = 0
task_timeout_s = 300
prefetch = 4
max_queue_per_client = 0

[tasks]
modules = ["workerd.examples.tasks"]

[gpu]
enabled = "auto"
device = "auto"
start = "lazy"
memory_budget_mb = 0
host_memory_budget_mb = 0
retained_warn_mb = 500
run_timeout_s = 600

[pipelines.demo]
module = "workerd.examples.demo_pipeline"

[access]
execute = []
clear_memory = []
scale = []
reload = []

[fairness]
# Clients share the workers by weighted round robin: "uid" (a client is a user) or "unit" (its
# systemd unit where it runs in one). Tables by "user", "@group", "uid:N", "gid:N", "unit:NAME".
identity = "uid"
weights = {}
max_priority = {}

[metrics]
# A Prometheus endpoint, e.g. "127.0.0.1:9464" (loopback only); empty: off.
listen = ""

[cluster]
# "ray": send work to a Ray cluster (needs the cluster extra); empty: off.
engine = ""
address = "local"
mode = "overflow"
spill_queue = 0
pipelines = false
num_gpus = 0
ship_modules = false
"""

EMBEDDED_SOURCE = "<embedded default>"
# The largest batch a pipeline may ask for: one batch is one message to its GPU worker.
MAX_BATCH = 1024
PIPELINE_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")


class ConfigError(Exception):
    pass


@dataclasses.dataclass(frozen=True)
class DaemonConfig:
    socket: str = ""
    max_queue: int = 10000
    max_message_mb: float = 64
    stop_timeout_s: float = 30.0

    @property
    def max_message_bytes(self) -> int:
        """The message size limit, in bytes: the one figure every size check starts from."""
        return int(self.max_message_mb * 1024 * 1024)


@dataclasses.dataclass(frozen=True)
class PoolConfig:
    workers: int = 0
    preload: tuple[str, ...] = ()
    gc_freeze: bool = True
    max_tasks_per_worker: int = 0
    max_worker_memory_mb: float = 0
    task_timeout_s: float = 300.0
    prefetch: int = 4  # jobs a worker may hold beyond the one it runs (bench: 4 ≈ 2x of 0)
    max_queue_per_client: int = 0  # requests one client may have waiting; 0 = only [daemon] max_queue

    def worker_count(self) -> int:
        return self.workers or os.cpu_count() or 1


@dataclasses.dataclass(frozen=True)
class TasksConfig:
    modules: tuple[str, ...] = ()
    # Directories put first on the zygote's and the GPU worker's sys.path, absolute once parsed
    # (a relative one is relative to the config file's directory).
    path: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class GpuConfig:
    enabled: str = "auto"  # auto | true | false
    device: str = "auto"
    start: str = "lazy"  # lazy | boot
    memory_budget_mb: float = 0
    run_timeout_s: float = 600.0
    host_memory_budget_mb: float = 0  # 0 = no host tier: pipelines evicted from the device are dropped
    retained_warn_mb: float = 500  # 0 = never warn
    # None: one GPU worker on `device`, as before; "all": one per visible CUDA device; or indices.
    devices: str | tuple[int, ...] | None = None


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
    name: str
    module: str = ""
    path: str = ""
    max_retained_mb: float = 0  # 0 = never reload for retained growth
    devices: tuple[int, ...] = ()  # () = any device
    max_batch: int = 1  # > 1: queued runs go to its run_batch() together (gpu/batches.py)
    max_wait_ms: float = 0  # how long an idle device may wait for a fuller batch


@dataclasses.dataclass(frozen=True)
class AccessConfig:
    """[access]: commands limited to some users or groups (see access.py)."""

    execute: Principals = dataclasses.field(default_factory=Principals)
    clear_memory: Principals = dataclasses.field(default_factory=Principals)
    scale: Principals = dataclasses.field(default_factory=Principals)
    reload: Principals = dataclasses.field(default_factory=Principals)


@dataclasses.dataclass(frozen=True)
class MetricsConfig:
    """[metrics]: the optional Prometheus endpoint (exporter.py)."""

    listen: str = ""  # "HOST:PORT" on a loopback address; "" = off

    def address(self) -> tuple[str, int] | None:
        """(host, port) to bind, or None when off."""
        return listen_address(self.listen) if self.listen else None


@dataclasses.dataclass(frozen=True)
class ClusterConfig:
    """[cluster]: where work goes beyond this machine (cluster/)."""

    engine: str = ""  # "" = off; "ray"
    address: str = "local"  # "local": a private Ray on this machine; else "host:port" of a Ray head
    mode: str = "overflow"  # "overflow": past spill_queue waiting local jobs; "all": every CPU execute
    spill_queue: int = 0
    pipelines: bool = False  # pipelines run in Ray actors instead of the local GPU worker
    num_gpus: float = 0  # GPUs each pipeline actor asks Ray for
    ship_modules: bool = False  # [tasks] modules travel to the nodes in a runtime_env (py_modules)

    @property
    def enabled(self) -> bool:
        return self.engine == "ray"


ACCESS_COMMANDS = tuple(field.name for field in dataclasses.fields(AccessConfig))

WEIGHT_MAX = 1000


@dataclasses.dataclass(frozen=True)
class FairnessConfig:
    """[fairness]: how clients share the workers (clients.py says who a client is,
    core/queue.py which job goes next)."""

    identity: str = "uid"  # "uid": a client is a user; "unit": its systemd unit where it has one
    weights: Grants = dataclasses.field(default_factory=Grants)  # jobs per turn; unlisted: 1
    max_priority: Grants = dataclasses.field(default_factory=Grants)  # the cap between clients; unlisted: 0


@dataclasses.dataclass(frozen=True)
class Config:
    source: str
    daemon: DaemonConfig
    pool: PoolConfig
    tasks: TasksConfig
    gpu: GpuConfig
    pipelines: dict[str, PipelineConfig]
    access: AccessConfig = AccessConfig()
    fairness: FairnessConfig = FairnessConfig()
    metrics: MetricsConfig = MetricsConfig()
    cluster: ClusterConfig = ClusterConfig()

    def with_overrides(self, socket: str | None = None, workers: int | None = None) -> Config:
        """The config with command-line flags applied (flags beat the file)."""
        daemon = dataclasses.replace(self.daemon, socket=socket) if socket else self.daemon
        pool = self.pool if workers is None else dataclasses.replace(self.pool, workers=workers)
        return dataclasses.replace(self, daemon=daemon, pool=pool)


def ray_installed() -> bool:
    """Is Ray importable here? Asked without importing it: the master never imports ray."""
    return importlib.util.find_spec("ray") is not None


def check_cluster(source: str, cluster: ClusterConfig) -> None:
    if cluster.enabled and not ray_installed():
        raise ConfigError(
            f'{source}: [cluster] engine = "ray" needs Ray, which is not installed: '
            "pip install 'workerd[cluster]'"
        )


SECTIONS: dict[str, tuple[type, dict[str, Checker]]] = {
    "daemon": (
        DaemonConfig,
        {
            "socket": string,
            "max_queue": integer(1),
            "max_message_mb": number(0, exclusive=True),
            "stop_timeout_s": number(0),
        },
    ),
    "pool": (
        PoolConfig,
        {
            "workers": integer(0),
            "preload": module_names,
            "gc_freeze": boolean,
            "max_tasks_per_worker": integer(0),
            "max_worker_memory_mb": number(0),
            "task_timeout_s": number(0, exclusive=True),
            "prefetch": integer(0),
            "max_queue_per_client": integer(0),
        },
    ),
    "tasks": (TasksConfig, {"modules": module_names, "path": directories}),
    "gpu": (
        GpuConfig,
        {
            "enabled": one_of("auto", "true", "false"),
            "device": string,
            "start": one_of("lazy", "boot"),
            "memory_budget_mb": number(0),
            "run_timeout_s": number(0, exclusive=True),
            "host_memory_budget_mb": number(0),
            "retained_warn_mb": number(0),
            "devices": devices,
        },
    ),
    "access": (AccessConfig, dict.fromkeys(ACCESS_COMMANDS, principals)),
    "fairness": (
        FairnessConfig,
        {
            "identity": one_of("uid", "unit"),
            "weights": grants(1, WEIGHT_MAX),
            "max_priority": grants(protocol.PRIORITY_MIN, protocol.PRIORITY_MAX),
        },
    ),
    "metrics": (MetricsConfig, {"listen": listen}),
    "cluster": (
        ClusterConfig,
        {
            "engine": engine,
            "address": cluster_address,
            "mode": one_of("overflow", "all"),
            "spill_queue": integer(0),
            "pipelines": boolean,
            "num_gpus": number(0),
            "ship_modules": boolean,
        },
    ),
}


def parse_section(source: str, name: str, table: Any) -> Any:
    cls, checkers = SECTIONS[name]
    if not isinstance(table, dict):
        raise ConfigError(f"{source}: [{name}] must be a table")
    values = {}
    for key, raw in table.items():
        if key not in checkers:
            known = ", ".join(sorted(checkers))
            raise ConfigError(f"{source}: [{name}] unknown key {key!r} (known: {known})")
        try:
            values[key] = checkers[key](raw)
        except ValueError as exc:
            raise ConfigError(f"{source}: [{name}] {key}: {exc}, got {raw!r}") from None
    return cls(**values)


PIPELINE_KEYS: dict[str, Checker] = {
    "module": module_name,
    "path": absolute_path,
    "max_retained_mb": number(0),
    "devices": device_indices,
    "max_batch": integer(1, MAX_BATCH),
    "max_wait_ms": number(0),
}


def parse_pipeline(source: str, name: str, table: Any) -> PipelineConfig:
    where = f"{source}: [pipelines.{name}]"
    if not PIPELINE_NAME.match(name):
        raise ConfigError(f"{where} name must be letters, digits, '_', '-' or '.'")
    if not isinstance(table, dict):
        raise ConfigError(f"{where} must be a table")
    values = {}
    for key, raw in table.items():
        if key not in PIPELINE_KEYS:
            raise ConfigError(f"{where} unknown key {key!r} (known: {', '.join(PIPELINE_KEYS)})")
        try:
            values[key] = PIPELINE_KEYS[key](raw)
        except ValueError as exc:
            raise ConfigError(f"{where} {key}: {exc}, got {raw!r}") from None
    if ("module" in values) == ("path" in values):
        raise ConfigError(f"{where} needs exactly one of 'module' or 'path'")
    return PipelineConfig(name=name, **values)


def check_devices(source: str, gpu: GpuConfig, pipelines: dict[str, PipelineConfig]) -> None:
    """[gpu] devices against [gpu] device and the pipelines' pins (checks across keys)."""
    if gpu.devices is not None and gpu.device not in ("auto", "cuda", "cpu"):
        raise ConfigError(
            f'{source}: [gpu] device: with [gpu] devices, expected "auto", "cuda" or "cpu" '
            f"(the indices pick the devices), got {gpu.device!r}"
        )
    for pipeline in pipelines.values():
        if not pipeline.devices:
            continue
        where = f"{source}: [pipelines.{pipeline.name}] devices"
        if gpu.devices is None:
            raise ConfigError(f"{where}: a pin needs [gpu] devices")
        if gpu.devices == "all":
            continue  # which devices exist is known only at start (placement.worker_slots)
        missing = sorted(set(pipeline.devices) - set(gpu.devices))
        if missing:
            raise ConfigError(f"{where}: device {missing[0]} is not in [gpu] devices {list(gpu.devices)}")


def gpu_worker_settings(config: Config, device: str | None = None) -> dict[str, Any]:
    """What a GPU worker takes from the config, JSON-ready: its [gpu] keys and the pipelines.

    `device` is the torch device of this worker (one of several with [gpu] devices); the
    pipelines' pins stay with the master, which places the runs."""
    gpu = config.gpu
    return {
        "task_path": list(config.tasks.path),
        "device": device or gpu.device,
        "memory_budget_mb": gpu.memory_budget_mb,
        "host_memory_budget_mb": gpu.host_memory_budget_mb,
        "retained_warn_mb": gpu.retained_warn_mb,
        "pipelines": {
            # Not max_batch: the master batches, and tells the worker with each batch (a reload
            # that tunes it must not restart the workers, which would load every model again).
            name: {"name": p.name, "module": p.module, "path": p.path, "max_retained_mb": p.max_retained_mb}
            for name, p in config.pipelines.items()
        },
    }


def parse(text: str, source: str) -> Config:
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: not valid TOML: {exc}") from None
    unknown = set(document) - set(SECTIONS) - {"pipelines"}
    if unknown:
        raise ConfigError(f"{source}: unknown section [{sorted(unknown)[0]}]")
    sections = {name: parse_section(source, name, document.get(name, {})) for name in SECTIONS}
    pipelines_table = document.get("pipelines", {})
    if not isinstance(pipelines_table, dict):
        raise ConfigError(f"{source}: [pipelines] must be a table of [pipelines.NAME] tables")
    pipelines = {name: parse_pipeline(source, name, table) for name, table in pipelines_table.items()}
    check_devices(source, sections["gpu"], pipelines)
    check_cluster(source, sections["cluster"])
    sections["tasks"] = resolve_task_path(source, sections["tasks"])
    return Config(source=source, pipelines=pipelines, **sections)


def resolve_task_path(source: str, tasks: TasksConfig) -> TasksConfig:
    """[tasks] path made absolute, relative to the config file's directory (never to the
    directory the daemon or --check-config happens to run in); each must be a directory."""
    base = os.getcwd() if source == EMBEDDED_SOURCE else os.path.dirname(os.path.abspath(source))
    resolved = tuple(os.path.normpath(os.path.join(base, entry)) for entry in tasks.path)
    for entry, directory in zip(tasks.path, resolved, strict=True):
        if not os.path.isdir(directory):
            shown = entry if entry == directory else f"{entry!r} ({directory})"
            raise ConfigError(f"{source}: [tasks] path: {shown} is not a directory")
    return dataclasses.replace(tasks, path=resolved)


def load(path: str | None) -> Config:
    """The config from `path`, or the embedded default when path is None."""
    if path is None:
        return parse(EMBEDDED_DEFAULT, EMBEDDED_SOURCE)
    try:
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    return parse(text, path)
