"""workerd: a daemon that keeps expensive Python work warm.

The master (master.py) owns the control socket and the loop, and goes through its backends
alike (core/backend.py): the CPU pool (pool/), the GPU workers (gpu/), the Ray bridge
(cluster/). core/ is the layer under them: the job lifecycle, a child process's channel, kill
window, back-off and asks; pipelines/ is the pipeline cache that the GPU workers and the
cluster's hosts share. Every module's docstring says where it runs (`Runs in:`);
docs/architecture.md draws the whole.
"""

from workerctl import __version__

__all__ = ["__version__"]
