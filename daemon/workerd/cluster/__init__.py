"""Work beyond this machine: the Ray bridge, as the master sees it and as Ray runs it.

    backend.py  the master's side: the serving bridge and retiring ones, their jobs
                (core/lifecycle.py), routing them, the cluster's state
    process.py  the master's side of one bridge process: a core.child.Child, its phase
    bridge.py   the bridge process itself, the one Ray driver
    driver.py   the bridge's side of Ray: connecting, what ships, how Ray's failures read
    routing.py  where an execute goes: the local pool or GPU worker, or the cluster (pure)
    remote.py   what runs inside Ray's worker processes: task runs and pipeline host actors

Only remote.py and bridge.py (through driver.py) import ray, and only in processes that Ray or
the bridge started: the master never does.
"""
