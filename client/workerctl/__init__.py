"""Client for the workerd daemon: protocol, Client and the workerctl command line.

This package must stay light: it never imports the daemon or torch, so `workerctl ping` costs
little more than importing zmq and msgpack.
"""

from .client import Client
from .errors import WorkerdError

__version__ = "0.1.0"

__all__ = ["Client", "WorkerdError", "__version__"]
