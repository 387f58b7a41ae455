"""The pipeline cache's pure decision: which least recently used pipelines to evict."""

from __future__ import annotations

from types import ModuleType

from workerd.pipelines import Entry, plan_evictions

MB = 1024 * 1024


def entry(name: str, size_mb: int, last_used: float) -> Entry:
    return Entry(name, "0" * 64, ModuleType(name), None, size_mb * MB, 0.0, last_used=last_used)


def test_nothing_to_evict_when_it_fits() -> None:
    entries = [entry("a", 10, 1), entry("b", 10, 2)]
    assert plan_evictions(entries, 20 * MB, 10 * MB, 100 * MB, keep="c") == []


def test_evicts_oldest_first_and_no_more_than_needed() -> None:
    entries = [entry("new", 30, 3), entry("old", 30, 1), entry("mid", 30, 2)]
    assert plan_evictions(entries, 90 * MB, 40 * MB, 100 * MB, keep="x") == ["old"]
    assert plan_evictions(entries, 90 * MB, 41 * MB, 100 * MB, keep="x") == ["old", "mid"]


def test_never_evicts_the_one_being_loaded() -> None:
    entries = [entry("self", 50, 1), entry("other", 30, 2)]
    assert plan_evictions(entries, 80 * MB, 40 * MB, 100 * MB, keep="self") == ["other"]


def test_returns_everything_when_even_that_is_not_enough() -> None:
    entries = [entry("a", 10, 1), entry("b", 10, 2)]
    assert plan_evictions(entries, 20 * MB, 500 * MB, 100 * MB, keep="c") == ["a", "b"]
