"""Client for the workerd daemon: protocol, Client, AsyncClient and the workerctl command line.

This package must stay light: it never imports the daemon, torch or numpy, and the synchronous
side never imports asyncio, so `workerctl ping` costs little more than importing zmq and msgpack.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .client import Client
from .core import Outcome
from .errors import WorkerdError
from .protocol import Raw

if TYPE_CHECKING:
    from .aio import AsyncClient
    from .executor import Executor

__version__ = "0.1.0"

__all__ = ["AsyncClient", "Client", "Executor", "Outcome", "Raw", "WorkerdError", "__version__"]


def __getattr__(name: str) -> Any:
    # AsyncClient pulls in asyncio and zmq.asyncio, Executor concurrent.futures and threading:
    # only for those who use them.
    if name == "AsyncClient":
        from .aio import AsyncClient

        return AsyncClient
    if name == "Executor":
        from .executor import Executor

        return Executor
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
