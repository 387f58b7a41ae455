"""The message kinds on the channels between the master and its children, in one place.

Runs in: the master and every child (both ends of each channel import it).

A message on a channel (core/transport.py) is a list of frames; its first frame is one of these
kinds. Which kinds each channel carries, and the frames that follow them, are drawn in the module
that serves the child's end: pool/worker.py (CPU worker), gpu/worker.py (GPU worker) and
cluster/bridge.py (the Ray bridge). Named here once, as billiard names ACK/READY/TASK, so that a
kind is never a bytes literal that one end spells differently from the other.

The zygote's channel is the exception: JSON packets, one per SEQPACKET, whose "cmd" and "event"
names are the ZYGOTE_* strings below (pool/zygote.py draws them).
"""

from __future__ import annotations

# -- master -> child ---------------------------------------------------------------------------
RUN = b"run"  # a job: [RUN, job id, (bridge: name,) request body, *raw]
BATCH = b"batch"  # GPU worker: runs of one pipeline together: [BATCH, msgpack(layout), *bodies+raw]
DROP = b"drop"  # CPU worker: do not start these jobs: [DROP, msgpack([job ids])]
GC = b"gc"  # CPU worker: gc.collect(): [GC, token]; answered [GC, token, msgpack(result)]
RESTORE = b"restore"  # GPU worker: load these pipelines in the background
CLEAR = b"clear"  # GPU worker, bridge: clear_memory: [CLEAR, token, level]
MEMORY = b"memory"  # GPU worker, bridge: a memory snapshot: [MEMORY, token]; answered likewise
CANCEL = b"cancel"  # bridge: stop this job (ray.cancel): [CANCEL, job id]
STOP = b"stop"  # every child: exit once idle (jobs held and not started are dropped)

# -- child -> master ---------------------------------------------------------------------------
READY = b"ready"  # started (and, for the bridge, connected): [READY, msgpack(info)]
START = b"start"  # GPU worker: this run (a batch's runs) begins now, its timeout too: [START, job id, ...]
ITEM = b"item"  # a stream item: [ITEM, job id, reply frame, *raw]
DONE = b"done"  # a job's end: [DONE, job id, OK | ERROR, reply frame, ...]
DROPPED = b"dropped"  # CPU worker: the jobs it held and did not start: [DROPPED, msgpack([ids])]
RECYCLING = b"recycling"  # CPU worker: it leaves, starting nothing more: [RECYCLING, reason]
RESTORED = b"restored"  # GPU worker: a restore ended: [RESTORED, msgpack(report)]
CLEARED = b"cleared"  # GPU worker, bridge: a clear ended: [CLEARED, token, msgpack(result), ...]
LOST = b"lost"  # bridge: what ran the job died (it may have run): [LOST, job id, msgpack]
FAILED = b"failed"  # bridge: Ray could not run the job: [FAILED, job id, msgpack]
STATE = b"state"  # bridge: the cluster's nodes changed: [STATE, msgpack(state)]
DOWN = b"down"  # bridge: the head is out of reach, it exits: [DOWN, msgpack({"error"})]

# A DONE's outcome frame.
OK = b"ok"
ERROR = b"error"

# Why a CPU worker recycles (RECYCLING's reason).
MAX_TASKS = b"max_tasks"
MAX_MEMORY = b"max_memory"

# -- the zygote's JSON packets -----------------------------------------------------------------
ZYGOTE_FORK = "fork"  # {"cmd": "fork", "count": n}
ZYGOTE_SERVE = "serve"  # {"cmd": "serve"}: a standby takes over
ZYGOTE_READY = "ready"  # {"event": "ready", "pid", "import_s", "standby_pid"} + the standby's fd
ZYGOTE_FAILED = "failed"  # {"event": "failed", "error", "traceback"}
ZYGOTE_FORKED = "forked"  # {"event": "forked", "pid"} + the worker's channel
ZYGOTE_FORK_FAILED = "fork_failed"  # {"event": "fork_failed", "error"}
ZYGOTE_EXITED = "exited"  # {"event": "exited", "pid", "status"}
ZYGOTE_STANDBY = "standby"  # {"event": "standby", "pid"} + the new standby's fd
