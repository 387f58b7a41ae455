"""Config parsing: the embedded default, and one clear error per mistake."""

from __future__ import annotations

from pathlib import Path

import pytest

from workerd import config


def test_embedded_default_serves_the_examples() -> None:
    cfg = config.load(None)
    assert cfg.tasks.modules == ("workerd.examples.tasks",)
    assert cfg.pool.gc_freeze is True
    assert cfg.pool.worker_count() >= 1
    assert cfg.pipelines["demo"].module == "workerd.examples.demo_pipeline"


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("[pool]\nworkers = -1\n", "[pool] workers: expected an integer >= 0"),
        ("[pool]\nworkers = 'four'\n", "[pool] workers"),
        ("[pool]\ngc_freeze = 1\n", "[pool] gc_freeze: expected true or false"),
        ("[pool]\nbogus = 1\n", "[pool] unknown key 'bogus'"),
        ("[nope]\n", "unknown section [nope]"),
        ("[tasks]\nmodules = ['not a module']\n", "[tasks] modules"),
        ("[daemon]\nmax_queue = 0\n", "[daemon] max_queue"),
        ("[gpu]\nenabled = 'maybe'\n", "[gpu] enabled"),
        ("[pipelines.x]\n", "needs exactly one of 'module' or 'path'"),
        ("[pipelines.x]\npath = 'relative.py'\n", "absolute file path"),
        ("this is = = not toml", "not valid TOML"),
        (
            "[metrics]\nlisten = '0.0.0.0:9464'\n",
            "[metrics] listen: the metrics endpoint listens on a loopback",
        ),
        ("[metrics]\nlisten = '10.1.2.3:9464'\n", "loopback address only"),
        ("[metrics]\nlisten = '127.0.0.1'\n", '[metrics] listen: expected "HOST:PORT"'),
        ("[metrics]\nlisten = '127.0.0.1:99999'\n", "expected a port from 0 to 65535"),
        ("[gpu]\nhost_memory_budget_mb = -1\n", "[gpu] host_memory_budget_mb: expected a number >= 0"),
        ("[gpu]\nretained_warn_mb = 'lots'\n", "[gpu] retained_warn_mb"),
        ("[gpu]\ndevices = 'some'\n", '[gpu] devices: expected "all" or a non-empty list'),
        ("[gpu]\ndevices = []\n", '[gpu] devices: expected "all" or a non-empty list'),
        ("[gpu]\ndevices = [0, 0]\n", "[gpu] devices"),
        ("[gpu]\ndevices = [0, -1]\n", "[gpu] devices"),
        ("[gpu]\ndevice = 'cuda:1'\ndevices = [0]\n", '[gpu] device: with [gpu] devices, expected "auto"'),
        ("[pipelines.x]\npath = '/p.py'\nmax_retained_mb = -5\n", "[pipelines.x] max_retained_mb"),
        (
            "[pipelines.x]\npath = '/p.py'\ndevices = [0]\n",
            "[pipelines.x] devices: a pin needs [gpu] devices",
        ),
        (
            "[gpu]\ndevices = [0, 1]\n[pipelines.x]\npath = '/p.py'\ndevices = [2]\n",
            "[pipelines.x] devices: device 2 is not in [gpu] devices [0, 1]",
        ),
        ("[pipelines.x]\npath = '/p.py'\nbogus = 1\n", "[pipelines.x] unknown key 'bogus'"),
        ("[pipelines.x]\npath = '/p.py'\nmax_batch = 0\n", "max_batch: expected an integer >= 1"),
        ("[pipelines.x]\npath = '/p.py'\nmax_batch = 5000\n", "expected an integer from 1 to 1024"),
        ("[pipelines.x]\npath = '/p.py'\nmax_batch = '8'\n", "[pipelines.x] max_batch"),
        ("[pipelines.x]\npath = '/p.py'\nmax_wait_ms = -1\n", "max_wait_ms: expected a number >= 0"),
    ],
)
def test_errors_name_the_file_and_key(tmp_path: Path, text: str, fragment: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(config.ConfigError) as info:
        config.load(str(path))
    assert str(path) in str(info.value)
    assert fragment in str(info.value)


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(config.ConfigError, match="cannot read"):
        config.load(str(tmp_path / "absent.toml"))


def test_gpu_enabled_accepts_toml_booleans(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text("[gpu]\nenabled = true\n")
    assert config.load(str(path)).gpu.enabled == "true"


def test_overrides_beat_the_file() -> None:
    cfg = config.load(None).with_overrides(socket="/tmp/x.sock", workers=3)
    assert cfg.daemon.socket == "/tmp/x.sock" and cfg.pool.workers == 3


def test_shipped_config_file_parses_and_matches_the_embedded_default() -> None:
    shipped = Path(__file__).parents[2] / "systemd" / "workerd.toml"
    cfg = config.load(str(shipped))
    default = config.load(None)
    assert cfg.metrics.listen == ""
    assert (cfg.daemon, cfg.pool, cfg.tasks, cfg.gpu, cfg.pipelines, cfg.access, cfg.fairness) == (
        default.daemon,
        default.pool,
        default.tasks,
        default.gpu,
        default.pipelines,
        default.access,
        default.fairness,
    )
    assert cfg.metrics == default.metrics


@pytest.mark.parametrize(
    ("listen", "address"),
    [
        ("127.0.0.1:9464", ("127.0.0.1", 9464)),
        ("localhost:9464", ("127.0.0.1", 9464)),
        ("[::1]:0", ("::1", 0)),
        ("127.8.9.10:80", ("127.8.9.10", 80)),
    ],
)
def test_metrics_listen_addresses(listen: str, address: tuple[str, int]) -> None:
    assert config.MetricsConfig(listen).address() == address
    assert config.MetricsConfig("").address() is None


def test_host_tier_leak_watch_and_devices(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text(
        "[gpu]\nhost_memory_budget_mb = 2048\nretained_warn_mb = 100\ndevices = [0, 2]\n"
        "[pipelines.x]\npath = '/p.py'\nmax_retained_mb = 50\ndevices = [2]\n"
        "[pipelines.y]\nmodule = 'y'\n"
    )
    cfg = config.load(str(path))
    assert (cfg.gpu.host_memory_budget_mb, cfg.gpu.retained_warn_mb, cfg.gpu.devices) == (2048, 100, (0, 2))
    assert (cfg.pipelines["x"].max_retained_mb, cfg.pipelines["x"].devices) == (50, (2,))
    assert cfg.pipelines["y"].devices == () and config.load(None).gpu.devices is None
    settings = config.gpu_worker_settings(cfg, device="cuda:2")
    assert settings["device"] == "cuda:2" and settings["host_memory_budget_mb"] == 2048
    assert settings["pipelines"]["x"] == {"name": "x", "module": "", "path": "/p.py", "max_retained_mb": 50}
    path.write_text("[gpu]\ndevices = 'all'\n[pipelines.x]\npath = '/p.py'\ndevices = [5]\n")
    assert config.load(str(path)).gpu.devices == "all"  # pins are checked at start, against the devices found
