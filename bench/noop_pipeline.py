"""A pipeline that does nothing: its end-to-end time is the daemon's own overhead."""

from __future__ import annotations

from typing import Any


def load(device: str) -> str:
    return device


def run(device: str) -> dict[str, Any]:
    return {}
