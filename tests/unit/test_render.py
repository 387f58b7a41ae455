"""workerctl's tables for several GPU workers, and for a daemon that predates `gpus`."""

from __future__ import annotations

from workerctl.render import render_clear, render_memory, render_status

CLEARED = {"device": "cuda:0", "level": "full", "freed_objects": 3, "dropped": ["a"], "freed_bytes": 0}


def test_clear_has_a_line_per_gpu_worker() -> None:
    result = {
        "level": "full",
        "workers": [],
        "freed_bytes": 0,
        "gpu": CLEARED,
        "gpus": [
            {"index": 0, "state": "idle", **CLEARED},
            {"index": 1, "state": "starting"},
            {"index": 2, "state": "busy", "error": "the GPU worker 2 did not answer in time"},
        ],
    }
    lines = render_clear(result).splitlines()
    assert lines[-5].startswith("gpu cuda:0  objects freed 3") and lines[-5].endswith("dropped: a")
    assert lines[-3:] == ["gpu 1   not running", "", "gpu 2   the GPU worker 2 did not answer in time"]


def test_a_daemon_without_gpus_renders_as_before() -> None:
    assert render_clear({"level": "gc", "workers": [], "gpu": None}).endswith("\ngpu     not running")
    memory = {"daemon": {}, "workers": [], "gpu": {"device": "cpu", "runs": 1, "pipelines": []}}
    assert "\ngpu cpu  allocated" in render_memory(memory)
    status = {
        "gpu": {"enabled": True, "state": "idle", "device": "cpu", "pid": 7, "queue": 0, "cached": ["a"]}
    }
    assert "gpu     idle on cpu, pid 7, 0 waiting, cached: a" in render_status(status)


def test_status_has_a_line_per_gpu_worker_and_says_why_none_runs() -> None:
    gpus = [
        {
            "index": i,
            "device": f"cuda:{i}",
            "state": "idle",
            "pid": 10 + i,
            "queue": i,
            "cached": ["a"],
            "parked": [],
        }
        for i in (0, 1)
    ]
    gpus[1]["parked"] = ["b"]
    text = render_status({"gpu": {"enabled": True, "queue": 1, "error": None}, "gpus": gpus})
    assert "gpu     2 workers, 1 waiting" in text
    assert "  cuda:1  idle, pid 11, 1 waiting, cached: a, parked: b" in text
    failed = render_status({"gpu": {"enabled": True, "error": "no CUDA device is visible"}, "gpus": []})
    assert "ERROR   pipelines unavailable: no CUDA device is visible" in failed
