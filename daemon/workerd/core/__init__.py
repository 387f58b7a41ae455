"""The shared layer under the backends: what a job is (lifecycle.py), what a child process is to
the master (child.py: channel, lane, kill window, asks; kill.py; backoff.py; fanout.py), the
channel itself (transport.py), processes (processes.py) and the one poller (reactor.py).

A fix to how children are watched, killed, stopped or retried is made here, once, for every
backend (docs/architecture.md).
"""
