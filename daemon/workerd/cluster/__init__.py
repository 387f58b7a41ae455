"""Work beyond this machine: the Ray bridge, as the master sees it and as Ray runs it.

    backend.py  the master's side: the bridge process, its jobs (lifecycle.py), its state
    routing.py  where an execute goes: the local pool or GPU worker, or the cluster (pure)
    remote.py   what runs inside Ray's worker processes: task runs and pipeline host actors

The bridge process itself is workerd/bridge.py. Only remote.py and bridge.py import ray, and
only in processes that Ray or the bridge started: the master never does.
"""
