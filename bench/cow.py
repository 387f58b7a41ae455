"""Copy-on-write after a gc pass in forked workers, with pool.gc_freeze = true vs false.

    .venv/bin/python bench/cow.py [--rounds 2] [--workers 4] [--heap-mb 300] [--no-write]

Each round starts two daemons one after the other (gc_freeze true, then false), each with
bench/heavy_heap.py preloaded (~300 MB of small objects built at import, in the zygote) and
4 workers. For each daemon:

  1. memory_status once the pool is full and idle               -> "before"
  2. clear_memory level "gc": gc.collect() in every worker        -> "after gc"
  3. heavy_heap:touch_gc on each worker (4 concurrent requests, one per client, to 4 idle workers:
     the pool hands each to a different worker), a second full collection     -> "after 2nd gc"

and reports per-worker USS (private pages) and the total PSS of zygote + workers, as the
daemon's memory_status reads them from /proc/PID/smaps_rollup.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import benchlib
from benchlib import median, spread, table

TOUCH = "heavy_heap:touch_gc"
INFO = "heavy_heap:heap_info"


def by_pid(memory: dict[str, Any]) -> dict[int, dict[str, Any]]:
    return {w["pid"]: w for w in memory["workers"] if w["state"] in ("idle", "busy")}


def pss_total(memory: dict[str, Any]) -> int:
    workers = sum(w["pss_bytes"] or 0 for w in memory["workers"])
    zygotes = sum(z["pss_bytes"] or 0 for z in memory.get("zygotes", []))
    return workers + zygotes


def measure(freeze: bool, workers: int, heap_mb: int) -> dict[str, Any]:
    daemon = benchlib.Daemon(
        workers=workers,
        modules=["heavy_heap"],
        preload=["heavy_heap"],
        gc_freeze=freeze,
        extra_pythonpath=[benchlib.BENCH_DIR],
        env={"HEAVY_HEAP_MB": str(heap_mb)},
        label=f"gc_freeze={freeze}",
    )
    try:
        daemon.wait_ready(timeout=180)
        time.sleep(0.5)  # let freshly started workers settle (their own start-up allocations)
        with daemon.client(timeout=120) as client:
            before = client.memory_status()
            started = time.perf_counter()
            cleared = client.clear_memory("gc")
            clear_s = time.perf_counter() - started
            after_gc = client.memory_status()
            # Requests in flight at once go to different idle workers. One client each: one
            # request in flight per client is the simplest contract a client can offer.
            touchers = [daemon.client(timeout=120) for _ in range(workers)]
            ids = [toucher.send("execute", name=TOUCH, args=[], kwargs={}) for toucher in touchers]
            touches = [toucher.wait_result(i) for toucher, i in zip(touchers, ids, strict=True)]
            for toucher in touchers:
                toucher.close()
            after_touch = client.memory_status()
            info = client.call(INFO)
    finally:
        daemon.stop()
    pids = sorted(by_pid(before))
    for later in (after_gc, after_touch):
        if sorted(by_pid(later)) != pids:
            raise RuntimeError("the set of workers changed during the measurement")
    distinct = len({t["pid"] for t in touches})
    if distinct != workers:
        print(f"note: touch_gc ran on {distinct} distinct workers, not {workers}")
    zygote = before["zygotes"][-1] if before.get("zygotes") else {}
    return {
        "uss_before": [by_pid(before)[p]["uss_bytes"] for p in pids],
        "uss_after_gc": [by_pid(after_gc)[p]["uss_bytes"] for p in pids],
        "uss_after_touch": [by_pid(after_touch)[p]["uss_bytes"] for p in pids],
        "rss_before": [by_pid(before)[p]["rss_bytes"] for p in pids],
        "pss_before": pss_total(before),
        "pss_after_gc": pss_total(after_gc),
        "pss_after_touch": pss_total(after_touch),
        "zygote_rss": zygote.get("rss_bytes") or 0,
        "clear_s": clear_s,
        "clear_growth": [w["uss_after"] - w["uss_before"] for w in cleared["workers"] if "uss_after" in w],
        "gc_s_second": [t["gc_s"] for t in touches],
        "frozen": touches[0]["frozen_objects"],
        "heap": info,
    }


def growth(results: list[dict[str, Any]], key: str) -> list[float]:
    """USS growth of every worker in every round, from "before" to `key`."""
    return [after - before for r in results for before, after in zip(r["uss_before"], r[key], strict=True)]


def render(results: dict[bool, list[dict[str, Any]]], workers: int, rounds: int) -> str:
    mb = 1 / 2**20
    rows = []
    for freeze in (True, False):
        rs = results[freeze]
        rows.append(
            [
                f"gc_freeze = {str(freeze).lower()}",
                spread([u for r in rs for u in r["uss_before"]], 1, mb),
                spread([u for r in rs for u in r["uss_after_gc"]], 1, mb),
                spread(growth(rs, "uss_after_gc"), 2, mb),
                spread(growth(rs, "uss_after_touch"), 2, mb),
                spread([r["pss_before"] for r in rs], 0, mb),
                spread([r["pss_after_gc"] for r in rs], 0, mb),
                spread([r["pss_after_touch"] for r in rs], 0, mb),
            ]
        )
    frozen, thawed = (
        median(growth(results[True], "uss_after_gc")),
        median(growth(results[False], "uss_after_gc")),
    )
    heap = results[True][0]["heap"]
    detail = []
    for freeze in (True, False):
        rs = results[freeze]
        detail.append(
            [
                f"gc_freeze = {str(freeze).lower()}",
                spread([r["zygote_rss"] for r in rs], 0, mb),
                spread([u for r in rs for u in r["rss_before"]], 0, mb),
                spread([g for r in rs for g in r["clear_growth"]], 2, mb),
                spread([r["clear_s"] for r in rs], 1, 1e3),
                spread([g for r in rs for g in r["gc_s_second"]], 1, 1e3),
                f"{rs[0]['frozen']:,}",
            ]
        )
    verdict_ratio = f"{thawed / frozen:,.0f}x" if frozen > 0 else "inf (no growth with freeze)"
    return (
        f"Preloaded heap: {heap['records']:,} records, {heap['heap_bytes'] * mb:.0f} MB of RSS built in "
        f"{heap['build_s']:.1f} s at import (bench/heavy_heap.py); {workers} workers; {rounds} rounds per "
        "setting, the two settings alternating. USS = private pages of one worker, PSS total = "
        "zygote + all workers. Figures: median (min-max) over all workers of all rounds "
        "(PSS: over rounds).\n\n"
        + table(
            [
                "setting",
                "USS before MB",
                "USS after gc MB",
                "USS growth, 1st gc MB",
                "USS growth, after 2nd gc MB",
                "PSS total before MB",
                "PSS total after gc MB",
                "PSS total after 2nd gc MB",
            ],
            rows,
        )
        + f"\n\nMedian growth per worker after one gc pass: {frozen * mb:.2f} MB with freeze, "
        f"{thawed * mb:.1f} MB without: {verdict_ratio} less with freeze. "
        "Goal: <= 2 MB per worker with freeze, and >= 50x less than without.\n\n"
        + table(
            [
                "setting",
                "zygote RSS MB",
                "worker RSS before MB",
                "growth during the gc, as clear_memory reports it MB",
                "clear_memory(gc) round trip ms",
                "2nd gc.collect() in worker ms",
                "objects frozen",
            ],
            detail,
        )
    )


def csv_rows(results: dict[bool, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """One row per worker per round: its USS before and after each gc pass, in bytes."""
    return [
        {
            "setting": f"gc_freeze={str(freeze).lower()}",
            "round": number + 1,
            "worker": index,
            "uss_before_bytes": result["uss_before"][index],
            "uss_after_gc_bytes": result["uss_after_gc"][index],
            "uss_after_2nd_gc_bytes": result["uss_after_touch"][index],
            "pss_total_before_bytes": result["pss_before"],
            "pss_total_after_gc_bytes": result["pss_after_gc"],
        }
        for freeze, rounds in results.items()
        for number, result in enumerate(rounds)
        for index in range(len(result["uss_before"]))
    ]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--heap-mb", type=int, default=300)
    parser.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md alone")
    args = parser.parse_args()
    results: dict[bool, list[dict[str, Any]]] = {True: [], False: []}
    for round_number in range(args.rounds):
        for freeze in (True, False):
            started = time.monotonic()
            results[freeze].append(measure(freeze, args.workers, args.heap_mb))
            print(f"round {round_number + 1}, gc_freeze={freeze}: {time.monotonic() - started:.1f} s")
    benchlib.write_csv("cow", csv_rows(results))
    benchlib.report("cow", render(results, args.workers, args.rounds), write=not args.no_write)


if __name__ == "__main__":
    main()
