"""The pipeline cache's pure decisions: which pipelines leave the device, and where they go."""

from __future__ import annotations

from types import ModuleType

from workerd.pipelines.evictions import HOST, Entry, plan_evictions, plan_parking

MB = 1024 * 1024


def entry(name: str, size_mb: int, last_used: float, tier: str = "device", parkable: bool = True) -> Entry:
    return Entry(
        name, "0" * 64, ModuleType(name), None, size_mb * MB, 0.0,
        last_used=last_used, tier=tier, parkable=parkable,
    )  # fmt: skip


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


def test_parked_pipelines_are_not_evicted_from_the_device() -> None:
    entries = [entry("parked", 30, 1, tier=HOST), entry("on", 30, 2)]
    assert plan_evictions(entries, 30 * MB, 80 * MB, 100 * MB, keep="x") == ["on"]


def test_victims_are_parked_while_the_host_budget_lasts() -> None:
    victims = [entry("a", 30, 1), entry("b", 30, 2)]
    assert plan_parking(victims, [], 100 * MB) == [("park", "b"), ("park", "a")]
    assert plan_parking(victims, [], 0) == [("drop", "b"), ("drop", "a")]  # no host tier


def test_older_parked_pipelines_make_room_for_a_newer_victim() -> None:
    parked = [entry("old", 30, 1, tier=HOST), entry("older", 30, 0, tier=HOST)]
    victims = [entry("v", 30, 5)]
    assert plan_parking(victims, parked, 70 * MB) == [("drop", "older"), ("park", "v")]


def test_a_victim_older_than_the_parked_ones_is_dropped_itself() -> None:
    parked = [entry("recent", 30, 9, tier=HOST)]
    assert plan_parking([entry("v", 30, 5)], parked, 40 * MB) == [("drop", "v")]


def test_unparkable_or_too_big_victims_are_dropped() -> None:
    victims = [entry("plain", 10, 1, parkable=False), entry("huge", 50, 2), entry("ok", 10, 3)]
    assert plan_parking(victims, [], 40 * MB) == [("park", "ok"), ("drop", "huge"), ("drop", "plain")]


def test_the_newest_victims_are_parked_first_and_none_is_parked_in_vain() -> None:
    victims = [entry("a", 30, 1), entry("b", 30, 2)]
    assert plan_parking(victims, [], 40 * MB) == [("park", "b"), ("drop", "a")]
