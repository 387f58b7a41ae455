"""A batch of pipeline runs in the GPU worker: one call of the pipeline's run_batch() for the
requests the master sent together, each answered on its own.

Runs in: the GPU worker (gpu/batches.py is the master's side: which runs go together).

A pipeline with `[pipelines.NAME] max_batch` > 1 defines `run_batch(model, inputs) -> outputs`:
`inputs` holds each request's keyword arguments (a dict) in the order the requests came, and
`outputs` must have one output per input, in the same order. Each request gets its own reply
with its own output, and `"batch"`: how many requests the batch held.

The split rule. If run_batch raises, no request is failed for another's input: the batch is
split in halves and each half run again, down to single inputs, so an input that fails alone
fails only its own request (with its own exception), and the others get their outputs. An
out-of-memory is split the same way, before any pipeline is evicted: at half the size the run
may fit; a single input that still does not fit gets the usual eviction and one retry. The
re-runs are bounded: a batch of n takes at most 2n - 1 calls (every input failing), and
log2(n) * 2 + 1 for one bad input. They are counted (`batch_reruns`, metrics.CACHE_EVENTS).
A run_batch that returns the wrong number of outputs is a bug in it, not in an input: every
request of that call is answered TASK_ERROR, and nothing is split.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

from workerctl import protocol
from workerd import tasks
from workerd.pipelines.cache import PipelineCache, result_reply
from workerd.pipelines.loading import PipelineError, check_run_batch, failure

Failure = tuple[str, str, dict[str, Any]]  # an error reply's code, message, details
Outcome = tuple[bool, Any]  # (True, output) or (False, Failure)


class WrongCount(PipelineError):
    """run_batch returned another number of outputs than it was given inputs."""


def split_frames(frames: list[Any]) -> tuple[int, list[tuple[bytes, bytes, list[Any]]]]:
    """[BATCH, msgpack({"max_batch", "runs": [[job id, raw count], ...]}), body, *raw, body, *raw,
    ...] -> (the pipeline's max_batch, (job id, body, raw) per run); gpu/batches.batch_message
    packs it."""
    layout = protocol.unpack(frames[1])
    runs, at = [], 2
    for job_id, raw_count in layout["runs"]:
        runs.append((b"%d" % job_id, frames[at], frames[at + 1 : at + 1 + raw_count]))
        at += 1 + raw_count
    return int(layout["max_batch"]), runs


def run_split(call: Callable[[list[Any]], Sequence[Any]], inputs: list[Any]) -> tuple[list[Outcome], int]:
    """Each input's outcome, by the split rule; and how many calls were re-runs."""
    outcomes: list[Outcome] = [(False, None)] * len(inputs)
    todo = [(0, len(inputs))]
    calls = 0
    while todo:
        low, high = todo.pop()
        calls += 1
        try:
            outputs = call(inputs[low:high])
        except WrongCount as exc:
            outcomes[low:high] = [(False, failure(exc))] * (high - low)
        except Exception as exc:
            if high - low == 1:
                # Kept as the reply's fields, not as the exception: its traceback holds the
                # frames of the failed call, and their tensors, while the rest still runs.
                outcomes[low] = (False, failure(exc))
            else:
                middle = (low + high) // 2
                todo += [(middle, high), (low, middle)]  # the first half runs first
        else:
            outcomes[low:high] = [(True, output) for output in outputs]
    return outcomes, calls - 1


def run_batch(
    cache: PipelineCache, name: str, inputs: list[dict[str, Any]], max_batch: int
) -> tuple[list[Outcome], dict[str, Any]]:
    """One run of pipeline `name` on `inputs`: each input's outcome, and what every reply says
    of the run (how it started, its seconds, "batch", "reruns")."""
    entry, info = cache.begin(name)
    check_run_batch(name, entry.module, max_batch)
    started = time.monotonic()

    def call(chunk: list[Any]) -> Sequence[Any]:
        # Only a single input evicts other pipelines on out-of-memory: a bigger chunk is split.
        tries = 2 if len(chunk) == 1 else 1
        outputs = cache.measure(entry, len(chunk), lambda: entry.module.run_batch(entry.obj, chunk), tries)
        return checked(name, outputs, len(chunk))

    outcomes, reruns = run_split(call, inputs)
    cache.counts["batch_reruns"] += reruns
    return outcomes, {**cache.end(entry, info, len(inputs), started), "reruns": reruns}


def checked(name: str, outputs: Any, count: int) -> Sequence[Any]:
    try:
        returned = len(outputs)
    except TypeError:
        returned = -1
    if returned != count:
        got = f"{returned} outputs" if returned >= 0 else f"a {type(outputs).__name__}"
        message = f"run_batch of pipeline {name!r} returned {got} for {count} inputs (one output per input)"
        raise WrongCount(protocol.TASK_ERROR, message, {"type": "WrongCount", "message": message})
    return outputs  # type: ignore[no-any-return]


def run_requests(
    cache: PipelineCache,
    runs: list[tuple[bytes, bytes, list[Any]]],
    max_batch: int,
    limit: int,
    where: dict[str, Any],
) -> list[tuple[bytes, bytes, list[Any]]]:
    """The requests of one batch, each answered: (job id, kind, [reply body, *raw frames])."""
    answered: dict[bytes, tuple[bytes, list[Any]]] = {}
    batched: list[tuple[bytes, dict[str, Any]]] = []
    for job, body, raw in runs:
        request, error = tasks.decode(body, raw)
        if request is None:
            answered[job] = (tasks.ERROR, [error])
        elif request.get("args"):
            message = f"pipeline {request['name']!r} runs in batches: pass keyword arguments, not args"
            error = protocol.encode_error(request.get("id"), protocol.BAD_REQUEST, message)
            answered[job] = (tasks.ERROR, [error])
        else:
            batched.append((job, request))
    if batched:
        try:
            inputs = [request.get("kwargs", {}) for _, request in batched]
            outcomes, info = run_batch(cache, batched[0][1]["name"], inputs, max_batch)
        except Exception as exc:  # the pipeline did not load: every request is told why
            outcomes, info = [(False, failure(exc))] * len(batched), {}
        for (job, request), outcome in zip(batched, outcomes, strict=True):
            answered[job] = reply(request, outcome, {**info, **where}, limit)
    return [(job, *answered[job]) for job, _, _ in runs]


def reply(
    request: dict[str, Any], outcome: Outcome, info: dict[str, Any], limit: int
) -> tuple[bytes, list[Any]]:
    ok, value = outcome
    if not ok:
        return tasks.ERROR, [protocol.encode_error(request.get("id"), *value)]
    return result_reply(request, {"output": value, **info}, limit)  # one output's failure is its own
