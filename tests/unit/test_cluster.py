"""Pure parts of the cluster: where an execute goes, WHEN_ASSIGNED lanes, [cluster] config,
and the bridge's helpers (what ships, how a Ray failure is reported)."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest

from workerd import config
from workerd.cluster.routing import CLUSTER, LOCAL, destination
from workerd.config import ClusterConfig
from workerd.core.lifecycle import ANSWERED, RUNNING, WHEN_ASSIGNED, Job, Lane

# Ray is the cluster extra's: without it, the tests that need it skip (as the torch ones do) and the
# rest still run. Asked as config.ray_installed asks, without importing ray.
needs_ray = pytest.mark.skipif(
    importlib.util.find_spec("ray") is None, reason="needs ray: pip install 'workerd[cluster]'"
)


def never() -> int:
    raise AssertionError("the local queue's depth was asked for")


def room() -> bool:
    return True


def test_overflow_keeps_a_job_local_while_the_cluster_has_no_room() -> None:
    overflow = ClusterConfig(engine="ray")
    assert destination(overflow, False, True, lambda: 10, lambda: False) == LOCAL
    assert destination(ClusterConfig(engine="ray", mode="all"), False, True, never, lambda: False) == CLUSTER


def test_an_engine_off_keeps_everything_local() -> None:
    off = ClusterConfig()
    assert destination(off, False, True, never, room) == LOCAL
    assert destination(off, True, True, never, room) == LOCAL


def test_pipelines_go_to_the_cluster_only_when_told() -> None:
    on = ClusterConfig(engine="ray")
    assert destination(on, True, True, never, room) == LOCAL
    pipelines = ClusterConfig(engine="ray", pipelines=True)
    assert destination(pipelines, True, True, never, room) == CLUSTER
    assert destination(pipelines, True, False, never, room) == CLUSTER  # down: the error, not a GPU worker


def test_mode_all_sends_every_cpu_execute_even_while_down() -> None:
    every = ClusterConfig(engine="ray", mode="all")
    assert destination(every, False, True, never, room) == CLUSTER
    assert destination(every, False, False, never, room) == CLUSTER


@pytest.mark.parametrize(("waiting", "where"), [(0, LOCAL), (2, LOCAL), (3, CLUSTER), (50, CLUSTER)])
def test_overflow_spills_only_past_spill_queue(waiting: int, where: str) -> None:
    overflow = ClusterConfig(engine="ray", spill_queue=2)
    assert destination(overflow, False, True, lambda: waiting, room) == where


def test_overflow_never_spills_to_a_cluster_that_is_not_connected() -> None:
    overflow = ClusterConfig(engine="ray")
    assert destination(overflow, False, False, lambda: 1000, room) == LOCAL


def job(n: int, timeout_s: float = 10.0) -> Job:
    return Job(n, b"c", n, b"", [], "m:f", "m", "cluster", timeout_s, 0, 0.0)


def test_a_when_assigned_lane_starts_each_job_at_once_and_ends_them_in_any_order() -> None:
    lane = Lane(3, starts=WHEN_ASSIGNED)
    jobs = [job(1, 5.0), job(2, 1.0), job(3, 3.0)]
    for n, each in enumerate(jobs):
        lane.add(each, 100.0 + n)
    assert all(each.state is RUNNING for each in jobs) and lane.free() == 0
    assert [each.deadline for each in jobs] == [105.0, 102.0, 105.0]
    assert lane.next_deadline() == 102.0
    assert lane.done(3, 0.0) is jobs[2]
    assert lane.done(3, 0.0) is None  # a second word about it is dropped
    assert lane.overdue(103.0) == [jobs[1]] and list(lane.jobs) == [jobs[0]]
    assert lane.next_deadline() == 105.0


def test_every_job_a_lost_when_assigned_lane_held_may_have_run() -> None:
    lane = Lane(4, starts=WHEN_ASSIGNED)
    jobs = [job(n) for n in range(3)]
    for each in jobs:
        lane.add(each, 0.0)
    jobs[1].state = ANSWERED
    may_have_run, never_ran = lane.release()
    assert may_have_run == jobs and never_ran == []
    assert lane.next_deadline() == math.inf


@needs_ray  # engine = "ray" is refused where Ray is not installed
def test_cluster_section_parses() -> None:
    text = '[cluster]\nengine = "ray"\naddress = "10.0.0.5:6379"\nmode = "all"\nspill_queue = 4\n'
    parsed = config.parse(text + "pipelines = true\nnum_gpus = 1\nship_modules = true\n", "f.toml").cluster
    assert parsed == ClusterConfig("ray", "10.0.0.5:6379", "all", 4, True, 1.0, True)


def test_cluster_section_names_bad_keys() -> None:
    assert config.parse("", "f.toml").cluster == ClusterConfig()
    for bad, key in [
        ('engine = "spark"', "engine"),
        ('address = "nohost"', "address"),
        ('address = "h:99999"', "address"),
        ("spill_queue = -1", "spill_queue"),
        ('mode = "some"', "mode"),
        ("shards = 3", "unknown key 'shards'"),
    ]:
        with pytest.raises(config.ConfigError, match=f"f.toml: \\[cluster\\] {key}"):
            config.parse(f"[cluster]\n{bad}\n", "f.toml")


def test_engine_ray_without_ray_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(config, "ray_installed", lambda: False)
    with pytest.raises(config.ConfigError, match=r"pip install 'workerd\[cluster\]'"):
        config.parse('[cluster]\nengine = "ray"\n', "f.toml")
    assert config.parse('[cluster]\nengine = ""\n', "f.toml").cluster.enabled is False


def test_the_embedded_default_keeps_the_cluster_off() -> None:
    assert config.load(None).cluster == ClusterConfig()


def test_what_ships_is_each_modules_top_level_package_or_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from workerd.cluster.driver import py_modules

    (tmp_path / "single.py").write_text("")
    (tmp_path / "pkg" / "sub").mkdir(parents=True)
    (tmp_path / "pkg" / "__init__.py").write_text("")
    (tmp_path / "pkg" / "sub" / "__init__.py").write_text("")
    (tmp_path / "pkg" / "sub" / "tasks.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path))
    shipped = py_modules(["single", "pkg.sub.tasks", "pkg", "workerd.examples.tasks", "missing_here"])
    assert shipped == [str(tmp_path / "single.py"), str(tmp_path / "pkg")]


@needs_ray
def test_a_ray_failure_is_lost_when_what_ran_it_died_and_failed_otherwise() -> None:
    from ray import exceptions

    from workerd.cluster.driver import classify

    assert classify(exceptions.WorkerCrashedError())[0] == b"lost"
    assert classify(exceptions.NodeDiedError("node gone"))[0] == b"lost"
    kind, details = classify(exceptions.RuntimeEnvSetupError("pip failed"))
    assert kind == b"failed" and details["code"] == "INTERNAL" and "runtime_env" in details["message"]
    assert classify(ValueError("x"))[0] == b"failed"
