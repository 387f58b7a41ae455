"""The Celery app of bench/sweep.py: the same two tasks as workerd.examples.tasks, trivially.

The worker runs as `celery -A celery_tasks worker --pool=prefork ...` with bench/ on PYTHONPATH;
the broker and the result backend come from SWEEP_CELERY_BROKER / SWEEP_CELERY_BACKEND (two
databases of the redis-server that sweep.py starts), set by sweep.py for itself and the worker.
"""

from __future__ import annotations

import os
import time
from typing import Any

from celery import Celery

app = Celery(
    "celery_tasks",
    broker=os.environ.get("SWEEP_CELERY_BROKER", "redis://127.0.0.1:6379/0"),
    backend=os.environ.get("SWEEP_CELERY_BACKEND", "redis://127.0.0.1:6379/1"),
)
app.conf.update(
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
    # The load generator calls from up to 256 threads: a pooled producer connection each, not a
    # queue of threads waiting for one of the default 10 (None would disable the pool: a new
    # connection per message).
    broker_pool_limit=512,
    broker_connection_retry_on_startup=True,
    # Results are read once and are of no use after the run.
    result_expires=300,
    worker_hijack_root_logger=False,
)


@app.task(name="celery_tasks.echo")
def echo(value: Any) -> Any:
    return value


@app.task(name="celery_tasks.sleep")
def sleep(seconds: float = 1.0) -> dict[str, Any]:
    start = time.time()
    time.sleep(seconds)
    return {"pid": os.getpid(), "start": start, "end": time.time()}
