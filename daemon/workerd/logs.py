"""Logging to stderr, the same in the master and the GPU worker (the journal collects both).

Runs in: both: the master and every spawned child.
"""

from __future__ import annotations

import logging
import os
import sys


def setup_logging(level: str) -> None:
    # Under systemd the journal stamps each line; by hand, a timestamp helps.
    fmt = "%(levelname)s %(name)s: %(message)s"
    if not os.environ.get("JOURNAL_STREAM"):
        fmt = "%(asctime)s " + fmt
    logging.basicConfig(level=level.upper(), format=fmt, stream=sys.stderr)
