"""workerd: a daemon that keeps expensive Python work warm.

The master (master.py) owns the control socket and the loop; the zygote (zygote.py) imports task
code once and forks CPU workers (worker.py) from that frozen image.
"""

from workerctl import __version__

__all__ = ["__version__"]
