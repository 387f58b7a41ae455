"""The reliability suite's reports: every test's counts, printed once more at the end of the run."""

from __future__ import annotations

from typing import Any

from tests.reliability.harness import REPORTS, STRESS


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not REPORTS:
        return
    terminalreporter.section(f"reliability counts ({'long' if STRESS else 'short'} version)")
    for test, counts in REPORTS:
        terminalreporter.write_line(f"{test}: " + ", ".join(f"{k}={v}" for k, v in counts.items()))
